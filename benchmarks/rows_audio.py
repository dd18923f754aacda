"""Rows on audio in, embeddings out: preprocessing and embedding against Resemblyzer 0.1.4.

Resemblyzer is what users run today: `resemblyzer.preprocess_wav(path)` and
`VoiceEncoder.embed_utterance(wav)` called once per utterance, with RTVC's pretrained weights
(the `pretrained.pt` its wheel ships). spkenc loads the same weights.
"""

import logging
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

from benchmarks.common import RowResult, Settings, median_time
from benchmarks.inputs import Sources, audio_files, demo_sources, duration_s, long_file, one_per_speaker, resampled_copies, shared_sources

log = logging.getLogger(__name__)

RESEMBLYZER_RATE = 1.3  # Resemblyzer's default partials per second; both sides use it
GROWTH_LIMIT = 1.1  # rss row: peak growth per byte of extra decoded float32 audio


def sources_for(settings: Settings) -> Sources:
    return demo_sources() if settings.quick else shared_sources()


def pretrained_path() -> Path:
    """RTVC's weights as shipped in the Resemblyzer wheel."""
    import resemblyzer

    return Path(resemblyzer.__file__).parent / "pretrained.pt"


@lru_cache(maxsize=None)
def peer_encoder():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from resemblyzer import VoiceEncoder

    return VoiceEncoder("cpu", verbose=False)


def peer_preprocess(path_or_wav, source_sr=None) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from resemblyzer import preprocess_wav

    return preprocess_wav(path_or_wav, source_sr)


def inputs_48k(settings: Settings) -> list[tuple[str, list[Path]]]:
    """[("30 utterances", paths), ("10-min file", [path])] as 48 kHz WAVs (smaller in --quick)."""
    src = sources_for(settings)
    n, seconds = (4, 20.0) if settings.quick else (30, 600.0)
    utterances = resampled_copies(one_per_speaker(src.utterances, n), 48000, settings.cache / "inputs")
    long = long_file(src.long_speech, seconds, 48000, settings.cache / "inputs")
    label = "10-min file" if not settings.quick else f"{seconds:.0f}-s file"
    return [(f"{n} utterances", utterances), (label, [long])]


def preprocess_rows(settings: Settings) -> list[RowResult]:
    """`preprocess_wav` on 48 kHz files: audio seconds per second, and the same trimmed output."""
    from spkenc.audio import preprocess_wav

    rows = []
    for label, paths in inputs_48k(settings):
        seconds = sum(duration_s(p) for p in paths)
        ours = [preprocess_wav(p) for p in paths]
        theirs = [peer_preprocess(p) for p in paths]
        same_length = all(len(a) == len(b) for a, b in zip(ours, theirs))
        max_diff = max(float(np.abs(a - b).max()) if len(a) == len(b) and len(a) else np.inf for a, b in zip(ours, theirs))
        # the calls above that produced the outputs were each side's first warm-up
        warmup = max(0, settings.n_warmup - 1)
        t_ours = median_time(lambda: [preprocess_wav(p) for p in paths], settings.n_runs, warmup)
        t_peer = median_time(lambda: [peer_preprocess(p) for p in paths], settings.n_runs, warmup)
        row = RowResult(
            f"preprocess_wav, {label} (48 kHz)", "preprocess", seconds / t_ours.median_s, seconds / t_peer.median_s,
            "audio s/s", "higher", target_ratio=5.0, target_text=">= 5x, same output",
        )
        kept = sum(len(a) for a in ours) / 16000
        row.checks["same trimmed output"] = (
            same_length and max_diff <= 1e-4,
            f"lengths {'equal' if same_length else 'DIFFER'}, max abs diff {max_diff:.2e} (limit 1e-4); {kept:.1f} s of {seconds:.1f} s kept",
        )
        rows.append(row)
    return rows


def _embedder(n_threads: int, precision: str = "fp32"):
    """spkenc's Embedder on RTVC's weights at `precision` ("fp32" or its "bf16" fast mode)."""
    from spkenc.inference import Embedder

    return Embedder.from_checkpoint(pretrained_path(), device="cpu", n_threads=n_threads, precision=precision)


def embed_sets(settings: Settings) -> list[tuple[str, list[np.ndarray]]]:
    """The preprocessing rows' inputs after spkenc's preprocess_wav: what both sides embed."""
    from spkenc.audio import preprocess_wav

    return [(label, [preprocess_wav(p) for p in paths]) for label, paths in inputs_48k(settings)]


def n_partials(wavs: list[np.ndarray]) -> int:
    from spkenc.inference import compute_partial_slices

    return sum(len(compute_partial_slices(len(w), RESEMBLYZER_RATE)[1]) for w in wavs)


