"""Mel-domain training augmentation (spkenc.augment) on real demo-corpus mels: each augmentation
does what it says, draws are reproducible, bad settings are refused, and augmented training
still resumes bit-identically."""

from pathlib import Path

import numpy as np
import pytest
import torch

from spkenc.augment import augment_batch, change_speed, crop_frames
from spkenc.config import AudioConfig, ModelConfig, TrainConfig

PARTIAL = AudioConfig().partial_n_frames
TINY = ModelConfig(hidden_size=32, n_layers=1, embedding_size=32)


@pytest.fixture(scope="module")
def shards(demo_dir: Path, tmp_path_factory) -> list[Path]:
    """Shards of the first 8 demo speakers, every utterance kept."""
    from spkenc.audio import preprocess_wav, wav_to_mel
    from spkenc.shards import write_shard

    folder = tmp_path_factory.mktemp("augment_shards")
    paths = []
    for speaker_dir in sorted(p for p in demo_dir.iterdir() if p.is_dir())[:8]:
        utterances = [(p.stem, wav_to_mel(preprocess_wav(p)), str(p)) for p in sorted(speaker_dir.glob("*.flac"))]
        paths.append(write_shard(folder / f"{speaker_dir.name}.parquet", speaker_dir.name, utterances, corpus="demo"))
    return paths


@pytest.fixture(scope="module")
def store(shards):
    from spkenc.sampling import ShardStore

    return ShardStore(shards)


def _batch(store, config: TrainConfig, step: int = 0):
    from spkenc.sampling import sample_batch

    return sample_batch(store, config.seed, step, 0, 1, 4, 3, "repeat", crop_frames(config))


def test_no_augmentation_leaves_the_crop_unchanged(store):
    config = TrainConfig(crop_n_frames=100)
    batch = _batch(store, config)
    assert batch.mels.shape == (4, 3, 100, 40)
    np.testing.assert_array_equal(augment_batch(batch.mels, batch.speaker_indices, store, config, 0, 0), batch.mels)


def test_volume_scales_each_crop_by_one_gain_within_the_range(store):
    config = TrainConfig(aug_volume_db=6.0)
    batch = _batch(store, config)
    out = augment_batch(batch.mels, batch.speaker_indices, store, config, 0, 0)
    ratio_db = 10 * np.log10(out.sum(axis=(2, 3)) / batch.mels.sum(axis=(2, 3)))
    assert np.all(np.abs(ratio_db) <= 6.0 + 1e-3)
    assert np.ptp(ratio_db) > 1.0, "every crop got the same gain"
    per_bin = out / np.maximum(batch.mels, 1e-30)
    spread = [np.ptp(per_bin[i, j][batch.mels[i, j] > 1e-8]) for i in range(4) for j in range(3)]
    assert max(spread) < 1e-3 * per_bin.max(), "a crop's gain is not one number"


def test_speed_moves_energy_up_the_mel_bands_and_shortens_time():
    mel = np.zeros((200, 40), dtype=np.float32)
    mel[:, 10] = 1.0
    mel[100:, 10] = 0.0  # the tone stops half way
    faster = change_speed(mel, 1.25, 100)
    slower = change_speed(mel, 0.8, 100)
    assert faster.shape == slower.shape == (100, 40)
    centroid = lambda m: float((m.sum(axis=0) * np.arange(40)).sum() / m.sum())  # noqa: E731
    assert centroid(faster) > 10.2 and centroid(slower) < 9.8
    # 125 source frames played 1.25x faster: the tone (100 frames) fills 80% of the crop
    assert abs(float((faster.sum(axis=1) > 0.01).mean()) - 0.8) < 0.03
    np.testing.assert_allclose(change_speed(mel, 1.0, 100), mel[:100], atol=1e-6)


def test_noise_is_another_speakers_recording_at_the_drawn_snr(store):
    quiet = TrainConfig(aug_noise_prob=1.0, aug_noise_snr_db_min=60.0, aug_noise_snr_db_max=60.0)
    batch = _batch(store, quiet)
    out = augment_batch(batch.mels, batch.speaker_indices, store, quiet, 0, 0)
    np.testing.assert_allclose(out.sum(axis=(2, 3)), batch.mels.sum(axis=(2, 3)) * (1 + 1e-6), rtol=1e-4)
    assert not np.array_equal(out, batch.mels)
    loud = quiet.replace(aug_noise_snr_db_min=0.0, aug_noise_snr_db_max=0.0)
    out = augment_batch(batch.mels, batch.speaker_indices, store, loud, 0, 0)
    np.testing.assert_allclose(out.mean(axis=(2, 3)), 2 * batch.mels.mean(axis=(2, 3)), rtol=1e-4)


def test_masking_zeroes_one_band_and_one_span_per_crop_and_keeps_the_rest(store):
    config = TrainConfig(aug_freq_mask=8, aug_time_mask=20)
    batch = _batch(store, config)
    out = augment_batch(batch.mels, batch.speaker_indices, store, config, 0, 0)
    assert out.shape == batch.mels.shape
    masked = out != batch.mels
    assert np.all(out[masked] == 0), "masking only ever zeroes"
    bands, spans = [], []
    for i in range(4):
        for j in range(3):
            zero_band = np.flatnonzero((out[i, j] == 0).all(axis=0) & (batch.mels[i, j] != 0).any(axis=0))
            zero_span = np.flatnonzero((out[i, j] == 0).all(axis=1) & (batch.mels[i, j] != 0).any(axis=1))
            for zero, widest in ((zero_band, 8), (zero_span, 20)):
                assert len(zero) <= widest and (len(zero) == 0 or np.ptp(zero) == len(zero) - 1), "one contiguous mask"
            kept = np.ones_like(masked[i, j])
            kept[:, zero_band] = False
            kept[zero_span] = False
            np.testing.assert_array_equal(out[i, j][kept], batch.mels[i, j][kept])
            bands.append(len(zero_band))
            spans.append(len(zero_span))
    assert max(bands) > 0 and max(spans) > 0 and len(set(bands)) > 1, (bands, spans)


