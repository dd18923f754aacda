"""spkenc.evaluation: trials, cosine scores, exact EER, minDCF, DET curve, report.

The EER and minDCF are checked against brute-force threshold sweeps written here with plain
loops, over many random score sets, including heavily tied ones.
"""

import math
from collections import Counter

import numpy as np
import pytest

from spkenc.config import EvalConfig
from spkenc.evaluation import (
    VerificationReport,
    _pairs_from_linear,
    cosine_scores,
    det_curve,
    equal_error_rate,
    evaluate_embeddings,
    make_trials,
    min_dcf,
)


def sweep_points(scores, labels):
    """(threshold, FAR, FRR) at every distinct score and +inf, by counting (accept: score >= t)."""
    targets = [s for s, y in zip(scores, labels) if y]
    nontargets = [s for s, y in zip(scores, labels) if not y]
    points = []
    for t in sorted(set(scores)) + [math.inf]:
        far = sum(s >= t for s in nontargets) / len(nontargets)
        frr = sum(s < t for s in targets) / len(targets)
        points.append((t, far, frr))
    return points


def brute_eer(scores, labels):
    """Where the piecewise-linear ROC through the swept points meets FAR = FRR."""
    points = sweep_points(scores, labels)
    for (t0, far0, frr0), (t1, far1, frr1) in zip(points, points[1:]):
        if far0 > frr0 and far1 <= frr1:
            w = (far0 - frr0) / ((far0 - frr0) - (far1 - frr1))
            return far0 + w * (far1 - far0), frr0 + w * (frr1 - frr0), (t0, t1)
    raise AssertionError("the ROC never crossed FAR = FRR")


def brute_min_dcf(scores, labels, p_target, c_miss=1.0, c_fa=1.0):
    costs = [c_miss * p_target * frr + c_fa * (1 - p_target) * far for _, far, frr in sweep_points(scores, labels)]
    return min(costs) / min(c_miss * p_target, c_fa * (1 - p_target))


def random_score_sets(n_sets=300, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n_sets):
        n = int(rng.integers(2, 80))
        labels = rng.random(n) < rng.uniform(0.05, 0.95)
        labels[0], labels[1] = True, False  # both kinds present
        scores = rng.normal(0, 1, n) + labels * rng.uniform(0, 3)
        kind = i % 3
        if kind == 1:
            scores = np.round(scores)  # heavy ties, across classes
        elif kind == 2:
            scores = rng.integers(0, 3, n).astype(float)  # almost all tied
        yield scores, labels


def test_eer_matches_brute_force_sweep():
    n_tied = 0
    for scores, labels in random_score_sets():
        eer, threshold = equal_error_rate(scores, labels)
        far, frr, (t0, t1) = brute_eer(scores.tolist(), labels.tolist())
        assert eer == pytest.approx(far, abs=1e-12) and eer == pytest.approx(frr, abs=1e-12)
        assert t0 <= threshold <= (t1 if t1 < math.inf else np.nextafter(t0, np.inf))
        points = sweep_points(scores.tolist(), labels.tolist())
        # independent bounds: no threshold does better than the EER on both rates at once,
        # and the EER is no better than the best average of the two rates
        assert eer <= min(max(f, r) for _, f, r in points) + 1e-12
        assert eer >= min((f + r) / 2 for _, f, r in points) - 1e-12
        n_tied += len(set(scores.tolist())) < len(scores)
    assert n_tied > 150


def test_eer_with_sklearn_roc():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(3)
    labels = rng.random(2000) < 0.2
    scores = rng.normal(0, 1, 2000) + 1.5 * labels
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    fnr = 1 - tpr  # sklearn's points run from the highest threshold down
    k = int(np.argmax(fnr <= fpr))
    w = (fnr[k - 1] - fpr[k - 1]) / ((fnr[k - 1] - fpr[k - 1]) - (fnr[k] - fpr[k]))
    assert equal_error_rate(scores, labels)[0] == pytest.approx(fpr[k - 1] + w * (fpr[k] - fpr[k - 1]), abs=1e-12)


def test_eer_ties_are_never_flattering():
    assert equal_error_rate([0.3] * 10, [1] * 5 + [0] * 5)[0] == pytest.approx(0.5)
    # a tie across classes at the boundary costs half of that pair, not nothing
    assert equal_error_rate([0.1, 0.5, 0.5, 0.9], [0, 0, 1, 1])[0] == pytest.approx(0.25)
    assert equal_error_rate([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == (0.0, 0.8)
    assert equal_error_rate([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0])[0] == pytest.approx(1.0)


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0], [True], []])
def test_eer_needs_both_kinds_of_trial(labels):
    with pytest.raises(ValueError, match="need both target and non-target"):
        equal_error_rate([0.5] * len(labels), labels)
    with pytest.raises(ValueError, match="need both target and non-target"):
        min_dcf([0.5] * len(labels), labels, 0.01)


