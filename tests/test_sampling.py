"""Batch sampling over real mel shards made from the committed demo corpus."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spkenc.config import AudioConfig
from spkenc.sampling import ShardStore, eligible_speakers, find_shards, fit_batch_geometry, sample_batch, shards_for_split

PARTIAL = AudioConfig().partial_n_frames


def demo_mels(demo_dir: Path, speaker: str) -> list[tuple[str, np.ndarray]]:
    """(utterance_id, (T, 40) mel) of a demo speaker's utterances with at least one partial."""
    from spkenc.audio import preprocess_wav, wav_to_mel

    out = []
    for path in sorted((demo_dir / speaker).glob("*.flac")):
        mel = wav_to_mel(preprocess_wav(path))
        if len(mel) >= PARTIAL:
            out.append((path.stem, mel))
    return out


def write(path: Path, speaker: str, utterances: list[tuple[str, np.ndarray]], **kwargs) -> Path:
    from spkenc.shards import write_shard

    return write_shard(path, speaker, [(u, mel, f"{speaker}/{u}.flac") for u, mel in utterances], **kwargs)


@pytest.fixture(scope="module")
def corpus(demo_dir: Path, tmp_path_factory) -> dict:
    """6 demo speakers' shards; speaker 'short' has 3 usable utterances plus one under 160 frames."""
    folder = tmp_path_factory.mktemp("shards")
    speakers = sorted(p.name for p in demo_dir.iterdir() if p.is_dir())[:6]
    mels = {s: demo_mels(demo_dir, s) for s in speakers}
    paths = [write(folder / f"{s}.parquet", s, mels[s][:5], corpus="demo") for s in speakers[:5]]
    donor = mels[speakers[5]]
    short = donor[:3] + [("tiny", donor[3][1][: PARTIAL - 1])]
    paths.append(write(folder / "short.parquet", "short", short, corpus="demo"))
    return {"folder": folder, "paths": paths, "mels": mels, "speakers": speakers, "short": short}


def test_a_batch_is_a_pure_function_of_seed_step_rank(corpus):
    store = ShardStore(corpus["paths"])
    a = sample_batch(store, seed=3, step=7, rank=1, world_size=2, speakers_per_batch=2, utterances_per_speaker=4)
    b = sample_batch(ShardStore(corpus["paths"]), seed=3, step=7, rank=1, world_size=2, speakers_per_batch=2, utterances_per_speaker=4)
    assert a.mels.shape == (2, 4, PARTIAL, 40) and a.mels.dtype == np.float32
    assert np.array_equal(a.mels, b.mels) and np.array_equal(a.speaker_indices, b.speaker_indices)
    draws = {sample_batch(store, 3, step, 0, 1, 2, 4).mels.tobytes() for step in range(6)}
    assert len(draws) == 6, "different steps must draw different batches"


def test_crops_are_the_named_frames_of_the_named_utterances(corpus):
    store = ShardStore(corpus["paths"])
    batch = sample_batch(store, seed=0, step=1, speakers_per_batch=3, utterances_per_speaker=4)
    for i, speaker in enumerate(batch.speaker_indices):
        source = store.utterances(int(speaker), batch.utterance_indices[i])
        for j, (mel, start) in enumerate(zip(source, batch.offsets_frames[i])):
            assert 0 <= start <= len(mel) - PARTIAL
            assert np.array_equal(batch.mels[i, j], mel[start : start + PARTIAL])


def test_no_speaker_twice_in_a_batch_and_ranks_draw_disjoint_speakers(corpus):
    store = ShardStore(corpus["paths"])
    for step in range(30):
        ranks = [sample_batch(store, 0, step, r, 2, 2, 4).speaker_indices for r in range(2)]
        for chosen in ranks:
            assert len(set(chosen.tolist())) == 2
        assert not set(ranks[0].tolist()) & set(ranks[1].tolist())


def test_short_speaker_policy_exclude_never_draws_it_and_repeat_reuses_utterances(corpus):
    store = ShardStore(corpus["paths"])
    short = [s.speaker_id for s in store.speakers].index("short")
    assert store.usable_counts()[short] == 3
    excluded = {int(i) for step in range(40) for i in sample_batch(store, 0, step, 0, 1, 5, 4, "exclude").speaker_indices}
    assert short not in excluded and len(excluded) == 5
    tiny_row = len(corpus["short"]) - 1
    for step in range(10):
        batch = sample_batch(store, 0, step, 0, 1, 6, 4, "repeat")
        rows = batch.utterance_indices[list(batch.speaker_indices).index(short)]
        assert len(set(rows.tolist())) <= 3, "4 draws from 3 usable utterances must repeat one"
        assert tiny_row not in rows, "an utterance under 160 frames is never cropped"


