"""The peer that RTVC users run today for training, written from RTVC's published description.

RTVC's encoder (Jemine 2019, "Real-Time Voice Cloning", section 3.3 and the repository's
README) trains GE2E (Wan et al. 2018) like this:

- model: a 3-layer LSTM of 256 units over 40 mel channels, the last layer's final hidden state
  through a 256-unit Linear layer and a ReLU, then divided by its L2 norm (plus 1e-5); the
  similarity scale w (init 10) and bias b (init -5) live on the model;
- loss: the similarity matrix against inclusive centroids, except that an utterance is compared
  with the centroid of its own speaker computed without it (GE2E section 2.1, eq. 8); RTVC
  fills it speaker by speaker in a Python loop; then softmax cross-entropy (eq. 6);
- every step it also computes the batch EER with scikit-learn's ROC curve and brentq;
- update: Adam at 1e-4; the gradients of w and b are scaled by 0.01; the total gradient norm is
  clipped at 3;
- loader: preprocessing saves one .npy file of mel frames per utterance; each batch draws
  speakers, then utterances, loads each utterance's file and takes a random 160-frame crop.

This module is a benchmark peer only, not part of spkenc.
"""

import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy.interpolate import interp1d
from scipy.optimize import brentq
from sklearn.metrics import roc_curve
from torch import nn


class RTVCEncoder(nn.Module):
    """RTVC's encoder with w and b on the model. (B, T, 40) mels -> (B, 256) embeddings."""

    def __init__(self, n_mels: int = 40, hidden_size: int = 256, n_layers: int = 3, embedding_size: int = 256) -> None:
        super().__init__()
        self.lstm = nn.LSTM(n_mels, hidden_size, n_layers, batch_first=True)
        self.linear = nn.Linear(hidden_size, embedding_size)
        self.relu = nn.ReLU()
        self.similarity_weight = nn.Parameter(torch.tensor([10.0]))
        self.similarity_bias = nn.Parameter(torch.tensor([-5.0]))

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        raw = self.relu(self.linear(hidden[-1]))
        return raw / (torch.norm(raw, dim=1, keepdim=True) + 1e-5)

    def similarity_matrix(self, embeds: torch.Tensor) -> torch.Tensor:
        """(N, M, E) embeddings -> (N, M, N) scaled cosine similarities, one speaker at a time."""
        n_speakers, n_utterances = embeds.shape[:2]
        inclusive = embeds.mean(dim=1, keepdim=True)
        inclusive = inclusive / (torch.norm(inclusive, dim=2, keepdim=True) + 1e-5)
        exclusive = (embeds.sum(dim=1, keepdim=True) - embeds) / (n_utterances - 1)
        exclusive = exclusive / (torch.norm(exclusive, dim=2, keepdim=True) + 1e-5)
        sim = torch.zeros(n_speakers, n_utterances, n_speakers)
        for j in range(n_speakers):
            others = [i for i in range(n_speakers) if i != j]
            sim[others, :, j] = (embeds[others] * inclusive[j]).sum(dim=2)
            sim[j, :, j] = (embeds[j] * exclusive[j]).sum(dim=1)
        return sim * self.similarity_weight + self.similarity_bias

    def loss(self, embeds: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(N, M, E) embeddings -> (GE2E softmax loss, batch EER in [0, 1])."""
        n_speakers, n_utterances = embeds.shape[:2]
        sim = self.similarity_matrix(embeds).reshape(n_speakers * n_utterances, n_speakers)
        truth = torch.arange(n_speakers).repeat_interleave(n_utterances)
        loss = nn.functional.cross_entropy(sim, truth)
        with torch.no_grad():
            labels = np.eye(n_speakers, dtype=np.int64)[truth.numpy()]
            fpr, tpr, _ = roc_curve(labels.ravel(), sim.detach().numpy().ravel())
            eer = brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)
        return loss, float(eer)


class RTVCTrainer:
    """One RTVC training step at a time on (N, M, T, 40) float32 batches."""

    def __init__(self, seed: int = 0, learning_rate: float = 1e-4) -> None:
        torch.manual_seed(seed)
        self.model = RTVCEncoder()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=learning_rate)

    def step(self, mels: np.ndarray) -> tuple[float, float]:
        """Forward, loss and EER, backward, w/b gradient scaling, clipping, Adam. -> (loss, eer)."""
        n, m = mels.shape[:2]
        inputs = torch.from_numpy(mels).reshape(n * m, *mels.shape[2:])
        embeds = self.model(inputs).reshape(n, m, -1)
        loss, eer = self.model.loss(embeds)
        self.optimizer.zero_grad()
        loss.backward()
        self.model.similarity_weight.grad *= 0.01
        self.model.similarity_bias.grad *= 0.01
        nn.utils.clip_grad_norm_(self.model.parameters(), 3.0, norm_type=2)
        self.optimizer.step()
        return float(loss.item()), eer


def write_npy_utterances(speakers: Sequence[tuple[str, Sequence[np.ndarray]]], folder: Path) -> Path:
    """Save each utterance's (T, 40) mel frames as `<folder>/<speaker>/<i>.npy` (RTVC's layout)."""
    for speaker_id, mels in speakers:
        (Path(folder) / speaker_id).mkdir(parents=True, exist_ok=True)
        for i, mel in enumerate(mels):
            np.save(Path(folder) / speaker_id / f"{i:04d}.npy", mel.astype(np.float32))
    return Path(folder)


class NpyUtteranceLoader:
    """RTVC-style batches: pick speakers and utterances, `np.load` each file, random crop.

    `batch()` -> (N, M, partial_n_frames, 40) float32. Speakers with fewer than M utterances of at
    least `partial_n_frames` frames are left out when the loader is built (as RTVC's
    preprocessing does), which costs one load of every file, once.
    """

    def __init__(self, folder: Path, n_speakers: int, n_utterances: int, partial_n_frames: int = 160, seed: int = 0) -> None:
        self.n_speakers, self.n_utterances, self.partial = n_speakers, n_utterances, partial_n_frames
        self.random = random.Random(seed)
        self.speakers: list[list[Path]] = []
        for speaker in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
            files = [f for f in sorted(speaker.glob("*.npy")) if np.load(f, mmap_mode="r").shape[0] >= partial_n_frames]
            if len(files) >= n_utterances:
                self.speakers.append(files)
        if len(self.speakers) < n_speakers:
            raise ValueError(f"{folder}: {len(self.speakers)} speakers with {n_utterances} usable utterances, {n_speakers} wanted")

    def batch(self) -> np.ndarray:
        out = np.empty((self.n_speakers, self.n_utterances, self.partial, 40), dtype=np.float32)
        for i, files in enumerate(self.random.sample(self.speakers, self.n_speakers)):
            for j, path in enumerate(self.random.sample(files, self.n_utterances)):
                frames = np.load(path)
                start = self.random.randint(0, len(frames) - self.partial)
                out[i, j] = frames[start : start + self.partial]
        return out
