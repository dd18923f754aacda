"""Rows on training: one GE2E step, the batch loader, and the bf16 loss curve (--long).

The peer is RTVC's recipe (`benchmarks.rtvc_reference`). Both sides train on the same real
batch: 64 speakers x 10 utterances x 160 frames drawn from speechocean762_train's mel shards
(8 x 4 from the demo corpus in --quick).
"""

import logging
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np

from benchmarks.common import RowResult, Settings, Timing, median_time
from benchmarks.rows_audio import sources_for

log = logging.getLogger(__name__)


def corpus_shards(settings: Settings) -> list[Path]:
    """One mel shard per speaker of the row corpus, built once into the cache with spkenc's
    preprocess_wav, wav_to_mel and write_shard."""
    from spkenc.audio import preprocess_wav, wav_to_mel
    from spkenc.shards import write_shard

    from benchmarks.inputs import audio_files

    corpus = sources_for(settings).corpus
    folder = settings.cache / "shards" / corpus.name
    done = folder / ".complete"
    if not done.exists():
        speakers = sorted(p for p in corpus.iterdir() if p.is_dir())
        log.info("building mel shards of %d speakers of %s into %s (once)", len(speakers), corpus, folder)
        for speaker in speakers:
            utterances = []
            for path in audio_files(speaker):
                wav = preprocess_wav(path)
                if len(wav):
                    utterances.append((path.stem, wav_to_mel(wav), str(path)))
            if utterances:
                write_shard(folder / f"{speaker.name}.parquet", speaker.name, utterances, corpus=corpus.name)
        done.touch()
    return sorted(folder.glob("*.parquet"))


def batch_geometry(settings: Settings) -> tuple[int, int]:
    return (8, 4) if settings.quick else (64, 10)


def real_batch(settings: Settings) -> np.ndarray:
    """(N, M, 160, 40) float32 mels: sample_batch(seed 0, step 0) over the row corpus's shards."""
    from spkenc.sampling import ShardStore, sample_batch

    n, m = batch_geometry(settings)
    store = ShardStore(corpus_shards(settings))
    return sample_batch(store, seed=0, step=0, speakers_per_batch=n, utterances_per_speaker=m).mels


class SpkencStep:
    """spkenc's training step: GE2EObjective forward (optionally bf16 autocast), vectorised GE2E,
    backward, w/b gradient scale 0.01, clip at 3, Adam in RTVC's parameter order, and the
    in-batch EER that the training loop reports every step."""

    def __init__(self, bf16: bool, seed: int = 0) -> None:
        import torch

        from spkenc.checkpoint import rtvc_parameters
        from spkenc.config import TrainConfig
        from spkenc.ge2e import GE2ELoss
        from spkenc.model import SpeakerEncoder
        from spkenc.training import GE2EObjective

        torch.manual_seed(seed)
        self.config = TrainConfig(bf16=bf16)
        self.encoder, self.loss_fn = SpeakerEncoder(), GE2ELoss(self.config.w_init, self.config.b_init)
        self.objective = GE2EObjective(self.encoder, self.loss_fn, bf16)
        self.params = rtvc_parameters(self.encoder, self.loss_fn)
        self.optimizer = torch.optim.Adam(self.params, lr=self.config.learning_rate_init)

    def step(self, mels: np.ndarray) -> tuple[float, float]:
        import torch

        from spkenc.ge2e import batch_eer

        n, m = mels.shape[:2]
        loss, sim = self.objective(torch.from_numpy(mels))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.loss_fn.similarity_weight.grad *= self.config.wb_grad_scale
        self.loss_fn.similarity_bias.grad *= self.config.wb_grad_scale
        torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_grad_norm)
        self.optimizer.step()
        return float(loss.detach()), batch_eer(sim.detach(), n, m)


def train_step_rows(settings: Settings, bf16: bool) -> list[RowResult]:
    """Seconds per training step, spkenc (fp32 or bf16 autocast) vs the RTVC recipe in fp32."""
    from spkenc.config import ModelConfig
    from spkenc.model import count_flops

    from benchmarks.rtvc_reference import RTVCTrainer

    mels = real_batch(settings)
    n, m = mels.shape[:2]
    ours, peer = SpkencStep(bf16), RTVCTrainer()
    first_ours, first_peer = ours.step(mels), peer.step(mels)  # each side's first warm-up
    warmup = max(0, settings.n_warmup - 1)
    t_ours = median_time(lambda: ours.step(mels), settings.n_runs, warmup)
    t_peer = median_time(lambda: peer.step(mels), settings.n_runs, warmup)
    flops = 3 * count_flops(ModelConfig(), mels.shape[2], n * m)  # forward + backward (2x forward)
    mode = "bf16 autocast" if bf16 else "fp32"
    row = RowResult(
        f"training step {mode}, {n}x{m}x{mels.shape[2]}", "train_bf16" if bf16 else "train",
        t_ours.median_s, t_peer.median_s, "s/step", "lower",
        target_ratio=1.8 if bf16 else 1.2, target_text=">= 1.8x (curve: --long)" if bf16 else ">= 1.2x",
        gflops=(flops / t_ours.median_s / 1e9, flops / t_peer.median_s / 1e9),
    )
    row.notes.append(
        f"first-step loss spkenc {first_ours[0]:.4f} vs RTVC {first_peer[0]:.4f}, batch EER {first_ours[1]:.3f} vs {first_peer[1]:.3f}"
    )
    return [row]


