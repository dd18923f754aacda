"""The Dagster code location: `dagster dev -m pipelines.definitions` or
`dagster asset materialize -m pipelines.definitions --select ...`.

Add an asset module with one line in ASSET_MODULES.
"""

import dagster as dg

from pipelines.assets import data, evaluation, training
from pipelines.corpora import corpus_registry_sensor
from pipelines.mlflow_resource import MlflowResource
from pipelines.resources import SpkencPaths

ASSET_MODULES = [
    data,
    training,
    evaluation,
]

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(ASSET_MODULES),
    asset_checks=dg.load_asset_checks_from_modules(ASSET_MODULES),
    sensors=[corpus_registry_sensor],
    resources={"paths": SpkencPaths(), "mlflow": MlflowResource()},
)
