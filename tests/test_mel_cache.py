"""The on-demand mel cache, on real mel shards made from the committed demo corpus."""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spkenc import mel_cache
from spkenc.config import AudioConfig
from spkenc.mel_cache import DEFAULT_FOLDER_NAME
from spkenc.sampling import ShardStore, sample_batch
from spkenc.shards import ShardError, write_shard

PARTIAL = AudioConfig().partial_n_frames
N, M = 3, 3


@pytest.fixture(scope="module")
def demo_mels(demo_dir: Path) -> dict[str, list[tuple[str, np.ndarray]]]:
    """4 demo speakers x 4 utterances of at least one partial: speaker -> [(utterance_id, (T, 40) mel)]."""
    from spkenc.audio import preprocess_wav, wav_to_mel

    out = {}
    for speaker in sorted(p.name for p in demo_dir.iterdir() if p.is_dir())[:4]:
        mels = [(f.stem, wav_to_mel(preprocess_wav(f))) for f in sorted((demo_dir / speaker).glob("*.flac"))]
        out[speaker] = [(u, mel) for u, mel in mels if len(mel) >= PARTIAL][:4]
        assert len(out[speaker]) == 4, f"demo speaker {speaker} has fewer than 4 utterances of {PARTIAL} frames"
    return out


def write_corpus(folder: Path, demo_mels: dict, mel_dtype: str = "float32", corpus: str = "demo") -> list[Path]:
    return [
        write_shard(folder / f"{s}.parquet", s, [(u, mel, f"{s}/{u}.flac") for u, mel in utts], corpus=corpus, mel_dtype=mel_dtype)
        for s, utts in demo_mels.items()
    ]


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.npy"))


def assert_same_batches(reference: ShardStore, store: ShardStore, steps=range(4), **kwargs) -> None:
    for step in steps:
        a = sample_batch(reference, 5, step, speakers_per_batch=N, utterances_per_speaker=M, **kwargs)
        b = sample_batch(store, 5, step, speakers_per_batch=N, utterances_per_speaker=M, **kwargs)
        assert np.array_equal(a.speaker_indices, b.speaker_indices) and np.array_equal(a.offsets_frames, b.offsets_frames)
        assert a.mels.tobytes() == b.mels.tobytes(), f"step {step}: on-demand batch differs from the in-memory one"


@pytest.mark.parametrize("mel_dtype", ["float32", "float16"])
def test_on_demand_batches_are_bit_identical_to_in_memory(demo_mels, tmp_path, mel_dtype):
    paths = write_corpus(tmp_path, demo_mels, mel_dtype)
    memory, on_demand = ShardStore(paths), ShardStore(paths, memory_budget_bytes=0)
    assert memory.in_memory and not on_demand.in_memory
    assert_same_batches(memory, on_demand)
    assert_same_batches(memory, on_demand, steps=[9], crop_frames=PARTIAL - 20)
    for i in range(len(memory)):
        rows = [3, 0, 3]
        assert all(np.array_equal(a, b) for a, b in zip(memory.utterances(i, rows), on_demand.utterances(i, rows)))
    cache = tmp_path / DEFAULT_FOLDER_NAME
    assert [p.name.split(".parquet.")[0] for p in entries(cache)] == sorted(demo_mels)
    assert all(np.load(p, mmap_mode="r").dtype == np.dtype(mel_dtype) for p in entries(cache))


def test_a_second_store_reuses_the_entries_without_rebuilding_them(demo_mels, tmp_path, caplog):
    paths = write_corpus(tmp_path, demo_mels)
    first = ShardStore(paths, memory_budget_bytes=0)
    assert_same_batches(ShardStore(paths), first)
    cache = tmp_path / DEFAULT_FOLDER_NAME
    before = {p.name: os.stat(p).st_ino for p in entries(cache)}
    with caplog.at_level(logging.WARNING):
        assert_same_batches(ShardStore(paths), ShardStore(paths, memory_budget_bytes=0))
    assert {p.name: os.stat(p).st_ino for p in entries(cache)} == before, "valid entries were rewritten"
    assert not caplog.records


