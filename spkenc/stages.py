"""The per-item work of the preprocessing stages, run inside pool workers.

`trim_source` turns one audio file into trimmed 16 kHz PCM16 wavs; `mel_shard_for_speaker`
turns one speaker's trimmed wavs into a mel shard. Both take and return plain picklable values.

A recording longer than `max_segment_s` is decoded block by block and cut into equal segments
of at most that length, each preprocessed on its own and written as `<utt>.seg<k>.wav`, so a
1-hour file needs the memory of one segment, not of the hour.
"""

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from spkenc.config import AudioConfig
from spkenc.pool import peak_rss_mb

log = logging.getLogger(__name__)


def params_hash(*parts: Any) -> str:
    """A short stable hash of JSON-able parameters (AudioConfig dicts, versions, dtypes).

    >>> params_hash({"a": 1}) == params_hash({"a": 1}) != params_hash({"a": 2})
    True
    """
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class OutputWriteError(OSError):
    """An output could not be written (disk full, I/O error): a fault of the machine, not of
    the source, so it is never recorded as the source's reject reason."""


def write_wav_atomic(path: Path, wav: np.ndarray, sample_rate_hz: int) -> Path:
    """Write float samples as 16-bit PCM WAV, clipping to [-1, 1] (never wrapping around).

    Raises OutputWriteError naming `path` when the write fails; the previous file is kept.
    """
    import soundfile as sf

    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(temp, np.clip(wav, -1.0, 1.0), sample_rate_hz, subtype="PCM_16", format="WAV")
        os.replace(temp, path)
    except BaseException as error:
        temp.unlink(missing_ok=True)
        if isinstance(error, (OSError, RuntimeError)):  # soundfile reports some write failures as RuntimeError
            reason = f"{path}: cannot write ({getattr(error, 'strerror', None) or error})"
            errno = getattr(error, "errno", None)
            raise (OutputWriteError(errno, reason) if errno else OutputWriteError(reason)) from error
        raise
    return path


def _reason(error: BaseException, path: str) -> str:
    text = str(error)
    return text[len(path) + 2 :] if text.startswith(f"{path}: ") else text


def segment_count(duration_s: float, max_segment_s: float) -> int:
    """Equal segments of at most `max_segment_s` covering `duration_s` (at least one).

    >>> segment_count(3600.0, 120.0), segment_count(121.0, 120.0), segment_count(4.0, 120.0)
    (30, 2, 1)
    """
    return max(1, math.ceil(duration_s / max_segment_s))


def _segments(source: str, header_frames: int, header_rate_hz: int, max_segment_s: float) -> Iterator[tuple[np.ndarray, int]]:
    """(segment at the native rate, native rate) pairs, decoding one block at a time.
    `header_frames` > 0 sets the segment length; the decoder has the last word on the total."""
    from spkenc.audio_io import decode_blocks

    rate, blocks = decode_blocks(source)
    length = math.ceil(header_frames / segment_count(header_frames / rate, max_segment_s))
    buffered: list[np.ndarray] = []
    n_buffered = 0
    for block in blocks:
        buffered.append(block)
        n_buffered += len(block)
        while n_buffered >= length:
            joined = np.concatenate(buffered)
            yield joined[:length], rate
            buffered, n_buffered = [joined[length:]], n_buffered - length
    if n_buffered:
        yield np.concatenate(buffered), rate


def trim_source(
    source: str,
    speaker_id: str,
    utterance_id: str,
    out_dir: str,
    config: dict,
    max_segment_s: float,
    header_frames: int = 0,
    header_rate_hz: int = 0,
    **_: Any,
) -> dict:
    """Preprocess `source` into `out_dir/<speaker>/<utterance>[.seg<k>].wav`.

    Returns {"reason": None or the reject reason, "outputs": [utterance ids],
    "output_durations_s": [seconds], "peak_rss_mb": this worker's peak memory}.
    """
    from spkenc.audio import AudioError, preprocess_wav

    audio = AudioConfig.from_dict(config)
    rate = audio.sample_rate_hz
    min_samples = int(round(audio.min_utterance_s * rate))
    speaker_dir = Path(out_dir) / speaker_id
    n_segments = segment_count(header_frames / header_rate_hz if header_rate_hz else 0.0, max_segment_s)
    kept: list[tuple[str, np.ndarray]] = []
    longest = 0
    try:
        if n_segments == 1:
            wavs: Iterator[np.ndarray] = iter([preprocess_wav(source, config=audio)])
        else:
            wavs = (preprocess_wav(seg, source_sr=sr, config=audio) for seg, sr in
                    _segments(source, header_frames, header_rate_hz, max_segment_s))
        for k, wav in enumerate(wavs):
            longest = max(longest, len(wav))
            if len(wav) >= min_samples:
                name = utterance_id if n_segments == 1 else f"{utterance_id}.seg{k:03d}"
                write_wav_atomic(speaker_dir / f"{name}.wav", wav, rate)
                kept.append((name, len(wav) / rate))
    except (AudioError, OSError, RuntimeError) as error:
        for name, _ in kept:
            (speaker_dir / f"{name}.wav").unlink(missing_ok=True)
        if isinstance(error, OutputWriteError):
            raise  # trim_corpus reports it and retries the source on the next run
        return {"reason": f"decode error: {_reason(error, source)}", "outputs": [], "output_durations_s": [],
                "peak_rss_mb": peak_rss_mb()}
    reason = None
    if not kept:
        reason = "empty after trimming" if longest == 0 else f"under {audio.min_utterance_s:g} s of speech"
    return {"reason": reason, "outputs": [n for n, _ in kept], "output_durations_s": [d for _, d in kept],
            "peak_rss_mb": peak_rss_mb()}


def mel_shard_for_speaker(
    speaker_id: str, utterances: list, path: str, corpus: str, config: dict, mel_dtype: str, **_: Any
) -> dict:
    """Mel frames of each (utterance_id, trimmed wav, source) of one speaker into the shard at
    `path`. Unreadable trimmed files become rejects; with none readable, no shard remains."""
    import soundfile as sf

    from spkenc.audio import wav_to_mel
    from spkenc.shards import write_shard

    audio = AudioConfig.from_dict(config)
    rows, rejects = [], []
    for utterance_id, wav_path, source in utterances:
        try:
            wav, rate = sf.read(wav_path, dtype="float32")
            if rate != audio.sample_rate_hz or wav.ndim != 1:
                raise ValueError(f"{wav_path}: expected mono {audio.sample_rate_hz} Hz, got {rate} Hz shape {wav.shape}")
            rows.append((utterance_id, wav_to_mel(wav, audio), source))
        except (OSError, RuntimeError, ValueError) as error:
            rejects.append({"path": wav_path, "stage": "mel", "reason": _reason(error, wav_path)})
    if not rows:
        Path(path).unlink(missing_ok=True)
        return {"written": False, "rejects": rejects}
    write_shard(path, speaker_id, rows, audio_config=audio, corpus=corpus, mel_dtype=mel_dtype)
    return {"written": True, "rejects": rejects}
