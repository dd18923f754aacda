"""Inference: partial slicing, chunked mels, and parity with Resemblyzer on real speech."""

from pathlib import Path

import numpy as np
import pytest
import resemblyzer
import torch

from spkenc.audio import wav_to_mel, wav_to_mel_batch
from spkenc.inference import Embedder, compute_partial_slices, mel_frames, resolve_device, thread_limits

PRETRAINED = Path(resemblyzer.__file__).parent / "pretrained.pt"
PARITY = 0.99999


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reference() -> resemblyzer.VoiceEncoder:
    return resemblyzer.VoiceEncoder("cpu", verbose=False)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.from_checkpoint(PRETRAINED, device="cpu")


@pytest.fixture(scope="module")
def wavs(demo_files) -> list[np.ndarray]:
    """Six real utterances from three speakers, preprocessed by the reference package."""
    picked = demo_files[0:2] + demo_files[8:10] + demo_files[16:18]
    return [resemblyzer.preprocess_wav(path) for path in picked]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# Lengths around the partial and step boundaries (in samples), plus ordinary ones.
LENGTHS = [0, 1, 159, 160, 12_800, 19_199, 19_200, 25_599, 25_600, 25_601, 28_000, 48_000, 100_003, 160_000]


@pytest.mark.parametrize("n_samples", LENGTHS)
@pytest.mark.parametrize("min_coverage", [0.5, 0.75, 1.0])
def test_slices_follow_resemblyzer_rule_and_rtvc_equals_rate_1_25(n_samples, min_coverage):
    for rate in (0.7, 1.25, 1.3, 3.0):
        expected = resemblyzer.VoiceEncoder.compute_partial_slices(n_samples, rate, min_coverage)
        assert compute_partial_slices(n_samples, rate, min_coverage) == expected
    rtvc = compute_partial_slices(n_samples, None, min_coverage)
    assert rtvc == resemblyzer.VoiceEncoder.compute_partial_slices(n_samples, 1.25, min_coverage)
    wav_slices, mel_slices = rtvc
    assert len(mel_slices) >= 1
    assert all(s.stop - s.start == 160 for s in mel_slices)
    assert all(b.start - a.start == 80 for a, b in zip(mel_slices, mel_slices[1:]))
    assert [(w.start, w.stop) for w in wav_slices] == [(m.start * 160, m.stop * 160) for m in mel_slices]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rate": 0.5}, "out of range"),  # a step longer than a partial leaves gaps
        ({"rate": 0.0}, "out of range"),
        ({"rate": -1.0}, "out of range"),
        ({"rate": 1000.0}, "out of range"),  # a step of 0 frames
        ({"min_coverage": 0.0}, "min_coverage"),
        ({"min_coverage": 1.5}, "min_coverage"),
    ],
)
def test_slices_refuse_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compute_partial_slices(16000, **kwargs)
    with pytest.raises(ValueError, match="non-negative"):
        compute_partial_slices(-1)


def test_chunked_mel_frames_equal_the_whole_mel(wavs):
    wav = np.concatenate(wavs[:3])
    padded = np.pad(wav, (0, 40_000))
    full = wav_to_mel_batch(torch.from_numpy(padded)[None])[0].numpy()
    reference = wav_to_mel(padded)  # librosa's numbers, as Resemblyzer computes them
    n_frames = len(wav) // 160
    for start, stop in [(0, 1), (0, 160), (1, 161), (80, 400), (n_frames - 100, n_frames + 60), (n_frames + 10, n_frames + 170)]:
        chunk = mel_frames(wav, start, stop)
        assert tuple(chunk.shape) == (stop - start, 40) and chunk.dtype == torch.float32
        # Same computation on a shorter segment: equal up to FFT-size rounding.
        np.testing.assert_allclose(chunk.numpy(), full[start:stop], rtol=1e-4, atol=1e-6 * full.max())
        np.testing.assert_allclose(chunk.numpy(), reference[start:stop], rtol=1e-3, atol=1e-5 * full.max())
    with pytest.raises(ValueError, match="start < stop"):
        mel_frames(wav, 10, 10)


@pytest.mark.parametrize("rate, reference_rate", [(None, 1.25), (1.3, 1.3)])
def test_embed_utterance_matches_resemblyzer(embedder, reference, wavs, rate, reference_rate):
    for wav in wavs:
        ours, partials, wav_slices = embedder.embed_utterance(wav, return_partials=True, rate=rate)
        theirs, their_partials, their_slices = reference.embed_utterance(wav, return_partials=True, rate=reference_rate)
        assert ours.shape == (256,) and ours.dtype == np.float32
        assert abs(np.linalg.norm(ours) - 1) < 1e-5
        assert cosine(ours, theirs) >= PARITY
        assert wav_slices == their_slices
        assert partials.shape == their_partials.shape
        assert min(cosine(a, b) for a, b in zip(partials, their_partials)) >= PARITY


