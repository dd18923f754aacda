"""The MLflow resource on a real SQLite store: runs that start together on a fresh store."""

import multiprocessing as mp
from pathlib import Path


def _start_run(uri: str, artifacts: str, barrier, errors) -> None:
    import mlflow  # noqa: F401 (imported before the barrier, so the processes reach the store together)

    from pipelines.mlflow_resource import MlflowResource

    resource = MlflowResource(tracking_uri=uri, artifact_root=artifacts)
    barrier.wait()
    try:
        with resource.start_run(run_name="together") as run:
            run.log_params({"who": mp.current_process().name})
    except Exception as error:  # reported to the test, which names it
        errors.put(f"{type(error).__name__}: {error}")


def test_three_runs_starting_together_on_a_fresh_store_all_succeed(tmp_path: Path):
    # Without the store lock the second process to migrate a new mlflow.db failed with
    # "duplicate column name" (seen with two encoder_model runs started at once).
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = mp.get_context("spawn")
    barrier, errors = ctx.Barrier(3), ctx.Queue()
    workers = [ctx.Process(target=_start_run, args=(uri, str(tmp_path / "art"), barrier, errors)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    failures = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert failures == [] and [w.exitcode for w in workers] == [0, 0, 0]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("spkenc").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3
