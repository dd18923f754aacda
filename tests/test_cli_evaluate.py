"""`spkenc evaluate`: the report JSON, bad input, and agreement with Resemblyzer's own numbers.

The parity test runs Resemblyzer's weights on the committed demo corpus (identical to
../shared/data/demo_tiny) with all cross pairs. The reference EER is computed here from the
resemblyzer package's own preprocessing and embeddings and a brute-force threshold sweep.
"""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from spkenc.cli import main

REPORT_KEYS = ["eer", "eer_threshold", "min_dcf_0.01", "min_dcf_0.05", "n_speakers", "n_utterances", "n_target", "n_nontarget"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pretrained() -> Path:
    import resemblyzer

    return Path(resemblyzer.__file__).parent / "pretrained.pt"


def brute_force_eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """Sweep every distinct score as the threshold (accept: score >= t), then +inf; the EER
    is where the straight ROC segment between the last point with FAR > FRR and the next
    meets FAR = FRR."""
    targets, nontargets = scores[labels], scores[~labels]
    thresholds = np.append(np.unique(scores), np.inf)
    far, frr = [], []
    for start in range(0, len(thresholds), 2000):
        t = thresholds[start : start + 2000, None]
        far.extend((nontargets[None, :] >= t).sum(axis=1) / len(nontargets))
        frr.extend((targets[None, :] < t).sum(axis=1) / len(targets))
    for k in range(1, len(thresholds)):
        if far[k - 1] > frr[k - 1] and far[k] <= frr[k]:
            w = (far[k - 1] - frr[k - 1]) / ((far[k - 1] - frr[k - 1]) - (far[k] - frr[k]))
            return far[k - 1] + w * (far[k] - far[k - 1])
    raise AssertionError("no crossing")


@pytest.fixture(scope="module")
def resemblyzer_reference(demo_files):
    """{rate: (EER, n_target, n_nontarget)} from resemblyzer's own pipeline, all cross pairs."""
    from resemblyzer import VoiceEncoder, preprocess_wav

    encoder = VoiceEncoder("cpu", verbose=False)
    wavs = [preprocess_wav(path) for path in demo_files]
    speakers = np.array([path.parent.name for path in demo_files])
    a, b = np.triu_indices(len(demo_files), k=1)
    labels = speakers[a] == speakers[b]
    reference = {}
    for rate in (1.3, 1.25):  # Resemblyzer's default, and RTVC's slicing
        embeds = np.stack([encoder.embed_utterance(wav, rate=rate) for wav in wavs])
        scores = np.einsum("ij,ij->i", embeds[a], embeds[b]) / (
            np.linalg.norm(embeds[a], axis=1) * np.linalg.norm(embeds[b], axis=1))
        reference[rate] = (brute_force_eer(scores, labels), int(labels.sum()), int((~labels).sum()))
    return reference


@pytest.mark.parametrize("rate_args, reference_rate", [(["--rate", "1.3"], 1.3), ([], 1.25)], ids=["rate1.3", "rtvc_slicing"])
def test_evaluate_matches_resemblyzer(tmp_path, demo_dir, pretrained, resemblyzer_reference, rate_args, reference_rate):
    out = tmp_path / "report.json"
    code = main(["evaluate", str(demo_dir), "--layout", "speaker_folders", "--checkpoint", str(pretrained),
                 "--output", str(out), "--trials", "all", "--device", "cpu", *rate_args])
    assert code == 0
    report = json.loads(out.read_text())
    assert list(report) == REPORT_KEYS
    eer, n_target, n_nontarget = resemblyzer_reference[reference_rate]
    assert abs(report["eer"] - eer) <= 0.001, (report["eer"], eer)  # within 0.1 percentage point
    assert 0.04 < eer < 0.10  # the published figure for these weights on this corpus is 6.8%
    assert (report["n_speakers"], report["n_utterances"]) == (24, 192)
    assert (report["n_target"], report["n_nontarget"]) == (n_target, n_nontarget) == (24 * 28, 192 * 191 // 2 - 24 * 28)
    assert 0 < report["min_dcf_0.05"] <= report["min_dcf_0.01"] <= 1
    assert -1 < report["eer_threshold"] < 1


@pytest.fixture
def small_corpus(tmp_path, demo_dir) -> Path:
    """2 speakers x 3 real utterances, plus one file that is not audio."""
    root = tmp_path / "corpus"
    for speaker in ("so0006", "so0036"):
        (root / speaker).mkdir(parents=True)
        for path in sorted((demo_dir / speaker).glob("*.flac"))[:3]:
            shutil.copy(path, root / speaker / path.name)
    (root / "so0036" / "broken.flac").write_bytes(b"this is not a FLAC file" * 100)
    return root


def test_sampled_trials_plots_and_skipped_files(tmp_path, small_corpus, pretrained, caplog):
    out, plots = tmp_path / "out" / "report.json", tmp_path / "plots"
    caplog.set_level(logging.WARNING)
    code = main(["evaluate", str(small_corpus), "--checkpoint", str(pretrained), "--output", str(out),
                 "--trials", "10", "--device", "cpu", "--plots", str(plots)])
    assert code == 0
    report = json.loads(out.read_text())
    assert (report["n_speakers"], report["n_utterances"]) == (2, 6)
    assert report["n_target"] + report["n_nontarget"] == 10
    assert "broken.flac" in caplog.text
    assert sorted(p.name for p in plots.iterdir()) == ["det_curve.png", "score_histograms.png", "similarity_matrix.png", "umap.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in plots.iterdir())


def test_one_speaker_is_an_error_not_an_eer(tmp_path, small_corpus, pretrained, caplog):
    shutil.rmtree(small_corpus / "so0036")
    out = tmp_path / "report.json"
    assert main(["evaluate", str(small_corpus), "--checkpoint", str(pretrained), "--output", str(out), "--device", "cpu"]) == 1
    assert "0 non-target pairs" in caplog.text
    assert not out.exists()


def test_refused_checkpoint(tmp_path, small_corpus, caplog):
    fake = tmp_path / "encoder.pt"
    fake.write_text("not a checkpoint")
    out = tmp_path / "report.json"
    assert main(["evaluate", str(small_corpus), "--checkpoint", str(fake), "--output", str(out), "--device", "cpu"]) == 1
    assert str(fake) in caplog.text
    assert not out.exists()


def test_missing_corpus(tmp_path, pretrained, caplog):
    missing = tmp_path / "nowhere"
    assert main(["evaluate", str(missing), "--checkpoint", str(pretrained), "--output", str(tmp_path / "r.json")]) == 1
    assert f"{missing}: corpus root not found" in caplog.text


@pytest.mark.parametrize("trials", ["0", "-3", "some"])
def test_bad_trials_argument(tmp_path, pretrained, trials, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(tmp_path), "--checkpoint", str(pretrained), "--output", str(tmp_path / "r.json"), "--trials", trials])
    assert exit_info.value.code == 2
    assert f"expected 'all' or a positive number of trials, got '{trials}'" in capsys.readouterr().err
