"""Process pools for the preprocessing stages, and a per-folder lock.

Workers start through `forkserver` (fresh processes, no copied parent state), with one BLAS /
OpenMP / torch thread each so that N workers use N cores. A worker that dies (a decoder
crash, the OOM killer) breaks the pool; the tasks in flight are retried in a new pool, and a
task in flight during `max_attempts` crashes is given up with `WorkerDied`.
"""

import contextlib
import fcntl
import glob
import logging
import multiprocessing
import os
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

log = logging.getLogger(__name__)

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
_limits: Any = None


class WorkerDied(RuntimeError):
    """The worker process running a task died (it did not raise: it crashed or was killed)."""


def default_workers() -> int:
    """All cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_workers(workers: Optional[int]) -> int:
    """`workers`, or all cores when None; ValueError when below 1."""
    if workers is None:
        return default_workers()
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    return int(workers)


def init_worker() -> None:
    """Pool initializer: one compute thread per worker process."""
    global _limits
    for name in _THREAD_VARIABLES:
        os.environ[name] = "1"
    from threadpoolctl import threadpool_limits

    _limits = threadpool_limits(1)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_alone(fn: Callable[[Any], Any], task: Any, context: Any) -> Any:
    """`fn(task)` in a pool of its own: a crash here can only be this task's."""
    with ProcessPoolExecutor(1, mp_context=context, initializer=init_worker) as pool:
        try:
            return pool.submit(fn, task).result()
        except BrokenProcessPool:
            return WorkerDied(f"the worker process died while running this task ({fn.__name__})")
        except Exception as error:  # the task's own error, reported as its result
            return error


def chunk_size_for(n_tasks: int, workers: int, largest: int = 16) -> int:
    """Tasks per chunk: up to `largest`, while keeping at least 8 chunks per worker so the
    last chunks still spread over all workers.

    >>> chunk_size_for(2500, 2), chunk_size_for(100, 2), chunk_size_for(3, 2)
    (16, 6, 1)
    """
    return max(1, min(largest, n_tasks // (8 * max(1, workers))))


def _run_chunk(fn: Callable[[Any], Any], tasks: list) -> list:
    """Worker: `fn` on each task of a chunk; a task's exception becomes its result."""
    results = []
    for task in tasks:
        try:
            results.append(fn(task))
        except Exception as error:  # the task's own error, reported as its result
            results.append(error)
    return results


def map_unordered(
    fn: Callable[[Any], Any],
    tasks: Iterable[Any],
    workers: int,
    preload: Sequence[str] = (),
    chunk_size: int = 1,
) -> Iterator[tuple[Any, Any]]:
    """Yield (task, fn(task)) as results arrive; at most 2 * workers chunks are in flight.

    Tasks travel to the workers `chunk_size` at a time: one future and one round trip per
    chunk, not per task, so the parent's bookkeeping stays off the cores the workers use.
    Exceptions raised by `fn` are yielded as the result (the caller turns them into
    rejects). When a worker dies, every task of the chunks then in flight is rerun alone in a
    fresh process, so only the task that kills its worker ends as `WorkerDied`. `fn` and the
    tasks must be picklable. `preload` names modules the fork server imports once, so that
    each new worker starts with them loaded (it applies when the server starts).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    listed = list(tasks)
    pending = [listed[i : i + chunk_size] for i in range(0, len(listed), chunk_size)][::-1]
    context = multiprocessing.get_context("forkserver")
    if preload:
        context.set_forkserver_preload(list(preload))
    while pending:
        crashed: list[Any] = []
        with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker) as pool:
            running: dict[Future, list] = {}
            while (pending and not crashed) or running:
                while pending and len(running) < 2 * workers and not crashed:
                    chunk = pending.pop()
                    try:
                        running[pool.submit(_run_chunk, fn, chunk)] = chunk
                    except BrokenProcessPool:
                        pending.append(chunk)
                        break
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    chunk = running.pop(future)
                    try:
                        results = future.result()
                    except BrokenProcessPool:
                        crashed.extend(chunk)
                        continue
                    except Exception as error:  # e.g. a result that cannot be pickled
                        results = [error] * len(chunk)
                    yield from zip(chunk, results)
        if crashed:
            log.warning("a pool worker died; rerunning the %d task(s) then in flight one by one", len(crashed))
        for task in crashed:
            yield task, _run_alone(fn, task, context)


@contextlib.contextmanager
def folder_lock(folder: Union[str, Path]) -> Iterator[Path]:
    """Hold an exclusive lock on `folder/.lock` (blocking): two runs writing the same output
    folder take turns instead of interleaving."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def remove_orphan_temps(folder: Union[str, Path]) -> int:
    """Delete the `.<name>....tmp` files under `folder` that killed writers left behind, and
    return how many. Call it while holding `folder_lock(folder)`: then no writer is mid-write."""
    orphans = [p for p in Path(folder).rglob(".*.tmp") if p.is_file()]
    for path in orphans:
        path.unlink(missing_ok=True)
    if orphans:
        log.info("%s: removed %d temporary file(s) left by a killed run", folder, len(orphans))
    return len(orphans)


def remove_dead_writer_temps(folder: Union[str, Path], prefix: str) -> int:
    """Delete `folder/.<prefix>*.<pid>.<hex>.tmp` files whose writer process `pid` is gone
    (killed mid-write), and return how many. Temporary files of live writers, of this process
    and of names that do not parse are left alone. Atomic writers that name their temporary
    files `.<target>.<pid>.<random hex>.tmp` call it before writing.
    """
    removed = 0
    for temp in Path(folder).glob(f".{glob.escape(prefix)}*.tmp"):
        parts = temp.name.rsplit(".", 3)
        if len(parts) != 4 or not parts[1].isdigit() or int(parts[1]) == os.getpid():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            temp.unlink(missing_ok=True)
            removed += 1
            log.info("%s: removed a temporary file left by a killed writer", temp)
        except PermissionError:  # alive, owned by another user
            pass
    return removed
