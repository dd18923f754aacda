"""GE2E loss against a loop written straight from the paper's equations, gradients on the
parameters' own device, and the in-batch EER against RTVC's sklearn/brentq computation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spkenc.config import ModelConfig
from spkenc.ge2e import MIN_SIMILARITY_WEIGHT, GE2ELoss, batch_eer
from spkenc.model import SpeakerEncoder

torch.set_num_threads(1)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def paper_ge2e(embeds: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan et al. 2018, one utterance and one speaker at a time: eq. 1 (centroid), eq. 8
    (centroid without the utterance itself for its own speaker), eq. 9 (S = w cos + b) and
    eq. 6 (L = -S_ji,j + log sum_k exp S_ji,k), averaged over the N*M utterances."""
    n, m, _ = embeds.shape
    rows, losses = [], []
    for j in range(n):
        for i in range(m):
            e = embeds[j, i]
            row = []
            for k in range(n):
                if k == j:
                    centroid = sum(embeds[j, q] for q in range(m) if q != i) / (m - 1)
                else:
                    centroid = sum(embeds[k, q] for q in range(m)) / m
                cos = torch.dot(e, centroid) / (torch.linalg.norm(e) * torch.linalg.norm(centroid))
                row.append(w[0] * cos + b[0])
            row = torch.stack(row)
            rows.append(row)
            losses.append(-row[j] + torch.log(torch.exp(row).sum()))
    return torch.stack(losses).mean(), torch.stack(rows)


def _unit_embeds(n: int, m: int, e: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, m, e, generator=generator, dtype=dtype), dim=2)


@pytest.mark.parametrize("n,m,e", [(2, 2, 3), (3, 4, 5), (5, 3, 8), (4, 6, 16)])
def test_loss_and_gradients_match_the_paper_equations(n, m, e):
    embeds = _unit_embeds(n, m, e, seed=n * 100 + m).requires_grad_()
    loss_fn = GE2ELoss(w_init=7.5, b_init=-3.0).double()
    loss, sim = loss_fn(embeds)
    grads = torch.autograd.grad(loss, [embeds, loss_fn.similarity_weight, loss_fn.similarity_bias])

    w = loss_fn.similarity_weight.detach().clone().requires_grad_()
    b = loss_fn.similarity_bias.detach().clone().requires_grad_()
    ref_loss, ref_sim = paper_ge2e(embeds, w, b)
    ref_grads = torch.autograd.grad(ref_loss, [embeds, w, b])

    assert sim.shape == (n * m, n)
    torch.testing.assert_close(sim, ref_sim, rtol=0, atol=1e-10)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-10)
    for name, got, want in zip(("embeds", "w", "b"), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=f"gradient wrt {name}")
    assert grads[0].abs().sum() > 0


def test_float32_loss_matches_the_float64_reference():
    embeds = _unit_embeds(6, 5, 32, seed=3)
    loss32, sim32 = GE2ELoss()(embeds.float())
    ref_loss, ref_sim = paper_ge2e(embeds, torch.tensor([10.0], dtype=torch.float64), torch.tensor([-5.0], dtype=torch.float64))
    assert abs(loss32.item() - ref_loss.item()) < 1e-5
    assert (sim32.double() - ref_sim).abs().max() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_w_and_b_get_gradients_on_their_own_device(device):
    torch.manual_seed(0)
    encoder = SpeakerEncoder(ModelConfig(hidden_size=16, n_layers=1, embedding_size=8), device=device)
    loss_fn = GE2ELoss(device=device)
    for param in (loss_fn.similarity_weight, loss_fn.similarity_bias):
        assert param.device.type == device and param.shape == (1,)
    mels = torch.rand(3 * 4, 30, 40, device=device)
    loss, _ = loss_fn(encoder(mels).reshape(3, 4, -1))
    loss.backward()
    for param in (loss_fn.similarity_weight, loss_fn.similarity_bias, encoder.linear.weight):
        assert param.grad is not None
        assert param.grad.device == param.device
        assert param.grad.abs().sum().item() > 0


