"""Shared pieces of the benchmark harness: timing, thread limits, machine facts, result rows.

Every row measures spkenc and its peer in the same process on the same inputs and reports the
median of `n_runs` timed runs after `n_warmup` untimed ones.

>>> median_time(lambda: None, n_runs=3, n_warmup=1).n_runs
3
>>> RowResult("x", "s", 2.0, 1.0, "x/s", "higher", target_ratio=1.5).ratio
2.0
>>> RowResult("x", "s", 1.0, 4.0, "s", "lower", target_ratio=2.0).passed
True
"""

import datetime
import logging
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_DIR = REPO / "data" / "demo_tiny"
DEFAULT_CACHE = REPO / "benchmarks" / ".cache"


@dataclass(frozen=True)
class Settings:
    """How a run measures: repeats, sizes and where cached inputs live.

    `quick` shrinks every input (a smoke run on the demo corpus); `n_runs` timed runs follow
    `n_warmup` untimed ones; `n_threads` is the torch/BLAS thread count of the rows that do not
    say otherwise; `curve_steps` is the length of the --long loss-curve comparison.
    """

    quick: bool
    n_runs: int
    n_warmup: int
    n_threads: int
    cache: Path
    curve_steps: int = 200


class DataMissing(RuntimeError):
    """A row's input data is absent (for example ../shared/data on a fresh clone): skip the row."""


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of the timed runs; `median_s` is what the table reports."""

    runs_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)

    @property
    def n_runs(self) -> int:
        return len(self.runs_s)


def median_time(fn: Callable[[], object], n_runs: int, n_warmup: int = 1) -> Timing:
    """Call `fn` `n_warmup` times untimed, then `n_runs` times timed (perf_counter seconds)."""
    if n_runs < 1:
        raise ValueError(f"n_runs must be at least 1, got {n_runs}")
    for _ in range(n_warmup):
        fn()
    runs = []
    for _ in range(n_runs):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return Timing(tuple(runs))


@dataclass
class RowResult:
    """One table row: a spkenc figure, the peer's figure on the same inputs, and the target.

    `better` is "higher" (throughput: ratio = spkenc / peer) or "lower" (time or memory:
    ratio = peer / spkenc), so a ratio above 1 always means spkenc wins. `target_ratio` is the
    ratio the issue asks for (None: no ratio target). `limit` is an absolute ceiling on the spkenc
    figure (for memory rows). `checks` are extra pass/fail conditions (name -> (ok, text)),
    such as output equality; `gflops` the achieved GFLOP/s of (spkenc, peer) for model rows.
    """

    what: str
    row: str
    spkenc: Optional[float]
    peer: Optional[float]
    unit: str
    better: str
    target_ratio: Optional[float] = None
    target_text: str = ""
    limit: Optional[float] = None
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)
    gflops: Optional[tuple[Optional[float], Optional[float]]] = None
    notes: list[str] = field(default_factory=list)
    skipped: str = ""

    @property
    def ratio(self) -> Optional[float]:
        if self.spkenc is None or self.peer is None or self.spkenc == 0 or self.peer == 0:
            return None
        return self.spkenc / self.peer if self.better == "higher" else self.peer / self.spkenc

    @property
    def passed(self) -> Optional[bool]:
        """True/False against every stated target; None when the row was skipped or has none."""
        if self.skipped:
            return None
        verdicts = [ok for ok, _ in self.checks.values()]
        if self.target_ratio is not None:
            verdicts.append(self.ratio is not None and self.ratio >= self.target_ratio)
        if self.limit is not None:
            verdicts.append(self.spkenc is not None and self.spkenc <= self.limit)
        return all(verdicts) if verdicts else None


def skipped_row(what: str, row: str, reason: str) -> RowResult:
    """A row that could not run, with the reason in the table."""
    return RowResult(what, row, None, None, "", "higher", skipped=reason)


def limit_threads(n_threads: int) -> None:
    """torch intra-op threads and every BLAS/OpenMP pool to `n_threads` (process-wide)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n_threads)
    threadpool_limits(n_threads)


def machine_facts() -> dict[str, str]:
    """CPU model, core count, bf16 support, load average, versions and the date, for the header."""
    import torch

    model, flags = platform.processor() or "unknown", ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        model = fields.get("Model name", model).strip()
        flags = fields.get("Flags", "")
    except (OSError, subprocess.CalledProcessError) as error:
        log.warning("lscpu failed (%s); the CPU model is from platform.processor()", error)
    native_bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()]
    load = os.getloadavg()
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "bf16 instructions": ", ".join(native_bf16) or "none",
        "load average (1, 5, 15 min)": ", ".join(f"{x:.2f}" for x in load),
        "torch": f"{torch.__version__} ({torch.get_num_threads()} thread(s) now)",
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


def gemm_gflops(dtype: str = "float32", size: int = 2048) -> float:
    """GFLOP/s of a (size x size) @ (size x size) torch matmul with the current thread count:
    the processor's practical limit that the model rows' GFLOP/s compare against."""
    import torch

    a = torch.rand(size, size).to(getattr(torch, dtype))
    b = torch.rand(size, size).to(getattr(torch, dtype))
    timing = median_time(lambda: a @ b, n_runs=5, n_warmup=2)
    return 2 * size**3 / timing.median_s / 1e9


def require_dir(path: Path, what: str) -> Path:
    """`path` if it is a folder, else DataMissing naming it and what it is for."""
    if not Path(path).is_dir():
        raise DataMissing(f"{path} is absent ({what})")
    return Path(path)
