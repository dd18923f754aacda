"""`spkenc embed` and `spkenc verify`, run for real on demo speech (in-process and as a subprocess)."""

import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import resemblyzer
import soundfile as sf
import torch

from spkenc.cli import main

PRETRAINED = str(Path(resemblyzer.__file__).parent / "pretrained.pt")
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def mixed_dir(tmp_path, demo_files) -> Path:
    """Three real utterances (two in a subfolder), a zero-byte .wav, text renamed .flac, silence, a .txt."""
    root = tmp_path / "inputs"
    (root / "sub").mkdir(parents=True)
    shutil.copy(demo_files[0], root / "a.flac")
    shutil.copy(demo_files[1], root / "sub" / "b.flac")
    shutil.copy(demo_files[8], root / "sub" / "c.flac")
    (root / "empty.wav").write_bytes(b"")
    (root / "notes.flac").write_text("not audio, just text\n")
    sf.write(root / "silence.wav", np.zeros(32000, dtype=np.float32), 16000)
    (root / "readme.txt").write_text("ignored: not an audio suffix\n")
    return root


def read_rows(path: Path) -> dict[str, dict]:
    table = pq.read_table(path)
    assert table.schema.field("embedding").type.value_type == "float"
    assert str(table.schema.field("n_partials").type) == "int32"
    return {Path(row["path"]).name: row for row in table.to_pylist()}


def test_embed_writes_a_row_per_file_and_reports_bad_ones(mixed_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="spkenc")
    out = tmp_path / "out" / "embeds.parquet"
    code = main(["embed", str(mixed_dir), "--checkpoint", PRETRAINED, "--output", str(out), "--batch-size", "8"])
    assert code == 0
    rows = read_rows(out)
    assert sorted(rows) == ["a.flac", "b.flac", "c.flac", "empty.wav", "notes.flac", "silence.wav"]
    good = {name: np.array(rows[name]["embedding"], dtype=np.float32) for name in ("a.flac", "b.flac", "c.flac")}
    for name, embed in good.items():
        assert rows[name]["error"] is None
        assert embed.shape == (256,)
        assert abs(np.linalg.norm(embed) - 1) < 1e-5
        assert rows[name]["n_partials"] >= 1 and 0.5 < rows[name]["duration_s"] < 10
    # a and b are the same speaker, c another one.
    assert good["a.flac"] @ good["b.flac"] > good["a.flac"] @ good["c.flac"]
    for name, reason in [("empty.wav", "empty.wav"), ("notes.flac", "notes.flac"), ("silence.wav", "no speech")]:
        assert rows[name]["embedding"] is None and rows[name]["n_partials"] == 0
        assert reason in rows[name]["error"]
    assert not list(out.parent.glob(".*tmp")), "the temporary file was left behind"
    assert "3 embedded, 3 failed" in caplog.text


def test_embed_matches_the_library(mixed_dir, tmp_path):
    from spkenc.audio import preprocess_wav
    from spkenc.inference import Embedder

    out = tmp_path / "embeds.parquet"
    assert main(["embed", str(mixed_dir / "a.flac"), "--checkpoint", PRETRAINED, "--output", str(out), "--rate", "1.3"]) == 0
    row = read_rows(out)["a.flac"]
    wav = preprocess_wav(mixed_dir / "a.flac")
    expected = Embedder.from_checkpoint(PRETRAINED, device="cpu").embed_utterance(wav, rate=1.3)
    np.testing.assert_allclose(row["embedding"], expected, atol=1e-5)
    assert row["duration_s"] == pytest.approx(len(wav) / 16000)


def test_embed_with_nothing_embeddable_fails(mixed_dir, tmp_path, caplog):
    out = tmp_path / "embeds.parquet"
    bad = [str(mixed_dir / "empty.wav"), str(mixed_dir / "notes.flac")]
    assert main(["embed", *bad, "--checkpoint", PRETRAINED, "--output", str(out)]) == 1
    assert not out.exists()
    assert "none of the 2 file(s) could be embedded" in caplog.text
    assert main(["embed", str(tmp_path / "no_audio_here"), "--checkpoint", PRETRAINED, "--output", str(out)]) == 1


