"""Corpus layouts: where the audio files are and which speaker each belongs to.

- `librispeech`: `[<split>/]<spk>/<chapter>/<spk>-<chapter>-<n>.flac` (transcripts optional).
- `voxceleb1`: `wav/<id>/<video>/<n>.wav` with `vox1_meta.csv`; option `nationalities`
  (a list, or "anglophone" for RTVC's set) keeps only those speakers.
- `voxceleb2`: `<subset>/aac/<id>/<video>/<n>.m4a`, option `subsets` (default ["dev"]).
- `speaker_folders`: `<spk>/**/<file>` in any supported audio format.
- `manifest`: a CSV/TSV file with path and speaker columns; relative paths resolve against the
  file's folder, and paths outside it are refused unless `allow_outside_root: true`.

Walks follow folder symlinks but never twice into one folder (a symlink loop becomes a reject),
skip hidden names, and never crash on odd entries.
"""

import csv
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

log = logging.getLogger(__name__)

LAYOUTS = ("librispeech", "voxceleb1", "voxceleb2", "speaker_folders", "manifest")
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a", ".aac", ".mp4", ".webm"})
LAYOUT_OPTIONS: dict[str, frozenset[str]] = {
    "librispeech": frozenset({"splits"}),
    "voxceleb1": frozenset({"nationalities", "meta_file"}),
    "voxceleb2": frozenset({"subsets"}),
    "speaker_folders": frozenset(),
    "manifest": frozenset({"file", "path_column", "speaker_column", "utterance_column", "delimiter", "allow_outside_root"}),
}
# RTVC's encoder_preprocess.py keeps these VoxCeleb1 nationalities.
ANGLOPHONE = ("australia", "canada", "ireland", "uk", "usa")
_LIBRI_NAME = re.compile(r"(\d+)-(\d+)-(\d+)")


@dataclass(frozen=True)
class Candidate:
    speaker_id: str
    utterance_id: str
    path: Path


@dataclass
class Found:
    candidates: list[Candidate] = field(default_factory=list)
    rejects: list[tuple[Path, str]] = field(default_factory=list)
    excluded_speakers: list[str] = field(default_factory=list)

    def add(self, speaker_id: str, utterance_id: str, path: Path) -> None:
        for name, kind in ((speaker_id, "speaker"), (utterance_id, "utterance")):
            problem = _name_problem(name)
            if problem:
                self.rejects.append((path, f"unusable {kind} id {name!r}: {problem}"))
                return
        self.candidates.append(Candidate(speaker_id, utterance_id, path))


def _name_problem(name: str) -> str:
    """Why `name` cannot be a file name for trimmed wavs and shards ('' when it can)."""
    if not name.strip():
        return "empty"
    if name.startswith("."):
        return "starts with '.'"
    if any(c in name for c in "/\\\0"):
        return "holds a path separator"
    if len(name.encode("utf-8")) > 200:
        return "longer than 200 bytes"
    return ""


def is_audio_name(name: str) -> bool:
    return Path(name).suffix.lower() in AUDIO_EXTENSIONS


def walk_audio(root: Path, found: Found) -> Iterator[Path]:
    """Audio files under `root`, sorted, following folder symlinks once per real folder."""
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            stat = os.stat(folder)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            found.rejects.append((folder, f"cannot list folder: {error.strerror or error}"))
            continue
        if (stat.st_dev, stat.st_ino) in seen:
            found.rejects.append((folder, "symlink loop: this folder was already scanned"))
            continue
        seen.add((stat.st_dev, stat.st_ino))
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if is_audio_name(entry.name):
                    found.rejects.append((Path(entry.path), "a folder named like an audio file (its contents are scanned)"))
                subfolders.append(Path(entry.path))
            elif is_audio_name(entry.name):
                yield Path(entry.path)
        stack.extend(reversed(subfolders))


