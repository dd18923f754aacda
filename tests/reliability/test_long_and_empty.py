"""Issue 7, part 1, the two cases that need a corpus of their own: a 1-hour recording, and a
corpus folder that holds no audio at all."""

import subprocess
import time
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
import resemblyzer
from hostile_corpus import LONG_CASE, REPO, child_env, leftovers, spkenc_cli, write_hour

from pipelines.assets.data import mel_shards, raw_corpus, trimmed_wavs
from pipelines.corpora import corpus_partitions
from pipelines.resources import SpkencPaths
from spkenc.config import DataConfig
from spkenc.shards import read_shard_meta

CKPT = Path(resemblyzer.__file__).parent / "pretrained.pt"


@pytest.mark.slow
def test_a_one_hour_file_is_preprocessed_in_segments_and_embedded(demo_files, tmp_path):
    root = tmp_path / "corpus"
    (root / "long").mkdir(parents=True)
    hour = root / LONG_CASE.path
    write_hour(hour, demo_files)
    out = tmp_path / "out"
    started = time.monotonic()
    done = subprocess.run(spkenc_cli("preprocess", str(root), str(out), "--layout", "speaker_folders", "--workers", "2"),
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    preprocess_s = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    n_segments = int(3600 / DataConfig().max_segment_s)
    entry = pq.read_table(out / "trimmed" / ".index.parquet").to_pylist()[0]
    assert entry["reason"] is None and entry["outputs"] == [f"one_hour.seg{k:03d}" for k in range(n_segments)]
    meta = read_shard_meta(out / "mels" / "long.parquet")
    assert len(meta.n_frames) == n_segments and meta.n_frames.sum() > 0.5 * 3600 * 100
    assert leftovers(out) == []

    started = time.monotonic()
    output = tmp_path / "hour.parquet"
    done = subprocess.run(spkenc_cli("embed", str(hour), "--checkpoint", str(CKPT), "--output", str(output), "--device", "cpu"),
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    embed_s = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    row = pq.read_table(output).to_pylist()[0]
    assert row["error"] is None and len(row["embedding"]) == 256 and row["n_partials"] > 1000 and row["duration_s"] > 1800
    print(f"1-hour file: spkenc preprocess {preprocess_s:.1f} s, spkenc embed {embed_s:.1f} s")


@pytest.fixture
def empty_corpus(tmp_path) -> Path:
    root = tmp_path / "empty"
    (root / "spk").mkdir(parents=True)
    (root / "spk" / "notes.txt").write_text("no audio here\n")
    return root


def test_spkenc_preprocess_on_a_corpus_without_audio_fails_clearly(empty_corpus, tmp_path):
    done = subprocess.run(spkenc_cli("preprocess", str(empty_corpus), str(tmp_path / "out"), "--workers", "1"),
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and f"nothing usable came out of {empty_corpus}" in done.stderr, done.stderr[-2000:]
    assert leftovers(tmp_path / "out") == []


def test_spkenc_embed_on_a_folder_without_audio_fails_clearly(empty_corpus, tmp_path):
    output = tmp_path / "e.parquet"
    done = subprocess.run(spkenc_cli("embed", str(empty_corpus), "--checkpoint", str(CKPT), "--output", str(output)),
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and f"no audio files in {empty_corpus}" in done.stderr, done.stderr[-2000:]
    assert not output.exists()


def test_the_data_assets_on_a_corpus_without_audio_fail_clearly(empty_corpus, tmp_path):
    registry = tmp_path / "corpora.yaml"
    registry.write_text(f"corpora:\n  empty:\n    root: {empty_corpus}\n    layout: speaker_folders\n")
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(corpus_partitions.name, ["empty"])
        result = dg.materialize([raw_corpus, trimmed_wavs, mel_shards], partition_key="empty", instance=instance,
                                raise_on_error=False,
                                resources={"paths": SpkencPaths(work_dir=str(tmp_path / "work"), corpora_file=str(registry))})
    assert not result.success
    failures = [e.step_failure_data.error.message for e in result.all_events if e.is_step_failure]
    assert len(failures) == 1 and "corpus 'empty': no usable utterance left for mel shards" in failures[0]
    assert pq.read_table(tmp_path / "work" / "corpora" / "empty" / "manifest.parquet").num_rows == 0
    assert leftovers(tmp_path / "work") == []
