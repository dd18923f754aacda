"""Row on the data pipeline: `trimmed_wavs` + `mel_shards` library code, 2 workers vs 1.

Each timed run starts from empty output folders (the stages are incremental and would otherwise
skip everything), runs `spkenc.preprocess.trim_corpus` then `build_mel_shards` with the same
worker count, and counts source utterances per second. The corpus scan (`raw_corpus`) is done
once, untimed. The "peer" is the same code with 1 worker.
"""

import logging
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import RowResult, Settings, Timing
from benchmarks.rows_audio import sources_for

log = logging.getLogger(__name__)


def preprocess_once(manifest, corpus: str, work: Path, workers: int) -> tuple[int, int]:
    """trim_corpus + build_mel_shards into fresh folders under `work`; (kept sources, shards)."""
    from spkenc.preprocess import build_mel_shards, trim_corpus

    out = Path(tempfile.mkdtemp(dir=work))
    try:
        trimmed = trim_corpus(manifest, out / "trimmed", workers=workers)
        shards = build_mel_shards(out / "trimmed", out / "mels", corpus=corpus, workers=workers)
        return trimmed.n_kept, shards.n_speakers
    finally:
        shutil.rmtree(out)


def pipeline_rows(settings: Settings) -> list[RowResult]:
    from spkenc.corpus import scan_corpus

    corpus_root = sources_for(settings).corpus
    scan = scan_corpus(corpus_root, layout="speaker_folders", corpus=corpus_root.name)
    manifest = scan.manifest_table()
    n_sources = manifest.num_rows
    hours = sum(manifest.column("duration_s").to_pylist()) / 3600
    work = settings.cache / "pipeline"
    work.mkdir(parents=True, exist_ok=True)
    for _ in range(settings.n_warmup):  # warms the page cache and the workers' imports
        preprocess_once(manifest, corpus_root.name, work, 2)
    # Whole-corpus runs are long: one fewer timed run than the other rows, alternating 1 and 2
    # workers so that a change in the machine's load hits both alike.
    n_runs = max(1, settings.n_runs - 1)
    runs: dict[int, list[float]] = {1: [], 2: []}
    outcome = {}
    for _ in range(n_runs):
        for workers in (1, 2):
            started = time.perf_counter()
            outcome[workers] = preprocess_once(manifest, corpus_root.name, work, workers)
            runs[workers].append(time.perf_counter() - started)
    timings = {w: Timing(tuple(r)) for w, r in runs.items()}
    one, two = timings[1].median_s, timings[2].median_s
    row = RowResult(
        f"trimmed_wavs + mel_shards, {corpus_root.name} ({n_sources} files, {hours:.1f} h), 2 workers vs 1",
        "pipeline", n_sources / two, n_sources / one, "utt/s", "higher", target_ratio=1.8, target_text=">= 1.8x",
    )
    row.checks["same output"] = (
        outcome[1] == outcome[2],
        f"kept sources, shards: 1 worker {outcome[1]}, 2 workers {outcome[2]}",
    )
    row.notes.append(f"median {one:.1f} s with 1 worker, {two:.1f} s with 2 ({n_runs} run(s) each); each worker runs 1 thread")
    return [row]
