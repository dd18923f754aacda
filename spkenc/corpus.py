"""Corpora: the registry (corpora.yaml), layout scanners and the stable held-out split.

A scan walks a corpus root in one of `LAYOUTS`, reads each audio file's header (no decoding)
through `spkenc.audio.read_audio_info`, and returns manifest rows and rejects. A bad file
never stops a scan: it becomes a reject with a reason. A bad argument (unknown layout,
missing root, unknown option) raises at once.

Manifest rows (`MANIFEST_SCHEMA`): corpus, speaker_id, utterance_id (unique within a
speaker and safe as a file name), path (absolute), format, sample_rate (Hz), channels,
n_frames, duration_s, bytes, mtime_ns and split ("train" or "heldout").
"""

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import pyarrow as pa

from spkenc.config import DataConfig
from spkenc.layouts import AUDIO_EXTENSIONS, LAYOUT_OPTIONS, LAYOUTS, Candidate, detect_layout, find_candidates

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ROLES = ("train", "eval")
SPLITS = ("train", "heldout")

MANIFEST_SCHEMA = pa.schema(
    [
        ("corpus", pa.string()),
        ("speaker_id", pa.string()),
        ("utterance_id", pa.string()),
        ("path", pa.string()),
        ("format", pa.string()),
        ("sample_rate", pa.int32()),
        ("channels", pa.int32()),
        ("n_frames", pa.int64()),
        ("duration_s", pa.float64()),
        ("bytes", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("split", pa.string()),
    ]
)
REJECTS_SCHEMA = pa.schema([("path", pa.string()), ("stage", pa.string()), ("reason", pa.string())])

__all__ = [
    "AUDIO_EXTENSIONS", "LAYOUTS", "LAYOUT_OPTIONS", "MANIFEST_SCHEMA", "REJECTS_SCHEMA", "CorpusSpec", "ScanResult",
    "default_registry_path", "detect_layout", "heldout_score", "load_registry", "scan_corpus", "speaker_split",
    "write_rejects",
]


def heldout_score(corpus: str, speaker_id: str) -> float:
    """A stable number in [0, 1) for (corpus, speaker): the first 60 bits of their SHA-1.

    It never depends on the other speakers, so adding speakers never moves one.

    >>> heldout_score("demo_tiny", "so0006") == heldout_score("demo_tiny", "so0006")
    True
    >>> 0.0 <= heldout_score("demo_tiny", "so0006") < 1.0
    True
    """
    digest = hashlib.sha1(f"{corpus}\0{speaker_id}".encode("utf-8")).hexdigest()
    return int(digest[:15], 16) / 16**15


def speaker_split(corpus: str, speaker_id: str, heldout_fraction: float, role: str = "train") -> str:
    """"heldout" when the corpus is for evaluation only or the speaker's score falls under
    `heldout_fraction`, else "train".

    >>> speaker_split("c", "s", 0.0), speaker_split("c", "s", 1.0), speaker_split("c", "s", 0.0, role="eval")
    ('train', 'heldout', 'heldout')
    """
    if role == "eval":
        return "heldout"
    return "heldout" if heldout_score(corpus, speaker_id) < heldout_fraction else "train"


@dataclass
class ScanResult:
    """Manifest rows (dicts with MANIFEST_SCHEMA's keys) and rejects (path, stage, reason)."""

    corpus: str
    layout: str
    rows: list[dict[str, Any]]
    rejects: list[dict[str, str]]
    excluded_speakers: list[str] = field(default_factory=list)

    def manifest_table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=MANIFEST_SCHEMA)

    def rejects_table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rejects, schema=REJECTS_SCHEMA)

    @property
    def n_speakers(self) -> int:
        return len({r["speaker_id"] for r in self.rows})

    def speakers_in(self, split: str) -> list[str]:
        return sorted({r["speaker_id"] for r in self.rows if r["split"] == split})

    def write(self, manifest_path: Union[str, Path], rejects_path: Union[str, Path]) -> Path:
        """Write the manifest and the scan rejects as Parquet (atomically); return the manifest."""
        from spkenc.shards import write_table_atomic

        write_rejects(self.rejects, rejects_path)
        return write_table_atomic(self.manifest_table(), manifest_path)


def write_rejects(rejects: list[dict[str, str]], path: Union[str, Path]) -> Path:
    """Write rejects (path, stage, reason) as Parquet, atomically."""
    from spkenc.shards import write_table_atomic

    return write_table_atomic(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), path)


def _reason(error: BaseException, path: Path) -> str:
    """The error's message without the leading path (the rejects table has its own column)."""
    text = str(error)
    for prefix in (f"{path}: ", f"{path}:"):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


def _read_row(candidate: Candidate, corpus: str, split: str) -> dict[str, Any]:
    from spkenc.audio import read_audio_info

    info = read_audio_info(candidate.path)
    stat = os.stat(candidate.path)
    return {
        "corpus": corpus,
        "speaker_id": candidate.speaker_id,
        "utterance_id": candidate.utterance_id,
        "path": str(candidate.path),
        "format": info.format,
        "sample_rate": int(info.sample_rate_hz),
        "channels": int(info.channels),
        "n_frames": int(info.n_frames),
        "duration_s": float(info.duration_s),
        "bytes": int(stat.st_size),
        "mtime_ns": int(stat.st_mtime_ns),
        "split": split,
    }


