"""The data assets under Dagster: the main command on the demo corpus (a real `dagster asset
materialize` in a temporary DAGSTER_HOME), raw_corpus on the real LibriSpeech layout, and the
ways corpus partitions get registered."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from pipelines.assets.data import raw_corpus, trimmed_wavs
from pipelines.corpora import corpus_partitions, corpus_registry_sensor
from pipelines.corpora import main as corpora_main
from pipelines.resources import SpkencPaths
from spkenc.shards import read_shard_meta

REPO = Path(__file__).resolve().parents[1]


def latest_metadata(instance: dg.DagsterInstance, asset: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    assert event is not None, f"{asset} was not materialized"
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def check_evaluation(instance: dg.DagsterInstance, name: str):
    record = instance.get_latest_asset_check_evaluation_record(dg.AssetCheckKey(dg.AssetKey("mel_shards"), name))
    assert record is not None, f"check {name} did not run"
    return record.event.dagster_event.event_specific_data


def write_registry(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> dict:
    """The README's main command for the data part, run as a user would from a shell."""
    home, work = tmp_path_factory.mktemp("dagster_home"), tmp_path_factory.mktemp("work")
    env = {**os.environ, "DAGSTER_HOME": str(home), "SPKENC_WORK_DIR": str(work),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("SPKENC_CORPORA", None)
    bin_dir = Path(sys.executable).parent
    commands = [
        [sys.executable, "-m", "pipelines.corpora", "sync"],
        [str(bin_dir / "dagster"), "asset", "materialize", "-m", "pipelines.definitions",
         "--select", "raw_corpus,trimmed_wavs,mel_shards", "--partition", "demo_tiny"],
    ]
    for command in commands:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return {"home": home, "work": work}


@pytest.mark.slow
def test_the_main_command_writes_manifest_trimmed_wavs_and_shards(demo_run):
    work = demo_run["work"]
    manifest = pq.read_table(work / "corpora" / "demo_tiny" / "manifest.parquet").to_pylist()
    assert len(manifest) == 192 and {r["split"] for r in manifest} == {"train", "heldout"}
    assert {r["speaker_id"] for r in manifest} == {p.name for p in (REPO / "data" / "demo_tiny").iterdir() if p.is_dir()}
    wavs = list((work / "trimmed" / "demo_tiny").rglob("*.wav"))
    trim_rejects = pq.read_table(work / "rejects" / "demo_tiny" / "trim.parquet").to_pylist()
    assert len(wavs) + len(trim_rejects) == 192
    assert {r["reason"] for r in trim_rejects} <= {"under 1.6 s of speech", "empty after trimming"}
    shards = sorted((work / "mels" / "demo_tiny").glob("*.parquet"))
    assert len(shards) == 24
    metas = [read_shard_meta(p) for p in shards]
    assert all(m.corpus == "demo_tiny" and m.n_frames.min() >= 160 for m in metas)
    assert sum(len(m.n_frames) for m in metas) == len(wavs)


@pytest.mark.slow
def test_the_main_command_records_metadata_and_checks(demo_run, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(demo_run["home"]))
    with dg.DagsterInstance.get() as instance:
        raw = latest_metadata(instance, "raw_corpus")
        assert (raw["n_files"], raw["n_speakers"], raw["n_rejects"], raw["layout"]) == (192, 24, 0, "speaker_folders")
        assert raw["n_train_speakers"] + raw["n_heldout_speakers"] == 24
        trimmed = latest_metadata(instance, "trimmed_wavs")
        assert trimmed["n_kept"] + trimmed["n_rejected"] == 192 and trimmed["n_processed"] == 192
        assert 0 < trimmed["hours_after"] < trimmed["hours_before"] == pytest.approx(raw["hours"])
        assert trimmed["duration_histogram"].startswith("![trimmed durations](data:image/png;base64,iVBORw0KGgo")
        shards = latest_metadata(instance, "mel_shards")
        assert shards["n_speakers"] == 24 and shards["n_utterances"] == trimmed["n_outputs"]
        on_disk = sum(p.stat().st_size for p in (demo_run["work"] / "mels" / "demo_tiny").glob("*.parquet"))
        assert shards["bytes_on_disk"] == on_disk and shards["n_frames"] > 160 * shards["n_utterances"]

        assert check_evaluation(instance, "mel_frames_are_finite").passed
        assert check_evaluation(instance, "shards_have_full_partial").passed
        enough = check_evaluation(instance, "shards_have_enough_utterances")
        # The demo corpus has 8 utterances per speaker, fewer than a 10-utterance batch asks for.
        assert not enough.passed and enough.severity == dg.AssetCheckSeverity.WARN
        short = enough.metadata["short_speakers"].value
        assert len(short) == 24 and all(0 < n <= 8 for n in short.values())


@pytest.mark.slow
def test_a_rerun_of_trimmed_wavs_skips_unchanged_files(demo_run, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(demo_run["home"]))
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize([trimmed_wavs], partition_key="demo_tiny", instance=instance,
                                resources={"paths": SpkencPaths(work_dir=str(demo_run["work"]))})
        assert result.success
        again = latest_metadata(instance, "trimmed_wavs")
    assert (again["n_processed"], again["n_skipped"]) == (0, 192)


def test_raw_corpus_on_the_real_librispeech_layout(shared_data, tmp_path):
    root = shared_data / "LibriSpeech"
    registry = write_registry(tmp_path / "corpora.yaml", f"corpora:\n  librispeech:\n    root: {root}\n    layout: auto\n")
    flacs = sorted(root.rglob("*.flac"))
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(corpus_partitions.name, ["librispeech"])
        result = dg.materialize([raw_corpus], partition_key="librispeech", instance=instance,
                                resources={"paths": SpkencPaths(work_dir=str(tmp_path / "work"), corpora_file=str(registry))})
        assert result.success
        metadata = latest_metadata(instance, "raw_corpus")
    rows = pq.read_table(tmp_path / "work" / "corpora" / "librispeech" / "manifest.parquet").to_pylist()
    assert metadata["layout"] == "librispeech" and metadata["n_files"] == len(flacs) == len(rows) and metadata["n_rejects"] == 0
    for row in rows:
        speaker, chapter, _ = row["utterance_id"].split("-")
        assert Path(row["path"]).parts[-3:-1] == (speaker, chapter) and row["speaker_id"] == speaker
        assert (row["format"], row["sample_rate"], row["channels"]) == ("FLAC", 16000, 1) and row["duration_s"] > 1
    speakers = {r["speaker_id"] for r in rows}
    assert metadata["n_speakers"] == len(speakers) == len({p.parts[-3] for p in flacs})
    assert 0.1 < metadata["n_heldout_speakers"] / len(speakers) < 0.3


def test_raw_corpus_refuses_an_unregistered_partition(tmp_path):
    registry = write_registry(tmp_path / "corpora.yaml", "corpora:\n  demo:\n    root: /nowhere\n")
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(corpus_partitions.name, ["ghost"])
        result = dg.materialize([raw_corpus], partition_key="ghost", instance=instance, raise_on_error=False,
                                resources={"paths": SpkencPaths(work_dir=str(tmp_path), corpora_file=str(registry))})
    assert not result.success
    failure = [e for e in result.all_events if e.is_step_failure][0]
    assert "corpus 'ghost' is not in" in failure.step_failure_data.error.message


def test_the_sensor_adds_registered_corpora(tmp_path):
    registry = write_registry(tmp_path / "corpora.yaml", "corpora:\n  a:\n    root: x\n  b:\n    root: y\n")
    paths = SpkencPaths(corpora_file=str(registry))
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(corpus_partitions.name, ["a"])
        result = corpus_registry_sensor(dg.build_sensor_context(instance=instance, resources={"paths": paths}))
        assert [r.partition_keys for r in result.dynamic_partitions_requests] == [["b"]]
        instance.add_dynamic_partitions(corpus_partitions.name, ["b"])
        again = corpus_registry_sensor(dg.build_sensor_context(instance=instance, resources={"paths": paths}))
        assert not again.dynamic_partitions_requests and "all 2 registered corpora" in again.skip_reason.skip_message


def test_the_sync_command_adds_and_prunes_partitions(tmp_path, monkeypatch):
    registry = write_registry(tmp_path / "corpora.yaml", "corpora:\n  a:\n    root: x\n  b:\n    root: y\n")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPKENC_CORPORA", str(registry))
    (tmp_path / "home").mkdir()
    assert corpora_main(["sync"]) == 0
    write_registry(registry, "corpora:\n  b:\n    root: y\n")
    assert corpora_main(["sync"]) == 0
    with dg.DagsterInstance.get() as instance:
        assert sorted(instance.get_dynamic_partitions("corpus")) == ["a", "b"]
    assert corpora_main(["sync", "--prune"]) == 0
    with dg.DagsterInstance.get() as instance:
        assert instance.get_dynamic_partitions("corpus") == ["b"]
    monkeypatch.setenv("SPKENC_CORPORA", str(tmp_path / "missing.yaml"))
    assert corpora_main(["sync"]) == 1
