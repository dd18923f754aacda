"""Run the benchmark rows side by side with their peers and print one table.

    python -m benchmarks.run                 # every row except --long ones (about 7 min here)
    python -m benchmarks.run --quick         # smoke run on the committed demo corpus
    python -m benchmarks.run --only embed --only train
    python -m benchmarks.run --long          # adds the 200-step bf16/fp32 loss-curve row

Every row runs spkenc and its peer in this process, on the same real-speech inputs from
../shared/data (a row whose data is absent is skipped with the reason), and reports the median
of --runs timed runs after --warmup untimed ones, with --threads torch and BLAS threads.
"""

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("benchmarks")

# name -> (module, function, keyword arguments, runs by default)
ROWS = {
    "preprocess": ("rows_audio", "preprocess_rows", {}, True),
    "embed": ("rows_audio", "embed_rows", {"bf16": False}, True),
    "embed_bf16": ("rows_audio", "embed_rows", {"bf16": True}, True),
    "train": ("rows_training", "train_step_rows", {"bf16": False}, True),
    "train_bf16": ("rows_training", "train_step_rows", {"bf16": True}, True),
    "loader": ("rows_training", "loader_rows", {}, True),
    "pipeline": ("rows_pipeline", "pipeline_rows", {}, True),
    "rss": ("rows_audio", "rss_rows", {}, True),
    "loss_curve": ("rows_training", "loss_curve_rows", {}, False),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny inputs from the demo corpus, 1 run, no warm-up")
    p.add_argument("--only", action="append", default=[], metavar="ROW", help=f"run only these rows (repeat or comma-separate): {', '.join(ROWS)}")
    p.add_argument("--long", action="store_true", help="also run the long rows (loss_curve)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per measurement (default 3; 1 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 1; 0 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (default %(default)s)")
    p.add_argument("--curve-steps", type=int, default=None, help="steps of the loss_curve row (default 200; 3 with --quick)")
    p.add_argument("--cache", type=Path, default=None, help="folder for derived inputs (default $SPKENC_BENCH_CACHE or benchmarks/.cache)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table as Markdown to this file")
    args = p.parse_args(argv)
    args.only = [name for item in args.only for name in item.split(",") if name]
    unknown = [name for name in args.only if name not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {unknown}; known rows: {', '.join(ROWS)}")
    for name in ("runs", "threads", "curve_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return args


def selected_rows(args: argparse.Namespace) -> list[str]:
    if args.only:
        return [name for name in ROWS if name in args.only]
    return [name for name, (_, _, _, default) in ROWS.items() if default or args.long]


BF16_ROWS = ("embed_bf16", "train_bf16", "loss_curve")  # skipped on a CPU without bfloat16


def run_row(name: str, settings):
    """The RowResults of one row; a skipped row when its data is absent, a failed one on error."""
    import importlib

    from benchmarks.common import DataMissing, RowResult, skipped_row
    from spkenc.precision import bf16_autocast_error

    module, function, kwargs, _ = ROWS[name]
    if name in BF16_ROWS and bf16_autocast_error("cpu") is not None:
        reason = "this CPU has no bfloat16 LSTM kernel (oneDNN needs AVX-512 BF16 or AMX)"
        log.warning("row %s skipped: %s", name, reason)
        return [skipped_row(name, name, f"skipped: {reason}")], True
    started = time.perf_counter()
    try:
        results = getattr(importlib.import_module(f"benchmarks.{module}"), function)(settings, **kwargs)
    except DataMissing as missing:
        log.warning("row %s skipped: %s", name, missing)
        return [skipped_row(name, name, f"skipped: {missing}")], True
    except Exception as error:  # a broken row must not hide the others; it is reported as FAILED
        log.error("row %s failed:\n%s", name, traceback.format_exc())
        failed = RowResult(name, name, None, None, "", "higher")
        failed.checks["ran"] = (False, f"FAILED: {type(error).__name__}: {error}")
        return [failed], False
    log.info("row %s took %.0f s", name, time.perf_counter() - started)
    return results, True


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def render(results, header: dict[str, str]) -> str:
    """A Markdown table of the rows, under the machine header."""
    lines = [f"- {key}: {value}" for key, value in header.items()]
    lines += ["", "| what | spkenc | peer | unit | ratio | target | pass | GFLOP/s spkenc / peer | details |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        verdict = {True: "PASS", False: "FAIL", None: "-"}[r.passed]
        flops = " / ".join(_fmt(x) for x in r.gflops) if r.gflops else ""
        details = "; ".join([f"{'ok' if ok else 'NOT MET'}: {text}" for ok, text in r.checks.values()] + r.notes)
        if r.skipped:
            details = r.skipped
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        details = details.replace("|", "/")  # a pipe would split the Markdown cell
        lines.append(f"| {r.what} | {_fmt(r.spkenc)} | {_fmt(r.peer)} | {r.unit} | {ratio} | {r.target_text} | {verdict} | {flops} | {details} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from benchmarks.common import DEFAULT_CACHE, Settings, gemm_gflops, limit_threads, machine_facts
    from spkenc.precision import bf16_autocast_error

    limit_threads(args.threads)
    settings = Settings(
        quick=args.quick,
        n_runs=args.runs or (1 if args.quick else 3),
        n_warmup=args.warmup if args.warmup is not None else (0 if args.quick else 1),
        n_threads=args.threads,
        cache=(args.cache or Path(os.environ.get("SPKENC_BENCH_CACHE", DEFAULT_CACHE))).resolve(),
        curve_steps=args.curve_steps or (3 if args.quick else 200),
    )
    settings.cache.mkdir(parents=True, exist_ok=True)
    header = machine_facts()
    header["threads"] = f"{args.threads} torch + {args.threads} BLAS (unless a row says otherwise)"
    # Without native bfloat16 a 2048^3 bf16 matmul is emulated (about 18 s each, 7 of them): not measured.
    bf16_limit = "n/a (no bfloat16 LSTM kernel)" if bf16_autocast_error("cpu") else f"{gemm_gflops('bfloat16'):.0f} GFLOP/s"
    header["matmul limit (2048^3, these threads)"] = f"fp32 {gemm_gflops('float32'):.0f} GFLOP/s, bf16 {bf16_limit}"
    header["measurement"] = f"median of {settings.n_runs} run(s) after {settings.n_warmup} warm-up(s){' (QUICK smoke run: tiny inputs)' if args.quick else ''}"
    started = time.perf_counter()
    results, all_ran = [], True
    for name in selected_rows(args):
        log.info("row %s ...", name)
        rows, ran = run_row(name, settings)
        results.extend(rows)
        all_ran &= ran
    header["wall time"] = f"{time.perf_counter() - started:.0f} s"
    header["load average at the end (1, 5, 15 min)"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    table = render(results, header)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0 if all_ran else 1


if __name__ == "__main__":
    sys.exit(main())
