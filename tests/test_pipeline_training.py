"""`encoder_model` materialized on the demo corpus with the dagster CLI, in a temporary
DAGSTER_HOME and a temporary MLflow SQLite store; the MLflow run and the asset metadata are checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_env import pipeline_env

from spkenc.config import AudioConfig, ModelConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 32, "n_layers": 1, "embedding_size": 32}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(demo_dir: Path, tmp_path_factory) -> dict:
    """A work folder as raw_corpus and mel_shards leave it: the demo manifest and one shard per speaker."""
    from spkenc.audio import preprocess_wav, wav_to_mel
    from spkenc.corpus import scan_corpus
    from spkenc.shards import write_shard

    root = tmp_path_factory.mktemp("pipeline_training")
    work_dir, home = root / "work", root / "dagster_home"
    home.mkdir()
    scan = scan_corpus(demo_dir, layout="speaker_folders", corpus="demo_tiny", heldout_fraction=0.2)
    manifest = work_dir / "corpora" / "demo_tiny" / "manifest.parquet"
    manifest.parent.mkdir(parents=True)
    import pyarrow.parquet as pq

    pq.write_table(scan.manifest_table(), manifest)
    for speaker in sorted({r["speaker_id"] for r in scan.rows}):
        files = sorted(Path(r["path"]) for r in scan.rows if r["speaker_id"] == speaker)
        mels = [(f.stem, wav_to_mel(preprocess_wav(f)), str(f)) for f in files]
        write_shard(work_dir / "mels" / "demo_tiny" / f"{speaker}.parquet", speaker, mels, corpus="demo_tiny")
    env = pipeline_env(work_dir, home)
    return {"work_dir": work_dir, "home": home, "env": env, "train": scan.speakers_in("train"), "heldout": scan.speakers_in("heldout")}


def _materialize(work: dict, config: dict) -> subprocess.CompletedProcess:
    run_config = {"ops": {"encoder_model": {"config": config}}}
    command = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "pipelines.definitions",
               "--select", "encoder_model", "--config-json", json.dumps(run_config)]
    return subprocess.run(command, cwd=REPO, env=work["env"], capture_output=True, text=True, timeout=600)


def test_encoder_model_materializes_and_tracks_its_run_in_mlflow(work, monkeypatch):
    import dagster as dg
    from mlflow import MlflowClient

    from spkenc.sampling import ShardStore, fit_batch_geometry

    done = _materialize(work, {"steps": 4, "log_every": 2, "umap_every": 2, "save_every": 2, **TINY})
    assert done.returncode == 0, done.stderr[-4000:]

    monkeypatch.setenv("DAGSTER_HOME", str(work["home"]))
    with dg.DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("encoder_model"))
        dagster_run_id = event.run_id
        metadata = event.asset_materialization.metadata
    shards = sorted((work["work_dir"] / "mels" / "demo_tiny").glob("*.parquet"))
    train_shards = [p for p in shards if p.stem in work["train"]]
    n, m = fit_batch_geometry(ShardStore(train_shards).usable_counts(), 64, 10)
    assert n < 64, "the demo corpus cannot fill 64 speakers: the asset must shrink the batch"
    assert metadata["batch"].value == f"{n} x {m}" and metadata["n_train_speakers"].value == len(work["train"])
    assert metadata["steps"].value == 4 and metadata["final_loss"].value > 0
    checkpoint = Path(metadata["checkpoint_path"].value)
    assert checkpoint == work["work_dir"] / "models" / dagster_run_id / "encoder.pt" and checkpoint.is_file()
    run_id = metadata["mlflow_run_id"].value
    assert metadata["mlflow_run_url"].value == f"http://127.0.0.1:5000/#/experiments/1/runs/{run_id}"
    assert "](data:image/png;base64,iVBORw0KGgo" in metadata["umap"].value

    client = MlflowClient(tracking_uri=work["env"]["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dagster.run_id"] == dagster_run_id
    expected_params = {**AudioConfig().to_dict(), **ModelConfig(**TINY).to_dict(), **TrainConfig().to_dict()}
    assert set(expected_params) <= set(run.data.params)
    assert run.data.params["speakers_per_batch"] == str(n) and run.data.params["steps"] == "4"
    for name in ("loss", "eer", "step_time_s", "lr", "w", "b"):
        assert [h.step for h in client.get_metric_history(run_id, name)] == [2, 4], name
    artifacts = {a.path for folder in ("checkpoint", "umap", "plots") for a in client.list_artifacts(run_id, folder)}
    assert artifacts == {"checkpoint/encoder.pt", "umap/umap_000002.png", "umap/umap_000004.png", "plots/loss_curve.png"}
    # The probe set is held-out speakers only: none of them was trained on.
    assert not set(work["heldout"]) & set(work["train"]) and work["heldout"]


def test_a_failing_materialization_ends_its_mlflow_run_failed(work, tmp_path):
    from mlflow import MlflowClient

    missing = tmp_path / "no_such.pt"
    done = _materialize(work, {"steps": 2, "init_from": str(missing), "run_name": "broken", **TINY})
    assert done.returncode != 0
    assert str(missing) in done.stdout + done.stderr
    client = MlflowClient(tracking_uri=work["env"]["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(["1"], filter_string="tags.`spkenc.run_name` = 'broken'")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_the_launchpad_config_carries_the_batch_and_speaker_augmentation_settings():
    from pipelines.assets.training import EncoderModelConfig

    config = EncoderModelConfig(speaker_speeds=[0.9, 1.1], single_corpus_batches=True, steps=7,
                                corpus_weights={"speechocean762_train": 3.0}, aug_freq_mask=8, aug_time_mask=20)
    train_config = config.spkenc_train_config(8, 4)
    assert (train_config.aug_freq_mask, train_config.aug_time_mask) == (8, 20)
    assert train_config.speaker_speeds == (0.9, 1.1) and train_config.single_corpus_batches is True
    assert train_config.corpus_weights == {"speechocean762_train": 3.0}
    assert (train_config.steps, train_config.speakers_per_batch, train_config.utterances_per_speaker) == (7, 8, 4)
    with pytest.raises(ValueError, match="speaker_speeds"):
        EncoderModelConfig(speaker_speeds=[1.0]).spkenc_train_config(8, 4)


def test_bf16_is_refused_before_an_mlflow_run_where_the_cpu_has_no_bfloat16_lstm(work):
    from mlflow import MlflowClient

    from spkenc.precision import bf16_autocast_error

    done = _materialize(work, {"steps": 2, "bf16": True, "device": "cpu", "run_name": "bf16_probe", **TINY})
    client = MlflowClient(tracking_uri=work["env"]["MLFLOW_TRACKING_URI"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="tags.`spkenc.run_name` = 'bf16_probe'")
    if bf16_autocast_error("cpu") is None:  # this CPU trains in bf16: the run goes through
        assert done.returncode == 0, done.stderr[-4000:]
        assert [r.info.status for r in runs] == ["FINISHED"]
    else:
        assert done.returncode != 0
        assert "bf16 autocast is not available on cpu" in done.stdout + done.stderr
        assert "bf16: false in the Dagster config" in done.stdout + done.stderr
        assert runs == [], "the refusal comes before an MLflow run is opened"
