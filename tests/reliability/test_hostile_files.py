"""Issue 7, part 4: a checkpoint carrying a pickle payload, a manifest that points outside
its corpus, and shards written with other audio parameters or another schema version."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hostile_corpus import REPO, child_env, spkenc_cli

from spkenc.checkpoint import CheckpointError
from spkenc.config import AudioConfig
from spkenc.corpus import scan_corpus
from spkenc.inference import Embedder
from spkenc.shards import write_shard


class Payload:
    """Unpickling this runs `touch marker` in whatever process loads it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture
def evil_checkpoint(tmp_path) -> tuple[Path, Path]:
    from spkenc.model import SpeakerEncoder

    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pt"
    torch.save({"step": 1, "model_state": SpeakerEncoder().state_dict(), "extra": Payload(marker)}, path)
    return path, marker


def _assert_payload_is_real(path: Path, marker: Path) -> None:
    """The payload does run under an unrestricted load: the refusals above were not vacuous."""
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_embedder_refuses_a_pickle_payload(evil_checkpoint):
    path, marker = evil_checkpoint
    with pytest.raises(CheckpointError, match=f"^{path}: .*refused"):
        Embedder.from_checkpoint(path, device="cpu")
    _assert_payload_is_real(path, marker)


def test_spkenc_embed_refuses_a_pickle_payload(evil_checkpoint, demo_files, tmp_path):
    path, marker = evil_checkpoint
    done = subprocess.run(spkenc_cli("embed", str(demo_files[0]), "--checkpoint", str(path), "--output",
                                     str(tmp_path / "e.parquet"), "--device", "cpu"),
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and f"{path}: " in done.stderr and "refused" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "e.parquet").exists()
    _assert_payload_is_real(path, marker)


def test_spkenc_train_init_from_refuses_a_pickle_payload(evil_checkpoint, tmp_path):
    path, marker = evil_checkpoint
    mel = np.random.default_rng(0).random((200, 40), dtype=np.float32)
    for speaker in ("a", "b"):
        write_shard(tmp_path / "shards" / f"{speaker}.parquet", speaker, [(f"u{k}", mel + k, "x.wav") for k in range(3)])
    done = subprocess.run(spkenc_cli("train", str(tmp_path / "shards"), "--out", str(tmp_path / "run"), "--steps", "1",
                                     "--init-from", str(path), "--speakers-per-batch", "2", "--utterances-per-speaker", "2",
                                     "--device", "cpu", "--threads", "1"),
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and f"{path}: " in done.stderr and "refused" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "run" / "encoder.pt").exists()
    _assert_payload_is_real(path, marker)


@pytest.fixture
def outside_manifest(demo_files, tmp_path) -> tuple[Path, list[Path]]:
    """A corpus whose manifest lists one file inside it, one through `../` and one absolute
    path outside it."""
    import shutil

    root, outside = tmp_path / "corpus", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    shutil.copy(demo_files[0], root / "inside.flac")
    for name in ("dotdot.flac", "absolute.flac"):
        shutil.copy(demo_files[1], outside / name)
    (root / "manifest.csv").write_text("path,speaker_id\ninside.flac,s1\n../elsewhere/dotdot.flac,s1\n"
                                       f"{outside / 'absolute.flac'},s2\n")
    return root, [outside / "dotdot.flac", outside / "absolute.flac"]


def test_a_manifest_pointing_outside_its_root_is_rejected_unless_allowed(outside_manifest):
    root, outside = outside_manifest
    scan = scan_corpus(root, layout="manifest")
    assert [r["path"] for r in scan.rows] == [str((root / "inside.flac").resolve())]
    reasons = {r["path"]: r["reason"] for r in scan.rejects}
    for path in outside:
        assert "outside the corpus root" in reasons[str(path)] and "allow_outside_root" in reasons[str(path)]
    allowed = scan_corpus(root, layout="manifest", options={"allow_outside_root": True})
    assert sorted(r["path"] for r in allowed.rows) == sorted(map(str, [(root / "inside.flac").resolve(), *outside]))
    assert allowed.rejects == []


def test_spkenc_preprocess_rejects_manifest_paths_outside_the_root(outside_manifest, tmp_path):
    root, outside = outside_manifest
    out = tmp_path / "out"
    done = subprocess.run(spkenc_cli("preprocess", str(root), str(out), "--layout", "manifest", "--workers", "1"),
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rejects = {r["path"]: r["reason"] for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    assert all("outside the corpus root" in rejects[str(p)] for p in outside)
    assert [r["path"] for r in pq.read_table(out / "manifest.parquet").to_pylist()] == [str((root / "inside.flac").resolve())]


def _shards(folder: Path, audio: AudioConfig = AudioConfig()) -> Path:
    mel = np.random.default_rng(0).random((200, 40), dtype=np.float32)
    for speaker in ("a", "b"):
        write_shard(folder / f"{speaker}.parquet", speaker, [(f"u{k}", mel + k, "x.wav") for k in range(3)], audio_config=audio)
    return folder


def _set_schema_version(path: Path, version: str) -> None:
    table = pq.read_table(path)
    metadata = {**table.schema.metadata, b"spkenc.schema_version": version.encode()}
    pq.write_table(table.replace_schema_metadata(metadata), path, row_group_size=1)


@pytest.mark.parametrize("fault", ["audio parameters", "schema version"])
def test_spkenc_train_refuses_a_shard_that_differs_from_what_it_expects(tmp_path, fault):
    folder = tmp_path / "shards"
    if fault == "audio parameters":
        _shards(folder, AudioConfig(mel_window_step_ms=20))
        message = "'mel_window_step_ms': 20"
    else:
        _shards(folder)
        _set_schema_version(folder / "b.parquet", "999")
        message = "schema version"
    done = subprocess.run(spkenc_cli("train", str(folder), "--out", str(tmp_path / "run"), "--steps", "1",
                                     "--speakers-per-batch", "2", "--utterances-per-speaker", "2", "--device", "cpu",
                                     "--threads", "1", "--hidden-size", "16", "--n-layers", "1", "--embedding-size", "16"),
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"ERROR spkenc: {folder}/" in done.stderr and message in done.stderr, done.stderr[-2000:]
    assert "differ" in done.stderr or "schema version" in done.stderr
    assert not (tmp_path / "run" / "encoder.pt").exists()
