"""PNG plots for training and evaluation: UMAP, loss curve, DET curve, score histograms,
speaker similarity matrix and utterance durations.

Each function draws on its own `matplotlib.figure.Figure` (Agg canvas, no pyplot state),
writes a PNG atomically (temporary name in the same folder, then `os.replace`) and returns
its Path. Parent folders are created.
"""

import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

# Below this many points UMAP's spectral initialisation is unreliable (it fails outright for
# n <= 4), so the projection falls back to PCA and the title says so.
MIN_UMAP_POINTS = 10
_DPI = 100


def _figure(width_in: float = 6.0, height_in: float = 5.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=_DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        figure.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _finite_1d(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(array)).sum())} non-finite value(s)")
    return array


def project_2d(embeddings: np.ndarray, random_state: int = 0) -> tuple[np.ndarray, str]:
    """(n, E) embeddings -> ((n, 2) coordinates, method name "UMAP" or "PCA").

    UMAP (cosine metric, fixed `random_state`) when there are at least MIN_UMAP_POINTS points,
    PCA otherwise (one point sits at the origin; a rank-1 set lies on the x axis).

    >>> xy, method = project_2d(np.eye(3, 8))
    >>> xy.shape, method
    ((3, 2), 'PCA')
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"embeddings must be (n, E) with n >= 1, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings hold non-finite values")
    if len(x) >= MIN_UMAP_POINTS:
        import torch

        # umap-learn resets the OpenMP pool that torch shares to all cores; a training loop
        # pinned to 1 thread then oversubscribes the CPU (a measured run slowed 7x after its
        # first UMAP), so torch's thread count is put back.
        torch_threads = torch.get_num_threads()
        try:
            import umap

            reducer = umap.UMAP(n_neighbors=min(15, len(x) - 1), metric="cosine", random_state=random_state, n_jobs=1)
            return np.asarray(reducer.fit_transform(x), dtype=np.float64), "UMAP"
        finally:
            torch.set_num_threads(torch_threads)
    log.info("%d point(s): PCA instead of UMAP, which needs at least %d", len(x), MIN_UMAP_POINTS)
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = np.zeros((len(x), 2))
    k = min(2, vt.shape[0])
    xy[:, :k] = centred @ vt[:k].T
    return xy, "PCA"


def plot_umap(embeddings: np.ndarray, labels: Sequence, path: PathLike, title: str = "") -> Path:
    """Scatter of (n, E) embeddings projected to 2-D, one colour per label (speaker).

    Uses UMAP with a fixed random_state, or PCA below MIN_UMAP_POINTS points (the title then
    says "PCA (too few points for UMAP)"). A legend is drawn for up to 20 labels.
    """
    labels = list(labels)
    if len(labels) != len(embeddings):
        raise ValueError(f"{len(labels)} labels for {len(embeddings)} embeddings")
    xy, method = project_2d(embeddings)
    figure = _figure()
    ax = figure.add_subplot()
    names = sorted(set(map(str, labels)))
    colours = _colours(len(names))
    text = np.array(list(map(str, labels)))
    for colour, name in zip(colours, names):
        keep = text == name
        ax.scatter(xy[keep, 0], xy[keep, 1], s=18, color=colour, label=name, alpha=0.85)
    if len(names) <= 20:
        ax.legend(fontsize=6, markerscale=0.8, loc="best", ncol=2 if len(names) > 10 else 1)
    how = method if method == "UMAP" else "PCA (too few points for UMAP)"
    ax.set_title(f"{title} - {how}" if title else how, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    figure.tight_layout()
    return _save(figure, path)


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if n <= 20 else "hsv"]
    return [cmap(i / max(n, 1)) if n > 20 else cmap(i) for i in range(n)]


def plot_loss_curve(steps: Sequence[int], losses: Sequence[float], path: PathLike, title: str = "GE2E loss") -> Path:
    """Training loss against optimizer step (non-finite losses are an error)."""
    steps_a, losses_a = _finite_1d(steps, "steps"), _finite_1d(losses, "losses")
    if len(steps_a) != len(losses_a) or len(steps_a) == 0:
        raise ValueError(f"need as many steps as losses, at least one: got {len(steps_a)} and {len(losses_a)}")
    figure = _figure(6.0, 4.0)
    ax = figure.add_subplot()
    ax.plot(steps_a, losses_a, marker="." if len(steps_a) < 50 else None, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def plot_det_curve(
    false_alarm_rates: Sequence[float],
    miss_rates: Sequence[float],
    path: PathLike,
    eer: Optional[float] = None,
    title: str = "DET curve",
) -> Path:
    """Detection error trade-off: miss rate against false-alarm rate, both on the normal
    deviate (probit) scale, as in NIST evaluations. Rates are fractions in [0, 1]; they are
    clipped to [1e-4, 1 - 1e-4] for the axes. `eer` (a fraction) is marked if given.
    """
    from scipy.stats import norm

    fa, miss = _finite_1d(false_alarm_rates, "false_alarm_rates"), _finite_1d(miss_rates, "miss_rates")
    if len(fa) != len(miss) or len(fa) == 0:
        raise ValueError(f"need as many false-alarm as miss rates, at least one: got {len(fa)} and {len(miss)}")
    if fa.min() < 0 or fa.max() > 1 or miss.min() < 0 or miss.max() > 1:
        raise ValueError("rates must be fractions in [0, 1]")
    low = 1e-4
    figure = _figure(5.0, 5.0)
    ax = figure.add_subplot()
    ax.plot(norm.ppf(np.clip(fa, low, 1 - low)), norm.ppf(np.clip(miss, low, 1 - low)), linewidth=1.5)
    ticks = np.array([0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4])
    ax.set_xticks(norm.ppf(ticks), [f"{100 * t:g}" for t in ticks])
    ax.set_yticks(norm.ppf(ticks), [f"{100 * t:g}" for t in ticks])
    limit = norm.ppf([0.0005, 0.5])
    ax.set_xlim(*limit)
    ax.set_ylim(*limit)
    ax.plot(limit, limit, color="grey", linewidth=0.5, linestyle=":")
    if eer is not None:
        point = norm.ppf(np.clip(eer, low, 1 - low))
        ax.plot([point], [point], "o", color="C3", label=f"EER {100 * eer:.2f}%")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("false alarm rate (%)")
    ax.set_ylabel("miss rate (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def plot_score_histograms(
    target_scores: Sequence[float],
    nontarget_scores: Sequence[float],
    path: PathLike,
    threshold: Optional[float] = None,
    title: str = "cosine scores",
) -> Path:
    """Density histograms of target (same speaker) and non-target scores on shared bins,
    with the decision `threshold` (e.g. the EER threshold) as a vertical line if given."""
    target, nontarget = _finite_1d(target_scores, "target_scores"), _finite_1d(nontarget_scores, "nontarget_scores")
    if len(target) == 0 and len(nontarget) == 0:
        raise ValueError("no scores to plot")
    both = np.concatenate([target, nontarget])
    bins = np.linspace(both.min(), both.max() + 1e-9, 51)
    figure = _figure(6.0, 4.0)
    ax = figure.add_subplot()
    for scores, name, colour in ((nontarget, "non-target", "C0"), (target, "target", "C1")):
        if len(scores):
            ax.hist(scores, bins=bins, density=True, alpha=0.55, color=colour, label=f"{name} (n={len(scores)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
    ax.set_xlabel("cosine score")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def plot_similarity_matrix(
    matrix: np.ndarray, labels: Sequence, path: PathLike, title: str = "speaker similarity"
) -> Path:
    """(S, S) speaker-by-speaker similarity as a heat map, labelled by speaker (ticks hidden
    above 40 speakers). Colours span the matrix's own range: embeddings are non-negative, so
    cosines sit in [0, 1] and a fixed [-1, 1] scale would wash the contrast out."""
    m = np.asarray(matrix, dtype=np.float64)
    labels = list(map(str, labels))
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"matrix must be square and non-empty, got shape {m.shape}")
    if len(labels) != m.shape[0]:
        raise ValueError(f"{len(labels)} labels for a {m.shape[0]} x {m.shape[0]} matrix")
    if not np.isfinite(m).all():
        raise ValueError("matrix holds non-finite values")
    size = min(4.0 + 0.2 * len(labels), 12.0)
    figure = _figure(size + 1.0, size)
    ax = figure.add_subplot()
    low, high = float(m.min()), float(m.max())
    image = ax.imshow(m, vmin=low, vmax=high if high > low else low + 1e-6, cmap="viridis")
    if len(labels) <= 40:
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def plot_duration_histogram(durations_s: Sequence[float], path: PathLike, title: str = "utterance durations") -> Path:
    """Histogram of utterance durations in seconds (e.g. after silence trimming)."""
    durations = _finite_1d(durations_s, "durations_s")
    if len(durations) == 0:
        raise ValueError("no durations to plot")
    if durations.min() < 0:
        raise ValueError(f"durations must be non-negative, got {durations.min()}")
    figure = _figure(6.0, 4.0)
    ax = figure.add_subplot()
    ax.hist(durations, bins=min(50, max(5, len(durations) // 4)), color="C2")
    ax.set_xlabel("duration (s)")
    ax.set_ylabel("utterances")
    ax.set_title(f"{title} (n={len(durations)}, total {durations.sum() / 3600:.2f} h)", fontsize=10)
    figure.tight_layout()
    return _save(figure, path)