def test_too_few_speakers_is_an_error_with_the_numbers(corpus):
    store = ShardStore(corpus["paths"])
    with pytest.raises(ValueError, match=r"5 of 6 speakers .* needs 3 speakers x 2 rank\(s\) = 6"):
        sample_batch(store, 0, 0, 0, 2, 3, 4, "exclude")
    with pytest.raises(ValueError, match="GE2E needs 2 speakers"):
        fit_batch_geometry(np.array([9, 1, 1]), 64, 10)


def test_on_demand_reading_gives_the_same_batches_as_in_memory(corpus):
    memory = ShardStore(corpus["paths"])
    on_demand = ShardStore(corpus["paths"], memory_budget_bytes=0)
    assert memory.in_memory and not on_demand.in_memory
    for step in range(3):
        a = sample_batch(memory, 1, step, speakers_per_batch=3, utterances_per_speaker=5)
        b = sample_batch(on_demand, 1, step, speakers_per_batch=3, utterances_per_speaker=5)
        assert np.array_equal(a.mels, b.mels)


def test_a_speaker_with_two_shards_is_refused_naming_both_files(corpus, tmp_path):
    copy = write(tmp_path / "again.parquet", corpus["speakers"][0], corpus["mels"][corpus["speakers"][0]][:2], corpus="demo")
    with pytest.raises(ValueError, match=rf"{copy}: speaker .* already in {corpus['paths'][0]}"):
        ShardStore(corpus["paths"] + [copy])


def test_a_shard_with_other_audio_parameters_is_refused(corpus, tmp_path):
    from spkenc.shards import ShardError

    other = write(tmp_path / "other.parquet", "x", corpus["short"][:2], corpus="demo", audio_config=AudioConfig(vad_mode=2))
    with pytest.raises(ShardError, match=str(other)):
        ShardStore([corpus["paths"][0], other])


def test_find_shards_expands_folders_and_rejects_missing_or_empty(corpus, tmp_path):
    assert find_shards([corpus["folder"]]) == sorted(corpus["paths"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_shards([tmp_path / "nowhere"])
    with pytest.raises(ValueError, match="no \\*.parquet mel shards"):
        find_shards([tmp_path])


def test_shards_for_split_keeps_the_speakers_of_that_split(corpus, tmp_path):
    speakers = corpus["speakers"][:5]
    manifest = tmp_path / "manifest.parquet"
    splits = ["train", "heldout", "train", "train", "heldout"]
    pq.write_table(pa.table({"speaker_id": speakers + ["short"], "split": splits + ["train"]}), manifest)
    train = shards_for_split(corpus["folder"], manifest, "train")
    assert train == sorted(corpus["folder"] / f"{s}.parquet" for s, sp in zip(speakers + ["short"], splits + ["train"]) if sp == "train")
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        shards_for_split(corpus["folder"], tmp_path / "missing.parquet")


def test_eligible_speakers_and_geometry_follow_the_policy():
    counts = np.array([10, 4, 0, 12])
    assert eligible_speakers(counts, 10, "exclude").tolist() == [0, 3]
    assert fit_batch_geometry(counts, 64, 10, "exclude") == (3, 4)
    assert fit_batch_geometry(counts, 64, 10, "repeat") == (3, 10)
    with pytest.raises(ValueError, match="short_speaker_policy"):
        eligible_speakers(counts, 10, "drop")


def test_drop_heldout_keeps_only_the_manifests_train_speakers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spkenc.sampling import drop_heldout
    from spkenc.shards import write_shard

    mel = np.ones((200, 40), dtype=np.float32)
    paths = [write_shard(tmp_path / f"{c}_{s}.parquet", s, [("u1", mel, f"{s}/u1.flac")], corpus=c)
             for s, c in (("a", "c1"), ("b", "c1"), ("b", "c2"), ("z", "c1"))]
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"corpus": ["c1", "c1", "c2"], "speaker_id": ["a", "b", "b"], "split": ["train", "heldout", "train"]}),
                   manifest)
    kept, dropped = drop_heldout(paths, [manifest])
    assert [p.name for p in kept] == ["c1_a.parquet", "c2_b.parquet", "c1_z.parquet"]
    assert dropped == 1
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        drop_heldout(paths, [tmp_path / "missing.parquet"])


