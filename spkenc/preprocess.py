"""Corpus preprocessing: trimmed 16 kHz PCM16 wavs, then one mel shard per speaker.

Both stages run over a process pool (`workers`, default all cores), write every output
atomically (temporary file + `os.replace`), hold a lock on their output folder, and are
incremental: an index next to the outputs records, per source, its size, mtime and the hash of
the parameters that shaped the output, and a rerun redoes only what changed. Outputs of
sources that left the manifest are deleted. The index is also saved every
`INDEX_CHECKPOINT_S` seconds while a stage runs, so a run killed mid-way (even `kill -9`)
redoes only the work it had not finished. A "processing error" or "worker died" outcome is not
kept as final: the next run tries that source again.

Trim rejects carry one of three reasons: "decode error: ...", "empty after trimming" or
"under 1.6 s of speech" (AudioConfig.min_utterance_s); a bug or a crash in a worker shows as
"processing error: ..." or "worker died: ..." for that file alone.
"""

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq

from spkenc.config import AudioConfig, DataConfig
from spkenc.pool import WorkerDied, chunk_size_for, folder_lock, map_unordered, remove_orphan_temps, resolve_workers
from spkenc.shards import write_table_atomic
from spkenc.stages import params_hash

log = logging.getLogger(__name__)

TRIM_INDEX = ".index.parquet"
INDEX_CHECKPOINT_S = 2.0  # how often a running stage saves its index
# Imported once by the fork server, so that pool workers start with them loaded.
# librosa.filters (the mel filterbank, about 1 s to import) too: paid once, not by every mel worker.
_WORKER_MODULES = ("spkenc.audio", "spkenc.stages", "spkenc.shards", "soundfile", "librosa.filters")
Progress = Callable[[int, int], None]
_INDEX_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("bytes", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("params_hash", pa.string()),
        ("speaker_id", pa.string()),
        ("utterance_id", pa.string()),
        ("source_duration_s", pa.float64()),
        ("reason", pa.string()),
        ("outputs", pa.list_(pa.string())),
        ("output_durations_s", pa.list_(pa.float64())),
    ]
)


@dataclass
class TrimResult:
    """Counts cover the whole corpus (skipped sources keep their earlier outcome)."""

    out_dir: Path
    n_sources: int
    n_processed: int
    n_skipped: int
    n_kept: int  # sources with at least one trimmed output
    n_rejected: int
    n_outputs: int
    hours_before: float
    hours_after: float
    durations_s: list[float]
    rejects: list[dict[str, str]]
    peak_worker_rss_mb: float = 0.0
    worker_cpu_s: float = 0.0  # CPU seconds the workers spent on this run's sources


@dataclass
class ShardsResult:
    out_dir: Path
    paths: list[Path]
    n_speakers: int
    n_utterances: int
    n_frames: int
    n_bytes: int
    n_written: int
    n_skipped: int
    rejects: list[dict[str, str]] = field(default_factory=list)
    worker_cpu_s: float = 0.0


def _manifest_rows(manifest: Union[str, Path, pa.Table, Sequence[dict]]) -> list[dict]:
    if isinstance(manifest, (str, Path)):
        if not Path(manifest).is_file():
            raise FileNotFoundError(f"{manifest}: manifest not found (run the corpus scan first)")
        return pq.read_table(manifest).to_pylist()
    if isinstance(manifest, pa.Table):
        return manifest.to_pylist()
    return list(manifest)


