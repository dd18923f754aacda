"""The one place MLflow lives: a small Dagster resource around `mlflow.MlflowClient`.

Tracking store: env `MLFLOW_TRACKING_URI`, default `sqlite:///<work_dir>/mlflow.db` (MLflow 3
refuses new file stores). Artifacts: `<work_dir>/mlartifacts`, set explicitly on the experiment.
UI links: env `MLFLOW_UI_URL`, default http://127.0.0.1:5000. `work_dir` is env
`SPKENC_WORK_DIR`, default `<project root>/work`, as for `SpkencPaths`.

Usage from an asset::

    with mlflow_resource.start_run(run_name="encoder", tags={"dagster.run_id": context.run.run_id}) as run:
        run.log_params(train_config.to_dict())
        run.log_metrics({"loss": 1.2}, step=10)
        run.log_artifact(path, "plots")

The run ends FINISHED when the block exits normally and FAILED when it raises.
"""

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import dagster as dg
from pydantic import Field

log = logging.getLogger(__name__)

from pipelines.resources import default_work_dir


class MlflowRun:
    """A handle on one MLflow run: log params, metrics and artifacts through one client."""

    def __init__(self, client: Any, run_id: str, experiment_id: str, ui_url: str) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.url = f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; values are stringified (None becomes "None")."""
        from mlflow.entities import Param

        items = [Param(str(k), str(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log finite scalar metrics at `step` in one batch."""
        import time

        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now_ms, int(step)) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        """Copy the file at `path` into the run's artifacts (under `artifact_path`)."""
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, str(key), str(value))


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking for the pipeline: one experiment, explicit SQLite store and artifact root.

    Empty `tracking_uri` / `artifact_root` / `ui_url` mean the environment defaults described in
    the module docstring.
    """

    tracking_uri: str = Field(
        default="", description="tracking URI; '' = $MLFLOW_TRACKING_URI or sqlite:///<work_dir>/mlflow.db"
    )
    artifact_root: str = Field(default="", description="artifact folder of a new experiment; '' = <work_dir>/mlartifacts")
    experiment_name: str = Field(default="spkenc", description="MLflow experiment that holds the runs")
    ui_url: str = Field(default="", description="UI base URL for links; '' = $MLFLOW_UI_URL or http://127.0.0.1:5000")

    def resolved_tracking_uri(self) -> str:
        default = f"sqlite:///{default_work_dir() / 'mlflow.db'}"
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default

    def resolved_ui_url(self) -> str:
        return self.ui_url or os.environ.get("MLFLOW_UI_URL") or "http://127.0.0.1:5000"

    def _client_and_experiment(self) -> tuple[Any, str]:
        uri = self.resolved_tracking_uri()
        if not uri.startswith("sqlite:///"):
            return self._open(uri)
        # MLflow creates and migrates a new SQLite store on first use; two runs starting together
        # on a fresh store would both migrate it ("duplicate column name"). One at a time.
        import fcntl

        db = Path(uri[len("sqlite:///") :])
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.with_name(db.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return self._open(uri)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _open(self, uri: str) -> tuple[Any, str]:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return client, experiment.experiment_id
        root = Path(self.artifact_root) if self.artifact_root else default_work_dir() / "mlartifacts"
        root.mkdir(parents=True, exist_ok=True)
        try:
            return client, client.create_experiment(self.experiment_name, artifact_location=root.resolve().as_uri())
        except Exception:
            # Another run created it between our lookup and create: use theirs.
            experiment = client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                raise
            return client, experiment.experiment_id

    @contextlib.contextmanager
    def start_run(
        self,
        run_name: str,
        tags: Optional[Mapping[str, Any]] = None,
        parent_run_id: Optional[str] = None,
    ) -> Iterator[MlflowRun]:
        """Create a run (a child of `parent_run_id` if given); end it FINISHED, or FAILED on error."""
        client, experiment_id = self._client_and_experiment()
        all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        handle = MlflowRun(client, run.info.run_id, experiment_id, self.resolved_ui_url())
        try:
            yield handle
        except BaseException:
            client.set_terminated(handle.run_id, "FAILED")
            raise
        client.set_terminated(handle.run_id, "FINISHED")

    def open_run(self, run_id: str) -> MlflowRun:
        """A handle on an existing run (e.g. to add evaluation results to the training run)."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.resolved_tracking_uri())
        run = client.get_run(run_id)
        return MlflowRun(client, run_id, run.info.experiment_id, self.resolved_ui_url())