def test_zero_embeddings_give_a_finite_loss_and_gradients():
    embeds = _unit_embeds(3, 2, 4, seed=1).float()
    embeds[0, 1] = 0.0  # a dead ReLU: speaker 0's leave-one-out centroid for utterance 0 is zero
    embeds[2] = 0.0  # a whole speaker of zero embeddings: its inclusive centroid is zero
    embeds.requires_grad_()
    loss_fn = GE2ELoss()
    loss, sim = loss_fn(embeds)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sim).all()
    assert torch.isfinite(embeds.grad).all() and torch.isfinite(loss_fn.similarity_weight.grad).all()
    # cos(., 0) = 0, so the zero centroid's column holds just the bias
    assert torch.allclose(sim[0, 0], loss_fn.similarity_bias.detach()[0])


def test_similarity_weight_is_kept_positive():
    embeds = _unit_embeds(3, 3, 4, seed=2).float()
    loss_fn = GE2ELoss()
    with torch.no_grad():
        loss_fn.similarity_weight.fill_(-4.0)
    sim = loss_fn.similarity_matrix(embeds)
    _, ref_sim = paper_ge2e(embeds, torch.tensor([MIN_SIMILARITY_WEIGHT]), loss_fn.similarity_bias.detach())
    torch.testing.assert_close(sim, ref_sim.float(), rtol=0, atol=1e-6)


def test_bad_batches_are_refused():
    loss_fn = GE2ELoss()
    with pytest.raises(ValueError, match="at least 2 utterances per speaker.*got 1"):
        loss_fn(_unit_embeds(4, 1, 8, seed=0).float())
    with pytest.raises(ValueError, match="at least 2 speakers per batch, got 1"):
        loss_fn(_unit_embeds(1, 4, 8, seed=0).float())
    with pytest.raises(ValueError, match=r"got shape \(8, 4\)"):
        loss_fn(torch.zeros(8, 4))
    with pytest.raises(ValueError, match="positive similarity weight.*w_init=0"):
        GE2ELoss(w_init=0.0)


def test_batch_eer_is_zero_for_perfect_separation_and_one_for_the_reverse():
    n, m = 5, 4
    targets = torch.eye(n).repeat_interleave(m, dim=0)
    noise = torch.rand(n * m, n, generator=torch.Generator().manual_seed(0)) * 0.4
    assert batch_eer(targets * 0.5 + noise, n, m) == 0.0
    assert batch_eer(targets, n, m) == 0.0
    assert batch_eer(-(targets * 0.5 + noise), n, m) == 1.0


def _rtvc_eer(sim: np.ndarray, n: int, m: int) -> float:
    """RTVC's encoder/model.py computation (sklearn roc_curve, scipy brentq)."""
    from scipy.interpolate import interp1d
    from scipy.optimize import brentq
    from sklearn.metrics import roc_curve

    labels = np.repeat(np.eye(n), m, axis=0)
    fpr, tpr, _ = roc_curve(labels.flatten(), sim.flatten())
    return brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)


@pytest.mark.parametrize("seed", range(4))
def test_batch_eer_of_random_scores_matches_rtvc(seed):
    n, m = 6, 5
    generator = torch.Generator().manual_seed(seed)
    # targets shifted up a little so the EER lands inside (0, 0.5) rather than at 0.5
    sim = torch.rand(n * m, n, generator=generator) + 0.3 * torch.eye(n).repeat_interleave(m, dim=0)
    eer = batch_eer(sim, n, m)
    assert 0.0 <= eer <= 1.0
    assert eer == pytest.approx(_rtvc_eer(sim.numpy().astype(np.float64), n, m), abs=1e-6)


def test_batch_eer_of_the_loss_similarity_matrix():
    n, m = 4, 3
    _, sim = GE2ELoss()(_unit_embeds(n, m, 16, seed=5).float())
    eer = batch_eer(sim.detach(), n, m)
    assert eer == pytest.approx(_rtvc_eer(sim.detach().double().numpy(), n, m), abs=1e-6)


def test_batch_eer_refuses_mismatched_or_broken_matrices():
    with pytest.raises(ValueError, match=r"shape \(6, 3\) does not match 3 speakers x 3 utterances"):
        batch_eer(torch.rand(6, 3), 3, 3)
    broken = torch.rand(6, 3)
    broken[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        batch_eer(broken, 3, 2)
    with pytest.raises(ValueError, match="at least 2 speakers"):
        batch_eer(torch.rand(3, 1), 1, 3)
