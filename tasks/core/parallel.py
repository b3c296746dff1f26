"""Independent jobs of one stage (seeds, tasks, variants) in worker processes.

Small models on a few CPU cores train fastest with one torch thread per process and one process per
core: torch's own threading does not pay off for them and degrades badly on a shared machine. A stage
hands ``map_jobs`` a picklable top-level function and its job arguments; ``workers=1`` runs them in the
stage's own process (no pickling, the same code path), more workers are forked from a forkserver, with one
torch thread each. Results come back in job order; a failing job raises in the stage (queued jobs
are cancelled, running ones finish), so the stage fails as a whole and its outputs are not committed.
Workers die with the stage process, however it ends.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any


def _die_with_parent() -> None:
    """Linux: the kernel sends this worker SIGKILL when the stage process that spawned it dies (even by
    SIGKILL), so no worker keeps computing or writing after its stage is gone."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: workers still exit when their task queue closes
        pass


def _die_with_stage(stage_pid: int) -> None:
    """A worker's parent is the forkserver, which outlives a SIGKILLed stage while its workers hold it
    open: each worker watches the stage process itself and exits the moment it is gone."""
    import select
    import threading

    def watch() -> None:
        try:
            fd = os.pidfd_open(stage_pid)
            select.select([fd], [], [])  # readable when the process has exited
        except (OSError, AttributeError):  # no pidfd (old kernel, not Linux): poll
            import time

            while os.getppid() != 1 and _exists(stage_pid):
                time.sleep(0.5)
        os._exit(137)

    threading.Thread(target=watch, daemon=True, name="die-with-stage").start()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _init_worker(threads: int, stage_pid: int) -> None:
    _die_with_parent()
    _die_with_stage(stage_pid)
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    os.environ["PAPERFLOWS_NO_PROGRESS"] = "1"  # the parent shows one bar over all jobs


def map_jobs(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int = 1,
             progress: Callable[..., Iterable] | None = None, desc: str = "",
             on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
    """Run ``fn(job)`` for every job and return the results in job order.

    ``progress`` is a tqdm-like wrapper (``StageContext.progress``); ``on_result(i, result)`` is called
    in the stage's process as each job finishes (log metrics there: workers have no MLflow run).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    jobs = list(jobs)
    wrap = progress or (lambda it, **kw: it)
    results: list[Any] = [None] * len(jobs)
    if workers == 1 or len(jobs) <= 1:
        for i, job in enumerate(wrap(jobs, desc=desc, total=len(jobs))):
            results[i] = fn(job)
            if on_result:
                on_result(i, results[i])
        return results

    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # Never fork the stage process itself (fork after torch/OpenMP initialisation can deadlock): a
    # forkserver (a fresh interpreter started once per stage) imports torch and the job's module once,
    # and forks each worker from that clean state instead of re-importing them in every worker.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", getattr(fn, "__module__", "") or "torch"])
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx,
                             initializer=_init_worker, initargs=(1, os.getpid())) as pool:
        futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
        pending = set(futures)
        bar = wrap(None, desc=desc, total=len(jobs))
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = futures[fut]
                    results[i] = fut.result()  # re-raises a worker's exception here
                    if on_result:
                        on_result(i, results[i])
                    if hasattr(bar, "update"):
                        bar.update(1)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
        finally:
            if hasattr(bar, "close"):
                bar.close()
    return results