def _read_index(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    return {row["source"]: row for row in pq.read_table(path).to_pylist()}


def _output_paths(out_dir: Path, row: dict) -> list[Path]:
    return [out_dir / row["speaker_id"] / f"{u}.wav" for u in row["outputs"] or []]


def _trim_task(task: dict) -> dict:
    """Worker: preprocess one source into one or more trimmed wavs."""
    from spkenc.stages import trim_source

    started = time.process_time()
    return {**trim_source(**task), "cpu_s": time.process_time() - started}


def trim_corpus(
    manifest: Union[str, Path, pa.Table, Sequence[dict]],
    out_dir: Union[str, Path],
    workers: Optional[int] = None,
    config: AudioConfig = AudioConfig(),
    data_config: DataConfig = DataConfig(),
    progress: Optional[Progress] = None,
) -> TrimResult:
    """Trim every manifest row's source to `out_dir/<speaker>/<utterance>.wav` (16 kHz PCM16).

    Sources unchanged since the last run (same size, mtime and parameters) are skipped.
    `progress(done, total)` is called as sources finish.
    """
    out_dir = Path(out_dir)
    workers = resolve_workers(workers)
    rows = _manifest_rows(manifest)
    digest = params_hash(config.to_dict(), data_config.max_segment_s, "trim-v1")
    with folder_lock(out_dir):
        remove_orphan_temps(out_dir)
        old = _read_index(out_dir / TRIM_INDEX)
        index: dict[str, dict] = {}
        tasks = []
        for row in rows:
            source = row["path"]
            try:
                stat = os.stat(source)
                size, mtime = stat.st_size, stat.st_mtime_ns
            except OSError:
                size, mtime = -1, -1
            entry = old.get(source)
            if (
                entry is not None
                and (entry["bytes"], entry["mtime_ns"], entry["params_hash"]) == (size, mtime, digest)
                and (entry["speaker_id"], entry["utterance_id"]) == (row["speaker_id"], row["utterance_id"])
                and all(p.is_file() for p in _output_paths(out_dir, entry))
            ):
                index[source] = entry
                continue
            base = {"source": source, "bytes": size, "mtime_ns": mtime, "params_hash": digest,
                    "speaker_id": row["speaker_id"], "utterance_id": row["utterance_id"],
                    "source_duration_s": float(row.get("duration_s") or 0.0)}
            tasks.append({**base, "out_dir": str(out_dir), "header_frames": int(row.get("n_frames") or 0),
                          "header_rate_hz": int(row.get("sample_rate") or 0), "config": config.to_dict(),
                          "max_segment_s": data_config.max_segment_s})
        n_skipped = len(index)
        log.info("%s: %d sources to trim, %d unchanged", out_dir, len(tasks), n_skipped)
        # Longest first, so that no long file starts last and leaves one worker busy alone.
        tasks.sort(key=lambda t: -t["source_duration_s"])
        chunk = chunk_size_for(len(tasks), workers)
        peak = cpu_s = 0.0
        fields = set(_INDEX_SCHEMA.names)
        saved = time.monotonic()
        for done, (task, result) in enumerate(map_unordered(_trim_task, tasks, workers, _WORKER_MODULES, chunk), start=1):
            entry = {k: v for k, v in task.items() if k in fields}
            if isinstance(result, BaseException):
                kind = "worker died" if isinstance(result, WorkerDied) else "processing error"
                result = {"reason": f"{kind}: {type(result).__name__}: {result}", "outputs": [], "output_durations_s": []}
                entry["bytes"] = -1  # not a verdict on the file: the next run tries it again
            peak = max(peak, result.pop("peak_rss_mb", 0.0))
            cpu_s += result.pop("cpu_s", 0.0)
            index[task["source"]] = {**entry, **result}
            if progress is not None:
                progress(n_skipped + done, len(rows))
            if time.monotonic() - saved >= INDEX_CHECKPOINT_S:
                # Old entries of sources not yet redone stay listed, so their outputs stay known.
                _write_trim_index({**old, **index}, out_dir)
                saved = time.monotonic()
        if progress is not None and not tasks:
            progress(len(rows), len(rows))
        _remove_stale(out_dir, old, index)
        entries = _write_trim_index(index, out_dir)
    return _trim_result(out_dir, entries, len(tasks), n_skipped, peak, cpu_s)


def _write_trim_index(index: dict[str, dict], out_dir: Path) -> list[dict]:
    entries = sorted(index.values(), key=lambda e: e["source"])
    write_table_atomic(pa.Table.from_pylist(entries, schema=_INDEX_SCHEMA), out_dir / TRIM_INDEX)
    return entries


def _remove_stale(out_dir: Path, old: dict[str, dict], index: dict[str, dict]) -> None:
    """Delete outputs that an earlier run wrote and this run no longer claims."""
    keep = {p for entry in index.values() for p in _output_paths(out_dir, entry)}
    for entry in old.values():
        for path in _output_paths(out_dir, entry):
            if path not in keep:
                path.unlink(missing_ok=True)


def _trim_result(out_dir: Path, entries: list[dict], n_processed: int, n_skipped: int, peak: float, cpu_s: float) -> TrimResult:
    kept = [e for e in entries if not e["reason"]]
    durations = [d for e in kept for d in e["output_durations_s"]]
    rejects = [{"path": e["source"], "stage": "trim", "reason": e["reason"]} for e in entries if e["reason"]]
    return TrimResult(
        out_dir=out_dir,
        n_sources=len(entries),
        n_processed=n_processed,
        n_skipped=n_skipped,
        n_kept=len(kept),
        n_rejected=len(rejects),
        n_outputs=len(durations),
        hours_before=sum(e["source_duration_s"] for e in entries) / 3600,
        hours_after=sum(durations) / 3600,
        durations_s=durations,
        rejects=rejects,
        peak_worker_rss_mb=peak,
        worker_cpu_s=cpu_s,
    )


def trimmed_utterances(trimmed_dir: Union[str, Path]) -> dict[str, list[tuple[str, Path, str]]]:
    """speaker -> [(utterance_id, trimmed wav, source)] from a trim index, sorted by utterance.

    Raises FileNotFoundError when `trimmed_dir` has no index (trim the corpus first).
    """
    trimmed_dir = Path(trimmed_dir)
    index_path = trimmed_dir / TRIM_INDEX
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: no trim index (run trim_corpus / trimmed_wavs first)")
    speakers: dict[str, list[tuple[str, Path, str]]] = {}
    for entry in pq.read_table(index_path).to_pylist():
        for utterance in entry["outputs"] or []:
            path = trimmed_dir / entry["speaker_id"] / f"{utterance}.wav"
            speakers.setdefault(entry["speaker_id"], []).append((utterance, path, entry["source"]))
    return {s: sorted(u) for s, u in sorted(speakers.items())}


def _mel_task(task: dict) -> dict:
    from spkenc.stages import mel_shard_for_speaker

    started = time.process_time()
    return {**mel_shard_for_speaker(**task), "cpu_s": time.process_time() - started}


def _fingerprint(utterances: list[tuple[str, Path, str]], digest: str) -> str:
    stats = []
    for utterance, path, _ in utterances:
        try:
            stat = os.stat(path)
            stats.append((utterance, stat.st_size, stat.st_mtime_ns))
        except OSError:
            stats.append((utterance, -1, -1))
    return params_hash(digest, stats)


def build_mel_shards(
    trimmed_dir: Union[str, Path],
    out_dir: Union[str, Path],
    corpus: str = "",
    workers: Optional[int] = None,
    config: AudioConfig = AudioConfig(),
    mel_dtype: str = DataConfig().mel_dtype,
    progress: Optional[Progress] = None,
) -> ShardsResult:
    """Write `out_dir/<speaker>.parquet` for every speaker of the trim index in `trimmed_dir`.

    A speaker whose trimmed files and parameters are unchanged keeps its shard; shards of
    speakers that left the index are deleted. A trimmed file that cannot be read becomes a
    reject (stage "mel").
    """
    out_dir = Path(out_dir)
    workers = resolve_workers(workers)
    speakers = trimmed_utterances(trimmed_dir)
    digest = params_hash(config.to_dict(), mel_dtype, corpus, "mel-v1")
    index_path = out_dir / ".index.json"
    with folder_lock(out_dir):
        remove_orphan_temps(out_dir)
        old = json.loads(index_path.read_text()) if index_path.is_file() else {}
        index: dict[str, dict] = {}
        tasks = []
        for speaker, utterances in speakers.items():
            fingerprint = _fingerprint(utterances, digest)
            entry = old.get(speaker)
            shard = out_dir / f"{speaker}.parquet"
            if entry and entry["fingerprint"] == fingerprint and shard.is_file():
                index[speaker] = entry
                continue
            tasks.append({"speaker_id": speaker, "utterances": [(u, str(p), s) for u, p, s in utterances],
                          "path": str(shard), "corpus": corpus, "config": config.to_dict(), "mel_dtype": mel_dtype,
                          "fingerprint": fingerprint})
        n_skipped, cpu_s = len(index), 0.0
        tasks.sort(key=lambda t: -len(t["utterances"]))  # the largest speakers first, for an even tail
        saved = time.monotonic()
        for done, (task, result) in enumerate(map_unordered(_mel_task, tasks, workers, _WORKER_MODULES), start=1):
            if isinstance(result, BaseException):
                result = {"written": False, "rejects": [{"path": task["path"], "stage": "mel", "reason": f"{type(result).__name__}: {result}"}]}
            cpu_s += result.get("cpu_s", 0.0)
            index[task["speaker_id"]] = {"fingerprint": task["fingerprint"] if result["written"] else "", "rejects": result["rejects"]}
            if progress is not None:
                progress(n_skipped + done, len(speakers))
            if time.monotonic() - saved >= INDEX_CHECKPOINT_S:
                _write_json_atomic({**old, **index}, index_path)
                saved = time.monotonic()
        for speaker in set(old) - set(index):
            (out_dir / f"{speaker}.parquet").unlink(missing_ok=True)
        _write_json_atomic(index, index_path)
    return _shards_result(out_dir, index, len(tasks), n_skipped, cpu_s)


def _write_json_atomic(value: dict, path: Path) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temp.write_text(json.dumps(value, indent=1, sort_keys=True))
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _shards_result(out_dir: Path, index: dict[str, dict], n_written: int, n_skipped: int, cpu_s: float) -> ShardsResult:
    from spkenc.shards import read_shard_meta

    paths = sorted(out_dir / f"{s}.parquet" for s in index if (out_dir / f"{s}.parquet").is_file())
    metas = [read_shard_meta(p) for p in paths]
    return ShardsResult(
        out_dir=out_dir,
        paths=paths,
        n_speakers=len(paths),
        n_utterances=sum(len(m.n_frames) for m in metas),
        n_frames=sum(int(m.n_frames.sum()) for m in metas),
        n_bytes=sum(p.stat().st_size for p in paths),
        n_written=n_written,
        n_skipped=n_skipped,
        rejects=[r for entry in index.values() for r in entry["rejects"]],
        worker_cpu_s=cpu_s,
    )


@dataclass
class PreprocessResult:
    manifest_path: Path
    rejects_path: Path
    n_rejects: int
    trim: TrimResult
    shards: ShardsResult


def preprocess_corpus(
    root: Union[str, Path],
    out_dir: Union[str, Path],
    layout: str = "auto",
    workers: Optional[int] = None,
    corpus: str = "",
    config: AudioConfig = AudioConfig(),
    data_config: DataConfig = DataConfig(),
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> PreprocessResult:
    """Scan, trim and shard a corpus without Dagster, into the layout of `spkenc preprocess`:
    `out_dir/manifest.parquet`, `out_dir/rejects.parquet` (path, stage, reason; every stage),
    `out_dir/trimmed/<speaker>/<utt>.wav` and `out_dir/mels/<speaker>.parquet`.

    `progress(stage, done, total)` reports each stage ("scan", "trim", "mel").
    """
    from spkenc.corpus import scan_corpus, write_rejects

    out_dir = Path(out_dir)

    def stage(name: str) -> Optional[Progress]:
        return None if progress is None else (lambda done, total: progress(name, done, total))

    scan = scan_corpus(root, layout, corpus, heldout_fraction=data_config.heldout_fraction, progress=stage("scan"))
    manifest_path = write_table_atomic(scan.manifest_table(), out_dir / "manifest.parquet")
    trim = trim_corpus(manifest_path, out_dir / "trimmed", workers, config, data_config, stage("trim"))
    shards = build_mel_shards(out_dir / "trimmed", out_dir / "mels", scan.corpus, workers, config,
                              data_config.mel_dtype, stage("mel"))
    rejects = scan.rejects + trim.rejects + shards.rejects
    return PreprocessResult(manifest_path, write_rejects(rejects, out_dir / "rejects.parquet"), len(rejects), trim, shards)
