"""evaluation_embeddings and verification_report on the demo corpus's held-out speakers.

The model is Resemblyzer's pretrained weights, recorded as the encoder_model materialization
of a real MLflow training run, so the assets' default path (use encoder_model's checkpoint,
log a child of its run) runs without a training run's minutes. One run goes through the
dagster CLI; the others run in-process on a temporary instance.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline_env import pipeline_env

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretrained() -> Path:
    import resemblyzer

    return Path(resemblyzer.__file__).parent / "pretrained.pt"


@pytest.fixture(scope="module")
def work(demo_dir, tmp_path_factory) -> dict:
    """A work folder holding the demo manifest as raw_corpus writes it, and an MLflow store."""
    from spkenc.corpus import scan_corpus

    root = tmp_path_factory.mktemp("pipeline_evaluation")
    work_dir, home = root / "work", root / "dagster_home"
    home.mkdir()
    scan = scan_corpus(demo_dir, layout="speaker_folders", corpus="demo_tiny", heldout_fraction=0.2)
    scan.write(work_dir / "corpora" / "demo_tiny" / "manifest.parquet", work_dir / "rejects" / "demo_tiny" / "scan.parquet")
    env = pipeline_env(work_dir, home)
    heldout = scan.speakers_in("heldout")
    assert 2 <= len(heldout) < 24
    return {"work_dir": work_dir, "home": home, "env": env, "heldout": heldout,
            "n_heldout_files": sum(r["split"] == "heldout" for r in scan.rows)}


def resources(work):
    from pipelines.mlflow_resource import MlflowResource
    from pipelines.resources import SpkencPaths

    return {
        "paths": SpkencPaths(work_dir=str(work["work_dir"]), corpora_file=str(REPO / "corpora.yaml")),
        "mlflow": MlflowResource(tracking_uri=work["env"]["MLFLOW_TRACKING_URI"], artifact_root=str(work["work_dir"] / "mlartifacts")),
    }


@pytest.fixture(scope="module")
def cli_run(work, pretrained):
    """Record a trained encoder_model (a real MLflow run + its materialization), then
    materialize both evaluation assets with the dagster CLI."""
    import dagster as dg

    with resources(work)["mlflow"].start_run(run_name="training") as training_run:
        training_run.log_metrics({"loss": 1.0}, step=7)
    os.environ["DAGSTER_HOME"] = str(work["home"])
    try:
        with dg.DagsterInstance.get() as instance:
            instance.report_runless_asset_event(dg.AssetMaterialization("encoder_model", metadata={
                "checkpoint_path": dg.MetadataValue.path(str(pretrained)), "mlflow_run_id": training_run.run_id, "steps": 7}))
    finally:
        del os.environ["DAGSTER_HOME"]
    command = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "pipelines.definitions",
               "--select", "evaluation_embeddings,verification_report",
               "--config-json", json.dumps({"ops": {"evaluation_embeddings": {"config": {"device": "cpu"}}}})]
    done = subprocess.run(command, cwd=REPO, env=work["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return {"training_run_id": training_run.run_id}


def latest(work, key):
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(work["home"])
    try:
        with dg.DagsterInstance.get() as instance:
            event = instance.get_latest_materialization_event(dg.AssetKey(key))
            checks = instance.event_log_storage.get_latest_asset_check_execution_by_key(
                [dg.AssetCheckKey(dg.AssetKey("verification_report"), "eer_within_ceiling")])
            return event.asset_materialization.metadata, checks
    finally:
        del os.environ["DAGSTER_HOME"]


def test_embeddings_cover_the_heldout_speakers(work, cli_run, pretrained):
    path = work["work_dir"] / "eval" / "embeddings.parquet"
    table = pq.read_table(path)
    assert table.column_names[:4] == ["utterance_id", "speaker_id", "corpus", "embedding"]
    assert table.num_rows == work["n_heldout_files"] == 8 * len(work["heldout"])
    assert sorted(set(table.column("speaker_id").to_pylist())) == work["heldout"]
    assert set(table.column("corpus").to_pylist()) == {"demo_tiny"}
    embeddings = np.array(table.column("embedding").to_pylist())
    assert embeddings.shape == (table.num_rows, 256) and np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    assert table.schema.metadata[b"spkenc.checkpoint"].decode() == str(pretrained)
    metadata, _ = latest(work, "evaluation_embeddings")
    assert metadata["n_utterances"].value == table.num_rows and metadata["n_failed"].value == 0


def test_report_metadata_check_and_files(work, cli_run):
    from spkenc.evaluation import evaluate_embeddings

    metadata, checks = latest(work, "verification_report")
    n = 8 * len(work["heldout"])
    n_target = 28 * len(work["heldout"])
    assert metadata["n_target"].value == n_target and metadata["n_nontarget"].value == n * (n - 1) // 2 - n_target
    assert 0 <= metadata["eer"].value < 0.2  # pretrained weights separate 4-5 demo speakers well
    for name in ("det_curve", "score_histograms", "umap", "similarity_matrix"):
        assert metadata[name].value.startswith(f"![{name.replace('_', ' ')}](data:image/png;base64,iVBORw0KGgo")
    report = json.loads((work["work_dir"] / "eval" / "report.json").read_text())
    assert report["eer"] == metadata["eer"].value and report["min_dcf_0.01"] == metadata["min_dcf_0.01"].value
    table = pq.read_table(work["work_dir"] / "eval" / "embeddings.parquet").to_pydict()
    direct = evaluate_embeddings(np.array(table["embedding"]), table["speaker_id"], table["utterance_id"])
    assert report == direct.summary()
    check = next(iter(checks.values()))
    assert check.status.value == "SUCCEEDED"
    assert check.event.asset_check_evaluation.passed


def test_mlflow_child_run_of_the_training_run(work, cli_run):
    from mlflow import MlflowClient

    metadata, _ = latest(work, "verification_report")
    client = MlflowClient(tracking_uri=work["env"]["MLFLOW_TRACKING_URI"])
    run = client.get_run(metadata["mlflow_run_id"].value)
    assert run.data.tags["mlflow.parentRunId"] == cli_run["training_run_id"] == metadata["mlflow_parent_run_id"].value
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eer"] == metadata["eer"].value
    for key in ("eer_threshold", "min_dcf_0.01", "min_dcf_0.05", "n_target", "n_nontarget", "target_score_mean", "nontarget_score_std"):
        assert key in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eer")] == [7]  # at the training step
    assert run.data.params["max_trials"] == "0" and run.data.params["checkpoint"].endswith("pretrained.pt")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"report.json", "plots/det_curve.png", "plots/score_histograms.png", "plots/umap.png", "plots/similarity_matrix.png"} <= artifacts


def test_eer_ceiling_check_fails_above_the_ceiling(work, cli_run):
    import dagster as dg

    from pipelines.assets.evaluation import verification_report

    with dg.instance_for_test() as instance:
        result = dg.materialize([verification_report], instance=instance, resources=resources(work),
                                run_config={"ops": {"verification_report": {"config": {"eer_ceiling": -0.01, "max_trials": 100}}}})
        evaluation = result.get_asset_check_evaluations()[0]
    assert result.success and not evaluation.passed
    assert evaluation.metadata["eer_ceiling"].value == -0.01
    report = json.loads((work["work_dir"] / "eval" / "report.json").read_text())
    assert report["n_target"] + report["n_nontarget"] == 100


def test_named_checkpoint_without_a_trained_model(work, pretrained, tmp_path):
    import dagster as dg

    from pipelines.assets.evaluation import evaluation_embeddings

    res = resources(work)
    res["paths"] = type(res["paths"])(work_dir=str(tmp_path / "work2"), corpora_file=str(REPO / "corpora.yaml"))
    (tmp_path / "work2" / "corpora").mkdir(parents=True)
    os.symlink(work["work_dir"] / "corpora" / "demo_tiny", tmp_path / "work2" / "corpora" / "demo_tiny")
    with dg.instance_for_test() as instance:
        with pytest.raises(dg.Failure, match="no encoder_model materialization"):
            dg.materialize([evaluation_embeddings], instance=instance, resources=res)
        config = {"ops": {"evaluation_embeddings": {"config": {"checkpoint": str(pretrained), "device": "cpu", "rate": 1.3}}}}
        assert dg.materialize([evaluation_embeddings], instance=instance, resources=res, run_config=config).success
    metadata = pq.read_metadata(tmp_path / "work2" / "eval" / "embeddings.parquet").metadata
    assert metadata[b"spkenc.checkpoint"].decode() == str(pretrained) and metadata[b"spkenc.mlflow_parent_run_id"] == b""
    assert metadata[b"spkenc.rate"] == b"1.3"


def test_no_heldout_speakers_is_a_clear_failure(work, pretrained, tmp_path, demo_dir):
    import dagster as dg

    from pipelines.assets.evaluation import evaluation_embeddings
    from spkenc.corpus import scan_corpus

    res = resources(work)
    res["paths"] = type(res["paths"])(work_dir=str(tmp_path / "work3"), corpora_file=str(REPO / "corpora.yaml"))
    scan = scan_corpus(demo_dir, layout="speaker_folders", corpus="demo_tiny", heldout_fraction=0.0)
    scan.write(tmp_path / "work3" / "corpora" / "demo_tiny" / "manifest.parquet", tmp_path / "work3" / "rejects.parquet")
    config = {"ops": {"evaluation_embeddings": {"config": {"checkpoint": str(pretrained)}}}}
    with dg.instance_for_test() as instance, pytest.raises(dg.Failure, match=r"no held-out speakers in the manifests of \['demo_tiny'\]"):
        dg.materialize([evaluation_embeddings], instance=instance, resources=res, run_config=config)


def test_score_backups_gives_the_pipelines_eer_per_checkpoint_and_names_a_bad_one(work, cli_run, pretrained, tmp_path):
    """recipes/score_backups.py scores a run's backups as the evaluation assets score a checkpoint."""
    import shutil

    run = tmp_path / "run"
    (run / "backups").mkdir(parents=True)
    shutil.copy(pretrained, run / "backups" / "encoder_000100.pt")
    (run / "backups" / "encoder_000200.pt").write_bytes(b"not a checkpoint")
    shutil.copy(pretrained, run / "encoder.pt")
    command = [sys.executable, str(REPO / "recipes" / "score_backups.py"), str(run), "--corpus", "demo_tiny",
               "--work-dir", str(work["work_dir"])]
    done = subprocess.run(command, cwd=REPO, env=work["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-4000:]  # the corrupt backup; the others are still scored
    assert f"{run / 'backups' / 'encoder_000200.pt'}: not scored" in done.stderr
    metadata, _ = latest(work, "verification_report")  # the dagster CLI run's, with the same weights
    lines = [line.split("\t") for line in done.stdout.splitlines()]
    assert [(Path(p).name, step) for p, step, *_ in lines] == [("encoder_000100.pt", "100"), ("encoder.pt", "-")]
    for _, _, eer, speakers, _ in lines:
        assert eer == f"EER {100 * metadata['eer'].value:.2f}%" and speakers == f"{len(work['heldout'])} speakers"


def test_score_backups_names_a_missing_manifest_and_an_empty_run(work, tmp_path):
    script = str(REPO / "recipes" / "score_backups.py")
    done = subprocess.run([sys.executable, script, str(tmp_path), "--corpus", "no_such_corpus", "--work-dir",
                           str(work["work_dir"])], cwd=REPO, env=work["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and f"{work['work_dir'] / 'corpora' / 'no_such_corpus' / 'manifest.parquet'}" in done.stderr
    done = subprocess.run([sys.executable, script, str(tmp_path), "--corpus", "demo_tiny", "--work-dir",
                           str(work["work_dir"])], cwd=REPO, env=work["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and f"{tmp_path}: no encoder.pt or backups/encoder_*.pt to score" in done.stderr