class _Payload:
    """Unpickling this would run os.system: a checkpoint must never be able to do that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_refused_or_missing_checkpoint_fails_with_a_message(mixed_dir, tmp_path, caplog):
    evil, marker = tmp_path / "evil.pt", tmp_path / "payload_ran"
    torch.save({"model_state": {}, "step": 0, "payload": _Payload(marker)}, evil, pickle_module=pickle)
    out = tmp_path / "embeds.parquet"
    assert main(["embed", str(mixed_dir), "--checkpoint", str(evil), "--output", str(out)]) == 1
    assert not marker.exists(), "the checkpoint's payload ran"
    assert str(evil) in caplog.text and not out.exists()
    caplog.clear()
    missing = tmp_path / "missing.pt"
    assert main(["verify", str(mixed_dir / "a.flac"), str(mixed_dir / "a.flac"), "--checkpoint", str(missing)]) == 1
    assert str(missing) in caplog.text


@pytest.mark.parametrize(
    "argv",
    [
        ["embed", "--checkpoint", PRETRAINED, "--output", "o.parquet"],  # no input
        ["verify", "a.wav", "--checkpoint", PRETRAINED],  # one file
        ["embed", "x.wav", "--checkpoint", PRETRAINED, "--output", "o.parquet", "--rate", "fast"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, message",
    [(["--rate", "0.1"], "rate 0.1"), (["--device", "nonsense"], "device 'nonsense'"), (["--batch-size", "0"], "batch_size")],
)
def test_bad_option_values_fail_at_once(mixed_dir, tmp_path, caplog, option, message):
    out = tmp_path / "embeds.parquet"
    assert main(["embed", str(mixed_dir), "--checkpoint", PRETRAINED, "--output", str(out), *option]) == 1
    assert message in caplog.text and not out.exists()


def test_verify_scores_same_speaker_above_different_speaker(demo_files, capsys):
    scores = []
    for other in (demo_files[1], demo_files[8]):
        assert main(["verify", str(demo_files[0]), str(other), "--checkpoint", PRETRAINED]) == 0
        printed = capsys.readouterr().out.strip()
        scores.append(float(printed))
        assert -1.0 <= scores[-1] <= 1.0 and len(printed.split(".")[1]) == 4
    assert scores[0] > scores[1]


def test_verify_unreadable_or_silent_file_fails(mixed_dir, caplog):
    for bad, reason in [("empty.wav", "empty.wav"), ("silence.wav", "no speech")]:
        caplog.clear()
        code = main(["verify", str(mixed_dir / "a.flac"), str(mixed_dir / bad), "--checkpoint", PRETRAINED])
        assert code == 1
        assert reason in caplog.text


def test_module_entry_point_runs_embed_and_reports_errors_on_stderr(mixed_dir, tmp_path):
    out = tmp_path / "embeds.parquet"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run(
        [sys.executable, "-m", "spkenc", "embed", str(mixed_dir / "a.flac"), str(mixed_dir / "empty.wav"),
         "--checkpoint", PRETRAINED, "--output", str(out)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert sorted(read_rows(out)) == ["a.flac", "empty.wav"]
    refused = subprocess.run(
        [sys.executable, "-m", "spkenc", "verify", str(mixed_dir / "a.flac"), str(mixed_dir / "a.flac"),
         "--checkpoint", str(tmp_path / "missing.pt")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert refused.returncode == 1
    error_lines = [line for line in refused.stderr.splitlines() if line.startswith("ERROR")]
    assert len(error_lines) == 1 and "missing.pt" in error_lines[0]
    assert refused.stdout == ""