def detect_layout(root: Path) -> str:
    """Guess a root's layout from its files. Raises ValueError when nothing fits.

    A CSV/TSV file is a manifest; `wav/` + `vox1_meta.csv` is VoxCeleb1; `<subset>/aac/` is
    VoxCeleb2; `<spk>/<chapter>/<spk>-<chapter>-<n>.flac` (one level deeper with splits) is
    LibriSpeech; any other folder of folders is speaker folders.
    """
    if root.is_file():
        if root.suffix.lower() in (".csv", ".tsv"):
            return "manifest"
        raise ValueError(f"{root}: a file that is not a .csv/.tsv manifest cannot be a corpus root")
    if (root / "wav").is_dir() and (root / "vox1_meta.csv").is_file():
        return "voxceleb1"
    if (root / "aac").is_dir() or any((root / s / "aac").is_dir() for s in ("dev", "test")):
        return "voxceleb2"
    for path in walk_audio(root, Found()):
        parts = path.relative_to(root).parts
        match = _LIBRI_NAME.fullmatch(Path(parts[-1]).stem)
        if len(parts) in (3, 4) and match and match.group(1, 2) == parts[-3:-1]:
            return "librispeech"
        break
    if any(p.is_dir() for p in root.iterdir()):
        return "speaker_folders"
    raise ValueError(f"{root}: cannot detect a layout (no speaker folders or manifest); pass one of {list(LAYOUTS)}")


def _librispeech(root: Path, options: Mapping[str, Any], found: Found) -> None:
    splits = options.get("splits")
    for path in walk_audio(root, found):
        parts = path.relative_to(root).parts
        match = _LIBRI_NAME.fullmatch(path.stem)
        if not (len(parts) in (3, 4) and match and match.group(1, 2) == parts[-3:-1]):
            found.rejects.append((path, "not in the LibriSpeech layout <split>/<spk>/<chapter>/<spk>-<chapter>-<n>.flac"))
        elif splits is None or (len(parts) == 4 and parts[0] in splits):
            found.add(parts[-3], path.stem, path)


def _voxceleb(base: Path, found: Found, keep: Any = None) -> None:
    for path in walk_audio(base, found):
        parts = path.relative_to(base).parts
        if len(parts) != 3:
            found.rejects.append((path, "not in the VoxCeleb layout <id>/<video>/<n>.<ext>"))
        elif keep is None or parts[0] in keep:
            found.add(parts[0], f"{parts[1]}_{path.stem}", path)
        elif parts[0] not in found.excluded_speakers:
            found.excluded_speakers.append(parts[0])