def test_a_shard_rewritten_after_its_entry_was_made_gets_a_new_entry(demo_mels, tmp_path):
    paths = write_corpus(tmp_path, demo_mels)
    assert_same_batches(ShardStore(paths), ShardStore(paths, memory_budget_bytes=0))
    cache = tmp_path / DEFAULT_FOLDER_NAME
    speaker = sorted(demo_mels)[0]
    old = [p for p in entries(cache) if p.name.startswith(speaker)]
    # same utterances and lengths, other frames: only the shard's identity tells the versions apart
    write_shard(paths[0], speaker, [(u, mel * 2, f"{speaker}/{u}.flac") for u, mel in demo_mels[speaker]], corpus="demo")
    assert_same_batches(ShardStore(paths), ShardStore(paths, memory_budget_bytes=0), steps=range(8))
    new = [p for p in entries(cache) if p.name.startswith(speaker)]
    assert len(old) == len(new) == 1 and old != new and not old[0].exists()
    assert np.array_equal(np.load(new[0])[:PARTIAL], 2 * demo_mels[speaker][0][1][:PARTIAL])


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def garble_header(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"not a numpy file")


def other_shape(path: Path) -> None:
    np.save(path.with_suffix(""), np.zeros((7, 40), np.float32))  # np.save appends .npy


@pytest.mark.parametrize("damage", [truncate, garble_header, other_shape])
def test_a_corrupt_entry_is_named_in_a_warning_and_rebuilt(demo_mels, tmp_path, caplog, damage):
    paths = write_corpus(tmp_path, demo_mels)
    ShardStore(paths, memory_budget_bytes=0).read_crops(0, [0], [0], PARTIAL)
    (entry,) = entries(tmp_path / DEFAULT_FOLDER_NAME)
    damage(entry)
    with caplog.at_level(logging.WARNING):
        assert_same_batches(ShardStore(paths), ShardStore(paths, memory_budget_bytes=0))
    assert any(str(entry) in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    n_frames = sum(len(mel) for _, mel in demo_mels[sorted(demo_mels)[0]])
    assert np.load(entry, mmap_mode="r").shape == (n_frames, 40)


@pytest.mark.parametrize("damage", [lambda path: os.truncate(path, 0), os.remove], ids=["emptied", "deleted"])
def test_an_entry_damaged_while_in_use_is_rebuilt(demo_mels, tmp_path, caplog, damage):
    paths = write_corpus(tmp_path, demo_mels)
    memory, on_demand = ShardStore(paths), ShardStore(paths, memory_budget_bytes=0)
    assert_same_batches(memory, on_demand, steps=[0])
    for entry in entries(tmp_path / DEFAULT_FOLDER_NAME):
        damage(entry)
    with caplog.at_level(logging.WARNING):
        assert_same_batches(memory, on_demand, steps=[1, 2])
    assert any("rebuilding" in r.getMessage() for r in caplog.records)


def test_an_unwritable_cache_folder_falls_back_to_parquet_with_one_warning(demo_mels, tmp_path, caplog):
    paths = write_corpus(tmp_path / "shards", demo_mels)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING):
        store = ShardStore(paths, memory_budget_bytes=0, cache_dir=blocked)
        assert_same_batches(ShardStore(paths), store)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(blocked) in warnings[0] and "cannot be written" in warnings[0]
    assert blocked.read_text().startswith("a file")


def test_a_shard_changed_while_the_store_is_open_is_refused_naming_it(demo_mels, tmp_path):
    paths = write_corpus(tmp_path, demo_mels)
    store = ShardStore(paths, memory_budget_bytes=0)
    speaker = sorted(demo_mels)[0]
    write_shard(paths[0], speaker, [(u, mel, f"{speaker}/{u}.flac") for u, mel in demo_mels[speaker][:3]], corpus="demo")
    with pytest.raises(ShardError, match=rf"{paths[0]}: the shard changed since it was opened"):
        store.read_crops(0, [0], [0], PARTIAL)


def test_a_crop_outside_its_utterance_is_refused_naming_the_entry(demo_mels, tmp_path):
    paths = write_corpus(tmp_path, demo_mels)
    store = ShardStore(paths, memory_budget_bytes=0)
    length = int(store.speakers[0].n_frames[1])
    with pytest.raises(IndexError, match=rf"{DEFAULT_FOLDER_NAME}/.*crop of {PARTIAL} frames at {length - PARTIAL + 1}"):
        store.read_crops(0, [1], [length - PARTIAL + 1], PARTIAL)
    with pytest.raises(IndexError, match=r"\.npy: utterance row 4 outside 0\.\.3"):
        store.read_crops(0, [4], [0], PARTIAL)
    with pytest.raises(IndexError, match=r"\.npy: utterance row -1 outside"):
        store.utterances(0, [-1])


