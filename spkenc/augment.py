"""Training-time augmentation of GE2E batches, done on the mel crops themselves.

spkenc's mels are linear power (RTVC's front end takes no log), so a gain is a product and a
mix of two sounds is, to first order, the sum of their mel powers. That makes three
augmentations cheap enough to run on every batch, with no audio decoding:

- volume: each crop's power times 10^(g/10), g uniform in [-aug_volume_db, +aug_volume_db] dB;
- speed: each crop played s times faster, s uniform in [1 - aug_speed, 1 + aug_speed]. The
  crop is drawn `ceil(T * (1 + aug_speed))` frames long, its first round(T * s) frames are
  resampled to T frames (tempo), and every mel band's power is read at its centre frequency
  divided by s (pitch, like resampling the waveform);
- speaker speed: with `speaker_speeds`, the sampler draws each speaker as recorded or as one
  of its sped-up or slowed-down copies, which count as other speakers (`Batch.copies`); all
  crops of a copy are played at its factor, times the per-crop speed above;
- noise: with probability aug_noise_prob, a crop of another training speaker's recording (real
  babble from the training data) is added at an SNR uniform in [aug_noise_snr_db_min, max] dB;
- masking (SpecAugment): one band of up to aug_freq_mask mel channels and one span of up to
  aug_time_mask frames of each crop are set to zero power, after the others.

The draws use `np.random.default_rng([seed, step, rank, 2])`, so an augmented batch is still a
pure function of (seed, step, rank) and a resumed run sees exactly the batches it would have seen.
"""

import math
from functools import lru_cache
from typing import TYPE_CHECKING, Optional

import numpy as np

from spkenc.config import AudioConfig, TrainConfig

if TYPE_CHECKING:
    from spkenc.sampling import ShardStore


def augments(config: TrainConfig) -> bool:
    """Whether `config` asks for any augmentation.

    >>> augments(TrainConfig()), augments(TrainConfig(aug_volume_db=3.0))
    (False, True)
    """
    return (config.aug_volume_db > 0 or config.aug_speed > 0 or config.aug_noise_prob > 0 or bool(config.speaker_speeds)
            or config.aug_freq_mask > 0 or config.aug_time_mask > 0)


def crop_frames(config: TrainConfig, audio_config: AudioConfig = AudioConfig()) -> int:
    """Frames the sampler must cut per utterance: the training crop, longer when speed is drawn.

    >>> crop_frames(TrainConfig()), crop_frames(TrainConfig(crop_n_frames=100, aug_speed=0.1))
    (160, 110)
    >>> crop_frames(TrainConfig(speaker_speeds=(0.9, 1.1)))
    176
    """
    frames = config.crop_n_frames or audio_config.partial_n_frames
    fastest = max((1.0, *config.speaker_speeds))
    return int(math.ceil(frames * fastest * (1.0 + config.aug_speed) - 1e-6))


@lru_cache(maxsize=8)
def _band_centres_hz(sample_rate_hz: int, n_mels: int) -> np.ndarray:
    import librosa

    return librosa.mel_frequencies(n_mels + 2, fmin=0.0, fmax=sample_rate_hz / 2.0)[1:-1]


def change_speed(mel: np.ndarray, speed: float, n_frames: int, audio_config: AudioConfig = AudioConfig()) -> np.ndarray:
    """(n_frames, n_mels): the first round(n_frames * speed) frames of `mel` played `speed` times faster.

    >>> mel = np.ones((120, 40), dtype=np.float32)
    >>> change_speed(mel, 1.1, 100).shape, float(change_speed(mel, 0.9, 100).max())
    ((100, 40), 1.0)
    """
    source = min(len(mel), max(2, int(round(n_frames * speed))))
    positions = np.linspace(0.0, source - 1, n_frames)
    left = np.floor(positions).astype(np.int64)
    right = np.minimum(left + 1, source - 1)
    frac = (positions - left)[:, None].astype(np.float32)
    tempo = mel[left] * (1.0 - frac) + mel[right] * frac
    centres = _band_centres_hz(audio_config.sample_rate_hz, mel.shape[1])
    read_at = np.clip(centres / speed, centres[0], centres[-1])
    upper = np.clip(np.searchsorted(centres, read_at), 1, len(centres) - 1)
    weight = ((read_at - centres[upper - 1]) / (centres[upper] - centres[upper - 1])).astype(np.float32)
    return (tempo[:, upper - 1] * (1.0 - weight) + tempo[:, upper] * weight).astype(np.float32)


