"""GE2E batch sampling over mel shards: N speakers x M utterances x 160-frame random partials.

A batch is a pure function of (seed, step, rank). A resumed run therefore draws exactly the
batches an uninterrupted run would have drawn, and ranks of a distributed run draw disjoint
speakers without talking to each other:

- `np.random.default_rng([seed, step])` draws ONE permutation of the eligible speakers, the
  same on every rank; rank r takes positions [r*N, (r+1)*N). No speaker appears twice in a
  batch, and no two ranks share a speaker at the same step.
- `np.random.default_rng([seed, step, rank, 1])` then picks each speaker's M utterances and
  each utterance's random 160-frame crop.

Speaker copies (`n_copies` > 1, TrainConfig.speaker_speeds): every eligible speaker enters the
permutation `n_copies` times, as different speakers; `Batch.copies` says which copy each drawn
speaker is (0: as recorded, k: played at speaker_speeds[k - 1] by `spkenc.augment`). A batch may
then hold one speaker at two speeds, as two speakers.

Single-corpus batches (`single_corpus=True`, TrainConfig.single_corpus_batches): the same
`default_rng([seed, step])` first picks one corpus, with probability proportional to its
eligible (virtual) speakers, then orders that corpus's speakers (permuted) before all others
(permuted). With enough speakers, every rank's batch is then from that one corpus; a corpus with
too few is filled up from the others.

Corpus weights (`corpus_weights`, TrainConfig.corpus_weights: corpus name -> weight, unnamed
corpora weigh 1): with single-corpus batches a corpus is picked with probability proportional to
weight x its (virtual) speakers. In mixed batches each speaker's place in the permutation is a
weighted draw without replacement (Efraimidis-Spirakis keys u ** (1 / weight) from the same
`default_rng([seed, step])`), so a speaker of weight 3 is 3 times as likely to be in a batch as
one of weight 1 while no speaker appears twice. Without weights (or all 1) the draw is unchanged.

Short-speaker policy (a speaker with fewer than M usable utterances; an utterance is usable when
it has at least `partial_n_frames` frames):
- `"exclude"` (default): the speaker is never drawn. Every batch holds M distinct utterances per
  speaker, as in RTVC, which simply skipped such speakers.
- `"repeat"`: the speaker is drawn; when it has fewer than M usable utterances, its utterances are
  drawn with replacement (each copy gets its own random crop). Speakers with no usable utterance
  are never drawn.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from spkenc.config import AudioConfig
from spkenc.shard_store import ShardStore, SpeakerShard  # noqa: F401 (their historical home)

log = logging.getLogger(__name__)

SHORT_SPEAKER_POLICIES = ("exclude", "repeat")


@dataclass(frozen=True)
class Batch:
    """One GE2E batch for one rank.

    `mels`: (N, M, partial_n_frames, n_mels) float32 mel frames.
    `speaker_indices`: (N,) indices into `ShardStore.speakers`.
    `utterance_indices`, `offsets_frames`: (N, M) the utterance row in the speaker's shard and
    the first frame of the crop.
    `copies`: (N,) which copy of each speaker was drawn (all 0 without speaker copies).
    """

    mels: np.ndarray
    speaker_indices: np.ndarray
    utterance_indices: np.ndarray
    offsets_frames: np.ndarray
    copies: np.ndarray


def eligible_speakers(usable_counts: np.ndarray, utterances_per_speaker: int, policy: str = "exclude") -> np.ndarray:
    """Indices of the speakers a batch may draw, given each speaker's usable utterance count.

    >>> eligible_speakers(np.array([10, 3, 0, 12]), 10, "exclude").tolist()
    [0, 3]
    >>> eligible_speakers(np.array([10, 3, 0, 12]), 10, "repeat").tolist()
    [0, 1, 3]
    """
    if policy not in SHORT_SPEAKER_POLICIES:
        raise ValueError(f"short_speaker_policy must be one of {SHORT_SPEAKER_POLICIES}, got {policy!r}")
    counts = np.asarray(usable_counts)
    minimum = utterances_per_speaker if policy == "exclude" else 1
    return np.flatnonzero(counts >= minimum)


def fit_batch_geometry(
    usable_counts: np.ndarray,
    speakers_per_batch: int,
    utterances_per_speaker: int,
    policy: str = "exclude",
    world_size: int = 1,
) -> tuple[int, int]:
    """Shrink (N, M) to what a small corpus can fill, speakers first.

    Keeps (N, M) when N * world_size speakers are eligible. Otherwise, under "exclude", M drops
    to the largest value that keeps as many speakers as possible (up to N * world_size), then N
    drops to the eligible speakers per rank. Under "repeat" only N drops. Raises ValueError
    when not even 2 speakers per rank with 2 usable utterances exist.

    >>> fit_batch_geometry(np.array([8] * 20), 64, 10)
    (20, 8)
    >>> fit_batch_geometry(np.array([8] * 20), 64, 10, policy="repeat")
    (20, 10)
    >>> fit_batch_geometry(np.array([12] * 200), 64, 10)
    (64, 10)
    >>> fit_batch_geometry(np.array([12] * 200), 64, 10, world_size=4)
    (50, 10)
    """
    counts = np.asarray(usable_counts)
    wanted = speakers_per_batch * world_size
    m = utterances_per_speaker
    if policy == "exclude":
        reachable = min(wanted, int((counts >= 2).sum()))
        while m > 2 and int((counts >= m).sum()) < reachable:
            m -= 1
    n = min(speakers_per_batch, len(eligible_speakers(counts, m, policy)) // world_size)
    if n < 2 or m < 2:
        raise ValueError(
            f"GE2E needs 2 speakers x 2 usable utterances per rank; the shards give {n} speakers "
            f"x {m} utterances per rank for {world_size} rank(s)"
        )
    return n, m


def require_eligible(
    store: "ShardStore",
    speakers_per_batch: int,
    utterances_per_speaker: int,
    short_speaker_policy: str,
    world_size: int,
    crop_frames: Optional[int] = None,
    n_copies: int = 1,
) -> np.ndarray:
    """Indices of the eligible speakers; ValueError with the numbers when a batch cannot be filled
    (with `n_copies` copies of each speaker counting as that many speakers)."""
    eligible = eligible_speakers(store.usable_counts(crop_frames), utterances_per_speaker, short_speaker_policy)
    needed = speakers_per_batch * world_size
    if len(eligible) * n_copies < needed:
        minimum = utterances_per_speaker if short_speaker_policy == "exclude" else 1
        copies = f" x {n_copies} copies" if n_copies > 1 else ""
        raise ValueError(
            f"{len(eligible)} of {len(store)} speakers{copies} have >= {minimum} utterances of >= "
            f"{crop_frames or store.audio_config.partial_n_frames} frames, but a batch needs {speakers_per_batch} speakers x "
            f"{world_size} rank(s) = {needed} (short_speaker_policy={short_speaker_policy!r})"
        )
    return eligible


def check_corpus_weights(store: "ShardStore", corpus_weights: Mapping[str, float]) -> None:
    """ValueError naming a weighted corpus that no training shard belongs to (a typo would
    otherwise silently weigh nothing)."""
    present = sorted({speaker.corpus for speaker in store.speakers})
    unknown = sorted(set(corpus_weights) - set(present))
    if unknown:
        raise ValueError(f"corpus_weights name {unknown}, which no training shard belongs to; the corpora are {present}")


def sample_batch(
    store: ShardStore,
    seed: int,
    step: int,
    rank: int = 0,
    world_size: int = 1,
    speakers_per_batch: int = 64,
    utterances_per_speaker: int = 10,
    short_speaker_policy: str = "exclude",
    crop_frames: Optional[int] = None,
    n_copies: int = 1,
    single_corpus: bool = False,
    corpus_weights: Optional[Mapping[str, float]] = None,
) -> Batch:
    """Draw rank `rank`'s batch for optimizer step `step` (a pure function of seed, step, rank).

    Returns a `Batch` whose `mels` is (N, M, crop_frames, n_mels) float32, crop_frames defaulting
    to the audio config's partial_n_frames. See the module docstring for the draw, the speaker
    copies, single-corpus batches, corpus weights and the short-speaker policy. Raises ValueError
    when fewer than N * world_size speakers are eligible, naming both numbers.
    """
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be non-negative, got seed={seed}, step={step}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if n_copies < 1:
        raise ValueError(f"n_copies must be at least 1, got {n_copies}")
    n, m = speakers_per_batch, utterances_per_speaker
    partial = crop_frames or store.audio_config.partial_n_frames
    eligible = require_eligible(store, n, m, short_speaker_policy, world_size, partial, n_copies)
    # Virtual speaker v is copy v // E of eligible speaker v % E. With one copy and no corpus
    # pick this is RTVC's draw: permuting the indices permutes `eligible` the same way.
    draw = np.random.default_rng([seed, step])
    virtual = np.arange(len(eligible) * n_copies)
    weights = {name: w for name, w in (corpus_weights or {}).items() if w != 1.0}
    if single_corpus or weights:
        corpora = np.array([store.speakers[s].corpus for s in eligible])[virtual % len(eligible)]
    if single_corpus:
        names, counts = np.unique(corpora, return_counts=True)
        mass = counts * np.array([weights.get(name, 1.0) for name in names])
        picked = names[draw.choice(len(names), p=mass / mass.sum())]
        virtual = np.concatenate([draw.permutation(virtual[corpora == picked]), draw.permutation(virtual[corpora != picked])])
    elif weights:
        speaker_weights = np.array([weights.get(name, 1.0) for name in corpora])
        virtual = virtual[np.argsort(-draw.random(len(virtual)) ** (1.0 / speaker_weights), kind="stable")]
    else:
        virtual = draw.permutation(virtual)
    order, copy_order = eligible[virtual % len(eligible)], virtual // len(eligible)
    chosen = order[rank * n : (rank + 1) * n]
    copies = copy_order[rank * n : (rank + 1) * n].astype(np.int64)
    rng = np.random.default_rng([seed, step, rank, 1])
    mels = np.empty((n, m, partial, store.audio_config.n_mels), dtype=np.float32)
    rows_out = np.empty((n, m), dtype=np.int64)
    offsets = np.empty((n, m), dtype=np.int64)
    for i, speaker in enumerate(chosen):
        n_frames = store.speakers[speaker].n_frames
        usable = np.flatnonzero(n_frames >= partial)
        rows = rng.choice(usable, size=m, replace=len(usable) < m)
        starts = rng.integers(0, n_frames[rows] - partial + 1)
        store.read_crops(int(speaker), rows, starts, partial, out=mels[i])
        rows_out[i], offsets[i] = rows, starts
    return Batch(mels, chosen.astype(np.int64), rows_out, offsets, copies)


def shards_for_split(shard_dir: Path, manifest_path: Path, split: str = "train") -> list[Path]:
    """The shards in `shard_dir` whose speaker is in `split` in the corpus manifest.

    A speaker is identified by the shard's `spkenc.speaker_id` metadata, not the file name.
    Raises FileNotFoundError naming the manifest or shard folder when one is missing.
    """
    import pyarrow.parquet as pq

    from spkenc.shards import read_shard_meta

    if not Path(manifest_path).is_file():
        raise FileNotFoundError(f"{manifest_path}: corpus manifest not found (materialize raw_corpus first)")
    if not Path(shard_dir).is_dir():
        raise FileNotFoundError(f"{shard_dir}: mel shard folder not found (materialize mel_shards first)")
    table = pq.read_table(manifest_path, columns=["speaker_id", "split"]).to_pydict()
    in_split = {s for s, sp in zip(table["speaker_id"], table["split"]) if sp == split}
    paths = sorted(p for p in Path(shard_dir).glob("*.parquet") if not p.name.startswith("."))
    return [p for p in paths if read_shard_meta(p).speaker_id in in_split]


def find_shards(paths: Iterable[Path]) -> list[Path]:
    """Expand folders into their `*.parquet` files (recursively, hidden files skipped), sorted.

    Raises FileNotFoundError naming a path that does not exist, ValueError when nothing is found.
    """
    paths = [Path(p) for p in paths]
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            for p in sorted(path.rglob("*.parquet")):
                if not any(part.startswith(".") for part in p.relative_to(path).parts):
                    found.append(p)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such shard file or folder")
    if not found:
        raise ValueError(f"no *.parquet mel shards under {[str(p) for p in paths]}")
    return found


@dataclass(frozen=True)
class ProbeSet:
    """Fixed held-out partials: `mels` (P, partial_n_frames, n_mels) float32, `labels` P speaker ids."""

    mels: np.ndarray
    labels: list[str]


def probe_partials(
    paths: Sequence[Path], audio_config: AudioConfig = AudioConfig(), n_speakers: int = 10, n_utterances: int = 10
) -> Optional[ProbeSet]:
    """The centre partial of the first `n_utterances` usable utterances of the first `n_speakers`
    shards (sorted by path): the same probe set at every step. None when no utterance is usable."""
    from spkenc.shards import read_shard

    partial = audio_config.partial_n_frames
    mels, labels = [], []
    for path in sorted(Path(p) for p in paths)[:n_speakers]:
        shard = read_shard(path, expected_audio=audio_config)
        for mel in [m for m in shard.mels if len(m) >= partial][:n_utterances]:
            start = (len(mel) - partial) // 2
            mels.append(mel[start : start + partial])
            labels.append(shard.speaker_id)
    if not mels:
        log.warning("no probe utterance has %d frames; no UMAP will be drawn", partial)
        return None
    return ProbeSet(np.stack(mels).astype(np.float32), labels)


def drop_heldout(shard_paths: Sequence[Path], manifest_paths: Sequence[Path]) -> tuple[list[Path], int]:
    """The shards whose (corpus, speaker) is not held out in any of the corpus manifests, and
    how many were dropped. A speaker that no manifest lists is kept.

    This gives `spkenc train` the pipeline's train split: the `split` column of the manifests
    that `raw_corpus` writes. Raises FileNotFoundError naming a missing manifest.
    """
    import pyarrow.parquet as pq

    from spkenc.shards import read_shard_meta

    heldout: set[tuple[str, str]] = set()
    for manifest in manifest_paths:
        if not Path(manifest).is_file():
            raise FileNotFoundError(f"{manifest}: corpus manifest not found")
        table = pq.read_table(manifest, columns=["corpus", "speaker_id", "split"]).to_pydict()
        heldout |= {(c, s) for c, s, sp in zip(table["corpus"], table["speaker_id"], table["split"]) if sp == "heldout"}
    kept = []
    for path in shard_paths:
        meta = read_shard_meta(path)
        if (meta.corpus, meta.speaker_id) not in heldout:
            kept.append(Path(path))
    return kept, len(shard_paths) - len(kept)