def loader_rows(settings: Settings) -> list[RowResult]:
    """Batches per second: ShardStore + sample_batch vs one np.load per drawn utterance."""
    from spkenc.sampling import ShardStore, sample_batch
    from spkenc.shards import read_shard

    from benchmarks.rtvc_reference import NpyUtteranceLoader, write_npy_utterances

    n, m = batch_geometry(settings)
    shards = corpus_shards(settings)
    npy = settings.cache / "npy" / shards[0].parent.name
    if not (npy / ".complete").exists():
        write_npy_utterances([(p.stem, read_shard(p).mels) for p in shards], npy)
        (npy / ".complete").touch()
    peer = NpyUtteranceLoader(npy, n, m)
    n_batches = 3 if settings.quick else 10
    rows, stores = [], []
    for budget, label in ((2 * 2**30, "shards in memory"), (0, "shards read on demand")):
        cache_dir = settings.cache / "mel_cache" / shards[0].parent.name
        store = ShardStore(shards, memory_budget_bytes=budget, cache_dir=cache_dir)
        notes = []
        if not store.in_memory:
            shutil.rmtree(cache_dir, ignore_errors=True)
            started = time.perf_counter()
            for i in range(len(store)):  # what the first use of each shard costs, once per shard version
                store.read_crops(i, [0], [0], 1)
            built_s = time.perf_counter() - started
            size_mb = sum(p.stat().st_size for p in cache_dir.glob("*.npy")) / 1e6
            notes.append(f"flat cache (spkenc.mel_cache) built on first use: {built_s:.1f} s for {len(store)} shards, {size_mb:.0f} MB, kept on disk for later runs")
        step = iter(range(10**9))
        t_ours, t_peer = alternating_times(
            [lambda: [sample_batch(store, 0, next(step), 0, 1, n, m) for _ in range(n_batches)], lambda: [peer.batch() for _ in range(n_batches)]],
            3 * settings.n_runs, settings.n_warmup,
        )
        row = RowResult(
            f"training loader, {n}x{m}x160 batches, {label}", "loader",
            n_batches / t_ours.median_s, n_batches / t_peer.median_s, "batch/s", "higher",
            target_ratio=5.0, target_text=">= 5x",
        )
        row.notes.append(
            f"{len(shards)} speakers; the .npy files sit in the page cache after the warm-up, as do the shards; "
            f"median of {t_ours.n_runs} runs of {n_batches} batches per side, the sides alternating"
        )
        row.notes.extend(notes)
        stores.append(store)
        if len(stores) == 2:
            same = all(
                np.array_equal(sample_batch(stores[0], 7, k, 0, 1, n, m).mels, sample_batch(stores[1], 7, k, 0, 1, n, m).mels)
                for k in range(3)
            )
            row.checks["same batches"] = (same, "sample_batch(seed 7, steps 0-2) bit-identical to the in-memory store" if same else "batches differ from the in-memory store")
        rows.append(row)
    return rows


def alternating_times(fns: list, n_runs: int, n_warmup: int = 1) -> list[Timing]:
    """Time each of `fns` `n_runs` times, taking turns (after `n_warmup` untimed turns), so that
    a change of machine load hits every side alike; one Timing per function."""
    runs: list[list[float]] = [[] for _ in fns]
    for turn in range(n_warmup + n_runs):
        for fn, times in zip(fns, runs):
            started = time.perf_counter()
            fn()
            if turn >= n_warmup:
                times.append(time.perf_counter() - started)
    return [Timing(tuple(times)) for times in runs]


def moving_gap(reference: np.ndarray, other: np.ndarray, width: int) -> tuple[float, float, float]:
    """(largest |relative gap|, mean relative gap, share of windows where `other` is higher) of
    the `width`-step moving averages of two loss curves.

    >>> tuple(round(v, 6) for v in moving_gap(np.ones(30), np.full(30, 1.5), 20))
    (0.5, 0.5, 1.0)
    """
    smooth_ref, smooth_other = (np.convolve(c, np.ones(width) / width, mode="valid") for c in (reference, other))
    gap = (smooth_other - smooth_ref) / smooth_ref
    return float(np.max(np.abs(gap))), float(gap.mean()), float((gap > 0).mean())


