"""Inference: utterance and speaker embeddings from preprocessed 16 kHz waveforms.

An utterance is cut into 160-frame (1.6 s) partials, each partial is embedded, and the
utterance embedding is the L2-normed mean of the partial embeddings (GE2E paper, section 3.2;
RTVC's encoder/inference.py). `Embedder` batches the partials of many utterances together
and computes mel frames chunk by chunk, so memory stays flat for hour-long files.
"""

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from spkenc.audio import wav_to_mel_batch
from spkenc.config import AudioConfig
from spkenc.precision import encoder_for

PathLike = Union[str, Path]


def compute_partial_slices(
    n_samples: int,
    rate: Optional[float] = None,
    min_coverage: float = 0.75,
    config: AudioConfig = AudioConfig(),
) -> tuple[list[slice], list[slice]]:
    """Where to cut an utterance of `n_samples` samples into partials of 160 mel frames.

    `rate=None` is RTVC's rule: 50% overlap, one partial every 80 frames. `rate=r` is
    Resemblyzer's rule: r partials per second, so a step of round(16000 / r / 160) frames
    (r = 1.25 gives RTVC's slicing exactly; Resemblyzer's default is 1.3). The last partial is
    kept if at least `min_coverage` of it holds real samples; there is always at least one.
    Returns (wav slices in samples, mel slices in frames); they may run past the end of the
    waveform, which is then zero-padded.

    >>> wav_slices, mel_slices = compute_partial_slices(3 * 16000)
    >>> mel_slices
    [slice(0, 160, None), slice(80, 240, None), slice(160, 320, None)]
    >>> wav_slices[-1]
    slice(25600, 51200, None)
    >>> [s.start for s in compute_partial_slices(3 * 16000, rate=1.3)[1]]
    [0, 77, 154]
    >>> len(compute_partial_slices(100)[1])
    1
    """
    if n_samples < 0:
        raise ValueError(f"n_samples must be non-negative, got {n_samples}")
    if not 0 < min_coverage <= 1:
        raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage}")
    hop = config.hop_length
    partial = config.partial_n_frames
    if rate is None:
        frame_step = max(int(round(partial * (1 - 0.5))), 1)
    else:
        frame_step = int(round((config.sample_rate_hz / rate) / hop)) if rate > 0 else 0
        min_rate = config.sample_rate_hz / (hop * partial)
        if not 0 < frame_step <= partial:
            raise ValueError(
                f"rate {rate} partials/s is out of range: it must give a step of 1 to {partial} frames "
                f"(rate from {min_rate:.4g} to {2 * config.sample_rate_hz / hop:.4g})"
            )
    n_frames = int(math.ceil((n_samples + 1) / hop))
    steps = max(1, n_frames - partial + frame_step + 1)
    mel_slices = [slice(i, i + partial) for i in range(0, steps, frame_step)]
    wav_slices = [slice(s.start * hop, s.stop * hop) for s in mel_slices]
    last = wav_slices[-1]
    coverage = (n_samples - last.start) / (last.stop - last.start)
    if coverage < min_coverage and len(mel_slices) > 1:
        mel_slices, wav_slices = mel_slices[:-1], wav_slices[:-1]
    return wav_slices, mel_slices