def test_utterance_shorter_than_one_partial_matches_resemblyzer(embedder, reference, wavs):
    short = wavs[0][:8000]  # 0.5 s: one zero-padded partial
    ours = embedder.embed_utterance(short)
    assert np.isfinite(ours).all()
    assert cosine(ours, reference.embed_utterance(short, rate=1.25)) >= PARITY


def test_embed_utterances_batches_across_utterances_like_one_by_one(wavs):
    long = np.concatenate(wavs)  # ~20 s: its partials span several chunks
    batch = [wavs[0], long, wavs[1][:8000], wavs[2], wavs[3]]
    small = Embedder.from_checkpoint(PRETRAINED, device="cpu", batch_size=3)
    together = small.embed_utterances(batch)
    assert together.shape == (len(batch), 256) and together.dtype == np.float32
    one_by_one = Embedder.from_checkpoint(PRETRAINED, device="cpu", batch_size=64)
    for embed, wav in zip(together, batch):
        assert cosine(embed, one_by_one.embed_utterance(wav)) >= PARITY
    # The rows are different utterances, not copies of one result.
    assert cosine(together[0], together[3]) < 0.999


def test_embed_speaker_matches_resemblyzer(embedder, reference, wavs):
    ours = embedder.embed_speaker(wavs[:2], rate=1.3)
    theirs = reference.embed_speaker(wavs[:2], rate=1.3)
    assert ours.shape == (256,)
    assert cosine(ours, theirs) >= PARITY
    with pytest.raises(ValueError, match="at least one"):
        embedder.embed_speaker([])


def test_same_speaker_scores_higher_than_different_speaker(embedder, wavs):
    embeds = embedder.embed_utterances(wavs)
    same = embeds[0] @ embeds[1]
    different = embeds[0] @ embeds[2]
    assert same > different


def test_bad_waveforms_raise_clear_errors_never_nan(embedder, wavs):
    with pytest.raises(ValueError, match="utterance 0: empty waveform"):
        embedder.embed_utterance(np.zeros(0, dtype=np.float32))
    with pytest.raises(ValueError, match="utterance 1: empty waveform"):
        embedder.embed_utterances([wavs[0], np.zeros(0, dtype=np.float32)])
    with pytest.raises(ValueError, match="1-D"):
        embedder.embed_utterance(np.zeros((2, 16000), dtype=np.float32))
    broken = wavs[0].copy()
    broken[100] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        embedder.embed_utterance(broken)
    with pytest.raises(ValueError, match="no utterances"):
        embedder.embed_utterances([])


def test_embed_frames_batch(embedder, reference, wavs):
    mels = resemblyzer.audio.wav_to_mel_spectrogram(wavs[0])[None, :160]
    ours = embedder.embed_frames_batch(mels)
    with torch.no_grad():
        theirs = reference(torch.from_numpy(mels)).numpy()
    assert ours.shape == (1, 256)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    with pytest.raises(ValueError, match="mel frames"):
        embedder.embed_frames_batch(np.zeros((2, 160, 30), dtype=np.float32))


def test_n_threads_applies_inside_calls_only(wavs):
    limited = Embedder.from_checkpoint(PRETRAINED, device="cpu", n_threads=1)
    torch.set_num_threads(2)
    try:
        with thread_limits(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        limited.embed_utterance(wavs[0][:8000])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    with pytest.raises(ValueError, match="n_threads"):
        with thread_limits(0):
            pass
    with pytest.raises(ValueError, match="batch_size"):
        Embedder(limited.model, device="cpu", batch_size=0)


def test_shared_corpora_match_resemblyzer(shared_data, embedder, reference):
    files = sorted((shared_data / "speechocean762_train").glob("*/*.ogg"))[:2]
    files += sorted((shared_data / "LibriSpeech" / "test-other").glob("*/*/*.flac"))[:2]
    assert len(files) == 4, f"expected Ogg Opus and FLAC files under {shared_data}"
    wavs = [resemblyzer.preprocess_wav(path) for path in files]
    together = embedder.embed_utterances(wavs, rate=1.3)
    for embed, wav in zip(together, wavs):
        assert cosine(embed, reference.embed_utterance(wav)) >= PARITY


def test_bad_device_or_batch_size_fails_before_loading(tmp_path):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'nonsense'"):
        resolve_device("nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Embedder.from_checkpoint(PRETRAINED, device="cuda")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        Embedder.from_checkpoint(tmp_path / "never_read.pt", device="cpu", batch_size=0)