def embed_rows(settings: Settings, bf16: bool = False) -> list[RowResult]:
    """`Embedder.embed_utterances` vs `VoiceEncoder.embed_utterance` per utterance (fp32 peer).

    With `bf16`, spkenc runs its fast mode (`Embedder(precision="bf16")`: the LSTM in bfloat16
    with a float32 cell state) and is held to cosine >= 0.999 to the fp32 peer on every
    utterance and a demo-corpus EER within 0.2 points of fp32.
    """
    from spkenc.config import ModelConfig
    from spkenc.model import count_flops

    embedder = _embedder(settings.n_threads, "bf16" if bf16 else "fp32")
    peer = peer_encoder()
    flops_per_partial = count_flops(ModelConfig(), 160, 1)
    rows = []
    for label, wavs in embed_sets(settings):

        def ours():
            return embedder.embed_utterances(wavs, rate=RESEMBLYZER_RATE)

        def theirs():
            return np.stack([peer.embed_utterance(w, rate=RESEMBLYZER_RATE) for w in wavs])

        cosine = float(np.min(np.sum(ours() * theirs(), axis=1)))  # also each side's first warm-up
        t_ours = median_time(ours, settings.n_runs, max(0, settings.n_warmup - 1))
        t_peer = median_time(theirs, settings.n_runs, max(0, settings.n_warmup - 1))
        seconds = sum(len(w) for w in wavs) / 16000
        flops = n_partials(wavs) * flops_per_partial
        mode = "bf16" if bf16 else "fp32"
        row = RowResult(
            f"embed_utterances {mode}, {label}", "embed_bf16" if bf16 else "embed",
            seconds / t_ours.median_s, seconds / t_peer.median_s, "audio s/s", "higher",
            target_ratio=2.0 if bf16 else 1.3,
            target_text=">= 2x, cos >= 0.999, EER +-0.2" if bf16 else ">= 1.3x, cos >= 0.99999",
            gflops=(flops / t_ours.median_s / 1e9, flops / t_peer.median_s / 1e9),
        )
        floor = 0.999 if bf16 else 0.99999
        row.checks["cosine to peer"] = (cosine >= floor, f"min cosine {cosine:.7f} (floor {floor})")
        if bf16:
            row.notes.append('Embedder(precision="bf16"): LSTM in bfloat16 with a float32 cell state')
        rows.append(row)
    if bf16:
        rows[0].checks["demo EER unchanged"] = demo_eer_check(settings, embedder)
    return rows


def demo_eer_check(settings: Settings, embedder_bf16) -> tuple[bool, str]:
    """EER over all cross pairs of the demo corpus, fp32 vs bf16: equal within 0.2 points."""
    from spkenc.audio import preprocess_wav

    files = audio_files(sources_for(settings).demo)
    if settings.quick:
        files = [f for f in files if f.parent.name in sorted({g.parent.name for g in files})[:6]]
    wavs = [preprocess_wav(f) for f in files]
    labels = [f.parent.name for f in files]
    e32 = _embedder(settings.n_threads).embed_utterances(wavs, rate=RESEMBLYZER_RATE)
    e16 = embedder_bf16.embed_utterances(wavs, rate=RESEMBLYZER_RATE)
    eer32, eer16 = pairwise_eer(e32, labels), pairwise_eer(e16, labels)
    ok = abs(eer32 - eer16) <= 0.002
    return ok, f"demo EER fp32 {100 * eer32:.2f}%, bf16 {100 * eer16:.2f}% ({len(files)} utterances, all pairs)"


def pairwise_eer(embeds: np.ndarray, labels: list[str]) -> float:
    """EER in [0, 1] of cosine scores over all pairs i < j (target: same label).

    >>> e = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> pairwise_eer(e / np.linalg.norm(e, axis=1, keepdims=True), ["a", "a", "b", "b"])
    0.0
    """
    from sklearn.metrics import roc_curve

    scores = embeds @ embeds.T
    i, j = np.triu_indices(len(labels), k=1)
    same = np.asarray(labels)[i] == np.asarray(labels)[j]
    fpr, tpr, _ = roc_curve(same, scores[i, j])
    fnr = 1.0 - tpr
    k = int(np.flatnonzero(fnr <= fpr)[0])
    if k == 0:
        return float(fpr[0])
    # linear interpolation of the crossing of fpr and fnr between ROC points k-1 and k
    d0, d1 = fnr[k - 1] - fpr[k - 1], fnr[k] - fpr[k]
    t = d0 / (d0 - d1)
    return float(fpr[k - 1] + t * (fpr[k] - fpr[k - 1]))


def rss_rows(settings: Settings) -> list[RowResult]:
    """Peak RSS of a child process embedding a long 16 kHz file, at 1/3 and at full length.

    Pass: at most 1.5 GB at full length (1 hour), and the growth between the two lengths is at
    most the extra decoded audio as float32 (issue 6: memory does not grow with the length of the
    file beyond the decoded audio), with 10% slack for the allocator and page granularity.
    """
    import json
    import subprocess
    import sys

    from benchmarks.common import REPO

    src = sources_for(settings)
    lengths_s = (20.0, 60.0) if settings.quick else (1200.0, 3600.0)
    reports = []
    for seconds in lengths_s:
        path = long_file(src.long_speech, seconds, 16000, settings.cache / "inputs")
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.rss_child", str(path), "--threads", str(settings.n_threads)],
            cwd=REPO, capture_output=True, text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"benchmarks.rss_child {path} failed ({done.returncode}): {done.stderr[-2000:]}")
        reports.append(json.loads(done.stdout.strip().splitlines()[-1]))
    short, full = reports
    def span(seconds: float) -> str:
        return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"

    row = RowResult(
        f"peak RSS embedding a {span(full['duration_s'])} file", "rss", full["peak_rss_mb"], None, "MB", "lower",
        limit=1500.0, target_text="<= 1500 MB, growth <= decoded audio",
    )
    growth = full["peak_rss_mb"] - short["peak_rss_mb"]
    audio = full["decoded_f32_mb"] - short["decoded_f32_mb"]
    row.checks["growth vs decoded audio"] = (
        growth <= GROWTH_LIMIT * audio,
        f"{span(short['duration_s'])}: {short['peak_rss_mb']:.0f} MB, {span(full['duration_s'])}: {full['peak_rss_mb']:.0f} MB; "
        f"growth {growth:.0f} MB = {growth / audio:.2f}x the extra float32 audio ({audio:.0f} MB; limit {GROWTH_LIMIT}x)",
    )
    row.notes.append(
        f"after imports and model load {full['base_rss_mb']:.0f} MB; {full['seconds']:.0f} s to preprocess and embed "
        f"{span(full['duration_s'])} with {settings.n_threads} thread(s); peak RSS is the child's VmHWM"
    )
    return [row]
