"""Speaker verification metrics: trials, cosine scores, EER, minDCF and the DET curve.

A trial pairs two utterances from different files; it is a target trial when both come from
the same speaker. A trial is accepted when its score is at least the threshold t, so

    false alarm rate  FAR(t) = #{non-target scores >= t} / #non-target
    miss rate         FRR(t) = #{target scores < t} / #target

Both are computed at every distinct score (ties move together) plus one threshold above the
highest score (reject everything): these are the exact operating points of the ROC.
"""

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from spkenc.config import EvalConfig

log = logging.getLogger(__name__)

__all__ = [
    "Trials", "VerificationReport", "cosine_scores", "det_curve", "equal_error_rate", "evaluate_embeddings",
    "make_trials", "min_dcf",
]


@dataclass(frozen=True)
class Trials:
    """Verification trials over n utterances: trial k pairs rows index_a[k] < index_b[k].

    `is_target[k]` is True when both rows have the same speaker. Arrays are (K,), sorted by
    (index_a, index_b).
    """

    index_a: np.ndarray
    index_b: np.ndarray
    is_target: np.ndarray

    def __len__(self) -> int:
        return len(self.index_a)

    @property
    def n_target(self) -> int:
        return int(self.is_target.sum())

    @property
    def n_nontarget(self) -> int:
        return len(self) - self.n_target


