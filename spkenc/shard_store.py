"""The mel shards of a training run, keyed by speaker: in memory, or read on demand.

`ShardStore(paths)` checks every shard's metadata at once (audio parameters, one shard per
speaker) and serves (T, n_mels) float32 utterances and fixed-length crops of them. Small
corpora are read into memory; larger ones are read on demand through a flat cache of each
shard (`spkenc.mel_cache`), so memory stays bounded whatever the corpus size.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from spkenc.config import AudioConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeakerShard:
    """One speaker's shard: where it is and how long each utterance is (in frames)."""

    path: Path
    speaker_id: str
    corpus: str
    n_frames: np.ndarray  # (n_utterances,) int
    mel_dtype: str = "float32"  # how the shard stores its frames; reads return float32


class ShardStore:
    """The mel shards of a training run, keyed by speaker.

    All mels are read into memory when they fit `memory_budget_bytes` (float32 size).
    Otherwise they are read on demand: the first use of a shard writes a flat copy of its
    frames into a `spkenc.mel_cache.MelCache` (in `cache_dir`, default a `.cache` folder beside
    each shard), and each crop then reads exactly its frames from that copy. Where the cache
    cannot be written, the shard is read row group by row group via
    `spkenc.shards.read_utterances` (one warning names the folder). Every mode returns the same
    float32 frames, so `sample_batch` draws bit-identical batches in all of them.

    Raises ValueError when no paths are given or when two shards hold the same
    (corpus, speaker); `spkenc.shards.ShardError` when a shard's audio parameters differ
    from `audio_config`.
    """

    def __init__(
        self,
        paths: Iterable[Path],
        audio_config: AudioConfig = AudioConfig(),
        memory_budget_bytes: int = 2 * 2**30,
        cache_dir: Optional[Path] = None,
    ) -> None:
        from spkenc.mel_cache import CachedMels, MelCache
        from spkenc.shards import read_shard, read_shard_meta

        self.audio_config = audio_config
        paths = [Path(p) for p in paths]
        if not paths:
            raise ValueError("ShardStore: no shard files given")
        speakers: list[SpeakerShard] = []
        owner: dict[tuple[str, str], Path] = {}
        for path in paths:
            meta = read_shard_meta(path)
            if meta.audio_config != audio_config:
                from spkenc.shards import ShardError

                raise ShardError(
                    f"{path}: audio parameters {meta.audio_config.to_dict()} differ from the "
                    f"model's {audio_config.to_dict()}"
                )
            key = (meta.corpus, meta.speaker_id)
            if key in owner:
                raise ValueError(
                    f"{path}: speaker {meta.speaker_id!r} of corpus {meta.corpus!r} is already in "
                    f"{owner[key]}; a speaker must have exactly one shard"
                )
            owner[key] = path
            speakers.append(SpeakerShard(path, meta.speaker_id, meta.corpus, np.asarray(meta.n_frames), meta.mel_dtype))
        self.speakers: list[SpeakerShard] = speakers
        n_bytes = sum(int(s.n_frames.sum()) for s in speakers) * audio_config.n_mels * 4
        self.n_bytes = n_bytes
        self.in_memory = n_bytes <= memory_budget_bytes
        self._mels: Optional[list[list[np.ndarray]]] = None
        self._usable: dict[int, np.ndarray] = {}
        self._cache = None if self.in_memory else MelCache(cache_dir)
        self._entries: dict[int, Optional[CachedMels]] = {}
        if self.in_memory:
            self._mels = [read_shard(s.path, expected_audio=audio_config).mels for s in speakers]
        log.info(
            "%d speaker shards, %.1f MB of mels, %s",
            len(speakers),
            n_bytes / 1e6,
            "kept in memory" if self.in_memory else "read on demand",
        )

    def __len__(self) -> int:
        return len(self.speakers)

    def usable_counts(self, crop_frames: Optional[int] = None) -> np.ndarray:
        """(n_speakers,) number of utterances with at least `crop_frames` frames (default `partial_n_frames`)."""
        partial = crop_frames or self.audio_config.partial_n_frames
        if partial not in self._usable:  # sample_batch asks at every step; thousands of speakers add up
            counts = np.array([int((s.n_frames >= partial).sum()) for s in self.speakers], dtype=np.int64)
            counts.flags.writeable = False
            self._usable[partial] = counts
        return self._usable[partial]

    def utterances(self, speaker_index: int, rows: Sequence[int]) -> list[np.ndarray]:
        """The (T, n_mels) float32 mels of rows `rows` of speaker `speaker_index`'s shard."""
        if self._mels is not None:
            return [self._mels[speaker_index][r] for r in rows]
        cached = self._read_cached(speaker_index, lambda entry: entry.read_utterances(rows))
        if cached is not None:
            return cached
        from spkenc.shards import read_utterances

        unique = sorted(set(int(r) for r in rows))
        read = dict(zip(unique, read_utterances(self.speakers[speaker_index].path, unique, self.audio_config)))
        return [read[int(r)] for r in rows]

    def read_crops(
        self, speaker_index: int, rows: Sequence[int], starts: Sequence[int], n_frames: int, out: Optional[np.ndarray] = None
    ) -> np.ndarray:
        """(len(rows), n_frames, n_mels) float32: crop j is frames [starts[j], starts[j] + n_frames)
        of row rows[j] of speaker `speaker_index`'s shard; written into `out` when given.
        On demand, only those frames are read from the speaker's cache entry."""
        if out is None:
            out = np.empty((len(rows), n_frames, self.audio_config.n_mels), dtype=np.float32)
        if self._mels is None:
            if self._read_cached(speaker_index, lambda entry: entry.read_crops(rows, starts, n_frames, out)) is not None:
                return out
        for j, (utterance, start) in enumerate(zip(self.utterances(speaker_index, rows), starts)):
            out[j] = utterance[start : start + n_frames]
        return out

    def _read_cached(self, speaker_index: int, read: Callable):
        """`read(entry)` with the speaker's cache entry, built on its first use; None when the
        shard is to be read from Parquet instead. An entry deleted or truncated since it was
        checked is checked again (and so rebuilt) once."""
        from spkenc.mel_cache import MelCacheError

        for attempt in range(2):
            if speaker_index not in self._entries:
                s = self.speakers[speaker_index]
                self._entries[speaker_index] = self._cache.entry(s.path, s.n_frames, s.mel_dtype, self.audio_config.n_mels)
            entry = self._entries[speaker_index]
            if entry is None:
                return None
            try:
                return read(entry)
            except MelCacheError as error:
                if attempt:
                    raise
                log.warning("%s; checking and rebuilding the entry", error)
                del self._entries[speaker_index]
        return None