def _voxceleb1_speakers(root: Path, options: Mapping[str, Any]) -> Any:
    """The VoxCeleb1 ids whose nationality passes the filter (None: no filter)."""
    wanted = options.get("nationalities")
    if wanted is None:
        return None
    wanted = ANGLOPHONE if wanted == "anglophone" else tuple(str(n).lower() for n in wanted)
    meta = root / options.get("meta_file", "vox1_meta.csv")
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: VoxCeleb1 metadata not found (needed by the nationality filter)")
    with open(meta, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t" if "\t" in f.readline() else ","))
    # vox1_meta.csv columns: VoxCeleb1 ID, VGGFace1 ID, Gender, Nationality, Set
    return {r[0].strip() for r in rows if len(r) > 3 and r[3].strip().lower() in wanted}


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop, rejected later as not found
        return path.absolute().is_relative_to(folder)


def _manifest(root: Path, options: Mapping[str, Any], found: Found) -> None:
    table = root if root.is_file() else root / options.get("file", "manifest.csv")
    if not table.is_file():
        raise FileNotFoundError(f"{table}: manifest file not found")
    base = table.parent.resolve()
    corpus_root = root.resolve() if root.is_dir() else base
    delimiter = options.get("delimiter") or ("\t" if table.suffix.lower() == ".tsv" else ",")
    with open(table, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = reader.fieldnames or []

        def column(option: str, names: tuple[str, ...], required: bool = True) -> Any:
            name = options.get(option) or next((n for n in names if n in columns), None)
            if required and name not in columns:
                raise ValueError(f"{table}: no {option.split('_')[0]} column (looked for {options.get(option) or names}; found {columns})")
            return name

        path_col = column("path_column", ("path", "file", "filename", "audio", "wav"))
        speaker_col = column("speaker_column", ("speaker_id", "speaker", "spk"))
        utt_col = column("utterance_column", ("utterance_id", "utterance", "utt"), required=False)
        listed: set[Path] = set()
        for line, row in enumerate(reader, start=2):
            raw = (row.get(path_col) or "").strip()
            path = Path(os.path.normpath(base / Path(raw).expanduser())) if raw else table
            where = f"line {line}"
            if not raw:
                found.rejects.append((table, f"{where}: empty path"))
            elif not options.get("allow_outside_root") and not _inside(path, corpus_root):
                found.rejects.append((path, f"{where}: outside the corpus root {corpus_root} (set allow_outside_root: true)"))
            elif path.is_dir():
                found.rejects.append((path, f"{where}: a folder, not an audio file"))
            elif not path.is_file():
                found.rejects.append((path, f"{where}: file not found"))
            elif path in listed:
                found.rejects.append((path, f"{where}: listed twice"))
            else:
                listed.add(path)
                utterance = (row.get(utt_col) or "").strip() if utt_col else ""
                found.add((row.get(speaker_col) or "").strip(), utterance or path.stem, path)


def _speaker_folders(root: Path, found: Found) -> None:
    for path in walk_audio(root, found):
        parts = path.relative_to(root).parts
        if len(parts) < 2:
            found.rejects.append((path, "an audio file outside any speaker folder"))
        else:
            found.add(parts[0], "__".join([*parts[1:-1], path.stem]), path)


def _dedupe(found: Found) -> None:
    """Keep (speaker, utterance) unique: same-named files in two formats keep their suffix."""
    counts: dict[tuple[str, str], int] = {}
    for c in found.candidates:
        counts[(c.speaker_id, c.utterance_id)] = counts.get((c.speaker_id, c.utterance_id), 0) + 1
    unique, taken = [], set()
    for c in found.candidates:
        key = (c.speaker_id, c.utterance_id)
        if counts[key] > 1:
            key = (c.speaker_id, f"{c.utterance_id}_{c.path.suffix.lstrip('.').lower()}")
        if key in taken:
            found.rejects.append((c.path, f"duplicate utterance id {key[1]!r} for speaker {key[0]!r}"))
            continue
        taken.add(key)
        unique.append(Candidate(key[0], key[1], c.path))
    found.candidates = unique


def find_candidates(root: Path, layout: str, options: Mapping[str, Any]) -> Found:
    """The (speaker, utterance, path) candidates of `root` in `layout`, and the rejected paths."""
    found = Found()
    if layout != "manifest" and not root.is_dir():
        raise ValueError(f"{root}: layout {layout} needs a folder")
    if layout == "librispeech":
        _librispeech(root, options, found)
    elif layout == "voxceleb1":
        if not (root / "wav").is_dir():
            raise ValueError(f"{root}: no wav/ folder for the voxceleb1 layout")
        _voxceleb(root / "wav", found, _voxceleb1_speakers(root, options))
    elif layout == "voxceleb2":
        bases = [root / s / "aac" for s in options.get("subsets", ["dev"])] if (root / "dev").is_dir() or "subsets" in options else [root / "aac"]
        if not any(b.is_dir() for b in bases):
            raise ValueError(f"{root}: no {[str(b.relative_to(root)) for b in bases]} folder for the voxceleb2 layout")
        for base in bases:
            if base.is_dir():
                _voxceleb(base, found)
    elif layout == "speaker_folders":
        _speaker_folders(root, found)
    elif layout == "manifest":
        _manifest(root, options, found)
    else:
        raise ValueError(f"{root}: unknown layout {layout!r}; known layouts: {list(LAYOUTS)}")
    _dedupe(found)
    if found.excluded_speakers:
        log.info("%s: %d speakers left out by the nationality filter", root, len(found.excluded_speakers))
    return found
