"""Mel shards: format, round trips, on-demand reads, refusals and atomic replacement."""

import json
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spkenc.config import AudioConfig
from spkenc.shards import ShardError, read_shard, read_shard_meta, read_utterances, write_shard


def utterances(n: int = 5, seed: int = 0) -> list[tuple[str, np.ndarray, str]]:
    """Power-mel-like frames of varied lengths (some under one 160-frame partial)."""
    rng = np.random.default_rng(seed)
    return [(f"u{i}", (rng.random((90 + 40 * i, 40)) ** 4).astype(np.float32), f"spk/u{i}.flac") for i in range(n)]


def test_the_file_has_the_documented_columns_metadata_and_one_row_group_per_utterance(tmp_path):
    path = write_shard(tmp_path / "spk.parquet", "spk", utterances(), corpus="demo")
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    assert schema.names == ["utterance_id", "n_frames", "mel", "source"]
    assert schema.field("n_frames").type == pa.int32()
    assert schema.field("mel").type == pa.list_(pa.list_(pa.float32(), 40))
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items() if k.startswith(b"spkenc.")}
    assert meta["spkenc.schema_version"] == "1" and meta["spkenc.speaker_id"] == "spk"
    assert meta["spkenc.corpus"] == "demo" and meta["spkenc.mel_dtype"] == "float32"
    assert json.loads(meta["spkenc.audio_config"]) == AudioConfig().to_dict()
    assert parquet.num_row_groups == 5


def test_float32_round_trip_is_exact(tmp_path):
    written = utterances()
    shard = read_shard(write_shard(tmp_path / "spk.parquet", "spk", written, corpus="c"))
    assert shard.speaker_id == "spk" and shard.corpus == "c"
    assert shard.utterance_ids == [u for u, _, _ in written]
    assert shard.sources == [s for _, _, s in written]
    for (_, mel, _), read in zip(written, shard.mels):
        assert read.dtype == np.float32 and np.array_equal(read, mel)


def test_float16_shards_are_smaller_and_read_back_as_close_float32(tmp_path):
    written = utterances()
    big = write_shard(tmp_path / "a.parquet", "spk", written)
    small = write_shard(tmp_path / "b.parquet", "spk", written, mel_dtype="float16")
    assert small.stat().st_size < 0.7 * big.stat().st_size
    assert read_shard_meta(small).mel_dtype == "float16"
    for (_, mel, _), read in zip(written, read_shard(small).mels):
        assert read.dtype == np.float32
        np.testing.assert_allclose(read, mel, rtol=1e-3, atol=1e-7)


def test_meta_gives_frame_counts_and_row_groups(tmp_path):
    path = write_shard(tmp_path / "spk.parquet", "spk", utterances(), corpus="demo")
    meta = read_shard_meta(path)
    assert meta.n_frames.tolist() == [90, 130, 170, 210, 250]
    assert meta.n_row_groups == 5 and meta.audio_config == AudioConfig() and meta.schema_version == 1


def test_read_utterances_returns_the_asked_rows_in_order(tmp_path):
    written = utterances()
    path = write_shard(tmp_path / "spk.parquet", "spk", written)
    got = read_utterances(path, [4, 1, 4])
    assert [g.shape for g in got] == [(250, 40), (130, 40), (250, 40)]
    assert np.array_equal(got[0], written[4][1]) and np.array_equal(got[1], written[1][1])
    with pytest.raises(IndexError, match=rf"{path}: utterance index \[5\] out of range"):
        read_utterances(path, [0, 5])


def test_other_audio_parameters_are_refused_naming_the_file_and_the_field(tmp_path):
    path = write_shard(tmp_path / "spk.parquet", "spk", utterances(2), audio_config=AudioConfig(vad_mode=2))
    with pytest.raises(ShardError, match=rf"{path}: audio parameters differ.*'vad_mode': \(2, 3\)"):
        read_shard(path)
    with pytest.raises(ShardError, match=str(path)):
        read_utterances(path, [0])
    assert len(read_shard(path, expected_audio=AudioConfig(vad_mode=2)).mels) == 2


def test_other_schema_versions_foreign_parquet_and_non_parquet_files_are_refused(tmp_path):
    path = write_shard(tmp_path / "spk.parquet", "spk", utterances(2))
    table = pq.read_table(path)
    future = tmp_path / "future.parquet"
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"spkenc.schema_version": b"99"}), future)
    with pytest.raises(ShardError, match=rf"{future}: shard schema version 99"):
        read_shard_meta(future)
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1]}), foreign)
    with pytest.raises(ShardError, match=rf"{foreign}: not a spkenc mel shard"):
        read_shard(foreign)
    text = tmp_path / "text.parquet"
    text.write_text("not parquet at all")
    with pytest.raises(ShardError, match=rf"{text}: not a readable Parquet shard"):
        read_shard_meta(text)
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        read_shard(tmp_path / "missing.parquet")


@pytest.mark.parametrize(
    "bad, message",
    [
        ([("a", np.ones((10, 39), np.float32), "s")], r"'a': mel shape \(10, 39\)"),
        ([("a", np.ones((0, 40), np.float32), "s")], r"'a': mel shape \(0, 40\)"),
        ([("a", np.full((10, 40), np.nan, np.float32), "s")], "'a': mel holds NaN or Inf"),
        ([("a", np.ones((10, 40)), "s"), ("a", np.ones((10, 40)), "s")], "'a': utterance id appears twice"),
        ([], "has no utterances"),
    ],
)
def test_bad_utterances_are_refused_and_leave_no_file(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        write_shard(tmp_path / "spk.parquet", "spk", bad)
    assert list(tmp_path.iterdir()) == []


def test_float16_overflow_is_refused(tmp_path):
    with pytest.raises(ValueError, match="NaN or Inf values \\(as float16\\)"):
        write_shard(tmp_path / "spk.parquet", "spk", [("a", np.full((5, 40), 1e6, np.float32), "s")], mel_dtype="float16")


def test_a_refused_rewrite_keeps_the_old_shard(tmp_path):
    path = write_shard(tmp_path / "spk.parquet", "spk", utterances(3))
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_shard(path, "spk", utterances(2) + [("bad", np.full((5, 40), np.inf, np.float32), "s")])
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]


def test_readers_never_see_a_half_written_shard_during_concurrent_rewrites(tmp_path):
    path = tmp_path / "spk.parquet"
    versions = {3: utterances(3, seed=1), 6: utterances(6, seed=2)}
    write_shard(path, "spk", versions[3])
    stop = threading.Event()
    errors: list[BaseException] = []

    def rewrite() -> None:
        try:
            for i in range(30):
                write_shard(path, "spk", versions[6 if i % 2 else 3])
        except BaseException as error:  # reported by the main thread
            errors.append(error)
        finally:
            stop.set()

    writer = threading.Thread(target=rewrite)
    writer.start()
    n_reads = 0
    while not stop.is_set() or n_reads == 0:
        shard = read_shard(path)
        assert len(shard.mels) in versions
        assert all(np.array_equal(a, b[1]) for a, b in zip(shard.mels, versions[len(shard.mels)]))
        n_reads += 1
    writer.join()
    assert not errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spk.parquet"], "temporary files were left behind"
