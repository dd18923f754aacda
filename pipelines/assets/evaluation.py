"""The evaluation assets: evaluation_embeddings -> verification_report.

`evaluation_embeddings` embeds every usable utterance of the held-out speakers (the `split`
column of the corpus manifests) with the latest `encoder_model` checkpoint, or with any
RTVC-format checkpoint named in its config (Resemblyzer's weights, for comparison). It writes
`eval/embeddings.parquet`, with the checkpoint and the training run's MLflow id in the file
metadata. `verification_report` scores trials on those embeddings, writes `eval/report.json`
and `eval/plots/*.png`, and logs everything to an MLflow child run of the training run.
"""

import base64
import math
from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field

from pipelines.mlflow_resource import MlflowResource
from pipelines.resources import SpkencPaths
from spkenc.config import EvalConfig

_E = EvalConfig()
EER_CHECK = "eer_within_ceiling"


class EvaluationEmbeddingsConfig(dg.Config):
    checkpoint: str = Field(default="", description="RTVC-format checkpoint to embed with; '' = the latest encoder_model's")
    corpora: list[str] = Field(default=[], description="corpora whose held-out speakers are embedded; [] = every registered corpus")
    rate: Optional[float] = Field(default=_E.rate, description="partials per second (Resemblyzer's rule); None = RTVC's 50% overlap")
    min_coverage: float = Field(default=_E.min_coverage, description="keep a last partial at least this full")
    device: str = Field(default="", description="cpu, cuda, cuda:N; '' = CUDA when present")
    batch_size: int = Field(default=64, description="partials per forward pass")


class VerificationReportConfig(dg.Config):
    max_trials: int = Field(default=_E.max_trials, description="0 = every cross pair; else a seeded sample of this many")
    trial_seed: int = _E.trial_seed
    p_target_low: float = _E.p_target_low
    p_target_high: float = _E.p_target_high
    eer_ceiling: float = Field(default=_E.eer_ceiling, description=f"the {EER_CHECK} check fails above this EER (a fraction)")


def _trained_checkpoint(context: dg.AssetExecutionContext) -> tuple[str, str, int]:
    """(checkpoint path, MLflow run id, step) from the latest encoder_model materialization."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey("encoder_model"))
    if event is None or event.asset_materialization is None:
        raise dg.Failure("no encoder_model materialization: materialize encoder_model, or name a checkpoint in the config")
    metadata = event.asset_materialization.metadata
    step = metadata["steps"].value if "steps" in metadata else 0
    return str(metadata["checkpoint_path"].value), str(metadata["mlflow_run_id"].value), int(step)


def _eval_config(config: VerificationReportConfig, provenance: dict) -> EvalConfig:
    """The trial and scoring knobs from the config; rate and min_coverage as the embeddings were made."""
    rate = provenance.get("rate", "None")
    trials = {k: v for k, v in config.model_dump().items() if k in _E.to_dict()}
    return EvalConfig.from_dict({**trials, "rate": None if rate == "None" else float(rate),
                                 "min_coverage": float(provenance.get("min_coverage", _E.min_coverage))})


def _inline_png(path: Path, title: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})")


@dg.asset(group_name="evaluation", deps=["encoder_model", "raw_corpus"], kinds={"parquet"})
def evaluation_embeddings(context: dg.AssetExecutionContext, config: EvaluationEmbeddingsConfig, paths: SpkencPaths) -> dg.MaterializeResult:
    """Utterance embeddings of the held-out speakers: utterance_id, speaker_id, corpus, embedding."""
    from spkenc.corpus import load_registry, write_rejects
    from spkenc.inference import Embedder
    from spkenc.verification import embed_manifest, manifest_rows, write_embedding_table

    checkpoint, parent_run_id, step = (config.checkpoint, "", 0) if config.checkpoint else _trained_checkpoint(context)
    corpora = config.corpora or sorted(load_registry(paths.registry_path()))
    rows = manifest_rows([paths.manifest_path(c) for c in corpora], split="heldout")
    if not rows:
        raise dg.Failure(f"no held-out speakers in the manifests of {corpora}: raise heldout_fraction or register an eval corpus")
    embedder = Embedder.from_checkpoint(checkpoint, device=config.device or None, batch_size=config.batch_size)
    embedded = embed_manifest(embedder, rows, rate=config.rate, min_coverage=config.min_coverage)
    failures_path = write_rejects([{**f, "stage": "evaluation"} for f in embedded.failures], paths.eval_dir() / "failures.parquet")
    if len(embedded) == 0:
        raise dg.Failure(f"none of the {len(rows)} held-out files could be embedded: see {failures_path}")
    provenance = {"checkpoint": checkpoint, "mlflow_parent_run_id": parent_run_id, "step": step, "rate": config.rate,
                  "min_coverage": config.min_coverage, "corpora": ",".join(corpora)}
    path = write_embedding_table(embedded, paths.eval_dir() / "embeddings.parquet", provenance)
    context.log.info(f"{len(embedded)} of {len(rows)} held-out files embedded with {checkpoint}")
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(path)), "checkpoint": dg.MetadataValue.path(checkpoint),
        "n_utterances": len(embedded), "n_speakers": len(set(embedded.speaker_keys())), "n_failed": len(embedded.failures),
        "failures": dg.MetadataValue.path(str(failures_path)), "corpora": ", ".join(corpora),
    })


@dg.asset(
    group_name="evaluation",
    deps=[evaluation_embeddings],
    kinds={"json", "png"},
    check_specs=[dg.AssetCheckSpec(EER_CHECK, asset="verification_report", description="the EER is finite and not above eer_ceiling")],
)
def verification_report(
    context: dg.AssetExecutionContext, config: VerificationReportConfig, paths: SpkencPaths, mlflow: MlflowResource
) -> dg.MaterializeResult:
    """Trials, cosine scores, EER, minDCF, DET curve, score histograms, UMAP and speaker similarity."""
    from spkenc.verification import evaluate_embedded, read_embedding_table, write_report_json, write_report_plots

    embedded, provenance = read_embedding_table(paths.eval_dir() / "embeddings.parquet")
    eval_config = _eval_config(config, provenance)
    report = evaluate_embedded(embedded, eval_config)
    report_path = write_report_json(report, paths.eval_dir() / "report.json")
    plots = write_report_plots(report, embedded, paths.eval_dir() / "plots")
    metrics = {**report.summary(), **report.score_stats()}
    tags = {"dagster.run_id": context.run.run_id, "spkenc.checkpoint": provenance.get("checkpoint", "")}
    with mlflow.start_run(run_name="evaluation", tags=tags, parent_run_id=provenance.get("mlflow_parent_run_id") or None) as run:
        run.log_params({**provenance, **eval_config.to_dict()})
        run.log_metrics(metrics, step=int(provenance.get("step") or 0))
        run.log_artifact(report_path)
        for png in plots.values():
            run.log_artifact(png, "plots")
    passed = math.isfinite(report.eer) and report.eer <= config.eer_ceiling
    return dg.MaterializeResult(
        metadata={**metrics, "report": dg.MetadataValue.path(str(report_path)), "mlflow_run_id": run.run_id,
                  "mlflow_parent_run_id": provenance.get("mlflow_parent_run_id", ""), "mlflow_run_url": dg.MetadataValue.url(run.url),
                  **{name: _inline_png(png, name.replace("_", " ")) for name, png in plots.items()}},
        check_results=[dg.AssetCheckResult(check_name=EER_CHECK, passed=passed, severity=dg.AssetCheckSeverity.ERROR,
                                           metadata={"eer": report.eer, "eer_ceiling": config.eer_ceiling})],
    )
