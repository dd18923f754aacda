"""GE2E training over mel shards: resumable, distributed (DDP), reporting through a callback.

RTVC's recipe (encoder/train.py): Adam over (w, b, lstm, linear) in RTVC's parameter order, the
gradients of the GE2E similarity scale w and bias b multiplied by 0.01, then clipping of the
total gradient norm at 3. Batches come from `spkenc.sampling.sample_batch`, a pure function of
(seed, step, rank), so a resumed or distributed run draws exactly the batches an uninterrupted
run would have drawn.

Run folder:
- `encoder.pt`: RTVC-format checkpoint, written atomically every `save_every` steps and at the end;
- `backups/encoder_<step:06d>.pt`: every `backup_every` steps;
- `umap/umap_<step:06d>.png`: UMAP of a fixed probe set every `umap_every` steps (when probes are given);
- `loss_curve.png`: at the end.

Under `torchrun` (env WORLD_SIZE > 1) the process group is initialised from torchrun's variables
(gloo on CPU, NCCL on CUDA); each rank draws its own speakers, gradients are averaged by
DistributedDataParallel, and only rank 0 writes files.
"""

import logging
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from spkenc.config import AudioConfig, ModelConfig, TrainConfig
from spkenc.distributed import barrier, distributed_context, mean_over_ranks, select_device, set_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainProgress:
    """What the loop reports after each optimizer step (rank 0 only).

    `loss` is the GE2E loss averaged over ranks; `eer` the in-batch EER of rank 0's batch in
    [0, 1] (a training signal, not an evaluation); `lr` the learning rate used for the step;
    `w`, `b` the similarity scale and bias after the step; `step_time_s` wall time of sampling,
    forward, backward and update. `checkpoint_path` / `umap_path` are set on steps that wrote them.
    """

    step: int
    steps: int
    loss: float
    eer: float
    lr: float
    w: float
    b: float
    step_time_s: float
    checkpoint_path: Optional[Path] = None
    umap_path: Optional[Path] = None


@dataclass(frozen=True)
class TrainResult:
    """The outcome of `train`: the final checkpoint and the loss history (steps are 1-based)."""

    run_dir: Path
    checkpoint_path: Path
    step: int
    final_loss: Optional[float]
    history_steps: list[int]
    history_losses: list[float]
    loss_curve_path: Optional[Path]
    umap_path: Optional[Path]
    speakers_per_batch: int
    utterances_per_speaker: int
    model_config: ModelConfig


