"""Mel shards: one Parquet file per speaker, one row per utterance.

Columns: `utterance_id` string, `n_frames` int32, `mel` list<fixed_size_list<float32|float16, n_mels>>
(power mel frames, no log, as `spkenc.audio.wav_to_mel` makes them), `source` string (the audio
file the utterance came from). The file's key-value metadata holds `spkenc.schema_version`,
`spkenc.audio_config` (JSON of `AudioConfig.to_dict()`), `spkenc.speaker_id`, `spkenc.corpus`
and `spkenc.mel_dtype`. Each utterance is its own row group, so a reader can fetch one
utterance without reading the others.

Writes are atomic: a temporary file in the same folder, then `os.replace`. Readers refuse a
shard whose schema version or audio parameters differ from what they expect (`ShardError`).

>>> import tempfile, numpy as np
>>> folder = Path(tempfile.mkdtemp())
>>> mel = np.ones((170, 40), np.float32)
>>> path = write_shard(folder / "s1.parquet", "s1", [("u1", mel, "s1/u1.flac")], corpus="demo")
>>> meta = read_shard_meta(path)
>>> meta.speaker_id, meta.corpus, meta.n_frames.tolist(), meta.n_row_groups
('s1', 'demo', [170], 1)
>>> read_shard(path).mels[0].shape
(170, 40)
"""

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spkenc.config import AudioConfig

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MEL_DTYPES = ("float32", "float16")
_KEY = "spkenc."

# (utterance_id, (T, n_mels) mel frames, source path)
Utterance = tuple[str, np.ndarray, str]


class ShardError(ValueError):
    """A shard that cannot be read as the caller expects; the message starts with the file."""


@dataclass(frozen=True)
class ShardMeta:
    """What a shard's footer and `n_frames` column say, without reading any mel frames."""

    path: Path
    speaker_id: str
    corpus: str
    n_frames: np.ndarray  # (n_utterances,) int32 frames per utterance
    audio_config: AudioConfig
    schema_version: int
    mel_dtype: str
    n_row_groups: int


@dataclass(frozen=True)
class Shard:
    """A whole shard in memory: `mels[i]` is utterance i's (T_i, n_mels) float32 frames."""

    path: Path
    speaker_id: str
    corpus: str
    utterance_ids: list[str]
    sources: list[str]
    mels: list[np.ndarray]
    audio_config: AudioConfig


def _schema(n_mels: int, mel_dtype: str) -> pa.Schema:
    value = pa.float32() if mel_dtype == "float32" else pa.float16()
    return pa.schema(
        [
            ("utterance_id", pa.string()),
            ("n_frames", pa.int32()),
            ("mel", pa.list_(pa.list_(value, n_mels))),
            ("source", pa.string()),
        ]
    )


