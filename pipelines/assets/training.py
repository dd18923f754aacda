"""The `encoder_model` asset: GE2E training on the train-split speakers, tracked in one MLflow run.

Its value (kept by the IO manager) is a dict: `checkpoint_path`, `run_dir`, `mlflow_run_id`,
`step`. Held-out speakers are never trained on; up to `n_probe_speakers` of them form the fixed
probe set of the UMAP plots.
"""

import base64
from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field

from pipelines.mlflow_resource import MlflowResource, MlflowRun
from pipelines.resources import SpkencPaths
from spkenc.config import AudioConfig, ModelConfig, TrainConfig

_T, _M = TrainConfig(), ModelConfig()


class EncoderModelConfig(dg.Config):
    """Launchpad knobs with spkenc's defaults, except `steps`, kept short for the demo corpus."""

    steps: int = Field(default=30, description="optimizer steps (30 keeps a demo run to a few minutes on 2 CPU cores)")
    speakers_per_batch: int = Field(default=_T.speakers_per_batch, description="N; shrunk to what the corpora hold")
    utterances_per_speaker: int = Field(default=_T.utterances_per_speaker, description="M; shrunk likewise")
    short_speaker_policy: str = Field(default=_T.short_speaker_policy, description="exclude or repeat")
    learning_rate_init: float = _T.learning_rate_init
    lr_schedule: str = Field(default=_T.lr_schedule, description="constant, cosine or step")
    lr_warmup_steps: int = _T.lr_warmup_steps
    lr_decay_steps: int = Field(default=_T.lr_decay_steps, description="cosine: steps to reach 0; step: steps per decay")
    lr_decay_gamma: float = _T.lr_decay_gamma
    bf16: bool = Field(default=_T.bf16, description="bfloat16 autocast for the encoder")
    crop_n_frames: int = Field(default=_T.crop_n_frames, description="training crop in frames; 0 = 160")
    aug_volume_db: float = Field(default=_T.aug_volume_db, description="gain augmentation, +- dB")
    aug_speed: float = Field(default=_T.aug_speed, description="speed augmentation, factor in [1 - x, 1 + x]")
    aug_noise_prob: float = Field(default=_T.aug_noise_prob, description="share of crops mixed with another speaker's recording")
    aug_noise_snr_db_min: float = _T.aug_noise_snr_db_min
    aug_noise_snr_db_max: float = _T.aug_noise_snr_db_max
    aug_freq_mask: int = Field(default=_T.aug_freq_mask, description="SpecAugment: zero one band of up to this many mel channels per crop")
    aug_time_mask: int = Field(default=_T.aug_time_mask, description="SpecAugment: zero one span of up to this many frames per crop")
    speaker_speeds: list[float] = Field(default=list(_T.speaker_speeds),
                                        description="speaker augmentation: speed factors whose copies of each speaker count as new speakers")
    single_corpus_batches: bool = Field(default=_T.single_corpus_batches,
                                        description="each batch from one corpus (hard negatives), filled up from the others")
    corpus_weights: dict[str, float] = Field(default={}, description="corpus -> weight of its speakers in the draw; others weigh 1")
    weight_decay: float = Field(default=_T.weight_decay,
                                description="decoupled weight decay of the encoder's weight matrices (AdamW style); 0 = RTVC")
    lstm_dropout: float = Field(default=_T.lstm_dropout, description="dropout between the LSTM layers in training; 0 = RTVC")
    input_lr_scale: float = Field(default=_T.input_lr_scale,
                                  description="Adam's step on the first LSTM layer's input weights times this; 1 = RTVC")
    seed: int = _T.seed
    save_every: int = _T.save_every
    backup_every: int = _T.backup_every
    log_every: int = _T.log_every
    umap_every: int = _T.umap_every
    hidden_size: int = _M.hidden_size
    n_layers: int = _M.n_layers
    embedding_size: int = _M.embedding_size
    corpora: list[str] = Field(default=[], description="corpora to train on; [] = every registered corpus")
    init_from: str = Field(default="", description="RTVC-format checkpoint to fine-tune from; '' = a fresh model")
    resume: bool = Field(default=False, description="continue models/<run_name>/encoder.pt exactly")
    run_name: str = Field(default="", description="models/<run_name>; '' = the Dagster run id")
    device: str = Field(default="", description="cpu, cuda, cuda:N; '' = CUDA when present")
    threads: int = Field(default=0, description="torch CPU threads; 0 = all cores")

    def spkenc_train_config(self, speakers_per_batch: int, utterances_per_speaker: int) -> TrainConfig:
        fields = {k: v for k, v in self.model_dump().items() if k in _T.to_dict()}
        return TrainConfig.from_dict(fields).replace(
            speakers_per_batch=speakers_per_batch, utterances_per_speaker=utterances_per_speaker
        )

    def spkenc_model_config(self) -> Optional[ModelConfig]:
        """None (the checkpoint decides) when fine-tuning or resuming with the default shape."""
        wanted = ModelConfig(self.hidden_size, self.n_layers, self.embedding_size)
        return None if (self.init_from or self.resume) and wanted == _M else wanted


