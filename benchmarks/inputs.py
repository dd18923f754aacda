"""Benchmark inputs made once from real speech and cached: 48 kHz copies, long concatenations.

Sources: ../shared/data (speechocean762_train, LibriSpeech) for the real runs, the committed
demo corpus for `--quick`. Every derived file is written atomically into the cache folder and
reused while it exists.
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from benchmarks.common import DEMO_DIR, SHARED_DATA, require_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sources:
    """Where the rows read speech from.

    `utterances`: folder of speaker folders for the 30-utterance sets; `long_speech`: folder
    searched recursively for the recordings that long files are concatenated from;
    `corpus`: the speaker-folder corpus of the loader and preprocessing rows;
    `demo`: the corpus of the EER check.
    """

    utterances: Path
    long_speech: Path
    corpus: Path
    demo: Path
    label: str


def shared_sources(shared: Path = SHARED_DATA) -> Sources:
    """Real speech from ../shared/data; DataMissing when a folder is absent."""
    return Sources(
        utterances=require_dir(shared / "speechocean762_train", "speechocean762 utterances"),
        long_speech=require_dir(shared / "LibriSpeech", "LibriSpeech recordings for the long files"),
        corpus=require_dir(shared / "speechocean762_train", "the corpus of the loader and preprocessing rows"),
        demo=require_dir(DEMO_DIR, "the committed demo corpus"),
        label=f"{shared} (speechocean762_train, LibriSpeech)",
    )


def demo_sources() -> Sources:
    """The committed demo corpus for every role (the `--quick` smoke run)."""
    demo = require_dir(DEMO_DIR, "the committed demo corpus")
    return Sources(demo, demo, demo, demo, f"{demo} (quick run)")


def audio_files(folder: Path) -> list[Path]:
    """Sorted audio files (flac, ogg, wav) under `folder`, recursively."""
    found = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".flac", ".ogg", ".wav"))
    if not found:
        raise FileNotFoundError(f"{folder}: no .flac/.ogg/.wav files")
    return found


def one_per_speaker(folder: Path, n: int) -> list[Path]:
    """The first utterance of each of the first `n` speaker folders (sorted), so n speakers."""
    speakers = sorted(p for p in Path(folder).iterdir() if p.is_dir())
    picked = [audio_files(s)[0] for s in speakers[:n]]
    if len(picked) < n:
        raise FileNotFoundError(f"{folder}: {len(picked)} speaker folders, {n} wanted")
    return picked


def read_mono(path: Path) -> tuple[np.ndarray, int]:
    """(float32 mono samples, sample rate) of an audio file."""
    wav, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return wav.mean(axis=1), int(rate)


def _write_wav(path: Path, wav: np.ndarray, rate: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sf.write(str(tmp), np.clip(wav, -1.0, 1.0), rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)
    return path


def resampled_copies(paths: list[Path], rate: int, cache: Path) -> list[Path]:
    """16-bit WAV copies of `paths` resampled to `rate` Hz with soxr (made once, then reused)."""
    out = []
    for i, path in enumerate(paths):
        target = cache / f"utterances_{rate}" / f"{i:03d}_{path.parent.name}_{path.stem}.wav"
        if not target.exists():
            wav, source_rate = read_mono(path)
            _write_wav(target, soxr.resample(wav, source_rate, rate), rate)
        out.append(target)
    return out


def long_file(folder: Path, seconds: float, rate: int, cache: Path) -> Path:
    """A 16-bit WAV of `seconds` of real speech at `rate` Hz: the recordings under `folder`
    concatenated in sorted order (repeated from the start if they run out), made once."""
    target = cache / f"long_{int(seconds)}s_{rate}.wav"
    if target.exists():
        return target
    parts, total, files = [], 0, audio_files(folder)
    i = 0
    while total < seconds * rate:
        wav, source_rate = read_mono(files[i % len(files)])
        wav = soxr.resample(wav, source_rate, rate) if source_rate != rate else wav
        parts.append(wav)
        total += len(wav)
        i += 1
    log.info("made %s from %d recordings", target, i)
    return _write_wav(target, np.concatenate(parts)[: int(seconds * rate)], rate)


def duration_s(path: Path) -> float:
    """Seconds of audio in a file, from its header."""
    return float(sf.info(str(path)).duration)