def loss_curve_rows(settings: Settings) -> list[RowResult]:
    """spkenc's training step for `curve_steps` steps in fp32 and in bf16 autocast, from the same
    initial weights on the same batches (sample_batch with seed 0, step k), interleaved step by
    step, plus an fp32 run from the initial weights of seed 1 on the same batches. The CSV is
    appended as it goes, so a stopped run leaves the steps it finished.

    The curves match when bf16's 20-step moving average stays as close to fp32's as a second
    fp32 run from other initial weights does: the largest relative gap bf16 vs fp32 is at most
    that of fp32 seed 1 vs fp32 seed 0 (a fixed 2% limit said nothing about the normal spread).
    """
    from spkenc.sampling import ShardStore, sample_batch

    n, m = batch_geometry(settings)
    steps = settings.curve_steps
    store = ShardStore(corpus_shards(settings))
    names = ("fp32", "bf16", "fp32_seed1")
    runs = {"fp32": SpkencStep(bf16=False, seed=0), "bf16": SpkencStep(bf16=True, seed=0),
            "fp32_seed1": SpkencStep(bf16=False, seed=1)}
    curves: dict[str, list[float]] = {k: [] for k in names}
    seconds = {k: 0.0 for k in names}
    curve_csv = settings.cache / f"loss_curves_{n}x{m}_{steps}.csv"
    with open(curve_csv, "w") as out:
        out.write("step," + ",".join(f"loss_{k}" for k in names) + "," + ",".join(f"eer_{k}" for k in names) + "\n")
        for step in range(steps):
            mels = sample_batch(store, 0, step, 0, 1, n, m).mels
            eers = {}
            for name, run in runs.items():
                started = time.perf_counter()
                loss, eers[name] = run.step(mels)
                seconds[name] += time.perf_counter() - started
                curves[name].append(loss)
            out.write(f"{step + 1}," + ",".join(f"{curves[k][-1]:.6f}" for k in names) + ","
                      + ",".join(f"{eers[k]:.4f}" for k in names) + "\n")
            out.flush()
            if (step + 1) % 10 == 0:
                log.info("loss curve step %d/%d: %s", step + 1, steps, ", ".join(f"{k} {curves[k][-1]:.4f}" for k in names))
    fp32, bf16, seed1 = (np.asarray(curves[k]) for k in names)
    width = min(20, steps)
    bf16_gap, bf16_mean, bf16_higher = moving_gap(fp32, bf16, width)
    seed_gap, seed_mean, _ = moving_gap(fp32, seed1, width)
    plot = plot_curves(fp32, bf16, curve_csv.with_suffix(".png"), f"{n}x{m}x160 batches, same initial weights and batches",
                       reference=seed1)
    row = RowResult(
        f"loss curve bf16 vs fp32, {steps} steps of {n}x{m}x160", "loss_curve",
        seconds["bf16"] / steps, seconds["fp32"] / steps, "s/step", "lower", target_text="curves match",
    )
    row.checks["curves match"] = (
        bf16_gap <= seed_gap,
        f"max relative gap of {width}-step moving averages: bf16 vs fp32 {100 * bf16_gap:.2f}% (mean {100 * bf16_mean:+.2f}%, "
        f"bf16 higher in {100 * bf16_higher:.0f}% of windows), fp32 seed 1 vs seed 0 {100 * seed_gap:.2f}% "
        f"(mean {100 * seed_mean:+.2f}%); loss {fp32[0]:.3f} -> {fp32[-1]:.3f} fp32, {bf16[0]:.3f} -> {bf16[-1]:.3f} bf16; "
        f"{curve_csv}, {plot}",
    )
    row.notes.append("spkenc figure: bf16 s/step, peer figure: spkenc fp32 s/step over the whole curve")
    return [row]


def plot_curves(fp32: np.ndarray, bf16: np.ndarray, path: Path, title: str, reference: Optional[np.ndarray] = None) -> Path:
    """PNG of the (steps,) loss curves, with the fp32 seed-1 `reference` when given; returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(fp32) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, fp32, lw=0.8, label="fp32")
    ax.plot(steps, bf16, lw=0.8, label="bf16 autocast")
    if reference is not None:
        ax.plot(steps, reference, lw=0.8, label="fp32, initial weights of seed 1")
    ax.set_xlabel("step")
    ax.set_ylabel("GE2E loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
