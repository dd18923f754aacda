"""Preprocessing throughput with 1 and 2 worker processes: utterances per second and cores kept busy.

    python -m benchmarks.bench_preprocess [--corpus ROOT] [--runs N] [--workers 1 2]

Each run trims and shards the corpus into empty folders (the stages are incremental and would
otherwise skip everything). The corpus is ../shared/data/speechocean762_train when present, else
the committed demo corpus. "cores busy" is the workers' CPU seconds over the wall time: with 2
workers on 2 free cores it should be near 2. The machine may be shared: compare runs made together.
"""

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from spkenc.corpus import scan_corpus  # noqa: E402
from spkenc.preprocess import build_mel_shards, trim_corpus  # noqa: E402


def default_corpus() -> Path:
    shared = REPO.parent / "shared" / "data" / "speechocean762_train"
    return shared if shared.is_dir() else REPO / "data" / "demo_tiny"


def run_once(manifest, corpus: str, workers: int) -> tuple[float, float]:
    """(wall seconds, worker CPU seconds) for trim + shards into fresh folders."""
    out = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    try:
        started = time.perf_counter()
        trimmed = trim_corpus(manifest, out / "trimmed", workers=workers)
        shards = build_mel_shards(out / "trimmed", out / "mels", corpus=corpus, workers=workers)
        return time.perf_counter() - started, trimmed.worker_cpu_s + shards.worker_cpu_s
    finally:
        shutil.rmtree(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=default_corpus(), help="speaker-folder corpus (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=2, help="timed runs per worker count; the median is shown")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    scan = scan_corpus(args.corpus, corpus=args.corpus.name)
    manifest = scan.manifest_table()
    n_utterances = manifest.num_rows
    hours = sum(manifest.column("duration_s").to_pylist()) / 3600
    print(f"corpus: {args.corpus} ({n_utterances} utterances, {hours:.2f} h, {scan.n_speakers} speakers)")
    run_once(manifest, args.corpus.name, max(args.workers))  # warm-up: page cache, worker imports
    walls: dict[int, list[float]] = {w: [] for w in args.workers}
    cpus: dict[int, list[float]] = {w: [] for w in args.workers}
    for _ in range(args.runs):  # alternate worker counts so load changes hit all alike
        for workers in args.workers:
            wall, cpu = run_once(manifest, args.corpus.name, workers)
            walls[workers].append(wall)
            cpus[workers].append(cpu)
    base = statistics.median(walls[args.workers[0]])
    print(f"| workers | wall s (median of {args.runs}) | utterances/s | cores busy | speed-up vs {args.workers[0]} |")
    print("|---|---|---|---|---|")
    for workers in args.workers:
        wall = statistics.median(walls[workers])
        busy = statistics.median(c / w for c, w in zip(cpus[workers], walls[workers]))
        print(f"| {workers} | {wall:.1f} | {n_utterances / wall:.1f} | {busy:.2f} | {base / wall:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
