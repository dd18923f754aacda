"""Issue 7, parts 2 and 3: kill -9 of preprocessing and of training, a full disk, and two
preprocessing runs of one corpus at once."""

import errno
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from hostile_corpus import REPO, assert_outputs_open, child_env, leftovers, spkenc_cli

from spkenc.config import AudioConfig
from spkenc.shards import read_shard, write_shard
from spkenc.stages import OutputWriteError, write_wav_atomic

SKIPPED = re.compile(r"(\d+) skipped as unchanged")


def copy_demo(demo_files: list[Path], root: Path, n_speakers: int, n_copies: int = 1) -> Path:
    """The first `n_speakers` demo speakers, `n_copies` times (copy k as speaker `<spk>_<k>`)."""
    speakers = sorted({p.parent.name for p in demo_files})[:n_speakers]
    for k in range(n_copies):
        for path in demo_files:
            if path.parent.name in speakers:
                folder = root / (path.parent.name if n_copies == 1 else f"{path.parent.name}_{k}")
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, folder / path.name)
    return root


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this test started (the CLI and its pool workers)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_kill_9_mid_partition_then_rerun_redoes_only_unfinished_work(demo_files, tmp_path):
    # Enough files that trimming outlasts the first index save (every 2 s) on a quiet machine.
    n_copies = 10
    n_files = 192 * n_copies
    corpus = copy_demo(demo_files, tmp_path / "corpus", 24, n_copies=n_copies)
    out = tmp_path / "out"
    command = spkenc_cli("preprocess", str(corpus), str(out), "--layout", "speaker_folders", "--workers", "1")
    log = tmp_path / "killed.log"  # a file, not a pipe: an unread pipe would block the progress bar
    proc = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=log.open("w"),
                            start_new_session=True)
    index = out / "trimmed" / ".index.parquet"
    deadline = time.monotonic() + 180
    try:
        while proc.poll() is None and time.monotonic() < deadline and not index.exists():
            time.sleep(0.05)
    finally:
        _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill: {log.read_text()[-2000:]}"
    assert not (out / "mels").exists()  # killed inside the trim stage
    done_before = len(pq.read_table(index))
    assert 0 < done_before < n_files

    rerun = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    skipped = int(SKIPPED.search(rerun.stderr).group(1))
    assert done_before <= skipped < n_files, rerun.stderr[-2000:]
    entries = pq.read_table(index).to_pylist()
    assert len(entries) == n_files and not [e for e in entries if e["reason"] and "worker" in e["reason"]]
    assert leftovers(out) == []
    assert assert_outputs_open(out) > n_files * 0.8
    shards = sorted((out / "mels").glob("*.parquet"))
    assert len(shards) == 24 * n_copies and all(read_shard(p).mels for p in shards)


def _tiny_shards(demo_files: list[Path], folder: Path, n_speakers: int = 5) -> Path:
    from spkenc.audio import preprocess_wav, wav_to_mel

    by_speaker: dict[str, list] = {}
    for path in demo_files:
        mel = wav_to_mel(preprocess_wav(path))
        if len(mel) >= 160:
            by_speaker.setdefault(path.parent.name, []).append((path.stem, mel, str(path)))
    for speaker, utterances in [(s, u) for s, u in sorted(by_speaker.items()) if len(u) >= 4][:n_speakers]:
        write_shard(folder / f"{speaker}.parquet", speaker, utterances, corpus="demo")
    return folder


@pytest.fixture(scope="module")
def train_shards(demo_files, tmp_path_factory) -> Path:
    return _tiny_shards(demo_files[:64], tmp_path_factory.mktemp("shards"))


