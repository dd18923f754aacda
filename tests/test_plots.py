"""spkenc.plots: every plot writes a decodable PNG and refuses bad input."""

import numpy as np
import pytest
from matplotlib.image import imread

from spkenc import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, expected):
    assert path == expected
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1000
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0  # something was drawn
    assert not list(path.parent.glob(".*tmp*"))  # the atomic write left no temporary file


def clustered(n_speakers, n_per_speaker, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_speakers, dim))
    x = np.repeat(centres, n_per_speaker, axis=0) + 0.1 * rng.standard_normal((n_speakers * n_per_speaker, dim))
    x = np.abs(x) / np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.repeat([f"spk{i}" for i in range(n_speakers)], n_per_speaker)
    return x.astype(np.float32), labels


def test_umap_writes_png_with_umap(tmp_path):
    x, labels = clustered(3, 8)
    out = tmp_path / "nested" / "umap.png"
    assert_png(plots.plot_umap(x, labels, out, title="probes"), out)
    xy, method = plots.project_2d(x)
    assert method == "UMAP" and xy.shape == (24, 2)
    assert np.array_equal(xy, plots.project_2d(x)[0])  # fixed random_state


@pytest.mark.parametrize("n", [1, 2, 5])
def test_umap_falls_back_to_pca_for_small_n(tmp_path, n):
    x, labels = clustered(n, 1)
    xy, method = plots.project_2d(x)
    assert method == "PCA" and xy.shape == (n, 2) and np.isfinite(xy).all()
    out = tmp_path / f"umap_{n}.png"
    assert_png(plots.plot_umap(x, labels, out), out)


def test_pca_fallback_separates_two_points():
    xy, _ = plots.project_2d(np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert np.isclose(np.linalg.norm(xy[0] - xy[1]), np.sqrt(2))


def test_umap_rejects_bad_input(tmp_path):
    x, labels = clustered(2, 3)
    with pytest.raises(ValueError, match="5 labels for 6 embeddings"):
        plots.plot_umap(x, labels[:5], tmp_path / "a.png")
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        plots.plot_umap(x, labels, tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"shape \(0,\)"):
        plots.plot_umap(np.zeros(0), [], tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_loss_curve(tmp_path):
    out = tmp_path / "loss.png"
    assert_png(plots.plot_loss_curve([1, 2, 3, 4], [3.5, 3.1, 2.9, 2.2], out), out)
    with pytest.raises(ValueError, match="non-finite"):
        plots.plot_loss_curve([1, 2], [1.0, float("nan")], out)
    with pytest.raises(ValueError, match="as many steps as losses"):
        plots.plot_loss_curve([1, 2], [1.0], out)


def test_det_curve(tmp_path):
    out = tmp_path / "det.png"
    far = np.linspace(0, 1, 50)
    assert_png(plots.plot_det_curve(far, 1 - far, out, eer=0.5), out)
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
        plots.plot_det_curve([0.0, 1.5], [1.0, 0.0], out)


def test_score_histograms(tmp_path):
    rng = np.random.default_rng(1)
    out = tmp_path / "hist.png"
    assert_png(plots.plot_score_histograms(rng.normal(0.8, 0.05, 100), rng.normal(0.5, 0.1, 400), out, threshold=0.7), out)
    with pytest.raises(ValueError, match="no scores"):
        plots.plot_score_histograms([], [], out)


def test_similarity_matrix(tmp_path):
    x, labels = clustered(5, 1)
    out = tmp_path / "sim.png"
    assert_png(plots.plot_similarity_matrix(x @ x.T, labels, out), out)
    with pytest.raises(ValueError, match="square"):
        plots.plot_similarity_matrix(np.zeros((2, 3)), ["a", "b"], out)
    with pytest.raises(ValueError, match="3 labels for a 2 x 2"):
        plots.plot_similarity_matrix(np.eye(2), ["a", "b", "c"], out)


def test_duration_histogram(tmp_path):
    out = tmp_path / "durations.png"
    assert_png(plots.plot_duration_histogram([1.2, 3.4, 2.2, 5.0, 4.1], out), out)
    with pytest.raises(ValueError, match="non-negative"):
        plots.plot_duration_histogram([1.0, -2.0], out)
    with pytest.raises(ValueError, match="no durations"):
        plots.plot_duration_histogram([], out)


def test_a_umap_leaves_torchs_thread_count_alone(tmp_path):
    """umap-learn resets the shared OpenMP pool; a 1-thread training loop must stay at 1 thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(0)
        plots.plot_umap(rng.random((40, 8)), [str(i % 4) for i in range(40)], tmp_path / "u.png")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