def scan_corpus(
    root: Union[str, Path],
    layout: str = "auto",
    corpus: str = "",
    options: Optional[Mapping[str, Any]] = None,
    heldout_fraction: float = DataConfig().heldout_fraction,
    role: str = "train",
    progress: Optional[Callable[[int, int], None]] = None,
) -> ScanResult:
    """Scan `root` (a folder, or a CSV/TSV file for the manifest layout) and read every header.

    `corpus` names the corpus in the rows and the split hash (default: the root's name).
    `progress(done, total)` is called after each header. Raises FileNotFoundError when the
    root is missing and ValueError for an unknown layout, role or option.
    """
    root = Path(root).expanduser().absolute()
    if not root.exists():
        raise FileNotFoundError(f"{root}: corpus root not found")
    if role not in ROLES:
        raise ValueError(f"{root}: role must be one of {ROLES}, got {role!r}")
    DataConfig(heldout_fraction=heldout_fraction)  # validates the range
    corpus = corpus or root.stem
    if layout == "auto":
        layout = detect_layout(root)
        log.info("%s: detected layout %s", root, layout)
    if layout not in LAYOUTS:
        raise ValueError(f"{root}: unknown layout {layout!r}; known layouts: {list(LAYOUTS)}")
    options = dict(options or {})
    unknown = sorted(set(options) - LAYOUT_OPTIONS[layout])
    if unknown:
        raise ValueError(f"{root}: unknown option(s) {unknown} for layout {layout}; known: {sorted(LAYOUT_OPTIONS[layout])}")

    found = find_candidates(root, layout, options)
    rejects = [{"path": str(p), "stage": "scan", "reason": r} for p, r in found.rejects]
    rows: list[dict[str, Any]] = []
    splits: dict[str, str] = {}
    for done, candidate in enumerate(found.candidates, start=1):
        split = splits.setdefault(
            candidate.speaker_id, speaker_split(corpus, candidate.speaker_id, heldout_fraction, role)
        )
        try:
            rows.append(_read_row(candidate, corpus, split))
        except (ValueError, OSError) as error:  # AudioError is a ValueError
            rejects.append({"path": str(candidate.path), "stage": "scan", "reason": _reason(error, candidate.path)})
        if progress is not None:
            progress(done, len(found.candidates))
    log.info("%s: %d files, %d speakers, %d rejects", corpus, len(rows), len({r["speaker_id"] for r in rows}), len(rejects))
    return ScanResult(corpus, layout, rows, rejects, found.excluded_speakers)


@dataclass(frozen=True)
class CorpusSpec:
    """One registered corpus: name (the Dagster partition key), root, layout, role, options."""

    name: str
    root: Path
    layout: str = "auto"
    role: str = "train"
    heldout_fraction: float = DataConfig().heldout_fraction
    options: Mapping[str, Any] = field(default_factory=dict)

    def scan(self, progress: Optional[Callable[[int, int], None]] = None, heldout_fraction: Optional[float] = None) -> ScanResult:
        fraction = self.heldout_fraction if heldout_fraction is None else heldout_fraction
        return scan_corpus(self.root, self.layout, self.name, self.options, fraction, self.role, progress)


_SPEC_KEYS = {"root", "layout", "role", "heldout_fraction", "options"}


def default_registry_path() -> Path:
    """$SPKENC_CORPORA, else `<project root>/corpora.yaml`."""
    return Path(os.environ.get("SPKENC_CORPORA") or PROJECT_ROOT / "corpora.yaml").expanduser().absolute()


def load_registry(path: Optional[Union[str, Path]] = None) -> dict[str, CorpusSpec]:
    """Parse a registry YAML: `corpora: {name: {root, layout, role, heldout_fraction, options}}`.

    Relative roots resolve against the YAML's folder. Names must be usable as partition keys
    and file names (letters, digits, `_`, `-`, `.`). Raises FileNotFoundError for a missing
    file and ValueError naming the file and the corpus for anything malformed.
    """
    import re

    import yaml

    path = Path(path).expanduser().absolute() if path else default_registry_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: corpus registry not found (set SPKENC_CORPORA to another file)")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(document, dict) or set(document) != {"corpora"} or not isinstance(document["corpora"], dict):
        raise ValueError(f"{path}: expected one top-level key 'corpora' mapping names to corpus entries")
    specs: dict[str, CorpusSpec] = {}
    for name, entry in document["corpora"].items():
        where = f"{path}: corpus {name!r}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"{where}: names may hold only letters, digits, '_', '-' and '.'")
        if not isinstance(entry, dict) or "root" not in entry:
            raise ValueError(f"{where}: expected a mapping with at least 'root'")
        unknown = sorted(set(entry) - _SPEC_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(_SPEC_KEYS)}")
        layout, role = entry.get("layout", "auto"), entry.get("role", "train")
        if layout != "auto" and layout not in LAYOUTS:
            raise ValueError(f"{where}: unknown layout {layout!r}; known layouts: {['auto', *LAYOUTS]}")
        if role not in ROLES:
            raise ValueError(f"{where}: role must be one of {ROLES}, got {role!r}")
        options = entry.get("options") or {}
        if not isinstance(options, dict):
            raise ValueError(f"{where}: options must be a mapping")
        if layout != "auto":
            bad = sorted(set(options) - LAYOUT_OPTIONS[layout])
            if bad:
                raise ValueError(f"{where}: unknown option(s) {bad} for layout {layout}")
        try:
            fraction = DataConfig(heldout_fraction=float(entry.get("heldout_fraction", DataConfig().heldout_fraction)))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from error
        root = Path(str(entry["root"])).expanduser()
        root = root if root.is_absolute() else path.parent / root
        specs[name] = CorpusSpec(name, Path(os.path.normpath(root)), layout, role, fraction.heldout_fraction, options)
    return specs