def mel_frames(
    wav: np.ndarray, start: int, stop: int, config: AudioConfig = AudioConfig(), device: Union[str, torch.device] = "cpu"
) -> torch.Tensor:
    """Mel frames [start, stop) of `wav` zero-padded on the right, without computing the rest.

    Equal to `wav_to_mel(np.pad(wav, (0, pad)))[start:stop]` (to float32 FFT precision) for any
    pad that makes frame stop - 1 exist: frames are centred, so frame t only sees samples
    t*hop +- n_fft/2, and a halo of whole hops around [start, stop) reproduces them.
    Computed with `wav_to_mel_batch` on `device`. (stop - start, 40) float32 tensor on `device`.

    >>> from spkenc.audio import wav_to_mel
    >>> wav = np.random.default_rng(0).standard_normal(8000).astype(np.float32)
    >>> full = wav_to_mel(np.pad(wav, (0, 4000)))
    >>> bool(np.allclose(mel_frames(wav, 30, 70).numpy(), full[30:70], rtol=1e-4, atol=1e-3))
    True
    >>> tuple(mel_frames(wav, 70, 75).shape)
    (5, 40)
    """
    if not 0 <= start < stop:
        raise ValueError(f"need 0 <= start < stop, got [{start}, {stop})")
    hop = config.hop_length
    halo = -(-(config.n_fft // 2) // hop)  # hops of context a centred frame needs on each side
    first = max(0, start - halo)
    end = (stop - 1 + halo) * hop
    segment = torch.from_numpy(np.ascontiguousarray(wav[first * hop : end], dtype=np.float32)).to(device)
    segment = torch.nn.functional.pad(segment, (0, end - first * hop - len(segment)))
    return wav_to_mel_batch(segment[None], config)[0, start - first : stop - first]


def _normalize(sums: np.ndarray) -> np.ndarray:
    """Per-row sums of partial embeddings -> L2-normed rows (the mean has the sum's direction)."""
    norms = np.linalg.norm(sums, axis=1)
    dead = np.flatnonzero(norms == 0)
    if len(dead):
        raise ValueError(f"utterance(s) {dead.tolist()}: every partial embedding is zero")
    return (sums / norms[:, None]).astype(np.float32)


@contextmanager
def thread_limits(n_threads: Optional[int]) -> Iterator[None]:
    """Use `n_threads` torch threads and one BLAS thread inside the block (None: no change).

    On a few cores, torch's OpenMP pool and numpy's BLAS pool otherwise oversubscribe them.
    """
    if n_threads is None:
        yield
        return
    if n_threads < 1:
        raise ValueError(f"n_threads must be at least 1, got {n_threads}")
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        with threadpool_limits(1, "blas"):
            yield
    finally:
        torch.set_num_threads(previous)


def resolve_device(device: Union[str, torch.device, None] = None) -> torch.device:
    """`device` as a torch.device; None means CUDA when present, else the CPU.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    try:
        resolved = torch.device("cuda" if device is None and torch.cuda.is_available() else device or "cpu")
    except RuntimeError as error:
        raise ValueError(f"device {device!r}: {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    return resolved


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def pretrained_checkpoint() -> Path:
    """Path of the checkpoint shipped in the package: `spkenc/models/encoder.pt`.

    Raises FileNotFoundError when the installation lacks it.
    """
    path = Path(__file__).resolve().parent / "models" / "encoder.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the packaged model is missing; reinstall spkenc")
    return path


class Embedder:
    """Owns a speaker encoder and its device; embeds utterances and speakers.

    `model` maps (B, T, 40) float32 mel frames to (B, E) L2-normed, non-negative embeddings.
    Waveforms must be preprocessed (`spkenc.preprocess_wav`): float32, 16 kHz, trimmed.
    `batch_size` bounds the partials per forward pass (memory), `n_threads` the CPU threads.
    `precision` is "fp32" (the model as trained) or "bf16", the CPU fast mode: the LSTM in
    bfloat16 with a float32 cell state (`spkenc.precision.Bf16Encoder`), about 2x faster where
    the CPU has AVX-512 BF16 or AMX, and within a cosine of 1e-3 of fp32 on every utterance.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: Union[str, torch.device, None] = None,
        batch_size: int = 64,
        n_threads: Optional[int] = None,
        config: AudioConfig = AudioConfig(),
        precision: str = "fp32",
    ) -> None:
        _check_batch_size(batch_size)
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.n_threads = n_threads
        self.config = config
        self.precision = precision
        self._encoder = encoder_for(self.model, precision)  # runs the forward passes

    @classmethod
    def from_pretrained(
        cls,
        device: Union[str, torch.device, None] = None,
        batch_size: int = 64,
        n_threads: Optional[int] = None,
        precision: str = "fp32",
    ) -> "Embedder":
        """The model shipped in the package (`spkenc/models/MODEL_CARD.md` says how it was trained)."""
        return cls.from_checkpoint(pretrained_checkpoint(), device=device, batch_size=batch_size, n_threads=n_threads,
                                   precision=precision)

    @classmethod
    def from_checkpoint(
        cls,
        path: PathLike,
        device: Union[str, torch.device, None] = None,
        batch_size: int = 64,
        n_threads: Optional[int] = None,
        precision: str = "fp32",
    ) -> "Embedder":
        """Load an RTVC-format checkpoint (RTVC's encoder.pt, Resemblyzer's pretrained.pt, ours).

        Raises `spkenc.checkpoint.CheckpointError` naming the file when it is refused, and
        ValueError for a bad `device`, `batch_size` or `precision`.
        """
        from spkenc.checkpoint import load_encoder
        from spkenc.precision import check_precision

        device = resolve_device(device)
        _check_batch_size(batch_size)
        check_precision(precision)
        model, info = load_encoder(path, device=device)
        audio = info.get("audio_config") if isinstance(info, dict) else None
        config = AudioConfig.from_dict(audio) if audio else AudioConfig()
        return cls(model, device=device, batch_size=batch_size, n_threads=n_threads, config=config, precision=precision)

    def embed_frames_batch(self, frames: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
        """(B, T, 40) float32 mel frames -> (B, E) float32 embeddings (L2-normed, non-negative)."""
        frames = torch.as_tensor(frames, dtype=torch.float32)
        if frames.ndim != 3 or frames.shape[-1] != self.config.n_mels:
            raise ValueError(f"expected (B, T, {self.config.n_mels}) mel frames, got shape {tuple(frames.shape)}")
        with thread_limits(self.n_threads), torch.inference_mode():
            return self._encoder(frames.to(self.device)).float().cpu().numpy()

    def embed_utterance(
        self,
        wav: np.ndarray,
        return_partials: bool = False,
        rate: Optional[float] = None,
        min_coverage: float = 0.75,
    ):
        """(N,) float32 16 kHz waveform -> (E,) L2-normed embedding.

        With `return_partials`, also returns the (n_partials, E) partial embeddings and the
        wav slices they came from, as Resemblyzer does. An empty waveform is a ValueError.
        """
        sums, partials = self._embed([wav], rate, min_coverage, keep_partials=return_partials)
        embed = _normalize(sums)[0]
        if return_partials:
            wav_slices, _ = compute_partial_slices(len(wav), rate, min_coverage, self.config)
            return embed, partials[0], wav_slices
        return embed

    def embed_utterances(
        self, wavs: Sequence[np.ndarray], rate: Optional[float] = None, min_coverage: float = 0.75
    ) -> np.ndarray:
        """n waveforms -> (n, E) L2-normed embeddings, the same as `embed_utterance` on each.

        Partials of consecutive utterances share forward passes of up to `batch_size` partials.
        """
        sums, _ = self._embed(wavs, rate, min_coverage)
        return _normalize(sums)

    def embed_speaker(self, wavs: Sequence[np.ndarray], **kwargs) -> np.ndarray:
        """Utterances of one speaker -> (E,) L2-normed mean of their utterance embeddings."""
        if len(wavs) == 0:
            raise ValueError("embed_speaker needs at least one utterance")
        mean = self.embed_utterances(wavs, **kwargs).mean(axis=0)
        return (mean / np.linalg.norm(mean)).astype(np.float32)

    def _runs(self, wavs: Sequence[np.ndarray], rate, min_coverage) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (utterance index, (k, 160, 40) partial frames on the device), k <= batch_size, in order.

        The mel frames of one run are computed together, so an hour-long file never holds
        more than `batch_size` partials' worth of frames.
        """
        partial = self.config.partial_n_frames
        for index, wav in enumerate(wavs):
            wav = np.asarray(wav)
            if wav.ndim != 1:
                raise ValueError(f"utterance {index}: expected a 1-D waveform, got shape {wav.shape}")
            if len(wav) == 0:
                raise ValueError(f"utterance {index}: empty waveform (no speech left after trimming?)")
            _, mel_slices = compute_partial_slices(len(wav), rate, min_coverage, self.config)
            step = mel_slices[1].start - mel_slices[0].start if len(mel_slices) > 1 else partial
            for first in range(0, len(mel_slices), self.batch_size):
                run = mel_slices[first : first + self.batch_size]
                mel = mel_frames(wav, run[0].start, run[-1].stop, self.config, self.device)
                if not torch.isfinite(mel).all():
                    raise ValueError(f"utterance {index}: non-finite samples")
                yield index, mel.unfold(0, partial, step).transpose(1, 2)

    def _embed(self, wavs, rate, min_coverage, keep_partials: bool = False):
        """(n, E) float64 sums of partial embeddings per utterance, and the (n_partials, E) partial
        embeddings themselves if asked; partials of consecutive utterances share batches."""
        n = len(wavs)
        sums: Optional[np.ndarray] = None
        partials: list[list[np.ndarray]] = [[] for _ in range(n)]
        shape = (self.batch_size, self.config.partial_n_frames, self.config.n_mels)
        buffer = torch.empty(shape, dtype=torch.float32, device=self.device)
        owners = np.empty(self.batch_size, dtype=np.int64)
        filled = 0

        def flush() -> None:
            nonlocal sums, filled
            embeds = self._encoder(buffer[:filled]).float().cpu().numpy()
            if sums is None:
                sums = np.zeros((n, embeds.shape[1]), dtype=np.float64)
            np.add.at(sums, owners[:filled], embeds)
            if keep_partials:
                for owner, embed in zip(owners[:filled], embeds):
                    partials[owner].append(embed)
            filled = 0

        with thread_limits(self.n_threads), torch.inference_mode():
            for index, windows in self._runs(wavs, rate, min_coverage):
                taken = 0
                while taken < len(windows):
                    k = min(len(windows) - taken, self.batch_size - filled)
                    buffer[filled : filled + k] = windows[taken : taken + k]
                    owners[filled : filled + k] = index
                    filled, taken = filled + k, taken + k
                    if filled == self.batch_size:
                        flush()
            if filled:
                flush()
        if sums is None:
            raise ValueError("no utterances to embed")
        return sums, [np.stack(p) if p else None for p in partials]

