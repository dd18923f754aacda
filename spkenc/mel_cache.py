"""Flat copies of mel shards, so that on-demand training reads touch only the frames a crop needs.

The Parquet shard stays the canonical format. Its mel column is nested (a list of 40-float
frames per utterance), and reading 10 utterances of one shard decodes 10 whole row groups,
about 2 ms. An entry of this cache holds the same frames as one standard `.npy` array of
shape (total_frames, n_mels), in the shard's dtype (float32 or float16), the utterances
concatenated in shard order: utterance i starts at frame `sum(n_frames[:i])`. A crop is then
one positioned read (`os.preadv`) of exactly its frames, straight into the batch array.
Nothing stays in memory between reads and no file stays open between batches. (Memory maps
kept open were measured about 1 ms per 64x10 batch faster, but hold one file descriptor per
speaker, past the usual limit of 1024 for a corpus like VoxCeleb2, and an entry truncated under
a map kills the process with SIGBUS where a read returns a short count.)

Where entries live: `<folder>/<stem>.<key>.npy`, `folder` being `.cache` beside the shard
unless one is given (then `stem` also carries a hash of the shard's folder, so that shards of
the same name from two folders do not evict each other).

The key hashes what identifies the shard's content without reading its frames: size,
mtime_ns, ctime_ns and inode, the bytes of its Parquet footer (every column chunk's offset,
size and statistics), its per-utterance frame counts, its dtype, n_mels and `CACHE_VERSION`.
spkenc rewrites a shard through `os.replace` (a new inode and ctime), so a rewritten shard gets
a new key: its entry is rebuilt and the old entry deleted. A stale entry is never read.

Writes are atomic: a temporary `.<name>.<pid>.<hex>.tmp` file in the same folder, fsync, then
`os.replace`. A killed writer leaves a temporary file (removed by the next build of that entry
once its process is gone), never half an entry under the final name; two processes building
the same entry each write their own temporary file. An entry whose header, shape, dtype or
length is wrong is named in a warning and rebuilt. Bit flips inside the frames of a complete
entry are not detected (a `.npy` has no checksum).

A folder that cannot be created or written gives one warning naming it, and `MelCache.entry`
returns None for the shards that would need a new entry there: the caller then reads those
shards from Parquet (same frames, slower). Valid entries in a read-only folder are still used.

>>> import tempfile
>>> from spkenc.shards import read_shard_meta, write_shard
>>> folder = Path(tempfile.mkdtemp())
>>> mel = np.arange(200 * 40, dtype=np.float32).reshape(200, 40)
>>> meta = read_shard_meta(write_shard(folder / "s1.parquet", "s1", [("u1", mel, "u1.flac")]))
>>> entry = MelCache().entry(meta.path, meta.n_frames, meta.mel_dtype, 40)
>>> entry.path.parent.name, entry.starts_frames
('.cache', (0, 200))
>>> crops = entry.read_crops([0, 0], [0, 30], 160)
>>> crops.shape, bool((crops[1] == mel[30:190]).all())
((2, 160, 40), True)
"""

import glob
import hashlib
import json
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from spkenc.pool import remove_dead_writer_temps
from spkenc.shards import ShardError

log = logging.getLogger(__name__)

CACHE_VERSION = 1
DEFAULT_FOLDER_NAME = ".cache"


class MelCacheError(OSError):
    """A cache entry that could not be read as its header promised (deleted or truncated since)."""


