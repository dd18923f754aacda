"""Reading speech files: header facts, and decoding to float32 mono at the native or a chosen rate.

libsndfile (through soundfile) reads WAV, FLAC, Ogg Vorbis/Opus and MP3; PyAV (FFmpeg) reads
M4A/AAC, VoxCeleb2's format, and whatever else libsndfile cannot open. Files are decoded in
blocks, and resampling to a new rate runs block by block (soxr "HQ", as librosa and Resemblyzer
use it), so a long 48 kHz file never sits in memory at both rates.
"""

import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Union

import numpy as np
import soundfile as sf
import soxr

if TYPE_CHECKING:
    import av

__all__ = [
    "AudioError", "AudioInfo", "read_audio_info", "decode_blocks", "load_audio", "load_resampled", "resample",
]

_DECODE_BLOCK_FRAMES = 1 << 20  # about a minute at 16 kHz per decoded block
_MAX_PREALLOCATED = 1 << 28  # samples (1 GB of float32): a header's length beyond this is not trusted
_OGG_MAX_PAGE_BYTES = 27 + 255 + 255 * 255  # page header, lacing table, largest payload (RFC 3533)
PathLike = Union[str, "os.PathLike[str]"]


class AudioError(ValueError):
    """A file or array that cannot be used as speech; the message starts with the path or <array>."""


@dataclass(frozen=True)
class AudioInfo:
    """Facts from a file's header. `format` is libsndfile's major format (WAV, FLAC, OGG, MP3)
    or, for files only PyAV reads, the codec name (AAC). For such files `n_frames` comes from the
    container's duration and may be an estimate; 0 when the container does not say."""

    path: str
    format: str
    sample_rate_hz: int
    channels: int
    n_frames: int
    duration_s: float


def _checked_path(path: PathLike) -> str:
    name = os.fspath(path)
    if os.path.isdir(name):
        raise AudioError(f"{name}: is a directory, not an audio file")
    try:
        size = os.stat(name).st_size
    except FileNotFoundError:
        raise AudioError(f"{name}: no such file") from None
    except OSError as error:
        raise AudioError(f"{name}: cannot read ({error.strerror})") from None
    if size == 0:
        raise AudioError(f"{name}: empty file (0 bytes)")
    if not os.access(name, os.R_OK):
        raise AudioError(f"{name}: not readable (permission denied)")
    return name


def _check_wav_header(name: str) -> None:
    """Check a RIFF/WAVE header by hand (other files pass untouched).

    libsndfile refuses a rate or channel count of 0 with a vague message, and silently reads
    whatever is there when the data chunk is shorter than declared: this names the fault. A
    declared data size of 0 or 0xFFFFFFFF (streamed writers) means "unknown" and passes.
    """
    with open(name, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:] != b"WAVE":
            return
        offset = 12
        while offset + 8 <= file_size:
            f.seek(offset)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"fmt " and chunk_size >= 8:
                n_channels, sample_rate_hz = struct.unpack("<2xHI", f.read(8))
                if sample_rate_hz == 0:
                    raise AudioError(f"{name}: sample rate 0")
                if n_channels == 0:
                    raise AudioError(f"{name}: zero channels")
            if chunk_id == b"data":
                held = file_size - offset - 8
                if chunk_size not in (0, 0xFFFFFFFF) and chunk_size > held:
                    raise AudioError(
                        f"{name}: truncated: the header declares {chunk_size} data bytes, the file holds {held}"
                    )
                return
            offset += 8 + chunk_size + (chunk_size & 1)


def _check_ogg_end(name: str) -> None:
    """Refuse an Ogg file that does not end with a whole end-of-stream page (other files pass).

    Every Ogg encoder closes its stream with a page flagged end-of-stream (RFC 3533), so a file
    cut short ends in a partial page or a page without that flag. libsndfile would return the
    part that decodes, and a cut recording would enter a corpus as a short one.
    """
    with open(name, "rb") as f:
        if f.read(4) != b"OggS":
            return
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - _OGG_MAX_PAGE_BYTES))
        tail = f.read()
    page = tail[tail.rfind(b"OggS") :]
    n_segments = page[26] if len(page) > 26 else 0
    whole = len(page) > 26 and len(page) >= 27 + n_segments + sum(page[27 : 27 + n_segments])
    if not (whole and page[5] & 0x04):
        raise AudioError(f"{name}: truncated: the Ogg stream ends without its end-of-stream page")


def _av_n_frames(container: "av.container.InputContainer", stream: "av.AudioStream") -> Optional[int]:
    """Presentation length in samples (after the edit list removes encoder padding), or None."""
    if stream.duration is not None and stream.time_base is not None:
        return round(stream.duration * stream.time_base * stream.rate)
    if container.duration is not None:
        return round(container.duration * stream.rate / 1_000_000)
    return None