def test_one_cache_folder_keeps_same_named_shards_of_two_folders_apart(demo_mels, tmp_path):
    speakers = sorted(demo_mels)
    for i, name in enumerate("ab"):  # a/x.parquet and b/x.parquet hold different speakers
        write_corpus(tmp_path / name, {speakers[i]: demo_mels[speakers[i]]}, corpus=name)
        (tmp_path / name / f"{speakers[i]}.parquet").rename(tmp_path / name / "x.parquet")
    paths = [tmp_path / "a" / "x.parquet", tmp_path / "b" / "x.parquet"]
    cache = tmp_path / "cache"
    for _ in range(2):
        store = ShardStore(paths, memory_budget_bytes=0, cache_dir=cache)
        for i in range(2):
            assert np.array_equal(store.utterances(i, [0])[0], demo_mels[speakers[i]][0][1])
    assert len(entries(cache)) == 2


def test_a_temporary_file_of_a_killed_build_is_never_trusted_and_is_removed(demo_mels, tmp_path):
    paths = write_corpus(tmp_path, demo_mels)
    ShardStore(paths, memory_budget_bytes=0).read_crops(0, [0], [0], PARTIAL)
    cache = tmp_path / DEFAULT_FOLDER_NAME
    (entry,) = entries(cache)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    leftover = cache / f".{entry.name}.{int(dead.stdout)}.0123abcd.tmp"
    shutil.copy(entry, leftover)
    truncate(leftover)
    entry.unlink()
    assert_same_batches(ShardStore(paths), ShardStore(paths, memory_budget_bytes=0))
    assert entry.exists() and not leftover.exists()


def test_two_processes_building_the_same_cache_at_once_both_draw_the_right_batches(demo_mels, tmp_path):
    paths = write_corpus(tmp_path, demo_mels)
    script = (
        "import sys; from pathlib import Path; from spkenc.sampling import ShardStore, sample_batch\n"
        "store = ShardStore([Path(p) for p in sys.argv[1:]], memory_budget_bytes=0)\n"
        f"sys.stdout.buffer.write(sample_batch(store, 5, 0, speakers_per_batch={N}, utterances_per_speaker={M}).mels.tobytes())\n"
    )
    runs = [subprocess.Popen([sys.executable, "-c", script, *map(str, paths)], stdout=subprocess.PIPE) for _ in range(2)]
    outputs = [run.communicate()[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    expected = sample_batch(ShardStore(paths), 5, 0, speakers_per_batch=N, utterances_per_speaker=M).mels.tobytes()
    assert outputs == [expected, expected]
    assert len(entries(tmp_path / DEFAULT_FOLDER_NAME)) == N
    assert not list((tmp_path / DEFAULT_FOLDER_NAME).glob(".*.tmp"))


@pytest.mark.parametrize("read", [mel_cache.preadv_into, mel_cache.pread_into], ids=["preadv", "pread"])
def test_both_positioned_reads_fill_the_buffer_and_report_a_short_read(demo_mels, tmp_path, read):
    if read is mel_cache.preadv_into and not hasattr(os, "preadv"):
        pytest.skip("this platform has no os.preadv; pread_into is the one in use")
    paths = write_corpus(tmp_path, demo_mels)
    ShardStore(paths, memory_budget_bytes=0).read_crops(0, [0], [0], PARTIAL)
    (entry,) = entries(tmp_path / DEFAULT_FOLDER_NAME)
    frames = np.load(entry)
    buffer = np.zeros((PARTIAL, 40), np.float32)
    fd = os.open(entry, os.O_RDONLY)
    try:
        offset = os.path.getsize(entry) - frames.nbytes
        assert read(fd, memoryview(buffer).cast("B"), offset + 3 * 40 * 4) == buffer.nbytes
        assert np.array_equal(buffer, frames[3 : 3 + PARTIAL])
        assert read(fd, memoryview(buffer).cast("B"), os.path.getsize(entry) - 100) == 100
    finally:
        os.close(fd)
