"""Issue 7, part 3: two real `dagster asset materialize` runs of one corpus partition at the
same time, on one Dagster instance and one work folder, leave consistent, complete outputs."""

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from hostile_corpus import REPO, child_env, leftovers

from spkenc.preprocess import TRIM_INDEX, trimmed_utterances
from spkenc.shards import read_shard, read_shard_meta

CORPUS = "concurrent"
N_SPEAKERS = 3
# The bookkeeping files the stages keep under the work folder; any other dot-name is a temp.
KNOWN_DOT_FILES = {".lock", TRIM_INDEX, ".index.json"}
ONE_WORKER = {"ops": {"trimmed_wavs": {"config": {"workers": 1}}, "mel_shards": {"config": {"workers": 1}}}}


def _copy_speakers(demo_files: list[Path], root: Path) -> list[Path]:
    """The first N_SPEAKERS demo speakers, copied whole under `root/<speaker>/`."""
    speakers = sorted({p.parent.name for p in demo_files})[:N_SPEAKERS]
    copies = []
    for path in demo_files:
        if path.parent.name in speakers:
            target = root / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
            copies.append(target)
    return copies


def _counts(record) -> dict:
    """The integer metadata (`n_...`) of one materialization record."""
    metadata = record.asset_materialization.metadata
    return {k: v.value for k, v in metadata.items() if k.startswith("n_")}


@pytest.mark.slow
def test_two_simultaneous_materializations_of_one_partition_leave_consistent_outputs(demo_files, tmp_path):
    sources = _copy_speakers(demo_files, tmp_path / "corpus")
    registry = tmp_path / "corpora.yaml"
    registry.write_text(f"corpora:\n  {CORPUS}:\n    root: {tmp_path / 'corpus'}\n    layout: speaker_folders\n")
    home, work = tmp_path / "dagster_home", tmp_path / "work"
    home.mkdir()
    env = child_env(DAGSTER_HOME=str(home), SPKENC_WORK_DIR=str(work), SPKENC_CORPORA=str(registry),
                    MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")
    sync = subprocess.run([sys.executable, "-m", "pipelines.corpora", "sync"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert sync.returncode == 0, sync.stderr[-3000:]

    command = [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "pipelines.definitions",
               "--select", "raw_corpus,trimmed_wavs,mel_shards", "--partition", CORPUS,
               "--config-json", json.dumps(ONE_WORKER)]
    logs = [tmp_path / f"run{k}.log" for k in range(2)]  # files, not pipes: nobody reads while both run
    procs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
             for log in logs]
    try:
        codes = [proc.wait(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for code, log in zip(codes, logs):
        assert code == 0, f"{log.name} exited {code}:\n{log.read_text()[-4000:]}"

    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.get_run_records()
        trims = [_counts(r) for r in instance.fetch_materializations(dg.AssetKey("trimmed_wavs"), limit=10).records]
        mels = [_counts(r) for r in instance.fetch_materializations(dg.AssetKey("mel_shards"), limit=10).records]
    assert len(records) == 2 and all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records)
    first, second = sorted(records, key=lambda r: r.start_time)
    assert second.start_time < first.end_time, "the two runs did not overlap: nothing concurrent was tested"
    # The folder locks make the runs take turns: one does the work, the other finds it done.
    assert len(trims) == len(mels) == 2
    assert sorted(t["n_processed"] for t in trims) == [0, len(sources)]
    assert sorted(m["n_written"] for m in mels) == [0, N_SPEAKERS]
    assert trims[0]["n_outputs"] == trims[1]["n_outputs"] and mels[0]["n_utterances"] == mels[1]["n_utterances"]

    manifest = pq.read_table(work / "corpora" / CORPUS / "manifest.parquet").to_pylist()
    assert sorted(r["path"] for r in manifest) == sorted(str(p) for p in sources)
    trimmed_dir, mels_dir = work / "trimmed" / CORPUS, work / "mels" / CORPUS
    entries = pq.read_table(trimmed_dir / TRIM_INDEX).to_pylist()
    assert sorted(e["source"] for e in entries) == sorted(str(p) for p in sources)
    assert not [e for e in entries if e["reason"] and ("worker" in e["reason"] or "error" in e["reason"])]
    trim_rejects = pq.read_table(work / "rejects" / CORPUS / "trim.parquet").to_pylist()
    assert sorted(r["path"] for r in trim_rejects) == sorted(e["source"] for e in entries if e["reason"])

    speakers = trimmed_utterances(trimmed_dir)
    expected_wavs = {path for utterances in speakers.values() for _, path, _ in utterances}
    assert len(expected_wavs) >= 2 * N_SPEAKERS and set(trimmed_dir.rglob("*.wav")) == expected_wavs
    for path in expected_wavs:
        wav, rate = sf.read(path, dtype="float32")
        assert rate == 16000 and wav.ndim == 1 and len(wav) > 0 and np.isfinite(wav).all(), path

    shards = sorted(mels_dir.glob("*.parquet"))
    assert [p.stem for p in shards] == sorted(speakers)
    for path in shards:
        shard = read_shard(path)
        assert shard.speaker_id == path.stem and read_shard_meta(path).corpus == CORPUS
        assert shard.utterance_ids == [u for u, _, _ in speakers[path.stem]], path
        assert all(m.ndim == 2 and m.shape[1] == 40 and len(m) > 0 and np.isfinite(m).all() for m in shard.mels)

    stray = [p for p in work.rglob("*") if p.name.startswith(".") and p.name not in KNOWN_DOT_FILES]
    assert leftovers(work) == [] and stray == []
