"""`torchrun --nproc_per_node=2 -m spkenc train`: gloo on CPU, DDP keeps both ranks identical."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spkenc.config import AudioConfig

PARTIAL = AudioConfig().partial_n_frames
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shard_dir(demo_dir: Path, tmp_path_factory) -> Path:
    """Shards of the first 8 demo speakers with at least 3 utterances of >= 160 frames."""
    from spkenc.audio import preprocess_wav, wav_to_mel
    from spkenc.shards import write_shard

    folder = tmp_path_factory.mktemp("ddp_shards")
    n_written = 0
    for speaker_dir in sorted(p for p in demo_dir.iterdir() if p.is_dir()):
        mels = [(p.stem, wav_to_mel(preprocess_wav(p)), str(p)) for p in sorted(speaker_dir.glob("*.flac"))]
        mels = [u for u in mels if len(u[1]) >= PARTIAL]
        if len(mels) >= 3:
            write_shard(folder / f"{speaker_dir.name}.parquet", speaker_dir.name, mels, corpus="demo")
            n_written += 1
        if n_written == 8:
            return folder
    raise AssertionError("the demo corpus has fewer than 8 speakers with 3 usable utterances")


@pytest.mark.slow
def test_two_gloo_ranks_stay_identical_draw_disjoint_speakers_and_write_one_checkpoint(shard_dir, tmp_path):
    from spkenc.checkpoint import load_checkpoint

    run, dumps = tmp_path / "run", tmp_path / "ranks"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "spkenc", "train",
        str(shard_dir), "--out", str(run), "--steps", "3", "--save-every", "2", "--backup-every", "2",
        "--speakers-per-batch", "3", "--utterances-per-speaker", "3", "--hidden-size", "32", "--n-layers", "1",
        "--embedding-size", "32", "--device", "cpu", "--rank-state-dir", str(dumps),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "") + os.pathsep + str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    rank0, rank1 = (torch.load(dumps / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert rank0["model_state"].keys() == rank1["model_state"].keys()
    for key, value in rank0["model_state"].items():
        assert torch.equal(value, rank1["model_state"][key]), f"{key} differs between ranks"
    assert torch.equal(rank0["loss_state"]["similarity_weight"], rank1["loss_state"]["similarity_weight"])
    assert rank0["speakers"].shape == rank1["speakers"].shape == (3, 3)
    for step in range(3):
        assert not set(rank0["speakers"][step].tolist()) & set(rank1["speakers"][step].tolist())

    checkpoint = load_checkpoint(run / "encoder.pt")
    assert checkpoint["step"] == 3
    for key, value in rank0["model_state"].items():
        assert torch.equal(checkpoint["model_state"][key], value)
    assert sorted(p.name for p in run.iterdir()) == ["backups", "encoder.pt", "loss_curve.png"]
    assert sorted(p.name for p in (run / "backups").iterdir()) == ["encoder_000002.pt"]


def test_threads_are_split_between_local_ranks_and_the_device_defaults_sensibly(monkeypatch):
    from spkenc.distributed import select_device, set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        set_threads(None, world_size=2)
        assert torch.get_num_threads() == max(1, (os.cpu_count() or 1) // 2)
        set_threads(1, world_size=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(None) == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert select_device("cuda", local_rank=1) == torch.device("cuda", 1)