def test_bad_scores_and_labels():
    with pytest.raises(ValueError, match="1 non-finite score"):
        equal_error_rate([0.1, float("nan"), 0.3], [0, 1, 1])
    with pytest.raises(ValueError, match="one length"):
        equal_error_rate([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="booleans or 0/1"):
        equal_error_rate([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match=r"p_target must be in \(0, 1\)"):
        min_dcf([0.1, 0.2], [0, 1], 1.0)
    with pytest.raises(ValueError, match="costs must be positive"):
        min_dcf([0.1, 0.2], [0, 1], 0.1, c_miss=0)


def test_min_dcf_matches_brute_force():
    for i, (scores, labels) in enumerate(random_score_sets(150, seed=1)):
        p = (0.01, 0.05, 0.5)[i % 3]
        c_miss, c_fa = (1.0, 1.0) if i % 2 else (10.0, 1.0)
        value = min_dcf(scores, labels, p, c_miss, c_fa)
        assert value == pytest.approx(brute_min_dcf(scores.tolist(), labels.tolist(), p, c_miss, c_fa), abs=1e-12)
        assert 0.0 <= value <= 1.0


def test_det_curve_is_monotone_and_complete():
    scores, labels = next(iter(random_score_sets(1, seed=5)))
    thresholds, far, frr = det_curve(scores, labels)
    assert (np.diff(thresholds) > 0).all()
    assert far[0] == 1.0 and frr[0] == 0.0 and far[-1] == 0.0 and frr[-1] == 1.0
    assert (np.diff(far) <= 0).all() and (np.diff(frr) >= 0).all()
    assert len(thresholds) == len(set(scores.tolist())) + 1


def triangle(n):
    return {(a, b) for a in range(n) for b in range(a + 1, n)}


def test_all_trials():
    speakers = ["a"] * 3 + ["b"] * 2 + ["c"]
    utterances = ["1", "2", "3", "1", "2", "1"]  # same utterance ids under different speakers are different files
    trials = make_trials(speakers, utterances)
    pairs = list(zip(trials.index_a.tolist(), trials.index_b.tolist()))
    assert set(pairs) == triangle(6) and len(pairs) == 15
    assert trials.n_target == 3 + 1 and trials.n_nontarget == 11
    assert all(trials.is_target[k] == (speakers[a] == speakers[b]) for k, (a, b) in enumerate(pairs))


def test_trials_pair_different_texts_where_known():
    speakers = ["a", "a", "a", "b", "b", "b"]
    texts = ["hello", "world", None, "hello", "world", "hello"]
    trials = make_trials(speakers, [str(i) for i in range(6)], texts=texts)
    pairs = set(zip(trials.index_a.tolist(), trials.index_b.tolist()))
    expected = {(a, b) for a, b in triangle(6) if texts[a] is None or texts[b] is None or texts[a] != texts[b]}
    assert pairs == expected and len(expected) == 15 - 4
    sampled = make_trials(speakers, [str(i) for i in range(6)], texts=texts, max_trials=5, seed=2)
    assert set(zip(sampled.index_a.tolist(), sampled.index_b.tolist())) <= expected and len(sampled) == 5


def test_sampled_trials_are_seeded_distinct_and_uniform():
    speakers = [f"s{i // 4}" for i in range(40)]
    utterances = [str(i) for i in range(40)]
    one = make_trials(speakers, utterances, max_trials=100, seed=7)
    again = make_trials(speakers, utterances, max_trials=100, seed=7)
    other = make_trials(speakers, utterances, max_trials=100, seed=8)
    pairs = list(zip(one.index_a.tolist(), one.index_b.tolist()))
    assert len(pairs) == 100 == len(set(pairs)) and set(pairs) <= triangle(40)
    assert np.array_equal(one.index_a, again.index_a) and np.array_equal(one.index_b, again.index_b)
    assert pairs != list(zip(other.index_a.tolist(), other.index_b.tolist()))
    # more than max_trials eligible pairs: sampled; fewer: all of them
    assert len(make_trials(speakers, utterances, max_trials=10**6)) == 780
    # uniform: every pair about equally often over many seeds
    counts = Counter()
    for seed in range(400):
        t = make_trials(["a", "a", "b", "b", "c"], list("12345"), max_trials=3, seed=seed)
        counts.update(zip(t.index_a.tolist(), t.index_b.tolist()))
    assert set(counts) == triangle(5) and min(counts.values()) > 80 and max(counts.values()) < 160  # mean 120


def test_sampled_trials_scale_without_listing_all_pairs():
    n = 6000  # 18 million pairs
    speakers = [f"s{i // 10}" for i in range(n)]
    trials = make_trials(speakers, [str(i) for i in range(n)], texts=[f"t{i % 7}" for i in range(n)], max_trials=5000)
    a, b = trials.index_a, trials.index_b
    assert len(trials) == 5000 and (a < b).all() and b.max() < n
    assert len(set(zip(a.tolist(), b.tolist()))) == 5000
    assert ((a % 7) != (b % 7)).all()  # never the same text


def test_linear_pair_index_matches_triu_order():
    for n in range(2, 40):
        i, j = _pairs_from_linear(np.arange(n * (n - 1) // 2), n)
        ti, tj = np.triu_indices(n, k=1)
        assert np.array_equal(i, ti) and np.array_equal(j, tj)
    n = 3_000_000
    last = n * (n - 1) // 2 - 1
    i, j = _pairs_from_linear(np.array([0, n - 2, n - 1, last]), n)
    assert i.tolist() == [0, 0, 1, n - 2] and j.tolist() == [1, n - 1, 2, n - 1]


def test_trials_reject_bad_input():
    with pytest.raises(ValueError, match="utterance '1' of speaker 'a' is listed twice"):
        make_trials(["a", "a", "b"], ["1", "1", "2"])
    with pytest.raises(ValueError, match="one of each per utterance"):
        make_trials(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="at least 2 utterances"):
        make_trials(["a"], ["1"])
    with pytest.raises(ValueError, match="max_trials must be 0"):
        make_trials(["a", "b"], ["1", "2"], max_trials=-1)


def test_cosine_scores():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5))
    trials = make_trials(list("aabbcc"), list("121212"))
    expected = [x[a] @ x[b] / np.linalg.norm(x[a]) / np.linalg.norm(x[b]) for a, b in zip(trials.index_a, trials.index_b)]
    assert np.allclose(cosine_scores(x, trials, chunk=4), expected)
    x[3] = 0
    with pytest.raises(ValueError, match=r"row\(s\) \[3\] are all zero"):
        cosine_scores(x, trials)
    with pytest.raises(ValueError, match="only 4 embeddings"):
        cosine_scores(rng.standard_normal((4, 5)), trials)


def clustered(n_speakers, n_per_speaker, spread, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_speakers, 32))
    x = np.repeat(centres, n_per_speaker, axis=0) + spread * rng.standard_normal((n_speakers * n_per_speaker, 32))
    speakers = [f"spk{i // n_per_speaker}" for i in range(len(x))]
    return x, speakers, [str(i % n_per_speaker) for i in range(len(x))]


def test_evaluate_embeddings_report():
    x, speakers, utterances = clustered(6, 5, spread=1.0)
    report = evaluate_embeddings(x, speakers, utterances)
    assert isinstance(report, VerificationReport)
    assert list(report.summary()) == ["eer", "eer_threshold", "min_dcf_0.01", "min_dcf_0.05", "n_speakers",
                                      "n_utterances", "n_target", "n_nontarget"]
    assert (report.n_speakers, report.n_utterances, report.n_target, report.n_nontarget) == (6, 30, 60, 375)
    assert len(report.target_scores) == 60 and len(report.nontarget_scores) == 375
    scores = np.concatenate([report.target_scores, report.nontarget_scores])
    labels = np.r_[np.ones(60, bool), np.zeros(375, bool)]
    assert report.eer == equal_error_rate(scores, labels)[0] and 0 < report.eer < 0.5
    assert report.min_dcf[0.01] == min_dcf(scores, labels, 0.01)
    assert report.score_stats()["target_score_mean"] > report.score_stats()["nontarget_score_mean"]
    # separable speakers score better than noisy ones
    assert evaluate_embeddings(*clustered(6, 5, spread=0.1)).eer == 0.0
    sampled = evaluate_embeddings(x, speakers, utterances, config=EvalConfig(max_trials=100, p_target_low=0.1))
    assert sampled.n_target + sampled.n_nontarget == 100 and "min_dcf_0.1" in sampled.summary()


def test_evaluate_embeddings_refuses_degenerate_sets():
    x, speakers, utterances = clustered(1, 5, spread=1.0)
    with pytest.raises(ValueError, match="0 non-target pairs: need both"):
        evaluate_embeddings(x, speakers, utterances)
    x, speakers, utterances = clustered(5, 1, spread=1.0)
    with pytest.raises(ValueError, match="hold 0 target"):
        evaluate_embeddings(x, speakers, utterances)
    with pytest.raises(ValueError, match="5 embeddings for 4 speaker ids"):
        evaluate_embeddings(x, speakers[:4], utterances[:4])
