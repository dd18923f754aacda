"""Environment for `dagster` subprocesses in tests (imported by name: tests/ has several conftest.py)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pipeline_env(work_dir: Path, dagster_home: Path) -> dict[str, str]:
    """Environment for a `dagster` subprocess on a temporary instance, work folder and MLflow store."""
    return {
        **os.environ,
        "DAGSTER_HOME": str(dagster_home),
        "SPKENC_WORK_DIR": str(work_dir),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work_dir / 'mlflow.db'}",
        "SPKENC_CORPORA": str(REPO / "corpora.yaml"),
        "OMP_NUM_THREADS": "1",
    }