def _split_shards(paths: SpkencPaths, corpora: list[str], split: str) -> list[Path]:
    from spkenc.sampling import shards_for_split

    return [p for c in corpora for p in shards_for_split(paths.mels_dir(c), paths.manifest_path(c), split)]


def _inline_png(path: Optional[Path], title: str) -> dg.MetadataValue:
    if path is None:
        return dg.MetadataValue.md(f"_no {title}: no held-out probe utterances_")
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})")


def _reporter(context: dg.AssetExecutionContext, run: MlflowRun, log_every: int):
    """The training callback: metrics to MLflow and a log line every `log_every` steps, UMAPs as artifacts."""

    def report(p) -> None:
        if p.step % log_every == 0 or p.step == p.steps:
            run.log_metrics({"loss": p.loss, "eer": p.eer, "step_time_s": p.step_time_s, "lr": p.lr, "w": p.w, "b": p.b}, p.step)
            context.log.info(f"step {p.step}/{p.steps} loss {p.loss:.4f} eer {p.eer:.3f} lr {p.lr:.2e} {p.step_time_s:.2f} s/step")
        if p.umap_path is not None:
            run.log_artifact(p.umap_path, "umap")

    return report


@dg.asset(group_name="training", deps=["mel_shards"], kinds={"pytorch", "mlflow"})
def encoder_model(
    context: dg.AssetExecutionContext, config: EncoderModelConfig, paths: SpkencPaths, mlflow: MlflowResource
) -> dg.Output:
    """GE2E speaker encoder trained on the train-split mel shards of the chosen corpora."""
    from spkenc.augment import crop_frames
    from spkenc.corpus import load_registry
    from spkenc.distributed import select_device
    from spkenc.precision import check_bf16_autocast
    from spkenc.sampling import ShardStore, fit_batch_geometry
    from spkenc.training import train

    corpora = config.corpora or sorted(load_registry(paths.registry_path()))
    train_shards, probe_shards = _split_shards(paths, corpora, "train"), _split_shards(paths, corpora, "heldout")
    if not train_shards:
        raise ValueError(f"no train-split mel shards for {corpora} under {paths.root / 'mels'}: materialize mel_shards")
    crop = crop_frames(config.spkenc_train_config(config.speakers_per_batch, config.utterances_per_speaker))
    counts = ShardStore(train_shards, memory_budget_bytes=0).usable_counts(crop)
    n, m = fit_batch_geometry(counts, config.speakers_per_batch, config.utterances_per_speaker, config.short_speaker_policy)
    if (n, m) != (config.speakers_per_batch, config.utterances_per_speaker):
        context.log.warning(f"{len(counts)} train speakers: batch shrunk from {config.speakers_per_batch} x "
                            f"{config.utterances_per_speaker} to {n} x {m} (speakers x utterances)")
    train_config, model_config = config.spkenc_train_config(n, m), config.spkenc_model_config()
    if train_config.bf16:  # refused before an MLflow run is opened (train() checks again)
        check_bf16_autocast(select_device(config.device or None))
    run_name = config.run_name or context.run.run_id
    with mlflow.start_run(run_name, tags={"dagster.run_id": context.run.run_id, "spkenc.run_name": run_name}) as run:
        run.log_params({**AudioConfig().to_dict(), **train_config.to_dict(), "corpora": ",".join(corpora),
                        "init_from": config.init_from, "resume": config.resume})
        result = train(train_shards, paths.model_dir(run_name), train_config, model_config=model_config,
                       init_from=Path(config.init_from) if config.init_from else None, resume=config.resume,
                       device=config.device or None, n_threads=config.threads or None, callback=_reporter(context, run, train_config.log_every),
                       probe_paths=probe_shards)
        run.log_params(result.model_config.to_dict())  # known once a checkpoint may have decided it
        run.log_artifact(result.checkpoint_path, "checkpoint")
        if result.loss_curve_path is not None:
            run.log_artifact(result.loss_curve_path, "plots")
    metadata = {
        "steps": result.step, "final_loss": float("nan") if result.final_loss is None else result.final_loss,
        "checkpoint_path": dg.MetadataValue.path(str(result.checkpoint_path)), "batch": f"{n} x {m}",
        "n_train_speakers": len(train_shards), "mlflow_run_id": run.run_id, "mlflow_run_url": dg.MetadataValue.url(run.url),
        "umap": _inline_png(result.umap_path, "UMAP of held-out probes"),
    }
    value = {"checkpoint_path": str(result.checkpoint_path), "run_dir": str(result.run_dir), "mlflow_run_id": run.run_id,
             "step": result.step}
    return dg.Output(value, metadata=metadata)