def augment_batch(
    mels: np.ndarray,
    speaker_indices: np.ndarray,
    store: "ShardStore",
    config: TrainConfig,
    seed: int,
    step: int,
    rank: int = 0,
    copies: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Augment a sampled batch (N, M, crop, n_mels) into (N, M, T, n_mels) float32, T the training crop.

    `speaker_indices` are the batch's speakers in `store`; noise is never taken from them.
    `copies` (N,) are the sampler's speaker copies (`Batch.copies`): copy k > 0 is played at
    `config.speaker_speeds[k - 1]`; None means every speaker as recorded.
    """
    audio = store.audio_config
    n_frames = config.crop_n_frames or audio.partial_n_frames
    rng = np.random.default_rng([seed, step, rank, 2])
    n, m = mels.shape[:2]
    out = np.empty((n, m, n_frames, mels.shape[3]), dtype=np.float32)
    in_batch = set(int(s) for s in speaker_indices)
    others = np.array([s for s in range(len(store)) if s not in in_batch], dtype=np.int64)
    lengths = [store.speakers[s].n_frames for s in range(len(store))]
    factors = (1.0, *config.speaker_speeds)
    for i in range(n):
        speaker_speed = factors[int(copies[i])] if copies is not None else 1.0
        for j in range(m):
            speed = rng.uniform(1.0 - config.aug_speed, 1.0 + config.aug_speed) if config.aug_speed > 0 else 1.0
            speed *= speaker_speed
            crop = change_speed(mels[i, j], speed, n_frames, audio) if speed != 1.0 else mels[i, j, :n_frames]
            if config.aug_noise_prob > 0 and len(others) and rng.random() < config.aug_noise_prob:
                crop = crop + _babble(store, others, lengths, n_frames, crop, rng, config)
            if config.aug_volume_db > 0:
                crop = crop * np.float32(10.0 ** (rng.uniform(-config.aug_volume_db, config.aug_volume_db) / 10.0))
            out[i, j] = crop
            _mask(out[i, j], config, rng)
    return out


def _mask(crop: np.ndarray, config: TrainConfig, rng: np.random.Generator) -> None:
    """Zero one band of 0..aug_freq_mask channels and one span of 0..aug_time_mask frames of `crop`, in place.

    >>> crop = np.ones((160, 40), dtype=np.float32)
    >>> _mask(crop, TrainConfig(aug_freq_mask=8, aug_time_mask=20), np.random.default_rng(0))
    >>> bool((crop == 0).all(axis=0).sum() <= 8), bool((crop == 0).all(axis=1).sum() <= 20), bool(crop.any())
    (True, True, True)
    """
    for axis, widest in ((1, config.aug_freq_mask), (0, config.aug_time_mask)):
        if widest <= 0:
            continue
        size = crop.shape[axis]
        width = int(rng.integers(0, min(widest, size) + 1))
        start = int(rng.integers(0, size - width + 1))
        if axis == 1:
            crop[:, start : start + width] = 0.0
        else:
            crop[start : start + width] = 0.0


def _babble(store, others, lengths, n_frames, crop, rng, config) -> np.ndarray:
    """A crop of another speaker's recording, scaled to a random SNR against `crop`."""
    speaker = int(others[rng.integers(len(others))])
    long_enough = np.flatnonzero(lengths[speaker] >= n_frames)
    if not len(long_enough):
        return np.zeros_like(crop)
    row = int(long_enough[rng.integers(len(long_enough))])
    utterance = store.utterances(speaker, [row])[0]
    start = int(rng.integers(0, len(utterance) - n_frames + 1))
    noise = utterance[start : start + n_frames]
    snr_db = rng.uniform(config.aug_noise_snr_db_min, config.aug_noise_snr_db_max)
    scale = float(crop.mean()) / (max(float(noise.mean()), 1e-12) * 10.0 ** (snr_db / 10.0))
    return (noise * np.float32(scale)).astype(np.float32)
