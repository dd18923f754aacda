"""Inference over audio files: embed many files into a Parquet table, or compare two.

Used by `spkenc embed` and `spkenc verify`. A file that cannot be read or holds no speech
becomes a row with its reason; it never aborts the batch.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from spkenc.audio import AudioError, preprocess_wav
from spkenc.inference import Embedder, compute_partial_slices

PathLike = Union[str, Path]


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a", ".aac")


@dataclass(frozen=True)
class FileEmbedding:
    """One row of `spkenc embed`: an (E,) embedding, or None and the reason in `error`."""

    path: str
    embedding: Optional[np.ndarray]
    n_partials: int
    duration_s: float  # speech left after silence trimming
    error: Optional[str]


def find_audio_files(inputs: Sequence[PathLike]) -> list[Path]:
    """Files as given, and the audio files under each directory (recursively, sorted)."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found.extend(sorted(p for p in item.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()))
        else:
            found.append(item)
    return found


def embed_files(
    embedder: Embedder,
    paths: Iterable[PathLike],
    rate: Optional[float] = None,
    min_coverage: float = 0.75,
    group_s: float = 60.0,
) -> Iterator[FileEmbedding]:
    """Preprocess and embed audio files, yielding one `FileEmbedding` per path, in order.

    A file that cannot be read or holds no speech gets a row with its reason and the batch
    goes on. Up to `group_s` seconds of speech are embedded together, so partials of short
    files share forward passes while memory stays bounded.
    """
    compute_partial_slices(0, rate, min_coverage, embedder.config)  # a bad rate fails at once
    pending: list[tuple[str, Union[np.ndarray, str]]] = []
    pending_samples = 0
    for path in map(str, paths):
        try:
            wav = preprocess_wav(path, config=embedder.config)
            pending.append((path, wav) if len(wav) else (path, f"{path}: no speech left after silence trimming"))
        except (AudioError, OSError) as error:
            reason = str(error)
            pending.append((path, reason if reason.startswith(path) else f"{path}: {reason}"))
            continue
        pending_samples += len(wav)
        if pending_samples >= group_s * embedder.config.sample_rate_hz:
            yield from _embed_group(embedder, pending, rate, min_coverage)
            pending, pending_samples = [], 0
    yield from _embed_group(embedder, pending, rate, min_coverage)


def _embed_group(embedder, pending, rate, min_coverage) -> Iterator[FileEmbedding]:
    """Embed a group's waveforms in one call; if one of them fails, file by file to name it."""
    wavs = [item for _, item in pending if not isinstance(item, str)]
    try:
        embeds: Optional[Iterator[np.ndarray]] = iter(embedder.embed_utterances(wavs, rate, min_coverage) if wavs else [])
    except ValueError:
        embeds = None
    for path, item in pending:
        if isinstance(item, str):
            yield FileEmbedding(path, None, 0, 0.0, item)
            continue
        duration_s = len(item) / embedder.config.sample_rate_hz
        try:
            embed = next(embeds) if embeds is not None else embedder.embed_utterance(item, rate=rate, min_coverage=min_coverage)
        except ValueError as error:
            yield FileEmbedding(path, None, 0, duration_s, f"{path}: {error}")
            continue
        n_partials = len(compute_partial_slices(len(item), rate, min_coverage, embedder.config)[1])
        yield FileEmbedding(path, embed, n_partials, duration_s, None)


def write_embeddings(rows: Iterable[FileEmbedding], path: PathLike) -> Path:
    """Write rows to Parquet atomically (temp file in the same folder, then os.replace).

    Columns: path (string), embedding (list<float32>, null on error), n_partials (int32),
    duration_s (float64), error (string, null on success).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(rows)
    schema = pa.schema([
        ("path", pa.string()), ("embedding", pa.list_(pa.float32())), ("n_partials", pa.int32()),
        ("duration_s", pa.float64()), ("error", pa.string()),
    ])
    table = pa.table({
        "path": [r.path for r in rows],
        "embedding": [None if r.embedding is None else r.embedding.astype(np.float32) for r in rows],
        "n_partials": [r.n_partials for r in rows],
        "duration_s": [r.duration_s for r in rows],
        "error": [r.error for r in rows],
    }, schema=schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def verify_files(embedder: Embedder, path_a: PathLike, path_b: PathLike, rate: Optional[float] = None) -> float:
    """Cosine similarity in [-1, 1] of two audio files' embeddings.

    Raises `spkenc.audio.AudioError` for an unreadable file and ValueError naming a file
    without speech.
    """
    wavs = []
    for path in (path_a, path_b):
        wav = preprocess_wav(path, config=embedder.config)
        if len(wav) == 0:
            raise ValueError(f"{path}: no speech left after silence trimming")
        wavs.append(wav)
    a, b = embedder.embed_utterances(wavs, rate=rate)
    return float(np.clip(np.dot(a, b), -1.0, 1.0))
