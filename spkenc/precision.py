"""Inference precision: the float32 encoder as trained, or a bfloat16 fast mode for the CPU.

`Embedder(..., precision="bf16")` runs a `Bf16Encoder`: the LSTM's matrix products in bfloat16
(about 2x the float32 speed where the CPU has AVX-512 BF16 or AMX), with the LSTM's cell state
and the final Linear + ReLU + L2 norm kept in float32.

Why the cell state: run wholly in bfloat16 (e.g. under `torch.autocast`), the LSTM rounds its
cell state to 8 bits of mantissa at each of the 160 steps of a partial, and the error piles up.
On RTVC's weights that gave a cosine of 0.9986 to the float32 embedding on some partials
(0.9988 on a 1.2 s utterance). Rounding the weights, inputs, hidden states or gate products
to bfloat16, each alone, costs under 1.5e-4 of cosine; rounding the cell state costs 1.5e-3.
oneDNN's LSTM keeps the cell state in float32 when its initial cell state is float32, at the
same speed, which is what `Bf16Encoder` asks for.

Training's `bf16` (bfloat16 autocast) needs a bfloat16 LSTM kernel too. A CPU without native
bfloat16 (AVX2 only, no AVX-512 BF16 or AMX) has none: oneDNN fails at the first step with
"could not create a primitive descriptor for the LSTM forward propagation primitive".
`check_bf16_autocast` finds that out with a tiny LSTM before any data is loaded.
"""

import copy
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from spkenc.model import NORM_EPS, SpeakerEncoder

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    """`precision` if it is one of PRECISIONS, else a ValueError naming it.

    >>> check_precision("bf16")
    'bf16'
    >>> check_precision("fp16")
    Traceback (most recent call last):
    ...
    ValueError: precision 'fp16': expected one of 'fp32', 'bf16'
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(map(repr, PRECISIONS))}")
    return precision


@functools.lru_cache(maxsize=None)
def bf16_autocast_error(device: str) -> Optional[str]:
    """None if a small LSTM runs forward and backward under bfloat16 autocast on `device`, else
    the error it raised (cached per device)."""
    torch_device = torch.device(device)
    lstm = nn.LSTM(8, 8, num_layers=2, batch_first=True).to(torch_device)
    try:
        with torch.autocast(torch_device.type, dtype=torch.bfloat16):
            out, _ = lstm(torch.zeros(2, 3, 8, device=torch_device))
        out.float().sum().backward()
    except RuntimeError as error:
        return str(error).strip() or type(error).__name__
    return None


def check_bf16_autocast(device: torch.device) -> None:
    """A ValueError naming the device and the kernel's error where bfloat16 autocast cannot run
    the LSTM (see the module docstring); nothing where it can."""
    error = bf16_autocast_error(str(device))
    if error is not None:
        raise ValueError(
            f"bf16 autocast is not available on {device} with this CPU or PyTorch build: the LSTM under "
            f"bfloat16 autocast failed ({error}). A CPU needs AVX-512 BF16 or AMX for it. "
            f"Train in float32: bf16: false in the Dagster config, no --bf16 on the command line"
        )


class Bf16Encoder(nn.Module):
    """Inference twin of a `SpeakerEncoder` with its LSTM in bfloat16 and a float32 cell state.

    `forward((B, T, n_mels) mel frames, any float dtype) -> (B, E) float32` embeddings,
    L2-normed and non-negative, as `SpeakerEncoder.forward`. The LSTM weights are a bfloat16
    copy taken here (later changes to the encoder's LSTM are not seen); the Linear layer is the
    encoder's own (float32, shared). CPU only: it needs oneDNN's
    bfloat16 LSTM, which takes a float32 cell state (PyTorch's other LSTM kernels refuse mixed
    dtypes). Raises ValueError on another device or where that kernel is missing.
    """

    def __init__(self, encoder: SpeakerEncoder) -> None:
        super().__init__()
        device = encoder.device
        if device.type != "cpu":
            raise ValueError(f"precision 'bf16' runs on the CPU only (oneDNN's LSTM), not on {device}; use 'fp32' there")
        self.n_mels = encoder.n_mels
        self.lstm = copy.deepcopy(encoder.lstm).to(torch.bfloat16).eval()
        self.linear = encoder.linear
        try:
            with torch.inference_mode():
                self.forward(torch.zeros(1, 1, self.n_mels))
        except RuntimeError as error:
            raise ValueError(
                f"precision 'bf16' is not available on this CPU or PyTorch build "
                f"(oneDNN's bfloat16 LSTM with a float32 cell state failed: {error}); use 'fp32'"
            ) from None

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """(B, T, n_mels) mel frames -> (B, E) float32 L2-normed, non-negative embeddings."""
        if mels.dim() != 3 or mels.shape[-1] != self.n_mels:
            raise ValueError(f"Bf16Encoder expects (batch, frames, {self.n_mels}) mels, got shape {tuple(mels.shape)}")
        shape = (self.lstm.num_layers, mels.shape[0], self.lstm.hidden_size)
        hidden0 = torch.zeros(shape, dtype=torch.bfloat16, device=mels.device)
        cell0 = torch.zeros(shape, dtype=torch.float32, device=mels.device)  # keeps the cell state float32
        _, (hidden, _) = self.lstm(mels.to(torch.bfloat16), (hidden0, cell0))
        embeds_raw = F.relu(self.linear(hidden[-1].float()))
        return F.normalize(embeds_raw, p=2.0, dim=1, eps=NORM_EPS)


def encoder_for(model: SpeakerEncoder, precision: str) -> nn.Module:
    """The module that runs `model`'s forward passes at `precision`: the model itself for fp32.

    >>> from spkenc.config import ModelConfig
    >>> model = SpeakerEncoder(ModelConfig(hidden_size=8, n_layers=2, embedding_size=4), n_mels=5)
    >>> encoder_for(model, "fp32") is model
    True
    """
    if check_precision(precision) == "fp32":
        return model
    if not isinstance(model, SpeakerEncoder):
        raise ValueError(f"precision {precision!r} needs a spkenc SpeakerEncoder, got {type(model).__name__}")
    return Bf16Encoder(model)
