"""The speaker encoder: a stacked LSTM over mel frames, then Linear + ReLU + L2 norm (GE2E, RTVC).

The module holds only the network. GE2E's similarity scale and bias belong to
`spkenc.ge2e.GE2ELoss`, so an encoder loads strictly from any RTVC-format `model_state`
once those two keys are set aside (see `spkenc.checkpoint`).

>>> import torch
>>> encoder = SpeakerEncoder(ModelConfig(hidden_size=8, n_layers=1, embedding_size=4), n_mels=5)
>>> embeds = encoder(torch.rand(3, 20, 5))
>>> tuple(embeds.shape), bool((embeds >= 0).all())
((3, 4), True)
"""

import re
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from spkenc.config import ModelConfig

# Below this L2 norm an embedding is treated as zero: an all-zero ReLU output gives a zero
# vector instead of 0/0 = NaN (Resemblyzer and RTVC divide by the raw norm).
NORM_EPS = 1e-12

_LSTM_LAYER_KEY = re.compile(r"^lstm\.\w+_l(\d+)$")


class SpeakerEncoder(nn.Module):
    """GE2E speaker encoder with RTVC's layout: submodules `lstm`, `linear`, `relu`.

    `forward((B, T, n_mels) float32 mel frames) -> (B, embedding_size) float32`: the final
    hidden state of the last LSTM layer, through Linear and ReLU, then L2-normalised.
    Embeddings are L2-normed and non-negative, so cosine scores between them lie in [0, 1].
    A ReLU output that is entirely zero gives a zero embedding (norm 0), never NaN.
    Parameters are created on `device` (None: PyTorch's default device).
    """

    def __init__(
        self,
        config: ModelConfig = ModelConfig(),
        n_mels: int = 40,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        super().__init__()
        for name, value in (("n_mels", n_mels), *config.to_dict().items()):
            if value < 1:
                raise ValueError(f"SpeakerEncoder: {name} must be at least 1, got {value}")
        self.config, self.n_mels = config, n_mels
        self.lstm = nn.LSTM(n_mels, config.hidden_size, config.n_layers, batch_first=True, device=device)
        self.linear = nn.Linear(config.hidden_size, config.embedding_size, device=device)
        self.relu = nn.ReLU()

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """(B, T, n_mels) float32 mel frames -> (B, E) L2-normed, non-negative embeddings."""
        if mels.dim() != 3 or mels.shape[-1] != self.n_mels:
            raise ValueError(f"SpeakerEncoder expects (batch, frames, {self.n_mels}) mels, got shape {tuple(mels.shape)}")
        _, (hidden, _) = self.lstm(mels)
        embeds_raw = self.relu(self.linear(hidden[-1]))
        return F.normalize(embeds_raw, p=2.0, dim=1, eps=NORM_EPS)

    @property
    def device(self) -> torch.device:
        """The device that holds the parameters."""
        return self.linear.weight.device

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, torch.Tensor],
        device: Optional[Union[str, torch.device]] = None,
    ) -> "SpeakerEncoder":
        """An encoder shaped after `state` (see `infer_model_config`), loaded with strict=True.

        `state` holds only the encoder's keys (`lstm.*`, `linear.*`): set GE2E's
        `similarity_weight`/`similarity_bias` aside first (`spkenc.checkpoint.load_encoder` does).
        A missing, unexpected or misshapen key raises (ValueError or RuntimeError from PyTorch).
        """
        config, n_mels = infer_model_config(state)
        encoder = cls(config, n_mels=n_mels, device=device)
        encoder.load_state_dict(state, strict=True)
        return encoder


def infer_model_config(state: Mapping[str, torch.Tensor]) -> tuple[ModelConfig, int]:
    """(ModelConfig, n_mels) read from the tensor shapes of an RTVC-layout state dict.

    `lstm.weight_ih_l0` is (4 * hidden_size, n_mels); the layers are counted from the
    `lstm.*_l<k>` keys; `linear.weight` is (embedding_size, hidden_size).

    >>> state = SpeakerEncoder(ModelConfig(hidden_size=8, n_layers=2, embedding_size=6), n_mels=5).state_dict()
    >>> infer_model_config(state)
    (ModelConfig(hidden_size=8, n_layers=2, embedding_size=6), 5)
    >>> infer_model_config({"linear.weight": torch.zeros(6, 8)})
    Traceback (most recent call last):
    ...
    ValueError: not an RTVC encoder state: key 'lstm.weight_ih_l0' is missing
    """
    for key in ("lstm.weight_ih_l0", "linear.weight"):
        if key not in state:
            raise ValueError(f"not an RTVC encoder state: key {key!r} is missing")
        if state[key].dim() != 2:
            raise ValueError(f"not an RTVC encoder state: {key} has shape {tuple(state[key].shape)}, expected 2 dimensions")
    gates, n_mels = state["lstm.weight_ih_l0"].shape
    embedding_size, linear_in = state["linear.weight"].shape
    if gates % 4:
        raise ValueError(f"not an RTVC encoder state: lstm.weight_ih_l0 has {gates} rows, not 4 * hidden_size")
    hidden_size = gates // 4
    if linear_in != hidden_size:
        raise ValueError(f"not an RTVC encoder state: linear.weight takes {linear_in} inputs but the LSTM has {hidden_size} units")
    layers = sorted({int(match.group(1)) for key in state if (match := _LSTM_LAYER_KEY.match(key))})
    if layers != list(range(len(layers))):
        raise ValueError(f"not an RTVC encoder state: LSTM layers {layers} are not numbered 0..{len(layers) - 1}")
    return ModelConfig(hidden_size=hidden_size, n_layers=len(layers), embedding_size=embedding_size), int(n_mels)


def count_flops(config: ModelConfig, n_frames: int, batch: int, n_mels: int = 40) -> int:
    """Floating-point operations of one forward pass over `batch` partials of `n_frames` frames.

    Counts the matrix products (2 FLOPs per multiply-add) and bias additions of every LSTM
    step and of the final Linear layer; gate nonlinearities, the cell update, ReLU and the
    L2 norm are left out (under 1 % of the total at RTVC's size).

    >>> count_flops(ModelConfig(), n_frames=160, batch=1) / 1e6  # RTVC's encoder, one partial
    433.651968
    """
    hidden = config.hidden_size
    per_frame = 0
    for layer in range(config.n_layers):
        n_in = n_mels if layer == 0 else hidden
        per_frame += 2 * 4 * hidden * (n_in + hidden) + 2 * 4 * hidden
    linear = 2 * hidden * config.embedding_size + config.embedding_size
    return batch * (n_frames * per_frame + linear)
