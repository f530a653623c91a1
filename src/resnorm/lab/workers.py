"""The lab's worker processes: they die with the lab (however it ends), leave Ctrl-C to it,
report progress through a queue, and are ended at once when the lab stops."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# Set in each worker process by _init_worker: where it reports its runs' progress.
_progress_reports = None


def _init_worker(parent_pid: int, reports) -> None:
    """Prepare a worker process of :func:`run_study`: it dies with the lab's process, leaves
    Ctrl-C to it (the terminal sends SIGINT to the whole process group; the lab then ends
    its workers itself) and reports progress to ``reports`` (a queue, or ``None``)."""
    global _progress_reports
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent_pid)
    _progress_reports = reports


def _exit_with_parent(parent_pid: int) -> None:
    """End this process as soon as its parent ends, however it ends (SIGKILL included),
    instead of training queued runs for nobody and then waiting forever. On Linux the
    kernel kills it (``prctl(PR_SET_PDEATHSIG, SIGKILL)``); elsewhere, or if that fails,
    a daemon thread waits for the parent's end and exits the process."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if armed:
            if os.getppid() != parent_pid:  # the parent died before the signal was armed
                os._exit(1)
            return
    _watch_parent()


def _watch_parent() -> None:
    """The portable way: a daemon thread that waits on the parent process's sentinel (a
    pipe that reaches end of file, or a process handle, when the parent ends)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def wait_then_exit() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=wait_then_exit, name="resnorm-exit-with-parent", daemon=True).start()


def spawn_pool(n_workers: int, reports=None) -> ProcessPoolExecutor:
    """``n_workers`` spawned worker processes that die with this one and leave Ctrl-C to
    it (see :func:`_init_worker`); ``reports``: a queue of the spawn context, or ``None``."""
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(
        n_workers, mp_context=context, initializer=_init_worker, initargs=(os.getpid(), reports)
    )


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """End ``pool``'s worker processes now, without waiting for their runs: the queued
    runs are cancelled, the running ones killed (they resume from their checkpoints when
    the lab runs again; what finished is on disk)."""
    # Python < 3.14 has no public way to terminate a pool's processes.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + 1.0
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(1.0)