def learning_rate(step: int, config: TrainConfig) -> float:
    """Learning rate for the update made at 0-based `step`.

    Linear warmup over `lr_warmup_steps`, then "constant", "cosine" (to 0 over `lr_decay_steps`)
    or "step" (times `lr_decay_gamma` every `lr_decay_steps`).

    >>> c = TrainConfig(learning_rate_init=1e-3, lr_schedule="step", lr_decay_steps=10, lr_decay_gamma=0.5)
    >>> learning_rate(0, c), learning_rate(10, c), learning_rate(25, c)
    (0.001, 0.0005, 0.00025)
    >>> c = TrainConfig(learning_rate_init=1.0, lr_schedule="cosine", lr_warmup_steps=4, lr_decay_steps=8)
    >>> [round(learning_rate(s, c), 3) for s in (0, 3, 4, 8, 12, 20)]
    [0.25, 1.0, 1.0, 0.5, 0.0, 0.0]
    """
    lr = config.learning_rate_init
    if config.lr_warmup_steps > 0 and step < config.lr_warmup_steps:
        return lr * (step + 1) / config.lr_warmup_steps
    after = step - config.lr_warmup_steps
    if config.lr_schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, after / config.lr_decay_steps)))
    if config.lr_schedule == "step":
        return lr * config.lr_decay_gamma ** (after // config.lr_decay_steps)
    return lr


class GE2EObjective(nn.Module):
    """Encoder + GE2E loss as one module, so DDP averages the gradients of w and b too.

    forward((N, M, T, n_mels) float32) -> (loss scalar, (N*M, N) similarity matrix). With
    `bf16` the encoder runs under bfloat16 autocast; the loss is computed in float32.
    """

    def __init__(self, encoder: nn.Module, loss: nn.Module, bf16: bool = False) -> None:
        super().__init__()
        self.encoder, self.loss, self.bf16 = encoder, loss, bf16

    def forward(self, mels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, m = mels.shape[:2]
        with torch.autocast(mels.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            embeds = self.encoder(mels.reshape(n * m, *mels.shape[2:]))
        return self.loss(embeds.float().reshape(n, m, -1))


def capture_rng_state() -> dict[str, Any]:
    """Torch, CUDA, NumPy and Python RNG states as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def stored_train_config(run_dir: Path) -> Optional[TrainConfig]:
    """The TrainConfig saved in `run_dir/encoder.pt`, or None when there is no such checkpoint
    (or it holds none, like RTVC's). Raises CheckpointError for an unreadable file."""
    from spkenc.checkpoint import load_checkpoint

    path = Path(run_dir) / "encoder.pt"
    if not path.exists():
        return None
    stored = load_checkpoint(path).get("train_config")
    return TrainConfig.from_dict(stored) if stored else None


def train(
    shard_paths: Sequence[Path],
    run_dir: Path,
    config: TrainConfig = TrainConfig(),
    model_config: Optional[ModelConfig] = None,
    audio_config: AudioConfig = AudioConfig(),
    init_from: Optional[Path] = None,
    resume: bool = False,
    device: Optional[str] = None,
    n_threads: Optional[int] = None,
    callback: Optional[Callable[[TrainProgress], None]] = None,
    probe_paths: Sequence[Path] = (),
    memory_budget_bytes: int = 2 * 2**30,
    rank_state_dir: Optional[Path] = None,
) -> TrainResult:
    """Train (or fine-tune, or resume) a speaker encoder on mel shards; see the module docstring.

    - `shard_paths`: one Parquet mel shard per training speaker.
    - `model_config`: None means ModelConfig() for a fresh model, or the checkpoint's shape for
      `init_from`/resume (a given config that differs from the checkpoint is a ValueError).
    - `init_from`: any RTVC-format checkpoint (RTVC's encoder.pt, Resemblyzer's pretrained.pt):
      weights, and w/b when present; the optimizer and step start fresh. Ignored when resuming.
    - `resume`: continue `run_dir/encoder.pt` exactly (weights, optimizer, RNG, step); starts fresh
      if there is none. Without `resume`, an existing `run_dir/encoder.pt` is a FileExistsError.
    - `n_threads`: torch CPU threads; None = all cores, split between the local ranks under torchrun.
    - `callback(TrainProgress)`: called on rank 0 after every step.
    - `probe_paths`: held-out speaker shards; their fixed partials are embedded and drawn as a
      UMAP every `config.umap_every` steps.
    - `rank_state_dir`: if set, each rank writes `rank<r>.pt` (final model_state and the speaker
      indices it drew per step) to verify that DDP keeps the ranks identical.
    """
    from spkenc import checkpoint as ckpt
    from spkenc.augment import augment_batch, augments, crop_frames
    from spkenc.ge2e import GE2ELoss, batch_eer
    from spkenc.model import SpeakerEncoder
    from spkenc.precision import check_bf16_autocast
    from spkenc.sampling import ShardStore, check_corpus_weights, probe_partials, require_eligible, sample_batch

    run_dir = Path(run_dir)
    with distributed_context(device) as (rank, world_size, local_rank), _flush_denormals():
        dev = select_device(device, local_rank)
        if config.bf16:
            check_bf16_autocast(dev)  # before the shards load: a CPU without bfloat16 fails at step 1
        set_threads(n_threads, world_size)
        store = ShardStore(shard_paths, audio_config, memory_budget_bytes)
        n, m = config.speakers_per_batch, config.utterances_per_speaker
        crop = crop_frames(config, audio_config)
        n_copies = 1 + len(config.speaker_speeds)
        require_eligible(store, n, m, config.short_speaker_policy, world_size, crop, n_copies)
        check_corpus_weights(store, config.corpus_weights)

        checkpoint_path = run_dir / "encoder.pt"
        state = None
        if checkpoint_path.exists() and not resume:
            raise FileExistsError(
                f"{checkpoint_path} exists: resume it (resume=True, --resume) or choose another run folder"
            )
        if resume and checkpoint_path.exists():
            state = ckpt.load_checkpoint(checkpoint_path)
            log.info("resuming %s at step %d", checkpoint_path, int(state["step"]))
        elif init_from is not None:
            state = ckpt.load_checkpoint(Path(init_from))
            log.info("fine-tuning from %s", init_from)

        torch.manual_seed(config.seed)
        loss_fn = GE2ELoss(config.w_init, config.b_init, device=dev)
        if state is None:
            encoder = SpeakerEncoder(model_config or ModelConfig(), n_mels=audio_config.n_mels, device=dev)
        else:
            encoder, _ = ckpt.load_encoder(state, device=dev)
            _check_model_config(encoder, model_config, audio_config.n_mels, checkpoint_path if resume else init_from)
            if "similarity_weight" in state["model_state"]:
                ckpt.load_loss_state(state, loss_fn)
        encoder.lstm.dropout = config.lstm_dropout  # nn.LSTM reads it at each call; eval() turns it off
        if config.lstm_dropout > 0 and encoder.lstm.num_layers == 1:
            log.warning("lstm_dropout %g has no effect: it acts between LSTM layers and this LSTM has one",
                        config.lstm_dropout)
        decayed = [p for p in encoder.parameters() if p.dim() >= 2]  # weight matrices, not biases or w/b
        input_weights = encoder.lstm.weight_ih_l0
        params = ckpt.rtvc_parameters(encoder, loss_fn)
        optimizer = torch.optim.Adam(params, lr=config.learning_rate_init)
        start_step, history_steps, history_losses = 0, [], []
        if resume and state is not None:
            optimizer.load_state_dict(state["optimizer_state"])
            start_step = int(state["step"])
            history = state.get("history") or {}
            history_steps = [int(s) for s in history.get("step", torch.zeros(0)).tolist()]
            history_losses = [float(v) for v in history.get("loss", torch.zeros(0)).tolist()]
            _warn_config_changes(state.get("train_config"), config)
            if "rng_state" in state:
                restore_rng_state(state["rng_state"])

        objective: nn.Module = GE2EObjective(encoder, loss_fn, config.bf16)
        if world_size > 1:
            device_ids = [dev.index] if dev.type == "cuda" else None
            objective = nn.parallel.DistributedDataParallel(objective, device_ids=device_ids)
        probes = None
        trained_on = {Path(p).resolve() for p in shard_paths} & {Path(p).resolve() for p in probe_paths}
        if trained_on:
            log.warning("%d probe shard(s) are also training shards: the UMAP does not show held-out speakers",
                        len(trained_on))
        if rank == 0 and probe_paths:
            probes = probe_partials(probe_paths, audio_config, config.n_probe_speakers, config.n_probe_utterances)
        configs = {"audio_config": audio_config, "model_config": encoder.config, "train_config": config}
        speakers = [f"{s.corpus}/{s.speaker_id}" for s in store.speakers]
        sampler_state = {"seed": config.seed, "world_size": world_size, "speakers": speakers}

        def save(step: int, path: Path) -> Path:
            extra = {
                "rng_state": capture_rng_state(),
                "sampler_state": sampler_state,
                "history": {
                    "step": torch.tensor(history_steps, dtype=torch.int64),
                    "loss": torch.tensor(history_losses, dtype=torch.float32),
                },
            }
            return ckpt.save_checkpoint(
                path, encoder, loss=loss_fn, optimizer=optimizer, step=step, configs=configs, extra=extra
            )

        drawn: list[np.ndarray] = []
        umap_path: Optional[Path] = None
        if start_step >= config.steps and rank == 0 and not checkpoint_path.exists():
            save(start_step, checkpoint_path)
        for step in range(start_step, config.steps):
            started = time.perf_counter()
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = sample_batch(store, config.seed, step, rank, world_size, n, m, config.short_speaker_policy, crop,
                                 n_copies, config.single_corpus_batches, config.corpus_weights)
            if rank_state_dir is not None:
                drawn.append(batch.speaker_indices)
            mels = batch.mels
            if augments(config):
                mels = augment_batch(mels, batch.speaker_indices, store, config, config.seed, step, rank, copies=batch.copies)
            loss, sim = objective(torch.from_numpy(mels).to(dev))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            loss_fn.similarity_weight.grad *= config.wb_grad_scale
            loss_fn.similarity_bias.grad *= config.wb_grad_scale
            nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
            before = input_weights.detach().clone() if config.input_lr_scale != 1.0 else None
            optimizer.step()
            if before is not None:
                with torch.no_grad():  # the first layer's input weights move input_lr_scale times Adam's step
                    input_weights.add_(input_weights - before, alpha=config.input_lr_scale - 1.0)
            if config.weight_decay > 0:
                with torch.no_grad():
                    for p in decayed:
                        p.mul_(1.0 - lr * config.weight_decay)
            loss_value = mean_over_ranks(loss.detach(), world_size)
            step_time_s = time.perf_counter() - started
            done = step + 1
            history_steps.append(done)
            history_losses.append(loss_value)
            saved = None
            backup = done % config.backup_every == 0  # on its own schedule, not only where save_every falls too
            if done % config.save_every == 0 or done == config.steps or backup:
                if rank == 0:
                    saved = save(done, checkpoint_path)
                if rank == 0 and backup:
                    save(done, run_dir / "backups" / f"encoder_{done:06d}.pt")
                barrier(world_size)
            drew_umap = None
            if probes is not None and (done % config.umap_every == 0 or done == config.steps):
                umap_file = run_dir / "umap" / f"umap_{done:06d}.png"
                drew_umap = umap_path = _plot_probes(encoder, probes, dev, umap_file, done)
            if rank == 0 and callback is not None:
                eer = float(batch_eer(sim.detach().float().cpu(), n, m))
                callback(
                    TrainProgress(done, config.steps, loss_value, eer, lr, float(loss_fn.similarity_weight.item()),
                                  float(loss_fn.similarity_bias.item()), step_time_s, saved, drew_umap)
                )

        if rank_state_dir is not None:
            Path(rank_state_dir).mkdir(parents=True, exist_ok=True)
            speakers = torch.from_numpy(np.stack(drawn)) if drawn else torch.zeros((0, n), dtype=torch.int64)
            torch.save({"model_state": encoder.state_dict(), "loss_state": loss_fn.state_dict(), "speakers": speakers},
                       Path(rank_state_dir) / f"rank{rank}.pt")
        loss_curve_path = None
        if rank == 0 and history_steps:
            from spkenc.plots import plot_loss_curve

            loss_curve_path = plot_loss_curve(history_steps, history_losses, run_dir / "loss_curve.png")
        barrier(world_size)
        final_loss = history_losses[-1] if history_losses else None
        return TrainResult(run_dir, checkpoint_path, max(start_step, config.steps), final_loss, history_steps,
                           history_losses, loss_curve_path, umap_path, n, m, encoder.config)


@contextmanager
def _flush_denormals() -> Iterator[None]:
    """Flush subnormal floats to zero on the CPU while training.

    Fine-tuning a model whose loss is already near zero (Resemblyzer's weights give batch
    losses around 1e-3) drives gradients and Adam's second moments towards the subnormal range,
    where x86 arithmetic is many times slower. This is a precaution: the slowdown first blamed
    on subnormals turned out to be the UMAP thread reset (see `spkenc.plots.project_2d`).
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)  # PyTorch's default; it has no getter to restore from


def _check_model_config(encoder: nn.Module, wanted: Optional[ModelConfig], n_mels: int, source: Any) -> None:
    if wanted is not None and wanted != encoder.config:
        raise ValueError(
            f"{source}: the checkpoint's model is {encoder.config.to_dict()}, not the requested {wanted.to_dict()}"
        )
    if encoder.n_mels != n_mels:
        raise ValueError(f"{source}: the checkpoint's model takes {encoder.n_mels} mels, the shards have {n_mels}")


def _warn_config_changes(stored: Optional[dict], config: TrainConfig) -> None:
    """A resumed run with other settings is no longer the uninterrupted run; say which changed."""
    if not stored:
        return
    # As a TrainConfig (like stored_train_config): lists back to tuples, and a setting newer than
    # the checkpoint at its default (the run trained without it).
    before = TrainConfig.from_dict(stored).to_dict()
    changed = {k: (before[k], v) for k, v in config.to_dict().items() if k != "steps" and before[k] != v}
    if changed:
        log.warning("resuming with changed training settings (stored, now): %s", changed)


def _plot_probes(encoder: nn.Module, probes: Any, device: torch.device, path: Path, step: int) -> Path:
    from spkenc.plots import plot_umap

    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        embeds = encoder(torch.from_numpy(probes.mels).to(device)).float().cpu().numpy()
    encoder.train(was_training)
    return plot_umap(embeds, probes.labels, path, title=f"held-out probes, step {step}")