def _step(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, weights_only=True, map_location="cpu")["step"])


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["mid-run", "during a checkpoint write"])
def test_kill_9_of_training_then_resume_finishes_at_the_requested_step(train_shards, tmp_path, moment):
    run = tmp_path / "run"
    model = [] if moment == "during a checkpoint write" else ["--hidden-size", "32", "--n-layers", "1", "--embedding-size", "32"]
    args = [str(train_shards), "--out", str(run), "--speakers-per-batch", "2", "--utterances-per-speaker", "2",
            "--save-every", "1" if model == [] else "2", "--device", "cpu", "--threads", "1", *model]
    log = tmp_path / "killed.log"
    proc = subprocess.Popen(spkenc_cli("train", *args, "--steps", "100000"), cwd=REPO, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True)
    caught, deadline = None, time.monotonic() + 120
    try:
        while caught is None and proc.poll() is None and time.monotonic() < deadline:
            if (run / "encoder.pt").exists():
                temp = [p.name for p in run.iterdir() if p.name not in ("encoder.pt", "backups")]
                if moment == "during a checkpoint write" and temp or moment == "mid-run" and _step(run / "encoder.pt") >= 4:
                    os.killpg(proc.pid, signal.SIGKILL)
                    caught = temp or ["mid-run"]
            time.sleep(0.0005 if model == [] else 0.05)
    finally:
        _kill_group(proc)
    assert caught, f"never reached the kill point: {log.read_text()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    killed_at = _step(run / "encoder.pt")  # the previous checkpoint survived the kill whole
    resumed = subprocess.run(spkenc_cli("train", str(train_shards), "--out", str(run), "--steps", str(killed_at + 2),
                                        "--resume", "--threads", "1"),
                             cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _step(run / "encoder.pt") == killed_at + 2
    assert leftovers(run) == []  # the killed writer's temporary file was cleaned up


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_writing_a_shard_keeps_the_previous_shard(tmp_path, monkeypatch):
    mel = np.random.default_rng(0).random((200, 40), dtype=np.float32)
    path = write_shard(tmp_path / "spk.parquet", "spk", [("u1", mel, "a.wav")])
    before = path.read_bytes()

    def half_written(table, where, **options):  # a few bytes land, then the disk is full
        Path(where).write_bytes(b"PAR1 partial")
        _disk_full()

    monkeypatch.setattr(pq, "write_table", half_written)
    with pytest.raises(OSError, match="No space left on device") as caught:
        write_shard(path, "spk", [("u2", mel[:100], "b.wav")])
    assert caught.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and read_shard(path).utterance_ids == ["u1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spk.parquet"]


def test_a_full_disk_while_writing_a_trimmed_wav_keeps_the_previous_wav(tmp_path, monkeypatch):
    wav = (np.sin(np.arange(16000) / 10) * 0.5).astype(np.float32)
    path = write_wav_atomic(tmp_path / "spk" / "u.wav", wav, 16000)
    before = path.read_bytes()
    real_write = sf.write

    def half_written(file, data, *args, **kwargs):
        real_write(file, data[:100], *args, **kwargs)
        _disk_full()

    monkeypatch.setattr(sf, "write", half_written)
    with pytest.raises(OutputWriteError, match=f"{path}: cannot write \\(No space left on device\\)") as caught:
        write_wav_atomic(path, wav * 0.1, 16000)
    assert caught.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["u.wav"]


def test_a_full_disk_while_trimming_is_an_error_not_a_reject_of_the_source(demo_files, tmp_path, monkeypatch):
    """trim_source (the per-file work of trimmed_wavs) raises instead of blaming the source, so
    the stage reports a processing error and the next run retries the file."""
    from spkenc.stages import trim_source

    monkeypatch.setattr(sf, "write", _disk_full)
    with pytest.raises(OutputWriteError, match=f"{tmp_path / 'out' / 'spk' / 'u.wav'}: cannot write"):
        trim_source(str(demo_files[0]), "spk", "u", str(tmp_path / "out"), AudioConfig().to_dict(), 120.0)
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


@pytest.mark.slow
def test_two_preprocess_runs_of_one_corpus_at_once_leave_consistent_shards(demo_files, tmp_path):
    corpus = copy_demo(demo_files, tmp_path / "corpus", 4)
    out = tmp_path / "out"
    command = spkenc_cli("preprocess", str(corpus), str(out), "--layout", "speaker_folders", "--workers", "1")
    procs = [subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    logs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    # the folder lock serializes them: one trims everything, the other finds it all done
    assert sorted(int(SKIPPED.search(log).group(1)) for log in logs) == [0, 32], logs
    assert leftovers(out) == []
    shards = sorted((out / "mels").glob("*.parquet"))
    assert len(shards) == 4
    index = {e["source"]: e for e in pq.read_table(out / "trimmed" / ".index.parquet").to_pylist()}
    for shard in shards:
        read = read_shard(shard, AudioConfig())
        expected = sorted(u for e in index.values() if e["speaker_id"] == shard.stem for u in e["outputs"])
        assert sorted(read.utterance_ids) == expected and all(np.isfinite(m).all() for m in read.mels)
