"""spkenc.audio and spkenc.audio_io on real speech: parity with Resemblyzer and librosa, RTVC's
edge cases, every file format written here from a demo utterance, and every kind of bad file."""

import fractions
import re
import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import resemblyzer.audio
import soundfile as sf
import soxr
import torch

from spkenc.audio import (
    AudioError,
    float_to_pcm16,
    load_audio,
    normalize_volume,
    preprocess_wav,
    read_audio_info,
    trim_long_silences,
    wav_to_mel,
    wav_to_mel_batch,
)
from spkenc.audio_io import _collect, decode_blocks, load_resampled, resample
from spkenc.config import AudioConfig

SR = 16000


@pytest.fixture(scope="module")
def speech(demo_files: list[Path]) -> np.ndarray:
    """A real 3.3 s utterance, (52960,) float32 at 16 kHz."""
    wav, sample_rate_hz = sf.read(demo_files[0], dtype="float32")
    assert sample_rate_hz == SR
    return wav


def assert_same_as_resemblyzer(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.dtype == np.float32
    assert len(ours) > SR // 2, "a real utterance must keep at least half a second of speech"
    assert len(ours) == len(reference)
    assert np.abs(ours - reference).max() <= 1e-4


def write_m4a(path: Path, wav: np.ndarray, sample_rate_hz: int) -> None:
    """AAC in an MP4 container, with timestamps so that the muxer writes an edit list (as ffmpeg does)."""
    with av.open(str(path), "w", format="ipod") as container:
        stream = container.add_stream("aac", rate=sample_rate_hz, layout="mono")
        frame = av.AudioFrame.from_ndarray(wav[None, :], format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = sample_rate_hz, 0, fractions.Fraction(1, sample_rate_hz)
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


# ---- 1. parity with Resemblyzer's preprocess_wav ----

def test_preprocess_matches_resemblyzer_on_demo_flac(demo_files: list[Path]) -> None:
    for path in demo_files[::32]:  # 6 files, 6 speakers; 16 kHz: neither side resamples
        assert_same_as_resemblyzer(preprocess_wav(path), resemblyzer.audio.preprocess_wav(path))


def odd_length(n: int, sample_rate_hz: int) -> int:
    """The largest length <= n whose 16 kHz length soxr rounds down but librosa rounds up
    (n itself where the ratio makes every length whole, as 8 kHz -> 16 kHz does)."""
    for m in range(n, n - sample_rate_hz, -1):
        if 0 < (m * SR / sample_rate_hz) % 1 < 0.5:
            return m
    return n


@pytest.mark.parametrize("sample_rate_hz", [8000, 44100, 48000, 96000])
def test_preprocess_matches_resemblyzer_after_resampling(speech, tmp_path, sample_rate_hz) -> None:
    resampled = soxr.resample(speech, SR, sample_rate_hz)
    array = resampled[:odd_length(len(resampled), sample_rate_hz)]
    path = tmp_path / f"speech_{sample_rate_hz}.wav"
    sf.write(path, array, sample_rate_hz, subtype="FLOAT")
    assert_same_as_resemblyzer(preprocess_wav(path), resemblyzer.audio.preprocess_wav(path))
    assert_same_as_resemblyzer(preprocess_wav(array, source_sr=sample_rate_hz),
                               resemblyzer.audio.preprocess_wav(array, source_sr=sample_rate_hz))


@pytest.mark.parametrize("sample_rate_hz", [44100, 96000])
def test_block_resampling_equals_librosa_resample(demo_files, tmp_path, sample_rate_hz) -> None:
    import librosa

    # 13 s of speech: at 96 kHz that is more than one decode block (2**20 frames).
    speech = np.concatenate([sf.read(path, dtype="float32")[0] for path in demo_files[:4]])
    resampled = soxr.resample(speech, SR, sample_rate_hz)
    resampled = resampled[:odd_length(len(resampled), sample_rate_hz)]
    path = tmp_path / "long.wav"
    sf.write(path, resampled, sample_rate_hz, subtype="FLOAT")
    reference = librosa.resample(resampled, orig_sr=sample_rate_hz, target_sr=SR)  # Resemblyzer's call
    ours = load_resampled(path, SR)
    assert ours.dtype == np.float32 and len(ours) == len(reference)
    assert len(reference) == len(soxr.resample(resampled, sample_rate_hz, SR)) + 1  # librosa's ceil, padded
    assert np.abs(ours - reference).max() <= 1e-6
    in_memory = resample(resampled, sample_rate_hz, SR)
    assert len(in_memory) == len(reference) and np.abs(in_memory - reference).max() <= 1e-6
    rate, blocks = decode_blocks(path)
    parts = list(blocks)
    assert rate == sample_rate_hz and all(len(part) <= 2**20 for part in parts)
    assert len(parts) == (2 if sample_rate_hz == 96000 else 1)
    np.testing.assert_array_equal(np.concatenate(parts), load_audio(path)[0])


def test_preprocess_matches_resemblyzer_on_shared_corpora(shared_data: Path) -> None:
    opus = sorted((shared_data / "speechocean762_train").glob("*/*.ogg"))[::700][:3]
    flac = sorted((shared_data / "LibriSpeech").glob("*/*/*/*.flac"))[::100][:3]
    assert len(opus) == 3 and len(flac) == 3, f"expected Ogg Opus and FLAC files under {shared_data}"
    for path in opus + flac:
        assert_same_as_resemblyzer(preprocess_wav(path), resemblyzer.audio.preprocess_wav(path))


def test_trim_long_silences_matches_resemblyzer_and_removes_silence(speech) -> None:
    gap = np.zeros(SR, dtype=np.float32)  # 1 s of digital silence between two utterances
    wav = normalize_volume(np.concatenate([speech, gap, speech]), -30.0, increase_only=True)
    ours = trim_long_silences(wav)
    np.testing.assert_array_equal(ours, resemblyzer.audio.trim_long_silences(wav))
    # The 1 s gap (33 windows) is cut to at most 2 x 6 dilated windows plus smoothing slack.
    assert len(wav) - len(ours) >= SR // 2


# ---- 1b. memory: a long file costs one copy of its decoded audio ----


@pytest.fixture(scope="module")
def speech_with_pauses(demo_files: list[Path]) -> np.ndarray:
    """About 2 minutes of real speech: 32 demo utterances, each followed by 0.5 s of silence."""
    gap = np.zeros(SR // 2, dtype=np.float32)
    return np.concatenate([part for path in demo_files[::6] for part in (sf.read(path, dtype="float32")[0], gap)])


def traced_peak_bytes(fn) -> tuple[int, np.ndarray]:
    """(peak bytes that numpy and Python allocated during fn(), fn's result)."""
    tracemalloc.start()
    try:
        out = fn()
        return tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("sample_rate_hz", [16000, 48000])
def test_preprocess_memory_grows_by_one_copy_of_the_audio(speech_with_pauses, tmp_path, sample_rate_hz) -> None:
    peaks, sizes = [], []
    for minutes in (2, 6):
        wav = np.resize(speech_with_pauses, minutes * 60 * SR)
        path = tmp_path / f"{minutes}min.wav"
        sf.write(path, wav if sample_rate_hz == SR else soxr.resample(wav, SR, sample_rate_hz), sample_rate_hz,
                 subtype="PCM_16")
        peak, out = traced_peak_bytes(lambda: preprocess_wav(path))
        assert 0.5 * len(wav) < len(out) < len(wav)  # speech kept, pauses cut
        peaks.append(peak)
        sizes.append(4 * len(wav))  # the decoded audio at 16 kHz, float32
    growth = (peaks[1] - peaks[0]) / (sizes[1] - sizes[0])
    # Decoding into a list and concatenating, then a scaled copy, its int16 cast and a bytes copy
    # for the VAD, then the trimmed copy, gave 3x here; one array scaled and trimmed in place gives 1x.
    assert growth <= 1.1, f"peak grew {growth:.2f}x the extra decoded audio"


def test_preprocess_never_writes_to_the_callers_array(speech_with_pauses, tmp_path) -> None:
    path = tmp_path / "speech.wav"
    sf.write(path, speech_with_pauses, SR, subtype="FLOAT")
    from_file = preprocess_wav(path)  # decoded into an array of its own, scaled and trimmed in place
    for wav in (speech_with_pauses.copy(), speech_with_pauses.astype(np.float64)):
        before = wav.copy()
        np.testing.assert_array_equal(preprocess_wav(wav), from_file)
        np.testing.assert_array_equal(wav, before)
    assert len(from_file) < len(speech_with_pauses) - 16 * SR // 2  # most of the 16 s of pauses went


@pytest.mark.parametrize("n_expected", [0, 7, 10, 1000])
def test_collect_sizes_the_result_to_what_was_decoded(n_expected) -> None:
    blocks = [np.arange(4, dtype=np.float32), np.arange(6, dtype=np.float32)]
    out = _collect(iter(blocks), n_expected)
    np.testing.assert_array_equal(out, np.concatenate(blocks))
    assert out.flags.owndata and out.dtype == np.float32


# ---- 2. mel frames ----

def test_wav_to_mel_matches_librosa(demo_files: list[Path]) -> None:
    import librosa

    for path in demo_files[:3]:
        wav = preprocess_wav(path)[4000:-4000]  # speech right at both ends: the zero padding shows
        assert np.abs(wav[:200]).max() > 1e-3 and np.abs(wav[-200:]).max() > 1e-3
        reference = librosa.feature.melspectrogram(y=wav, sr=SR, n_fft=400, hop_length=160, n_mels=40).T
        ours = wav_to_mel(wav)
        assert ours.shape == (1 + len(wav) // 160, 40) and ours.dtype == np.float32
        # atol: values near float32's rounding floor of the largest bin (1e-6 x max, ~8 ulp of it)
        # carry no relative precision in either implementation; everything above is held to 1e-5.
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6 * reference.max())


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")),
])
def test_wav_to_mel_batch_matches_wav_to_mel(demo_files: list[Path], device: str) -> None:
    torch.set_num_threads(1)
    wavs = [preprocess_wav(path)[4000:] for path in demo_files[8:11]]  # speech at the start
    n = min(map(len, wavs))
    mels = wav_to_mel_batch(torch.from_numpy(np.stack([w[:n] for w in wavs])).to(device))
    assert mels.shape == (3, 1 + n // 160, 40) and mels.dtype == torch.float32
    assert mels.device.type == device
    for wav, mel in zip(wavs, mels.cpu().numpy()):
        reference = wav_to_mel(wav[:n])
        # float32 FFT (torch) against float64 FFT (librosa's path): same atol reasoning as above.
        np.testing.assert_allclose(mel, reference, rtol=1e-4, atol=1e-6 * reference.max())


def test_wav_to_mel_rejects_2d_input() -> None:
    with pytest.raises(AudioError, match=r"^<array>: expected a 1-D waveform"):
        wav_to_mel(np.zeros((2, 400), dtype=np.float32))
    with pytest.raises(ValueError, match=r"expects \(B, n\)"):
        wav_to_mel_batch(torch.zeros(400))


# ---- 3. RTVC's edge cases ----

@pytest.mark.parametrize("source_sr", [None, 48000])
def test_all_zero_audio_gives_empty_result_without_warning(source_sr) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = preprocess_wav(np.zeros(3 * 48000, dtype=np.float32), source_sr=source_sr)
    assert out.shape == (0,) and out.dtype == np.float32


def test_resemblyzer_gives_nan_on_zeros_where_we_return_zeros() -> None:
    zeros = np.zeros(SR, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert np.isnan(resemblyzer.audio.normalize_volume(zeros, -30, increase_only=True)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = normalize_volume(zeros, -30.0, increase_only=True)
    np.testing.assert_array_equal(out, zeros)


def test_empty_input() -> None:
    empty = np.zeros(0, dtype=np.float32)
    assert preprocess_wav(empty).shape == (0,)
    assert trim_long_silences(empty).shape == (0,)
    assert normalize_volume(empty, -30.0).shape == (0,)


def test_input_shorter_than_one_vad_window(speech) -> None:
    short = speech[20000:20000 + AudioConfig().vad_window_samples - 1]
    assert np.abs(short).max() > 0.01, "the excerpt must hold speech, not silence"
    assert trim_long_silences(short).shape == (0,)
    assert preprocess_wav(short).shape == (0,)


def test_gain_past_full_scale_clips_instead_of_wrapping(speech) -> None:
    loud = speech * np.float32(8.0)
    assert np.abs(loud).max() > 1.5
    pcm = np.frombuffer(float_to_pcm16(loud), dtype="<i2")
    expected = np.clip(np.round(loud * np.float32(32767)), -32768, 32767).astype(np.int16)
    np.testing.assert_array_equal(pcm, expected)
    over = loud > 1.0
    assert over.any() and (pcm[over] == 32767).all()  # RTVC's astype(np.int16) wraps these negative
    wrapped = np.round(loud * np.float32(32767)).astype(np.int64).astype(np.int16)
    assert (wrapped[over] < 0).any()
    kept = trim_long_silences(loud)
    assert 0 < len(kept) <= len(loud)


def test_normalize_volume_levels() -> None:
    t = np.arange(SR, dtype=np.float32) / SR
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)  # about -9 dBFS
    quiet = normalize_volume(tone, -30.0)
    assert quiet.dtype == np.float32
    assert 20 * np.log10(np.sqrt(np.mean(quiet.astype(np.float64) ** 2))) == pytest.approx(-30.0, abs=1e-4)
    np.testing.assert_array_equal(normalize_volume(tone, -30.0, increase_only=True), tone)
    np.testing.assert_array_equal(normalize_volume(quiet, -9.0, decrease_only=True), quiet)
    with pytest.raises(ValueError, match="both set"):
        normalize_volume(tone, -30.0, increase_only=True, decrease_only=True)


def test_non_finite_array_is_refused() -> None:
    wav = np.zeros(SR, dtype=np.float32)
    wav[100] = np.nan
    with pytest.raises(AudioError, match=r"^<array>: non-finite samples"):
        preprocess_wav(wav)
    wav[100] = np.inf
    with pytest.raises(AudioError, match=r"^<array>: non-finite samples"):
        preprocess_wav(wav, source_sr=48000)
    with pytest.raises(AudioError, match=r"^<array>: expected a 1-D waveform"):
        preprocess_wav(np.zeros((2, SR), dtype=np.float32))


# ---- 4 and 6. every format, written here from a real utterance; header facts without decoding ----

LOSSLESS = [  # (subtype, file name, max abs error against the 16-bit source)
    ("PCM_U8", "u8.wav", 1 / 128), ("PCM_16", "s16.wav", 0.0), ("PCM_24", "s24.wav", 0.0),
    ("PCM_32", "s32.wav", 0.0), ("FLOAT", "f32.wav", 0.0), ("DOUBLE", "f64.wav", 0.0), ("PCM_16", "s16.flac", 0.0),
]


@pytest.mark.parametrize("subtype,name,tolerance", LOSSLESS)
def test_load_lossless_formats(speech, tmp_path, subtype, name, tolerance) -> None:
    path = tmp_path / name
    sf.write(path, speech, SR, subtype=subtype)
    wav, sample_rate_hz = load_audio(path)
    assert sample_rate_hz == SR and wav.dtype == np.float32 and wav.shape == speech.shape
    assert np.abs(wav - speech).max() <= tolerance
    info = read_audio_info(path)
    assert (info.sample_rate_hz, info.channels, info.n_frames) == (SR, 1, len(speech))
    assert info.format == ("FLAC" if name.endswith(".flac") else "WAV") and info.path == str(path)


@pytest.mark.parametrize("fmt,subtype,name", [
    ("OGG", "VORBIS", "vorbis.ogg"), ("OGG", "OPUS", "opus.ogg"), ("MP3", "MPEG_LAYER_III", "speech.mp3"),
])
def test_load_lossy_formats(speech, tmp_path, fmt, subtype, name) -> None:
    path = tmp_path / name
    sf.write(path, speech, SR, format=fmt, subtype=subtype)
    wav, sample_rate_hz = load_audio(path)
    assert sample_rate_hz == SR and wav.dtype == np.float32
    assert abs(len(wav) - len(speech)) <= 0.005 * SR
    assert correlation(wav, speech) > 0.9
    info = read_audio_info(path)
    assert (info.format, info.sample_rate_hz, info.channels) == (fmt, SR, 1)
    assert abs(info.n_frames - len(speech)) <= 0.005 * SR


def test_load_m4a_aac(speech, tmp_path) -> None:
    path = tmp_path / "speech.m4a"
    write_m4a(path, speech, SR)
    wav, sample_rate_hz = load_audio(path)
    assert sample_rate_hz == SR and wav.dtype == np.float32
    assert abs(len(wav) - len(speech)) <= 0.005 * SR  # encoder priming and end padding are dropped
    assert correlation(wav, speech) > 0.9
    info = read_audio_info(path)
    assert (info.format, info.sample_rate_hz, info.channels) == ("AAC", SR, 1)
    assert abs(info.n_frames - len(speech)) <= 1024  # one AAC frame: the container's figure
    assert len(preprocess_wav(path)) > SR // 2


@pytest.mark.parametrize("gains", [(1.0, 0.5), (1.0, -0.5, 0.25, 0.0, 0.75, -1.0)])
def test_multichannel_is_averaged(speech, tmp_path, gains) -> None:
    channels = np.stack([speech * np.float32(g) for g in gains], axis=1)
    path = tmp_path / f"{len(gains)}ch.wav"
    sf.write(path, channels, SR, subtype="FLOAT")
    wav, _ = load_audio(path)
    np.testing.assert_allclose(wav, channels.mean(axis=1), rtol=0, atol=1e-7)
    assert read_audio_info(path).channels == len(gains)


@pytest.mark.parametrize("sample_rate_hz", [8000, 96000])
def test_load_keeps_native_rate(speech, tmp_path, sample_rate_hz) -> None:
    resampled = soxr.resample(speech, SR, sample_rate_hz)
    path = tmp_path / f"speech_{sample_rate_hz}.flac"
    sf.write(path, resampled, sample_rate_hz, subtype="PCM_24")
    wav, rate = load_audio(path)
    assert rate == sample_rate_hz and len(wav) == len(resampled)
    assert np.abs(wav - resampled).max() <= 2**-23
    assert read_audio_info(path).duration_s == pytest.approx(len(speech) / SR, abs=1e-3)


# ---- 5. bad input: each an AudioError whose message starts with the path ----

def expect_error(path: Path, reason: str, header_level: bool = True) -> None:
    pattern = "^" + re.escape(str(path)) + ": .*" + reason
    with pytest.raises(AudioError, match=pattern):
        load_audio(path)
    with pytest.raises(AudioError, match=pattern):
        preprocess_wav(path)
    if header_level:
        with pytest.raises(AudioError, match=pattern):
            read_audio_info(path)


def test_zero_byte_file(tmp_path) -> None:
    for name in ("empty.wav", "empty.flac"):
        (tmp_path / name).write_bytes(b"")
        expect_error(tmp_path / name, r"empty file \(0 bytes\)")


def test_truncated_flac_is_refused(demo_files, tmp_path) -> None:
    data = demo_files[0].read_bytes()
    half, tiny = tmp_path / "half.flac", tmp_path / "tiny.flac"
    half.write_bytes(data[:len(data) // 2])
    tiny.write_bytes(data[:200])
    for path in (half, tiny):
        # The header (STREAMINFO) survives, so the header read passes: it does not decode.
        assert read_audio_info(path).n_frames == read_audio_info(demo_files[0]).n_frames
        expect_error(path, "truncated or corrupt", header_level=False)


def test_truncated_wav_is_refused(speech, tmp_path) -> None:
    whole = tmp_path / "whole.wav"
    sf.write(whole, speech, SR, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole.read_bytes()[:-1000])
    expect_error(cut, "truncated: the header declares 105920 data bytes, the file holds 104920")


@pytest.mark.parametrize("subtype", ["VORBIS", "OPUS"])
def test_truncated_ogg_is_refused(speech, tmp_path, subtype) -> None:
    whole = tmp_path / "whole.ogg"
    sf.write(whole, speech, SR, format="OGG", subtype=subtype)
    assert len(load_audio(whole)[0]) == len(speech)  # the whole file ends with its end-of-stream page
    cut = tmp_path / "cut.ogg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    expect_error(cut, "truncated: the Ogg stream ends without its end-of-stream page")


def test_text_file_renamed_wav(tmp_path) -> None:
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 20)
    expect_error(path, "not a readable audio file")


def test_directory_named_like_audio(tmp_path) -> None:
    path = tmp_path / "x.wav"
    path.mkdir()
    expect_error(path, "is a directory")


def test_missing_file(tmp_path) -> None:
    expect_error(tmp_path / "absent.flac", "no such file")


def write_png(path: Path) -> None:
    """An 8 x 8 grey PNG: a real file that FFmpeg opens, with a video stream and no audio."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = zlib.compress(b"".join(b"\x00" + bytes(range(0, 256, 32)) for _ in range(8)))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def test_image_has_no_audio_stream(tmp_path) -> None:
    path = tmp_path / "picture.wav"
    write_png(path)
    expect_error(path, "no audio stream")


def test_float_wav_with_nan_samples(speech, tmp_path) -> None:
    for bad in (np.nan, np.inf):
        wav = speech.copy()
        wav[1000] = bad
        path = tmp_path / f"bad_{bad}.wav"
        sf.write(path, wav, SR, subtype="FLOAT")
        expect_error(path, "non-finite samples", header_level=False)


def write_wav_header(path: Path, n_channels: int, sample_rate_hz: int) -> None:
    data = np.zeros(160, dtype="<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, n_channels, sample_rate_hz, 2 * sample_rate_hz, 2, 16)
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
                     + fmt + b"data" + struct.pack("<I", len(data)) + data)


def test_wav_with_zero_rate_or_channels(tmp_path) -> None:
    write_wav_header(tmp_path / "rate0.wav", 1, 0)
    expect_error(tmp_path / "rate0.wav", "sample rate 0")
    write_wav_header(tmp_path / "mono0.wav", 0, SR)
    expect_error(tmp_path / "mono0.wav", "zero channels")
    write_wav_header(tmp_path / "fine.wav", 1, SR)  # the same writer with sane values reads
    assert load_audio(tmp_path / "fine.wav")[0].shape == (160,)