def test_single_corpus_batches_take_their_speakers_from_one_corpus_first(corpus, tmp_path):
    # The same 6 demo speakers' mels as two corpora: 4 speakers of "big", 2 of "small".
    paths = [write(tmp_path / f"{c}_{s}.parquet", s, corpus["mels"][s][:4], corpus=c)
             for c, speakers in (("big", corpus["speakers"][:4]), ("small", corpus["speakers"][4:6])) for s in speakers]
    store = ShardStore(paths)
    corpus_of = [s.corpus for s in store.speakers]
    seen = set()
    for step in range(30):
        batch = sample_batch(store, 0, step, 0, 1, 2, 3, single_corpus=True)
        names = {corpus_of[s] for s in batch.speaker_indices}
        assert len(names) == 1, f"step {step}: a 2-speaker batch mixed corpora {names}"
        seen |= names
        again = sample_batch(store, 0, step, 0, 1, 2, 3, single_corpus=True)
        np.testing.assert_array_equal(again.mels, batch.mels)
    assert seen == {"big", "small"}
    # A batch larger than the picked corpus is filled up from the other one, speakers never repeating.
    for step in range(10):
        batch = sample_batch(store, 0, step, 0, 1, 3, 3, single_corpus=True)
        assert len(set(batch.speaker_indices.tolist())) == 3
    # Without it, the draw is RTVC's over all speakers, unchanged.
    plain = sample_batch(store, 0, 5, 0, 1, 3, 3)
    order = np.random.default_rng([0, 5]).permutation(np.arange(len(store)))
    np.testing.assert_array_equal(plain.speaker_indices, order[:3])


def test_corpus_weights_tilt_the_draw_toward_a_corpus_and_all_ones_change_nothing(corpus, tmp_path):
    from spkenc.sampling import check_corpus_weights

    paths = [write(tmp_path / f"{c}_{s}.parquet", s, corpus["mels"][s][:4], corpus=c)
             for c, speakers in (("big", corpus["speakers"][:4]), ("small", corpus["speakers"][4:6])) for s in speakers]
    store = ShardStore(paths)
    small = np.array([s.corpus == "small" for s in store.speakers])

    def small_share(steps, **kwargs):
        drawn = [sample_batch(store, 0, step, 0, 1, 2, 2, **kwargs).speaker_indices for step in range(steps)]
        assert all(len(set(d.tolist())) == 2 for d in drawn)  # weighted or not, no speaker twice
        return small[np.concatenate(drawn)].mean()

    # Single-corpus batches: "small" is picked with probability 2 / 6 unweighted, 10 * 2 / (10 * 2 + 4) at weight 10.
    assert small_share(300, single_corpus=True) < 0.45
    assert small_share(300, single_corpus=True, corpus_weights={"small": 10.0}) > 0.75
    # Mixed batches: each "small" speaker 5 times as likely as a "big" one; 2 of 6 speakers are small.
    assert small_share(300) < 0.45
    assert small_share(300, corpus_weights={"small": 5.0}) > 0.6
    # Weights of 1 are no weights: the batches are the unweighted ones, bit for bit.
    for step in range(5):
        for single in (False, True):
            plain = sample_batch(store, 0, step, 0, 1, 3, 2, single_corpus=single)
            ones = sample_batch(store, 0, step, 0, 1, 3, 2, single_corpus=single, corpus_weights={"big": 1.0, "small": 1.0})
            np.testing.assert_array_equal(ones.speaker_indices, plain.speaker_indices)
            np.testing.assert_array_equal(ones.mels, plain.mels)
    # A weighted draw is still a pure function of (seed, step, rank).
    a = sample_batch(store, 3, 9, 0, 1, 3, 2, corpus_weights={"small": 5.0})
    b = sample_batch(store, 3, 9, 0, 1, 3, 2, corpus_weights={"small": 5.0})
    np.testing.assert_array_equal(a.mels, b.mels)
    check_corpus_weights(store, {"small": 2.0})
    with pytest.raises(ValueError, match=r"\['smal'\].*\['big', 'small'\]"):
        check_corpus_weights(store, {"smal": 2.0})


def test_corpus_weights_must_be_positive_and_finite():
    from spkenc.config import TrainConfig

    assert TrainConfig(corpus_weights={"a": 3}).corpus_weights == {"a": 3.0}
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="corpus_weights"):
            TrainConfig(corpus_weights={"a": bad})
