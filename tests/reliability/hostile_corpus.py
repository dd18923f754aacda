"""The hostile corpus of the reliability suite: every bad-input case of issue 7 in one
speaker-folders corpus, next to good real speech from the committed demo corpus.

`CASES` maps a case name to its path inside the corpus and what every entry point must do
with it: "good" files are processed, the others are named rejects (`reason` is a piece of the
reject reason / error text that names the fault).
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf

REPO = Path(__file__).resolve().parents[2]
RATE = 16000
N_GOOD_SPEAKERS = 3  # real demo speakers copied whole, so every stage has shards to write


@dataclass(frozen=True)
class Case:
    name: str
    path: str  # relative to the corpus root
    good: bool
    reason: str = ""  # scan / trim reject reason or embed error (a substring), for bad cases
    stage: str = "trim"  # the pipeline stage that rejects it ("scan" or "trim")


CASES = [
    Case("zero_byte", "bad/zero_byte.wav", False, "empty file (0 bytes)", "scan"),
    Case("truncated_flac", "bad/truncated.flac", False, "truncated or corrupt"),
    Case("truncated_ogg", "bad/truncated.ogg", False, "truncated: the Ogg stream ends without its end-of-stream page", "scan"),
    Case("non_audio", "bad/not_audio.flac", False, "not a readable audio file", "scan"),
    Case("silence", "bad/silence.wav", False, "empty after trimming"),
    Case("nan_samples", "bad/nan.wav", False, "non-finite samples"),
    Case("inf_samples", "bad/inf.wav", False, "non-finite samples"),
    Case("dc_offset", "bad/dc_offset.wav", False, "empty after trimming"),
    Case("50ms", "bad/short_50ms.wav", False, "empty after trimming"),
    Case("symlink_loop", "bad/loop", False, "symlink loop", "scan"),
    Case("folder_named_like_audio", "good/folder.wav", False, "a folder named like an audio file", "scan"),
    Case("clipped", "good/clipped.wav", True),
    Case("pcm_u8", "good/pcm_u8.wav", True),
    Case("pcm_24", "good/pcm_24.flac", True),
    Case("float32", "good/float32.wav", True),
    Case("rate_8k", "good/rate_8k.wav", True),
    Case("rate_96k", "good/rate_96k.wav", True),
    Case("stereo", "good/stereo.wav", True),
    Case("six_channels", "good/six_channels.wav", True),
    Case("name_with_spaces", "good/name with spaces.flac", True),
    Case("name_non_ascii", "good/ñandú_日本語.flac", True),
    Case("inside_folder_named_like_audio", "good/folder.wav/inner.flac", True),
]
LONG_CASE = Case("one_hour", "long/one_hour.wav", True)


def speech(demo_files: list[Path], seconds: float) -> np.ndarray:
    """Real speech from the demo corpus, concatenated to at least `seconds` (16 kHz float32)."""
    parts, total = [], 0
    for path in demo_files:
        wav, _ = sf.read(path, dtype="float32")
        parts.append(wav)
        total += len(wav)
        if total >= seconds * RATE:
            break
    return np.concatenate(parts)[: int(seconds * RATE)]


def _resample(wav: np.ndarray, rate: int) -> np.ndarray:
    import soxr

    return soxr.resample(wav, RATE, rate).astype(np.float32)


def build_bad_corpus(root: Path, demo_files: list[Path], with_hour: bool) -> list[Case]:
    """Write the corpus under `root` and return its cases (good demo speakers not included)."""
    import shutil

    by_speaker: dict[str, list[Path]] = {}
    for path in demo_files:
        by_speaker.setdefault(path.parent.name, []).append(path)
    for speaker in sorted(by_speaker)[:N_GOOD_SPEAKERS]:
        (root / speaker).mkdir(parents=True)
        for path in by_speaker[speaker]:
            shutil.copy(path, root / speaker / path.name)
    for folder in ("bad", "good", "good/folder.wav"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    voice = speech(demo_files[N_GOOD_SPEAKERS * 8 :], 4.0)
    src = demo_files[N_GOOD_SPEAKERS * 8 + 8]

    (root / "bad/zero_byte.wav").write_bytes(b"")
    flac = (root / "good" / "pcm_24.flac")
    sf.write(flac, voice, RATE, subtype="PCM_24")
    (root / "bad/truncated.flac").write_bytes(flac.read_bytes()[: flac.stat().st_size // 2])
    ogg = root / "bad" / "whole.tmp_ogg"
    sf.write(ogg, voice, RATE, format="OGG", subtype="OPUS")
    (root / "bad/truncated.ogg").write_bytes(ogg.read_bytes()[: ogg.stat().st_size // 2])
    ogg.unlink()
    (root / "bad/not_audio.flac").write_text("this is a text file, not FLAC\n" * 50)
    sf.write(root / "bad/silence.wav", np.zeros(3 * RATE, np.float32), RATE, subtype="PCM_16")
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        bad = voice.copy()
        bad[RATE : RATE + 100] = value
        sf.write(root / "bad" / f"{name}.wav", bad, RATE, subtype="FLOAT")
    sf.write(root / "bad/dc_offset.wav", np.full(3 * RATE, 0.3, np.float32), RATE, subtype="PCM_16")
    sf.write(root / "bad/short_50ms.wav", voice[RATE : RATE + RATE // 20], RATE, subtype="PCM_16")
    os.symlink("..", root / "bad" / "loop")

    sf.write(root / "good/clipped.wav", np.clip(voice * 30.0, -1.0, 1.0), RATE, subtype="PCM_16")
    sf.write(root / "good/pcm_u8.wav", voice, RATE, subtype="PCM_U8")
    sf.write(root / "good/float32.wav", voice, RATE, subtype="FLOAT")
    sf.write(root / "good/rate_8k.wav", _resample(voice, 8000), 8000, subtype="PCM_16")
    sf.write(root / "good/rate_96k.wav", _resample(voice, 96000), 96000, subtype="PCM_16")
    sf.write(root / "good/stereo.wav", np.stack([voice, 0.5 * voice], axis=1), RATE, subtype="PCM_16")
    sf.write(root / "good/six_channels.wav", np.stack([voice * (k + 1) / 6 for k in range(6)], axis=1), RATE,
             subtype="PCM_16")
    shutil.copy(src, root / "good/name with spaces.flac")
    shutil.copy(src, root / "good/ñandú_日本語.flac")
    shutil.copy(src, root / "good/folder.wav/inner.flac")
    cases = list(CASES)
    if with_hour:
        (root / "long").mkdir()
        write_hour(root / LONG_CASE.path, demo_files)
        cases.append(LONG_CASE)
    return cases


def write_hour(path: Path, demo_files: list[Path]) -> None:
    """One hour of real speech (the demo files tiled), 16 kHz PCM16: 115 MB."""
    block = speech(demo_files, 60.0)
    with sf.SoundFile(path, "w", RATE, 1, subtype="PCM_16") as f:
        for _ in range(60):
            f.write(block)


def spkenc_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "spkenc", *args]


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **extra}


def leftovers(folder: Path) -> list[Path]:
    """Temporary or partial files left under `folder` (writers use `.<name>.<pid>.tmp`)."""
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".part", ".partial")) or ".tmp" in p.suffixes]


def assert_outputs_open(folder: Path) -> int:
    """Open every Parquet and WAV under `folder` in full; return how many there were."""
    n = 0
    for path in folder.rglob("*"):
        if path.suffix == ".parquet":
            pq.read_table(path)
            n += 1
        elif path.suffix == ".wav":
            wav, rate = sf.read(path, dtype="float32")
            assert rate == RATE and wav.ndim == 1 and len(wav) > 0, path
            n += 1
    return n


def find_reject(rejects: list[dict], root: Path, case: Case) -> Optional[dict]:
    target = str(root / case.path)
    return next((r for r in rejects if r["path"] == target), None)