def write_table_atomic(table: pa.Table, path: Union[str, Path], **options) -> Path:
    """Write `table` to the Parquet file `path` via a temporary file in the same folder and
    `os.replace`, so readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        pq.write_table(table, temp_name, **options)
        with open(temp_name, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def write_shard(
    path: Union[str, Path],
    speaker_id: str,
    utterances: Iterable[Utterance],
    audio_config: AudioConfig = AudioConfig(),
    corpus: str = "",
    mel_dtype: str = "float32",
) -> Path:
    """Write one speaker's utterances to `path` atomically and return `path`.

    `utterances` yields (utterance_id, (T, n_mels) mel, source) with T >= 1 and finite
    values. Raises ValueError naming the utterance when a mel has the wrong shape, is
    empty or holds NaN/Inf (also after a float16 cast), when an utterance id repeats, or
    when there is no utterance at all.
    """
    path = Path(path)
    if mel_dtype not in MEL_DTYPES:
        raise ValueError(f"{path}: mel_dtype must be one of {MEL_DTYPES}, got {mel_dtype!r}")
    n_mels = audio_config.n_mels
    ids, n_frames, frames, sources = [], [], [], []
    for utterance_id, mel, source in utterances:
        mel = np.asarray(mel)
        where = f"{path}: speaker {speaker_id!r} utterance {utterance_id!r}"
        if mel.ndim != 2 or mel.shape[1] != n_mels or mel.shape[0] == 0:
            raise ValueError(f"{where}: mel shape {mel.shape}, expected (T >= 1, {n_mels})")
        with np.errstate(over="ignore"):  # overflow to Inf is caught just below
            mel = mel.astype(mel_dtype)
        if not np.isfinite(mel).all():
            raise ValueError(f"{where}: mel holds NaN or Inf values (as {mel_dtype})")
        if utterance_id in ids:
            raise ValueError(f"{where}: utterance id appears twice")
        ids.append(str(utterance_id))
        n_frames.append(mel.shape[0])
        frames.append(mel.reshape(-1))
        sources.append(str(source))
    if not ids:
        raise ValueError(f"{path}: speaker {speaker_id!r} has no utterances to write")

    schema = _schema(n_mels, mel_dtype)
    flat = pa.array(np.concatenate(frames), type=schema.field("mel").type.value_type.value_type)
    per_frame = pa.FixedSizeListArray.from_arrays(flat, n_mels)
    offsets = pa.array(np.concatenate([[0], np.cumsum(n_frames)]).astype(np.int32))
    mel_column = pa.ListArray.from_arrays(offsets, per_frame, type=schema.field("mel").type)
    metadata = {
        f"{_KEY}schema_version": str(SCHEMA_VERSION),
        f"{_KEY}audio_config": json.dumps(audio_config.to_dict(), sort_keys=True),
        f"{_KEY}speaker_id": str(speaker_id),
        f"{_KEY}corpus": str(corpus),
        f"{_KEY}mel_dtype": mel_dtype,
    }
    table = pa.table(
        [pa.array(ids, pa.string()), pa.array(n_frames, pa.int32()), mel_column, pa.array(sources, pa.string())],
        schema=schema.with_metadata(metadata),
    )
    # One utterance per row group: on-demand reads fetch exactly the utterances asked for.
    return write_table_atomic(table, path, row_group_size=1, write_statistics=["utterance_id", "n_frames"])


def _open(path: Path) -> pq.ParquetFile:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such mel shard file")
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise ShardError(f"{path}: not a readable Parquet shard ({error})") from error


def _footer(path: Path, parquet: pq.ParquetFile) -> dict[str, str]:
    raw = parquet.schema_arrow.metadata or {}
    meta = {k.decode(): v.decode() for k, v in raw.items() if k.startswith(_KEY.encode())}
    missing = [k for k in ("schema_version", "audio_config", "speaker_id") if _KEY + k not in meta]
    if missing:
        raise ShardError(f"{path}: not a spkenc mel shard (missing metadata {missing})")
    if meta[f"{_KEY}schema_version"] != str(SCHEMA_VERSION):
        raise ShardError(
            f"{path}: shard schema version {meta[_KEY + 'schema_version']}, this spkenc reads version {SCHEMA_VERSION}"
        )
    return meta


def _audio_config(path: Path, text: str) -> AudioConfig:
    try:
        return AudioConfig.from_dict(json.loads(text))
    except (ValueError, TypeError) as error:
        raise ShardError(f"{path}: unreadable audio parameters in shard metadata ({error})") from error


def _check_audio(path: Path, found: AudioConfig, expected: Optional[AudioConfig]) -> None:
    if expected is None or found == expected:
        return
    mine, theirs = found.to_dict(), expected.to_dict()
    diff = {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
    raise ShardError(f"{path}: audio parameters differ from the expected ones (shard, expected): {diff}")


def read_shard_meta(path: Union[str, Path]) -> ShardMeta:
    """Footer metadata and per-utterance frame counts; no mel frames are read.

    Raises FileNotFoundError for a missing file and ShardError for a file that is not a
    spkenc shard or has another schema version.
    """
    path = Path(path)
    parquet = _open(path)
    meta = _footer(path, parquet)
    n_frames = parquet.read(columns=["n_frames"]).column("n_frames").to_numpy().astype(np.int32)
    return ShardMeta(
        path=path,
        speaker_id=meta[f"{_KEY}speaker_id"],
        corpus=meta.get(f"{_KEY}corpus", ""),
        n_frames=n_frames,
        audio_config=_audio_config(path, meta[f"{_KEY}audio_config"]),
        schema_version=SCHEMA_VERSION,
        mel_dtype=meta.get(f"{_KEY}mel_dtype", "float32"),
        n_row_groups=parquet.num_row_groups,
    )


def _to_frames(path: Path, column: pa.ChunkedArray, n_frames: Sequence[int], n_mels: int) -> list[np.ndarray]:
    """Split a list<fixed_size_list<float, n_mels>> column into (T_i, n_mels) float32 arrays."""
    flat = column.combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False)
    if flat.size != int(np.sum(n_frames)) * n_mels:
        raise ShardError(f"{path}: mel column holds {flat.size} values, n_frames says {int(np.sum(n_frames))} x {n_mels}")
    frames = flat.astype(np.float32, copy=False).reshape(-1, n_mels)
    return [a.copy() for a in np.split(frames, np.cumsum(n_frames)[:-1])]


def read_shard(path: Union[str, Path], expected_audio: Optional[AudioConfig] = AudioConfig()) -> Shard:
    """Read every utterance of a shard as float32; refuse it if its audio parameters differ
    from `expected_audio` (None skips that check)."""
    path = Path(path)
    parquet = _open(path)
    meta = _footer(path, parquet)
    audio = _audio_config(path, meta[f"{_KEY}audio_config"])
    _check_audio(path, audio, expected_audio)
    table = parquet.read()
    n_frames = table.column("n_frames").to_numpy()
    return Shard(
        path=path,
        speaker_id=meta[f"{_KEY}speaker_id"],
        corpus=meta.get(f"{_KEY}corpus", ""),
        utterance_ids=table.column("utterance_id").to_pylist(),
        sources=table.column("source").to_pylist(),
        mels=_to_frames(path, table.column("mel"), n_frames, audio.n_mels),
        audio_config=audio,
    )


def read_utterances(
    path: Union[str, Path], indices: Sequence[int], expected_audio: Optional[AudioConfig] = AudioConfig()
) -> list[np.ndarray]:
    """The (T, n_mels) float32 mels of rows `indices` (in that order), reading only the row
    groups that hold them. Raises IndexError naming the file for an index out of range."""
    path = Path(path)
    parquet = _open(path)
    meta = _footer(path, parquet)
    audio = _audio_config(path, meta[f"{_KEY}audio_config"])
    _check_audio(path, audio, expected_audio)
    starts = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
    n_rows = int(starts[-1])
    wanted = sorted({int(i) for i in indices})
    bad = [i for i in wanted if not 0 <= i < n_rows]
    if bad:
        raise IndexError(f"{path}: utterance index {bad} out of range for {n_rows} utterances")
    groups = sorted({int(np.searchsorted(starts, i, side="right") - 1) for i in wanted})
    table = parquet.read_row_groups(groups, columns=["n_frames", "mel"])
    first_rows = [int(starts[g]) for g in groups]
    row_of = {}
    position = 0
    for g, first in zip(groups, first_rows):
        for r in range(int(starts[g + 1] - first)):
            row_of[first + r] = position
            position += 1
    n_frames = table.column("n_frames").to_numpy()
    mels = _to_frames(path, table.column("mel"), n_frames, audio.n_mels)
    return [mels[row_of[int(i)]] for i in indices]


@dataclass
class ShardReport:
    """What the mel_shards asset checks assert, per shard file."""

    n_shards: int
    non_finite: dict[str, int]  # shard path -> utterances holding NaN/Inf frames
    without_full_partial: list[str]  # shard paths with no utterance of >= partial_n_frames frames
    short_speakers: dict[str, int]  # speaker -> usable utterances, when under utterances_per_speaker


def check_shards(
    paths: Iterable[Union[str, Path]], partial_n_frames: int = AudioConfig().partial_n_frames, utterances_per_speaker: int = 10
) -> ShardReport:
    """Read every shard in full and report non-finite frames, shards without one full partial
    and speakers with fewer usable (>= `partial_n_frames`) utterances than a batch asks for."""
    paths = [Path(p) for p in paths]
    non_finite: dict[str, int] = {}
    without, short = [], {}
    for path in paths:
        shard = read_shard(path, expected_audio=None)
        bad = sum(not np.isfinite(m).all() for m in shard.mels)
        if bad:
            non_finite[str(path)] = bad
        usable = sum(len(m) >= partial_n_frames for m in shard.mels)
        if usable == 0:
            without.append(str(path))
        if usable < utterances_per_speaker:
            short[shard.speaker_id] = usable
    return ShardReport(len(paths), non_finite, without, short)
