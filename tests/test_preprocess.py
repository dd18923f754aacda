"""Trimming and mel shards over a real process pool: bad input, incremental reruns, bounded memory
on a 1-hour file, concurrent runs, and the `spkenc preprocess` command."""

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import soxr

from spkenc.cli import main as cli_main
from spkenc.config import AudioConfig, DataConfig
from spkenc.corpus import scan_corpus
from spkenc.pool import WorkerDied, map_unordered
from spkenc.preprocess import build_mel_shards, preprocess_corpus, trim_corpus
from spkenc.shards import check_shards, read_shard, write_shard


def copy_speech(demo_files: list[Path], speaker_dir: Path, n: int) -> list[Path]:
    speaker_dir.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, speaker_dir / p.name)) for p in demo_files[:n]]


@pytest.fixture(scope="module")
def bad_corpus(demo_files, tmp_path_factory) -> Path:
    """Good speech plus each kind of bad file the issue lists (except the 1-hour file, tested alone)."""
    root = tmp_path_factory.mktemp("bad_corpus")
    copy_speech(demo_files, root / "good", 3)
    speech, rate = sf.read(demo_files[8], dtype="float32")
    bad = root / "bad"
    bad.mkdir()
    (bad / "zero.wav").write_bytes(b"")
    (bad / "text.wav").write_text("RIFF? no, just a text file renamed .wav\n" * 40)
    flac = demo_files[9].read_bytes()
    (bad / "truncated.flac").write_bytes(flac[: len(flac) // 2])
    sf.write(bad / "silence.wav", np.zeros(3 * rate, np.float32), rate, subtype="PCM_16")
    with_nan = speech.copy()
    with_nan[1000:1010] = np.nan
    sf.write(bad / "nan.wav", with_nan, rate, subtype="FLOAT")
    sf.write(bad / "short.wav", speech[: int(0.8 * rate)], rate, subtype="PCM_16")
    odd = root / "formats"
    odd.mkdir()
    sf.write(odd / "pcm8.wav", speech, rate, subtype="PCM_U8")
    at_48k = soxr.resample(speech, rate, 48000)
    sf.write(odd / "stereo48k.wav", np.stack([at_48k, 0.5 * at_48k], axis=1), 48000, subtype="PCM_16")
    return root


@pytest.fixture(scope="module")
def preprocessed(bad_corpus, tmp_path_factory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("preprocessed") / "out"
    code = cli_main(["preprocess", str(bad_corpus), str(out), "--workers", "2"])
    return out, code


def test_cli_writes_the_documented_layout_and_exits_0_with_rejects(preprocessed):
    out, code = preprocessed
    assert code == 0
    assert (out / "manifest.parquet").is_file() and (out / "rejects.parquet").is_file()
    assert sorted(p.name for p in (out / "mels").glob("*.parquet")) == ["formats.parquet", "good.parquet"]
    trimmed = sorted(str(p.relative_to(out / "trimmed")) for p in (out / "trimmed").rglob("*.wav"))
    assert len(trimmed) == 5 and "formats/pcm8.wav" in trimmed and "formats/stereo48k.wav" in trimmed
    assert pq.read_table(out / "rejects.parquet").schema.names == ["path", "stage", "reason"]


def test_each_bad_file_is_rejected_with_its_reason(preprocessed):
    out, _ = preprocessed
    rejects = {Path(r["path"]).name: (r["stage"], r["reason"]) for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    assert set(rejects) == {"zero.wav", "text.wav", "truncated.flac", "silence.wav", "nan.wav", "short.wav"}
    assert rejects["zero.wav"] == ("scan", "empty file (0 bytes)")
    assert rejects["text.wav"][0] == "scan" and "not a readable audio file" in rejects["text.wav"][1]
    assert rejects["truncated.flac"][0] == "trim" and rejects["truncated.flac"][1].startswith("decode error: ")
    assert "truncated" in rejects["truncated.flac"][1]
    assert rejects["nan.wav"] == ("trim", "decode error: non-finite samples")
    assert rejects["silence.wav"] == ("trim", "empty after trimming")
    assert rejects["short.wav"] == ("trim", "under 1.6 s of speech")


def test_trimmed_files_are_16k_mono_pcm16_equal_to_preprocess_wav(preprocessed, bad_corpus):
    from spkenc.audio import preprocess_wav

    out, _ = preprocessed
    for name in ("pcm8", "stereo48k"):
        info = sf.info(out / "trimmed" / "formats" / f"{name}.wav")
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        written = sf.read(out / "trimmed" / "formats" / f"{name}.wav", dtype="float32")[0]
        expected = np.clip(preprocess_wav(bad_corpus / "formats" / f"{name}.wav"), -1, 1)
        assert len(written) == len(expected) >= 1.6 * 16000
        assert np.abs(written - expected).max() <= 1.0 / 32767


def test_mel_shards_hold_the_mels_of_the_trimmed_files(preprocessed):
    from threadpoolctl import threadpool_limits

    from spkenc.audio import wav_to_mel

    out, _ = preprocessed
    shard = read_shard(out / "mels" / "good.parquet")
    assert shard.speaker_id == "good" and len(shard.utterance_ids) == 3
    for utterance, mel, source in zip(shard.utterance_ids, shard.mels, shard.sources):
        wav = sf.read(out / "trimmed" / "good" / f"{utterance}.wav", dtype="float32")[0]
        # The pool workers run BLAS on one thread; OpenBLAS on two splits the filterbank
        # product differently, which moves the last bit of some frames.
        with threadpool_limits(1):
            np.testing.assert_array_equal(mel, wav_to_mel(wav))
        assert Path(source).name.startswith(utterance) and mel.shape[0] >= 160
    report = check_shards(sorted((out / "mels").glob("*.parquet")), utterances_per_speaker=3)
    assert not report.non_finite and not report.without_full_partial
    assert report.short_speakers == {"formats": 2}


def test_nothing_usable_exits_1(tmp_path):
    root = tmp_path / "hopeless" / "spk"
    root.mkdir(parents=True)
    (root / "a.wav").write_bytes(b"")
    sf.write(root / "b.wav", np.zeros(32000, np.float32), 16000)
    assert cli_main(["preprocess", str(root.parent), str(tmp_path / "out"), "--workers", "1"]) == 1
    reasons = sorted(r["reason"] for r in pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist())
    assert reasons == ["empty after trimming", "empty file (0 bytes)"]


@pytest.mark.slow
def test_reruns_redo_only_what_changed(demo_files, tmp_path):
    root = tmp_path / "corpus"
    copied = copy_speech(demo_files, root / "a", 3) + copy_speech(demo_files[8:], root / "b", 2)
    out = tmp_path / "out"
    first = preprocess_corpus(root, out, workers=2)
    assert (first.trim.n_processed, first.trim.n_skipped) == (5, 0) and first.shards.n_written == 2
    again = preprocess_corpus(root, out, workers=2)
    assert (again.trim.n_processed, again.trim.n_skipped) == (0, 5)
    assert (again.shards.n_written, again.shards.n_skipped) == (0, 2)

    shutil.copy(demo_files[20], copied[0])  # new content under an old name
    copied[3].unlink()  # a source leaves the corpus
    changed = preprocess_corpus(root, out, workers=2)
    assert (changed.trim.n_processed, changed.trim.n_skipped, changed.trim.n_sources) == (1, 3, 4)
    assert (changed.shards.n_written, changed.shards.n_skipped) == (2, 0)
    assert not (out / "trimmed" / "b" / f"{copied[3].stem}.wav").exists(), "the output of a removed source stays"
    assert len(read_shard(out / "mels" / "b.parquet").mels) == 1

    other_params = trim_corpus(out / "manifest.parquet", out / "trimmed", workers=2, config=AudioConfig(vad_mode=2))
    assert (other_params.n_processed, other_params.n_skipped) == (4, 0)


def test_two_runs_on_one_folder_take_turns(demo_files, tmp_path):
    scan = scan_corpus(copy_speech(demo_files, tmp_path / "corpus" / "s", 3)[0].parent.parent)
    results = []
    runs = [threading.Thread(target=lambda: results.append(trim_corpus(scan.rows, tmp_path / "out", workers=1))) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert sorted((r.n_processed, r.n_skipped) for r in results) == [(0, 3), (3, 0)]
    assert sorted(p.name for p in (tmp_path / "out" / "s").iterdir()) == sorted(f"{p.stem}.wav" for p in (tmp_path / "corpus" / "s").iterdir())


def test_a_long_recording_is_cut_into_segments(demo_files, tmp_path):
    speech = np.concatenate([sf.read(p, dtype="float32")[0] for p in demo_files[:50]])
    assert len(speech) > 130 * 16000
    (tmp_path / "c" / "spk").mkdir(parents=True)
    sf.write(tmp_path / "c" / "spk" / "long.flac", speech, 16000)
    scan = scan_corpus(tmp_path / "c")
    result = trim_corpus(scan.rows, tmp_path / "out", workers=1, data_config=DataConfig(max_segment_s=60.0))
    n_segments = int(np.ceil(len(speech) / 16000 / 60.0))
    assert result.n_outputs == n_segments and result.n_kept == 1
    names = sorted(p.name for p in (tmp_path / "out" / "spk").glob("*.wav"))
    assert names == [f"long.seg{k:03d}.wav" for k in range(n_segments)]
    assert 0.5 * len(speech) / 16000 < sum(result.durations_s) <= len(speech) / 16000


@pytest.mark.slow
def test_a_one_hour_file_is_trimmed_in_bounded_memory(demo_files, tmp_path):
    """Peak worker memory for 1 hour vs 3 s of audio differs by far less than the 230 MB that the
    hour alone takes as float32 at 16 kHz."""
    speech = [sf.read(p, dtype="float32")[0] for p in demo_files[:12]]
    rng = np.random.default_rng(0)
    (tmp_path / "c" / "spk").mkdir(parents=True)
    with sf.SoundFile(tmp_path / "c" / "spk" / "hour.wav", "w", 16000, 1, subtype="PCM_16") as f:
        for minute in range(60):
            block = rng.standard_normal(60 * 16000).astype(np.float32) * 0.003
            block[8000 : 8000 + len(speech[minute % 12])] += speech[minute % 12]
            f.write(block)
    sf.write(tmp_path / "c" / "spk" / "short.wav", speech[0], 16000)
    rows = scan_corpus(tmp_path / "c").rows
    hour_row = [r for r in rows if r["utterance_id"] == "hour"]
    assert hour_row[0]["duration_s"] == 3600.0
    short = trim_corpus([r for r in rows if r["utterance_id"] == "short"], tmp_path / "short", workers=1)
    hour = trim_corpus(hour_row, tmp_path / "hour", workers=1)
    (tmp_path / "c" / "spk" / "hour.wav").unlink()
    assert hour.n_kept == 1 and hour.n_outputs == 30 and not hour.rejects
    assert hour.peak_worker_rss_mb - short.peak_worker_rss_mb < 120, (hour.peak_worker_rss_mb, short.peak_worker_rss_mb)


def double_or_die(task: int) -> int:
    """A pool task that kills its worker process for -1 and raises for 0."""
    if task == -1:
        os._exit(3)
    if task == 0:
        raise ValueError("zero")
    return 2 * task


def test_a_dead_worker_costs_only_its_own_task():
    results = dict(map_unordered(double_or_die, [1, 2, -1, 0, 3], workers=2))
    assert results[1] == 2 and results[2] == 4 and results[3] == 6
    assert isinstance(results[0], ValueError)
    assert isinstance(results[-1], WorkerDied)


def test_chunked_tasks_give_the_same_results_and_a_dead_worker_still_costs_one_task():
    tasks = [1, 2, -1, 0, 3, 4, 5]
    results = dict(map_unordered(double_or_die, tasks, workers=2, chunk_size=3))
    assert sorted(results) == sorted(tasks)
    assert all(results[t] == 2 * t for t in (1, 2, 3, 4, 5))
    assert isinstance(results[0], ValueError)
    assert isinstance(results[-1], WorkerDied)
    with pytest.raises(ValueError, match="chunk_size"):
        list(map_unordered(double_or_die, tasks, workers=1, chunk_size=0))


def test_shard_checks_flag_non_finite_frames_and_missing_partials(tmp_path):
    import pyarrow as pa

    good = write_shard(tmp_path / "good.parquet", "good", [("u", np.ones((170, 40), np.float32), "s")])
    short = write_shard(tmp_path / "short.parquet", "short", [("u", np.ones((100, 40), np.float32), "s")])
    table = pq.read_table(good)
    mel = np.ones((170, 40), np.float32)
    mel[3, 7] = np.nan  # written behind write_shard's back, as a foreign tool could
    column = pa.array([mel.tolist()], type=table.schema.field("mel").type)
    broken = tmp_path / "broken.parquet"
    pq.write_table(table.set_column(2, "mel", column).replace_schema_metadata(
        {**table.schema.metadata, b"spkenc.speaker_id": b"broken"}), broken)
    report = check_shards([good, short, broken], partial_n_frames=160, utterances_per_speaker=2)
    assert report.n_shards == 3
    assert report.non_finite == {str(broken): 1}
    assert report.without_full_partial == [str(short)]
    assert report.short_speakers == {"good": 1, "short": 0, "broken": 1}


def test_build_mel_shards_needs_a_trim_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trim index"):
        build_mel_shards(tmp_path, tmp_path / "mels")