def _pairs_from_linear(k: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear indices into the row-major upper triangle (i < j) of an n x n matrix -> (i, j)."""
    k = np.asarray(k, dtype=np.int64)
    offset = lambda i: i * n - i * (i + 1) // 2  # noqa: E731  first linear index of row i
    b = 2 * n - 1
    i = np.floor((b - np.sqrt(np.maximum(b * b - 8.0 * k, 0.0))) / 2).astype(np.int64)
    i = np.clip(i, 0, n - 2)
    i = np.where(offset(i) > k, i - 1, i)  # float rounding can land one row off either way
    i = np.where(offset(i + 1) <= k, i + 1, i)
    return i, k - offset(i) + i + 1


def make_trials(
    speaker_ids: Sequence[str],
    utterance_ids: Sequence[str],
    texts: Optional[Sequence[Optional[str]]] = None,
    max_trials: int = 0,
    seed: int = 0,
) -> Trials:
    """Trials over n utterances: every pair of different files, or a seeded sample of them.

    Row r is the file (speaker_ids[r], utterance_ids[r]); a repeated pair is an error, since a
    file scored against itself is no trial. Where `texts[a]` and `texts[b]` are both known
    (not None) and equal, the pair is left out, so trials are text-independent. With
    `max_trials` > 0 and more eligible pairs than that, `max_trials` pairs are drawn uniformly
    without replacement with numpy's generator seeded by `seed`, without listing all pairs.

    >>> t = make_trials(["a", "a", "b"], ["1", "2", "1"])
    >>> t.index_a.tolist(), t.index_b.tolist(), t.is_target.tolist()
    ([0, 0, 1], [1, 2, 2], [True, False, False])
    >>> len(make_trials(["a", "a", "b"], ["1", "2", "1"], texts=["hi", "hi", None]))
    2
    """
    n = len(speaker_ids)
    if len(utterance_ids) != n or (texts is not None and len(texts) != n):
        raise ValueError(f"{n} speaker ids, {len(utterance_ids)} utterance ids and "
                         f"{'no' if texts is None else len(texts)} texts: need one of each per utterance")
    if max_trials < 0:
        raise ValueError(f"max_trials must be 0 (all pairs) or positive, got {max_trials}")
    if n < 2:
        raise ValueError(f"need at least 2 utterances to make trials, got {n}")
    seen: dict[tuple[str, str], int] = {}
    for row, key in enumerate(zip(map(str, speaker_ids), map(str, utterance_ids))):
        if key in seen:
            raise ValueError(f"utterance {key[1]!r} of speaker {key[0]!r} is listed twice (rows {seen[key]} and {row}); "
                             "trials pair different files")
        seen[key] = row
    _, speaker_codes = np.unique(np.asarray(speaker_ids, dtype=str), return_inverse=True)
    text_codes = _text_codes(texts, n)
    eligible = _n_eligible_pairs(text_codes)
    if max_trials == 0 or eligible <= max_trials:
        a, b = np.triu_indices(n, k=1)
        keep = _different_texts(a, b, text_codes)
        a, b = a[keep], b[keep]
    else:
        a, b = _sample_pairs(n, text_codes, eligible, max_trials, seed)
    return Trials(a.astype(np.int64), b.astype(np.int64), speaker_codes[a] == speaker_codes[b])


def _text_codes(texts: Optional[Sequence[Optional[str]]], n: int) -> np.ndarray:
    """(n,) int codes of the texts, -1 where unknown."""
    codes = np.full(n, -1, dtype=np.int64)
    if texts is None:
        return codes
    known = np.array([t is not None for t in texts], dtype=bool)
    if known.any():
        _, inverse = np.unique(np.asarray([t for t in texts if t is not None], dtype=str), return_inverse=True)
        codes[known] = inverse
    return codes


def _n_eligible_pairs(text_codes: np.ndarray) -> int:
    n = len(text_codes)
    counts = np.bincount(text_codes[text_codes >= 0]) if (text_codes >= 0).any() else np.zeros(0, dtype=np.int64)
    return n * (n - 1) // 2 - int((counts * (counts - 1) // 2).sum())


def _different_texts(a: np.ndarray, b: np.ndarray, text_codes: np.ndarray) -> np.ndarray:
    ta, tb = text_codes[a], text_codes[b]
    return (ta < 0) | (tb < 0) | (ta != tb)


def _sample_pairs(n: int, text_codes: np.ndarray, eligible: int, max_trials: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`max_trials` distinct eligible pairs drawn uniformly: a random ordering of a sample of
    all pairs, filtered, keeps the first `max_trials` (drawing more if the filter left too few)."""
    rng = np.random.default_rng(seed)
    total = n * (n - 1) // 2
    draw = min(total, int(max_trials * total / eligible * 1.1) + 64)
    while True:
        k = rng.choice(total, size=draw, replace=False)
        a, b = _pairs_from_linear(k, n)
        keep = np.flatnonzero(_different_texts(a, b, text_codes))
        if len(keep) >= max_trials or draw == total:
            break
        draw = min(total, 2 * draw)
    keep = keep[:max_trials]
    order = np.lexsort((b[keep], a[keep]))
    return a[keep][order], b[keep][order]


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """(n, E) embeddings -> (n, E) float64 rows of unit L2 norm; non-finite or zero rows are a ValueError."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (n, E), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"embedding row(s) {np.flatnonzero(~np.isfinite(x).all(axis=1))[:10].tolist()} hold non-finite values")
    norms = np.linalg.norm(x, axis=1)
    if (norms == 0).any():
        raise ValueError(f"embedding row(s) {np.flatnonzero(norms == 0)[:10].tolist()} are all zero: no cosine")
    return x / norms[:, None]


def cosine_scores(embeddings: np.ndarray, trials: Trials, chunk: int = 1 << 20) -> np.ndarray:
    """(K,) float64 cosine similarities in [-1, 1] of the trials' embedding pairs.

    `embeddings` is (n, E); rows need not be normalised. Computed `chunk` trials at a time.

    >>> cosine_scores(np.array([[1.0, 0.0], [1.0, 1.0]]), make_trials(["a", "b"], ["1", "1"])).round(4).tolist()
    [0.7071]
    """
    x = unit_rows(embeddings)
    if len(trials) and max(trials.index_a.max(), trials.index_b.max()) >= len(x):
        raise ValueError(f"trials index rows up to {max(trials.index_a.max(), trials.index_b.max())}, "
                         f"but there are only {len(x)} embeddings")
    scores = np.empty(len(trials), dtype=np.float64)
    for start in range(0, len(trials), chunk):
        a, b = trials.index_a[start : start + chunk], trials.index_b[start : start + chunk]
        scores[start : start + chunk] = np.einsum("ij,ij->i", x[a], x[b])
    return np.clip(scores, -1.0, 1.0)


def _checked(scores: Sequence[float], labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"scores and labels must be 1-D of one length, got shapes {s.shape} and {y.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} non-finite score(s)")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be booleans or 0/1 (1 = target trial)")
        y = y.astype(bool)
    n_target = int(y.sum())
    if n_target == 0 or n_target == len(y):
        raise ValueError(f"need both target and non-target trials, got {n_target} target and "
                         f"{len(y) - n_target} non-target: no error rate can be computed")
    return s, y


def det_curve(scores: Sequence[float], labels: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact ROC operating points: (thresholds, false-alarm rates, miss rates), each (P,).

    Thresholds ascend: every distinct score, then the next float above the highest score.
    FAR falls from 1 to 0 and the miss rate rises from 0 to 1. `labels` are bool or 0/1
    (True = target). Raises ValueError unless there are both target and non-target trials.

    >>> t, far, frr = det_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    >>> far.tolist(), frr.tolist()
    ([1.0, 0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5, 1.0])
    """
    s, y = _checked(scores, labels)
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    thresholds, first = np.unique(s, return_index=True)
    targets_below = np.concatenate([[0], np.cumsum(y)])[first]
    nontargets_below = first - targets_below
    n_target, n_nontarget = int(y.sum()), len(y) - int(y.sum())
    # rates as count / total (not 1 - count / total), so equal rates compare equal exactly
    far = np.append((n_nontarget - nontargets_below) / n_nontarget, 0.0)
    frr = np.append(targets_below / n_target, 1.0)
    return np.append(thresholds, np.nextafter(thresholds[-1], np.inf)), far, frr


def equal_error_rate(scores: Sequence[float], labels: Sequence) -> tuple[float, float]:
    """(EER, threshold), the EER a fraction in [0, 1], computed exactly on the ROC.

    Walking the ROC points of `det_curve` by rising threshold, the first point k where the miss
    rate reaches the false-alarm rate and point k-1 bracket the crossing. The EER is where the
    straight segment between those two points meets FAR = FRR (a weighted choice between the
    two thresholds achieves it), and the threshold is interpolated between the two thresholds
    with the same weight. Tied scores form one point, so ties never flatter the EER: scores
    that cannot separate anything give 0.5. Raises ValueError without both kinds of trial.

    >>> equal_error_rate([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    (0.5, 0.4)
    >>> equal_error_rate([0.2, 0.9], [0, 1])
    (0.0, 0.9)
    >>> round(equal_error_rate([0.5, 0.5], [0, 1])[0], 6)
    0.5
    """
    thresholds, far, frr = det_curve(scores, labels)
    k = int(np.argmax(frr >= far))  # k >= 1: the first point accepts everything (FAR 1, FRR 0)
    above, below = far[k - 1] - frr[k - 1], far[k] - frr[k]  # > 0 and <= 0
    weight = above / (above - below)
    eer = (1.0 - weight) * far[k - 1] + weight * far[k]
    threshold = np.clip((1.0 - weight) * thresholds[k - 1] + weight * thresholds[k], thresholds[k - 1], thresholds[k])
    return float(eer), float(threshold)


def min_dcf(scores: Sequence[float], labels: Sequence, p_target: float, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """Normalised minimum detection cost over all thresholds (NIST SRE definition).

    DCF(t) = c_miss * p_target * FRR(t) + c_fa * (1 - p_target) * FAR(t), minimised over the
    ROC points (accept-all and reject-all included), divided by min(c_miss * p_target,
    c_fa * (1 - p_target)), the cost of the better trivial system; so 0 <= minDCF <= 1.

    >>> min_dcf([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], p_target=0.5)
    0.5
    >>> min_dcf([0.2, 0.9], [0, 1], p_target=0.01)
    0.0
    """
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    if c_miss <= 0 or c_fa <= 0:
        raise ValueError(f"costs must be positive, got c_miss={c_miss}, c_fa={c_fa}")
    _, far, frr = det_curve(scores, labels)
    dcf = c_miss * p_target * frr + c_fa * (1.0 - p_target) * far
    return float(dcf.min() / min(c_miss * p_target, c_fa * (1.0 - p_target)))


@dataclass(frozen=True)
class VerificationReport:
    """The result of a verification evaluation. Rates are fractions in [0, 1].

    `min_dcf` maps p_target to the normalised minDCF. `target_scores` and `nontarget_scores`
    are the (n_target,) and (n_nontarget,) cosine scores, the score distributions.
    """

    eer: float
    eer_threshold: float
    min_dcf: dict[float, float]
    n_speakers: int
    n_utterances: int
    n_target: int
    n_nontarget: int
    target_scores: np.ndarray = field(repr=False)
    nontarget_scores: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, float]:
        """The report as JSON-ready scalars: eer, eer_threshold, min_dcf_<p> per p_target
        (min_dcf_0.01 and min_dcf_0.05 by default), n_speakers, n_utterances, n_target, n_nontarget."""
        return {
            "eer": self.eer,
            "eer_threshold": self.eer_threshold,
            **{f"min_dcf_{p:g}": value for p, value in sorted(self.min_dcf.items())},
            "n_speakers": self.n_speakers,
            "n_utterances": self.n_utterances,
            "n_target": self.n_target,
            "n_nontarget": self.n_nontarget,
        }

    def score_stats(self) -> dict[str, float]:
        """Mean and standard deviation of the target and non-target scores."""
        return {
            "target_score_mean": float(self.target_scores.mean()),
            "target_score_std": float(self.target_scores.std()),
            "nontarget_score_mean": float(self.nontarget_scores.mean()),
            "nontarget_score_std": float(self.nontarget_scores.std()),
        }


def evaluate_embeddings(
    embeddings: np.ndarray,
    speaker_ids: Sequence[str],
    utterance_ids: Sequence[str],
    texts: Optional[Sequence[Optional[str]]] = None,
    config: EvalConfig = EvalConfig(),
) -> VerificationReport:
    """Trials (`make_trials` with config.max_trials and config.trial_seed), cosine scores,
    EER and minDCF at config.p_target_low and config.p_target_high, for (n, E) embeddings.

    Raises ValueError when the trials hold no target or no non-target pair (e.g. every
    speaker has one utterance, or there is one speaker): a failed evaluation is no EER of 0.
    """
    if len(embeddings) != len(speaker_ids):
        raise ValueError(f"{len(embeddings)} embeddings for {len(speaker_ids)} speaker ids")
    trials = make_trials(speaker_ids, utterance_ids, texts, config.max_trials, config.trial_seed)
    if trials.n_target == 0 or trials.n_nontarget == 0:
        raise ValueError(f"{len(trials)} trials over {len(set(map(str, speaker_ids)))} speaker(s) hold {trials.n_target} target "
                         f"and {trials.n_nontarget} non-target pairs: need both (2+ speakers, one with 2+ utterances)")
    scores = cosine_scores(embeddings, trials)
    eer, threshold = equal_error_rate(scores, trials.is_target)
    dcf = {p: min_dcf(scores, trials.is_target, p) for p in (config.p_target_low, config.p_target_high)}
    log.info("%d trials (%d target): EER %.2f%% at %.4f", len(trials), trials.n_target, 100 * eer, threshold)
    return VerificationReport(
        eer=eer, eer_threshold=threshold, min_dcf=dcf, n_speakers=len(set(map(str, speaker_ids))),
        n_utterances=len(speaker_ids), n_target=trials.n_target, n_nontarget=trials.n_nontarget,
        target_scores=scores[trials.is_target], nontarget_scores=scores[~trials.is_target],
    )