def _open_av(name: str, sf_error: "sf.LibsndfileError") -> "av.container.InputContainer":
    import av

    try:
        container = av.open(name)
    except av.FFmpegError as av_error:
        raise AudioError(
            f"{name}: not a readable audio file "
            f"(libsndfile: {sf_error.error_string}; PyAV: {av_error.strerror})"
        ) from None
    if not container.streams.audio:
        kind = container.format.name
        container.close()
        raise AudioError(f"{name}: no audio stream (FFmpeg reads it as {kind})")
    return container


def _validated(info: AudioInfo) -> AudioInfo:
    if info.sample_rate_hz <= 0:
        raise AudioError(f"{info.path}: sample rate {info.sample_rate_hz}")
    if info.channels <= 0:
        raise AudioError(f"{info.path}: zero channels")
    return info


def _read_info(path: PathLike) -> tuple[AudioInfo, Optional["sf.LibsndfileError"]]:
    """The header facts, and libsndfile's error when only PyAV can open the file (else None)."""
    name = _checked_path(path)
    _check_wav_header(name)
    _check_ogg_end(name)
    try:
        header = sf.info(name)
    except sf.LibsndfileError as sf_error:
        with _open_av(name, sf_error) as container:
            stream = container.streams.audio[0]
            n_frames = _av_n_frames(container, stream) or 0
            rate = stream.rate or 0
            if rate <= 0:  # FFmpeg's probe guessed a format for bytes that are no audio
                raise AudioError(f"{name}: not a readable audio file (libsndfile: {sf_error.error_string}; "
                                 f"PyAV reads it as {container.format.name} with no sample rate)")
            info = AudioInfo(name, stream.codec_context.name.upper(), rate, stream.channels, n_frames,
                             n_frames / rate if rate else 0.0)
        return _validated(info), sf_error
    info = _validated(AudioInfo(name, header.format, header.samplerate, header.channels, header.frames,
                                header.frames / header.samplerate if header.samplerate else 0.0))
    return info, None


def read_audio_info(path: PathLike) -> AudioInfo:
    """Read format, rate, channels and length from the header, without decoding the audio.

    Raises AudioError (path first) for a missing, empty, unreadable or non-audio file, a
    directory, sample rate 0 or zero channels, and a WAV whose data chunk is shorter than its
    header says. A truncated FLAC is only found when decoding (see `load_audio`).
    """
    return _read_info(path)[0]


def _mono(name: str, block: np.ndarray) -> np.ndarray:
    """(n, channels) float32 -> (n,) float32 channel mean, refusing NaN and Inf."""
    if not np.isfinite(block).all():
        raise AudioError(f"{name}: non-finite samples")
    if block.shape[1] == 1:
        return np.ascontiguousarray(block[:, 0])
    return block.mean(axis=1, dtype=np.float32)


def _sf_blocks(name: str, info: AudioInfo) -> Iterator[np.ndarray]:
    n_decoded = 0
    try:
        with sf.SoundFile(name) as f:
            while len(block := f.read(_DECODE_BLOCK_FRAMES, dtype="float32", always_2d=True)):
                n_decoded += len(block)
                yield _mono(name, block)
    except sf.LibsndfileError as error:
        reason = error.error_string.strip()
        raise AudioError(f"{name}: decoding failed ({reason}): truncated or corrupt") from None
    if info.format == "FLAC" and n_decoded < info.n_frames:
        raise AudioError(f"{name}: truncated: decoded {n_decoded} of the header's {info.n_frames} frames")


def _av_blocks(name: str, sf_error: "sf.LibsndfileError") -> Iterator[np.ndarray]:
    import av

    with _open_av(name, sf_error) as container:
        stream = container.streams.audio[0]
        n_left = _av_n_frames(container, stream)
        to_float = av.AudioResampler(format="fltp")  # same rate and layout: a pure format change
        try:
            for frame in container.decode(stream):
                for out in to_float.resample(frame):
                    block = _mono(name, out.to_ndarray().T)
                    if n_left is not None:  # drop the encoder's end padding past the stated length
                        block, n_left = block[:n_left], max(n_left - len(block), 0)
                    yield block
        except av.FFmpegError as error:
            raise AudioError(f"{name}: decoding failed ({error.strerror}): truncated or corrupt") from None


def _decode(path: PathLike) -> tuple[AudioInfo, Iterator[np.ndarray]]:
    """The header facts and the block iterator of `decode_blocks`."""
    info, sf_error = _read_info(path)
    if sf_error is not None:
        return info, _av_blocks(info.path, sf_error)
    return info, _sf_blocks(info.path, info)