@dataclass(frozen=True)
class CachedMels:
    """One shard's cache entry: utterance i is frames [starts_frames[i], starts_frames[i + 1])
    (n_utterances + 1 ints) of the (total_frames, n_mels) array stored at byte `data_offset` of
    `path`."""

    path: Path
    data_offset: int
    dtype: np.dtype
    n_mels: int
    starts_frames: tuple[int, ...]

    def read_crops(self, rows: Sequence[int], starts: Sequence[int], n_frames: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """(len(rows), n_frames, n_mels) float32: crop j is frames [starts[j], starts[j] + n_frames)
        of utterance rows[j]. Written into `out` when given. IndexError naming the entry for a
        crop outside its utterance; MelCacheError when the entry has gone or ended early."""
        # Plain ints: for 10 crops a Python loop beats a dozen small-array numpy calls.
        bounds, row_bytes = self.starts_frames, self.n_mels * self.dtype.itemsize
        offsets = []
        for row, start in zip(rows, starts):
            row, start = int(row), int(start)
            if not 0 <= row < len(bounds) - 1:
                raise IndexError(f"{self.path}: utterance row {row} outside 0..{len(bounds) - 2}")
            if start < 0 or start + n_frames > bounds[row + 1] - bounds[row]:
                raise IndexError(
                    f"{self.path}: crop of {n_frames} frames at {start} is outside utterance {row} ({bounds[row + 1] - bounds[row]} frames)"
                )
            offsets.append(self.data_offset + (bounds[row] + start) * row_bytes)
        if out is None:
            out = np.empty((len(offsets), n_frames, self.n_mels), dtype=np.float32)
        direct = self.dtype == np.float32 and out.dtype == np.float32 and out.flags.c_contiguous
        target = out if direct else np.empty((len(offsets), n_frames, self.n_mels), dtype=self.dtype)
        view = memoryview(target).cast("B")
        crop_bytes = n_frames * row_bytes
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError as error:
            raise MelCacheError(f"{self.path}: cache entry disappeared ({error})") from error
        try:
            for j, offset in enumerate(offsets):
                got = read_at(fd, view[j * crop_bytes : (j + 1) * crop_bytes], offset)
                if got != crop_bytes:
                    raise MelCacheError(f"{self.path}: ended early ({got} of {crop_bytes} bytes of a crop at byte {offset})")
        finally:
            os.close(fd)
        if not direct:
            out[...] = target
        return out

    def read_utterances(self, rows: Sequence[int]) -> list[np.ndarray]:
        """The whole (T, n_mels) float32 frames of utterances `rows`, in that order."""
        bounds = self.starts_frames
        lengths = [bounds[int(r) + 1] - bounds[int(r)] if 0 <= int(r) < len(bounds) - 1 else 0 for r in rows]
        return [self.read_crops([r], [0], t)[0] for r, t in zip(rows, lengths)]  # a bad row: IndexError there


def preadv_into(fd: int, buffer: memoryview, offset: int) -> int:
    """Read len(buffer) bytes at byte `offset` of `fd` into `buffer`; the number of bytes read."""
    return os.preadv(fd, [buffer], offset)


def pread_into(fd: int, buffer: memoryview, offset: int) -> int:
    """`preadv_into` for systems without `os.preadv` (one extra copy)."""
    data = os.pread(fd, len(buffer), offset)
    buffer[: len(data)] = data
    return len(data)


# One system call per crop, no seek, no copy where the platform allows it.
read_at = preadv_into if hasattr(os, "preadv") else pread_into


class MelCache:
    """Finds, checks and builds the cache entries of shards; one per `ShardStore`.

    `folder`: where entries go; None means a `.cache` folder beside each shard.
    """

    def __init__(self, folder: Optional[Path] = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.unwritable: set[Path] = set()

    def folder_for(self, shard_path: Path) -> Path:
        return self.folder if self.folder is not None else Path(shard_path).parent / DEFAULT_FOLDER_NAME

    def _stem(self, shard_path: Path) -> str:
        if self.folder is None:
            return shard_path.name
        where = hashlib.sha256(str(shard_path.resolve().parent).encode()).hexdigest()[:8]
        return f"{where}-{shard_path.name}"

    def entry(self, shard_path: Path, n_frames: np.ndarray, mel_dtype: str, n_mels: int) -> Optional[CachedMels]:
        """The checked cache entry of a shard, built first when missing, stale or corrupt; None
        when it had to be built and its folder cannot be written (one warning per folder).

        `n_frames` (n_utterances,) are the frame counts the caller read from the shard's
        metadata; ShardError naming the shard when the shard now holds other counts."""
        shard_path = Path(shard_path)
        folder = self.folder_for(shard_path)
        dtype = np.dtype(mel_dtype)
        starts = (0, *np.cumsum(np.asarray(n_frames, dtype=np.int64)).tolist())
        with open(shard_path, "rb") as shard:
            key = _shard_key(shard, shard_path, n_frames, mel_dtype, n_mels)
            stem = self._stem(shard_path)
            target = folder / f"{stem}.{key}.npy"
            try:
                offset = _check_entry(target, (int(starts[-1]), n_mels), dtype)
                return CachedMels(target, offset, dtype, n_mels, starts)
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                pass  # no entry we can read: build one
            except _BadEntry as error:
                log.warning("%s: corrupt mel cache entry (%s); rebuilding it", target, error)
            if folder in self.unwritable:
                return None
            frames = _read_frames(shard, shard_path, n_frames, dtype, n_mels)
            try:
                offset = self._write(folder, stem, target, frames)
            except OSError as error:
                self.unwritable.add(folder)
                log.warning(
                    "mel cache folder %s cannot be written (%s); shards needing a new entry there are read "
                    "from Parquet on demand instead (same batches, slower)", folder, error,
                )
                return None
        return CachedMels(target, offset, dtype, n_mels, starts)

    def _write(self, folder: Path, stem: str, target: Path, frames: np.ndarray) -> int:
        """Write `frames` to `target` atomically, delete the shard's older entries; return the data offset."""
        folder.mkdir(parents=True, exist_ok=True)
        temp = folder / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            with open(temp, "wb") as out:
                np.lib.format.write_array(out, frames, allow_pickle=False)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        try:
            _remove_leftovers(folder, stem, target)
        except OSError as error:  # the new entry is in place; a leftover only costs disk space
            log.warning("%s: could not remove older cache files of this shard (%s)", folder, error)
        return os.path.getsize(target) - frames.nbytes


class _BadEntry(ValueError):
    """A cache entry whose header or length does not match what its name promises."""


def _shard_key(handle, shard_path: Path, n_frames: np.ndarray, mel_dtype: str, n_mels: int) -> str:
    """20 hex digits identifying the shard content behind the open `handle` (see the module docstring)."""
    stat = os.fstat(handle.fileno())
    if stat.st_size < 12:
        raise ShardError(f"{shard_path}: {stat.st_size} bytes, too short for a Parquet file")
    handle.seek(stat.st_size - 8)
    tail = handle.read(8)
    footer_size = int.from_bytes(tail[:4], "little")
    if tail[4:] != b"PAR1" or footer_size > stat.st_size - 12:
        raise ShardError(f"{shard_path}: not a Parquet file (no valid footer)")
    handle.seek(stat.st_size - 8 - footer_size)
    digest = hashlib.sha256(
        json.dumps([CACHE_VERSION, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, mel_dtype, n_mels]).encode()
    )
    digest.update(handle.read(footer_size))
    digest.update(np.asarray(n_frames, dtype=np.int64).tobytes())
    return digest.hexdigest()[:20]


def _check_entry(path: Path, shape: tuple[int, int], dtype: np.dtype) -> int:
    """The byte offset of the frames in the entry `path`; _BadEntry when its header or size is
    not that of a (shape) C-order `dtype` array; FileNotFoundError when there is none."""
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                found_shape, fortran, found_dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                found_shape, fortran, found_dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise _BadEntry(f"npy format version {version}")
        except (ValueError, SyntaxError, EOFError) as error:
            raise _BadEntry(f"unreadable header: {error}") from error
        offset = handle.tell()
        size = os.fstat(handle.fileno()).st_size
    if tuple(found_shape) != shape or fortran or found_dtype != dtype:
        raise _BadEntry(f"holds {found_dtype} {tuple(found_shape)}, expected {dtype} {shape}")
    expected = offset + shape[0] * shape[1] * dtype.itemsize
    if size != expected:
        raise _BadEntry(f"{size} bytes, expected {expected}")
    return offset


def _read_frames(handle, shard_path: Path, n_frames: np.ndarray, dtype: np.dtype, n_mels: int) -> np.ndarray:
    """All frames of the shard behind `handle`, (total_frames, n_mels) in its own dtype."""
    import pyarrow.parquet as pq

    handle.seek(0)
    table = pq.ParquetFile(handle).read(columns=["n_frames", "mel"])
    found = table.column("n_frames").to_numpy()
    if not np.array_equal(found, np.asarray(n_frames)):
        raise ShardError(
            f"{shard_path}: the shard changed since it was opened ({len(found)} utterances now, "
            f"{len(n_frames)} then, or other lengths); open the shards again"
        )
    flat = table.column("mel").combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False)
    if flat.dtype != dtype or flat.size != int(np.sum(n_frames)) * n_mels:
        raise ShardError(f"{shard_path}: mel column holds {flat.size} {flat.dtype} values, expected {int(np.sum(n_frames))} x {n_mels} {dtype}")
    return flat.reshape(-1, n_mels)


def _remove_leftovers(folder: Path, stem: str, keep: Path) -> None:
    """Delete the other entries of shard `stem` (older versions of the shard) and the temporary
    files of its builds whose writer process is gone (killed mid-write)."""
    entry = re.compile(re.escape(stem) + r"\.[0-9a-f]{20}\.npy")
    for other in folder.glob(glob.escape(stem) + ".*.npy"):
        if other != keep and entry.fullmatch(other.name):
            other.unlink(missing_ok=True)
            log.info("%s: removed the mel cache entry of an older version of the shard", other)
    remove_dead_writer_temps(folder, f"{stem}.")
