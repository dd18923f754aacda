"""The generalized end-to-end (GE2E) softmax loss and the in-batch EER (Wan et al. 2018, sec. 2).

The loss owns the learnable similarity scale `similarity_weight` (w) and bias
`similarity_bias` (b), under RTVC's names and shapes ((1,) each), so the encoder carries no
loss parameters and loads strictly.

>>> import torch
>>> loss_fn = GE2ELoss()
>>> embeds = torch.nn.functional.normalize(torch.rand(4, 3, 8), dim=2)
>>> loss, sim = loss_fn(embeds)
>>> tuple(loss.shape), tuple(sim.shape)
((), (12, 4))
"""

from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Sec. 2.1: "we constrain the weight to be positive, w > 0". w is clamped to this minimum in
# the forward pass (RTVC leaves it unconstrained).
MIN_SIMILARITY_WEIGHT = 1e-6
# Below this norm an embedding or centroid counts as zero in the cosine similarity, which
# keeps a zero leave-one-out centroid (eq. 8) from dividing by zero.
COSINE_EPS = 1e-8


class GE2ELoss(nn.Module):
    """GE2E softmax loss over a batch of N speakers x M utterances (eqs. 5-9 of the paper).

    `forward(embeds)` takes (N, M, E) float embeddings, row j holding speaker j's M
    utterances, N >= 2 and M >= 2, and returns:

    - the loss, a scalar: softmax cross-entropy of each utterance against the N speakers
      (eq. 6), averaged over the N*M utterances as RTVC does (the paper sums);
    - the scaled similarity matrix, (N*M, N): entry (j*M + i, k) is
      w * cos(e_ji, c_k) + b (eq. 5), where c_k is the centroid of speaker k's utterances
      (eq. 1), except for k = j, where it is the centroid of speaker j's other M - 1
      utterances (eq. 8). w is clamped to at least MIN_SIMILARITY_WEIGHT.

    `similarity_weight` and `similarity_bias` are created on `device` (RTVC created them on
    the CPU and moved them with `.to`, which left GPU copies without gradients).
    """

    def __init__(
        self,
        w_init: float = 10.0,
        b_init: float = -5.0,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        super().__init__()
        if not w_init > 0:
            raise ValueError(f"GE2E needs a positive similarity weight (sec. 2.1), got w_init={w_init}")
        self.similarity_weight = nn.Parameter(torch.tensor([float(w_init)], device=device))
        self.similarity_bias = nn.Parameter(torch.tensor([float(b_init)], device=device))

    def forward(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, M, E) embeddings -> (scalar loss, (N*M, N) scaled similarity matrix)."""
        n_speakers, n_utterances = _check_batch(embeds)
        sim_matrix = self.similarity_matrix(embeds)
        target = torch.arange(n_speakers, device=embeds.device).repeat_interleave(n_utterances)
        return F.cross_entropy(sim_matrix, target), sim_matrix

    def similarity_matrix(self, embeds: torch.Tensor) -> torch.Tensor:
        """(N, M, E) embeddings -> (N*M, N) matrix of w * cos(e_ji, c_k) + b (eqs. 5 and 9)."""
        n_speakers, n_utterances = _check_batch(embeds)
        sums = embeds.sum(dim=1, keepdim=True)
        # eq. 1: inclusive centroids, (N, E); eq. 8: leave-one-out centroids, (N, M, E).
        # Cosine = dot product of unit vectors; normalising after averaging keeps eq. 1's mean.
        centroids_incl = F.normalize(sums[:, 0] / n_utterances, dim=1, eps=COSINE_EPS)
        centroids_excl = F.normalize((sums - embeds) / (n_utterances - 1), dim=2, eps=COSINE_EPS)
        units = F.normalize(embeds, dim=2, eps=COSINE_EPS)
        cos_incl = torch.einsum("jie,ke->jik", units, centroids_incl)
        cos_excl = (units * centroids_excl).sum(dim=2)
        own = torch.eye(n_speakers, dtype=torch.bool, device=embeds.device).unsqueeze(1)
        cos = torch.where(own, cos_excl.unsqueeze(2), cos_incl)
        weight = self.similarity_weight.clamp(min=MIN_SIMILARITY_WEIGHT)
        sim = cos * weight + self.similarity_bias
        return sim.reshape(n_speakers * n_utterances, n_speakers)


def _check_batch(embeds: torch.Tensor) -> tuple[int, int]:
    if embeds.dim() != 3:
        raise ValueError(f"GE2E expects (speakers, utterances, embedding) embeddings, got shape {tuple(embeds.shape)}")
    n_speakers, n_utterances = embeds.shape[:2]
    if n_utterances < 2:
        raise ValueError(
            f"GE2E needs at least 2 utterances per speaker for the leave-one-out centroid (eq. 8), got {n_utterances}"
        )
    if n_speakers < 2:
        raise ValueError(f"GE2E needs at least 2 speakers per batch, got {n_speakers}")
    return n_speakers, n_utterances


def batch_eer(sim_matrix: Union[torch.Tensor, np.ndarray], n_speakers: int, n_utterances: int) -> float:
    """Equal error rate in [0, 1] of a (N*M, N) GE2E similarity matrix, as RTVC logs per step.

    Each entry is a trial: the N*M entries where the utterance's own speaker is the column
    are targets, the others non-targets. The ROC is interpolated linearly between its
    points, and the EER is where the false-positive rate equals the miss rate (what RTVC
    computes with sklearn's roc_curve and brentq). A training signal only: the batch's own
    centroids score its utterances, so it is no evaluation.

    >>> import torch
    >>> batch_eer(torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.6]]), 2, 2)
    0.0
    >>> batch_eer(torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.7, 0.3], [0.6, 0.1]]), 2, 2)
    1.0
    """
    scores = torch.as_tensor(sim_matrix).detach().to("cpu", torch.float64)
    if n_speakers < 2 or n_utterances < 1:
        raise ValueError(f"an EER needs at least 2 speakers and 1 utterance each, got {n_speakers} x {n_utterances}")
    if tuple(scores.shape) != (n_speakers * n_utterances, n_speakers):
        raise ValueError(
            f"similarity matrix of shape {tuple(scores.shape)} does not match {n_speakers} speakers x "
            f"{n_utterances} utterances; expected {(n_speakers * n_utterances, n_speakers)}"
        )
    if not torch.isfinite(scores).all():
        raise ValueError("similarity matrix holds NaN or infinite scores")
    labels = torch.eye(n_speakers, dtype=torch.bool).repeat_interleave(n_utterances, dim=0).reshape(-1)
    scores = scores.reshape(-1)
    order = torch.argsort(scores, descending=True, stable=True)
    scores, labels = scores[order], labels[order]
    # One ROC point per distinct threshold: the last trial at or above each score value.
    last_of_value = torch.cat([torch.nonzero(scores[1:] != scores[:-1]).reshape(-1), torch.tensor([len(scores) - 1])])
    zero = torch.zeros(1, dtype=torch.float64)
    tpr = torch.cat([zero, labels.cumsum(0)[last_of_value].double() / labels.sum()])
    fpr = torch.cat([zero, (~labels).cumsum(0)[last_of_value].double() / (~labels).sum()])
    # gap = miss rate - false-positive rate falls from 1 at (0, 0) to -1 at (1, 1).
    gap = 1.0 - tpr - fpr
    i = int(torch.nonzero(gap <= 0)[0])
    t = gap[i - 1] / (gap[i - 1] - gap[i])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))