def decode_blocks(path: PathLike) -> tuple[int, Iterator[np.ndarray]]:
    """(native sample rate, iterator of (n,) float32 mono blocks of up to 2**20 frames).

    The header is checked at once; decoding (libsndfile first, else PyAV) happens as the
    iterator is consumed, and raises AudioError as `load_audio` does.
    """
    info, blocks = _decode(path)
    return info.sample_rate_hz, blocks


def _collect(blocks: Iterable[np.ndarray], n_expected: int) -> np.ndarray:
    """Copy (n,) float32 blocks, in order, into one array: (total,) float32 that owns its data.

    The array is allocated once at `n_expected` samples (the header's length), grown when more
    arrive (MP3 and AAC lengths are estimates) and shrunk in place to what arrived, so peak
    memory is the result plus one block, not a list of blocks and their concatenation.

    >>> _collect(iter([np.ones(3, np.float32), np.zeros(2, np.float32)]), 4).tolist()
    [1.0, 1.0, 1.0, 0.0, 0.0]
    """
    out = np.empty(min(max(n_expected, 0), _MAX_PREALLOCATED), dtype=np.float32)
    filled = 0
    for block in blocks:
        if filled + len(block) > len(out):
            # refcheck=False: `out` never leaves this function, so no view of it can exist.
            out.resize(max(filled + len(block), len(out) + len(out) // 2), refcheck=False)
        out[filled:filled + len(block)] = block
        filled += len(block)
    out.resize(filled, refcheck=False)
    return out


def load_audio(path: PathLike) -> tuple[np.ndarray, int]:
    """Decode a file to (n,) float32 mono at its native rate; returns (wav, sample_rate_hz).

    Integer PCM lands in [-1, 1]; float files are returned as stored. Channels are averaged.
    Reads WAV (8/16/24/32-bit int, 32/64-bit float), FLAC, Ogg Vorbis/Opus, MP3 (libsndfile)
    and M4A/AAC or anything else FFmpeg reads (PyAV, trimmed to the container's stated length).
    Truncation: a WAV or FLAC that ends before its header says, and an Ogg file without its
    end-of-stream page, raise AudioError instead of returning the part that decodes, so a cut
    recording never enters a corpus as a short one. MP3 and M4A carry no reliable length to
    check against: their decodable part is returned.
    Raises AudioError (path first, then the reason) for empty, missing, non-audio, truncated or
    corrupt files and for NaN/Inf samples.
    """
    info, blocks = _decode(path)
    return _collect(blocks, info.n_frames), info.sample_rate_hz


def _resampled_length(n_samples: int, source_sr: int, target_sr: int) -> int:
    # librosa.resample's rule (float ratio, then ceil), kept for sample-exact Resemblyzer parity.
    return int(np.ceil(n_samples * (float(target_sr) / source_sr)))


def _fit_length(wav: np.ndarray, n_samples: int) -> np.ndarray:
    if len(wav) >= n_samples:
        return wav[:n_samples]
    return np.concatenate([wav, np.zeros(n_samples - len(wav), dtype=wav.dtype)])


def resample(wav: np.ndarray, source_sr: int, target_sr: int) -> np.ndarray:
    """(n,) float32 at `source_sr` -> (ceil(n * target_sr / source_sr),) float32 at `target_sr`.

    soxr "HQ" and librosa's output length: `librosa.resample(res_type="soxr_hq")` to the sample.

    >>> resample(np.ones(4800, dtype=np.float32), 48000, 16000).shape
    (1600,)
    """
    if source_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {source_sr} -> {target_sr}")
    if source_sr == target_sr:
        return wav
    out = soxr.resample(wav, source_sr, target_sr)
    return _fit_length(out, _resampled_length(len(wav), source_sr, target_sr))


def load_resampled(path: PathLike, sample_rate_hz: int) -> np.ndarray:
    """`load_audio` then `resample` to `sample_rate_hz`, block by block: (n,) float32.

    Same values as resampling the whole signal at once. The full-rate signal is never held
    whole and the output is allocated once from the header's length, so peak memory is the
    output plus a few blocks of 2**20 frames.
    """
    info, blocks = _decode(path)
    source_sr = info.sample_rate_hz
    if source_sr == sample_rate_hz:
        return _collect(blocks, info.n_frames)
    stream = soxr.ResampleStream(source_sr, sample_rate_hz, 1, dtype="float32", quality="HQ")
    n_in = 0

    def resampled() -> Iterator[np.ndarray]:
        nonlocal n_in
        for block in blocks:
            n_in += len(block)
            yield stream.resample_chunk(block)
        yield stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)

    out = _collect(resampled(), _resampled_length(info.n_frames, source_sr, sample_rate_hz))
    n_out, n_made = _resampled_length(n_in, source_sr, sample_rate_hz), len(out)
    out.resize(n_out, refcheck=False)  # librosa's length: cut soxr's extra samples or pad with zeros
    out[n_made:] = 0.0
    return out