def test_augmentation_is_a_pure_function_of_seed_step_and_rank(store):
    config = TrainConfig(aug_volume_db=3.0, aug_speed=0.1, aug_noise_prob=0.5, aug_freq_mask=5, aug_time_mask=10)
    batch = _batch(store, config)
    args = (batch.mels, batch.speaker_indices, store, config)
    first, again = augment_batch(*args, 0, 5), augment_batch(*args, 0, 5)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (4, 3, PARTIAL, 40)
    assert not np.array_equal(first, augment_batch(*args, 0, 6))


@pytest.mark.parametrize(
    "changes, word",
    [({"aug_speed": 0.5}, "aug_speed"), ({"aug_volume_db": -1.0}, "aug_volume_db"), ({"crop_n_frames": -5}, "crop_n_frames"),
     ({"aug_noise_prob": 1.5}, "aug_noise_prob"), ({"aug_noise_snr_db_min": 20.0, "aug_noise_snr_db_max": 10.0}, "snr"),
     ({"speaker_speeds": (1.0,)}, "speaker_speeds"), ({"speaker_speeds": (0.9, 2.0)}, "speaker_speeds"),
     ({"speaker_speeds": (0.9, 0.9)}, "speaker_speeds"), ({"aug_freq_mask": 40}, "aug_freq_mask"),
     ({"aug_freq_mask": -1}, "aug_freq_mask"), ({"aug_time_mask": -3}, "aug_time_mask")],
)
def test_bad_augmentation_settings_are_refused_by_name(changes, word):
    with pytest.raises(ValueError, match=word):
        TrainConfig(**changes)


def test_speaker_copies_are_drawn_as_other_speakers_and_played_at_their_speed(store):
    from spkenc.sampling import sample_batch

    config = TrainConfig(crop_n_frames=100, speaker_speeds=[0.9, 1.1])
    assert config.speaker_speeds == (0.9, 1.1)  # a list from Dagster or YAML becomes a tuple
    crop = crop_frames(config)
    assert crop == 110
    # 8 speakers x 3 copies: a batch of 20 speakers is possible, and some copies are drawn.
    batch = sample_batch(store, 0, 0, 0, 1, 20, 3, "repeat", crop, n_copies=3)
    pairs = set(zip(batch.speaker_indices.tolist(), batch.copies.tolist()))
    assert len(pairs) == 20 and set(batch.copies.tolist()) == {0, 1, 2}
    again = sample_batch(store, 0, 0, 0, 1, 20, 3, "repeat", crop, n_copies=3)
    np.testing.assert_array_equal(again.copies, batch.copies)
    np.testing.assert_array_equal(again.mels, batch.mels)
    out = augment_batch(batch.mels, batch.speaker_indices, store, config, 0, 0, copies=batch.copies)
    for i, copy in enumerate(batch.copies):
        for j in range(3):
            if copy == 0:
                np.testing.assert_array_equal(out[i, j], batch.mels[i, j, :100])
            else:
                np.testing.assert_array_equal(out[i, j], change_speed(batch.mels[i, j], (1.0, 0.9, 1.1)[copy], 100))
    with pytest.raises(ValueError, match="8 of 8 speakers x 3 copies"):
        sample_batch(store, 0, 0, 0, 1, 25, 3, "repeat", crop, n_copies=3)


def test_a_crop_longer_than_every_utterance_is_refused_with_the_numbers(shards, tmp_path):
    from spkenc.training import train

    config = TrainConfig(speakers_per_batch=4, utterances_per_speaker=3, steps=1, crop_n_frames=5000)
    with pytest.raises(ValueError, match="5000 frames"):
        train(shards, tmp_path / "run", config, model_config=TINY, device="cpu", n_threads=1)


def test_augmented_training_resumes_bit_identically(shards, tmp_path):
    from spkenc.checkpoint import load_checkpoint
    from spkenc.training import train

    config = TrainConfig(speakers_per_batch=4, utterances_per_speaker=3, steps=4, save_every=2, learning_rate_init=1e-3,
                         short_speaker_policy="repeat", crop_n_frames=80, aug_volume_db=3.0, aug_speed=0.1, aug_noise_prob=0.5,
                         speaker_speeds=(0.9, 1.1))
    straight = train(shards, tmp_path / "straight", config, model_config=TINY, device="cpu", n_threads=1)
    train(shards, tmp_path / "split", config.replace(steps=2), model_config=TINY, device="cpu", n_threads=1)
    resumed = train(shards, tmp_path / "split", config, model_config=TINY, device="cpu", n_threads=1, resume=True)
    assert resumed.history_losses == straight.history_losses
    a, b = load_checkpoint(straight.checkpoint_path), load_checkpoint(resumed.checkpoint_path)
    for key, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), key
    assert a["train_config"]["aug_speed"] == 0.1 and a["train_config"]["crop_n_frames"] == 80
    assert tuple(a["train_config"]["speaker_speeds"]) == (0.9, 1.1)
