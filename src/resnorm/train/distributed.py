"""Data-parallel training on PyTorch's own engine: the process group that torchrun
describes, a launch of N local workers through torchrun's API, and one clear line when a
worker fails.

:func:`~resnorm.train.fit` trains with ``DistributedDataParallel`` whenever a process
group of more than one process is initialized; everything here is about getting there:

- under ``torchrun --nproc-per-node N -m resnorm train ...`` (any torchrun flags,
  multi-node included) each worker calls :func:`init_distributed`, which joins the group
  torchrun announces in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``): gloo on the CPU, nccl on CUDA (one GPU per local rank);
- :func:`launch` starts N workers on this machine with torchrun's launcher
  (``torch.distributed.launcher.api.elastic_launch``, what the ``torchrun`` command runs),
  and raises :class:`LaunchError` naming the worker that failed and how (exit status or
  signal) once torchrun has stopped the others.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import UsageError, UsageTypeError

DEFAULT_TIMEOUT = 600.0
"""Seconds a process waits for the others in a collective before giving up (a hung worker)."""


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    """Whether this process is one of several workers started by torchrun (or anything that
    sets its environment variables)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_device(device: torch.device) -> torch.device:
    """The device of this process: on CUDA without an index, the GPU of its local rank."""
    if device.type == "cuda" and device.index is None and world()[1] > 1:
        local = int(os.environ.get("LOCAL_RANK", world()[0] % max(1, torch.cuda.device_count())))
        return torch.device("cuda", local)
    return device


def init_distributed(device: str = "cpu", timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Join the process group described by torchrun's environment variables, with the
    backend that fits ``device`` (nccl for CUDA, gloo otherwise) and a ``timeout`` in
    seconds on every collective. Returns ``False``, doing nothing, outside a launch of more
    than one process; ``True`` once the group is up (also if it already was)."""
    if dist.is_available() and dist.is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise RuntimeError(
            "this PyTorch build has no torch.distributed; install a build "
            "with it to train on several processes"
        )
    from .loop import resolve_device

    kind = resolve_device(device).type
    if kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        "nccl" if kind == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout)
    )
    return True


def shutdown_distributed() -> None:
    """Leave the process group, if this process is in one, once every process is done
    with it (a process that tears its connections down while another still uses them
    can abort)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def check_nproc(nproc: int, device: str = "cpu") -> int:
    """``nproc`` if this machine can run that many workers on ``device``, else
    ``ValueError``: one per GPU on CUDA, one per core on the CPU (more would only share the
    cores, every step waiting for the slowest worker)."""
    from .loop import resolve_device

    if isinstance(nproc, bool) or not isinstance(nproc, int):
        raise UsageTypeError(f"nproc must be an integer, got {nproc!r}")
    on_gpu = resolve_device(device).type == "cuda"
    limit = torch.cuda.device_count() if on_gpu else os.cpu_count() or 1
    if not 1 <= nproc <= limit:
        what = ("GPU" if on_gpu else "CPU core") + ("s" if limit != 1 else "")
        raise UsageError(
            f"nproc={nproc} is not possible here: it must be between 1 and the "
            f"{limit} {what} of this machine (for more processes, use several "
            f"machines: torchrun --nnodes)"
        )
    return nproc


class LaunchError(RuntimeError):
    """A launch that failed: the message names the worker(s), the exit status or signal.
    ``exit_code`` is 2 when every failed worker reported bad input (status 2), else 1."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _failure_text(failure) -> str:
    if failure.exitcode < 0:
        return f"was killed by {failure.signal_name()}"
    text = f"exited with status {failure.exitcode}"
    data = failure.error_file_data.get("message") if failure.error_file_data else None
    message = data.get("message") if isinstance(data, dict) else None
    if message:  # a Python entry point's exception, recorded by torchrun
        text += f" ({message.strip().splitlines()[-1]})"
    return text


def describe_failures(failures: dict) -> str:
    """One line for torchrun's ``{rank: ProcessFailure}``: the worker that failed first (a
    worker torchrun stopped with SIGTERM is a consequence, not a cause), then the others."""

    def key(item):
        rank, failure = item
        return (failure.exitcode == -signal.SIGTERM, failure.timestamp, rank)

    ordered = sorted(failures.items(), key=key)
    rank, first = ordered[0]
    line = f"worker rank {rank} (pid {first.pid}) {_failure_text(first)}"
    stopped = [r for r, f in ordered[1:] if f.exitcode == -signal.SIGTERM]
    others = [
        f"rank {r} {_failure_text(f)}" for r, f in ordered[1:] if f.exitcode != -signal.SIGTERM
    ]
    if others:
        line += "; " + "; ".join(others)
    if stopped:
        line += f"; the other worker(s) were stopped (rank {', '.join(map(str, stopped))})"
    return line


@contextlib.contextmanager
def _quiet_torchrun_logs():
    """torchrun's agent logs each failure in several lines; LaunchError says it in one."""
    import torch.distributed.elastic  # noqa: F401  (creates its loggers)

    loggers = [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.startswith("torch.distributed.elastic")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def launch(
    entrypoint: Callable | str,
    args: Sequence = (),
    *,
    nproc: int,
    threads: int | None = None,
    device: str = "cpu",
) -> dict:
    """Run ``entrypoint`` in ``nproc`` worker processes on this machine, with torchrun's
    launcher (rendezvous on a free local port, as ``torchrun --standalone``), and return
    ``{rank: return value}`` (``None`` for programs).

    ``entrypoint``: a program (``sys.executable``, with ``args`` such as ``("-m", "resnorm",
    "train", ...)``) or a picklable function called as ``entrypoint(*args)`` in each
    worker. Each worker gets torchrun's environment (see :func:`init_distributed`) and
    ``OMP_NUM_THREADS=threads`` (default: the cores shared out) unless it is already set.
    If a worker fails, torchrun stops the others and :class:`LaunchError` says which
    worker failed and how; nothing is restarted (``max_restarts=0``): run again to resume.
    """
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_nproc(nproc, device)
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"resnorm-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    added_threads = "OMP_NUM_THREADS" not in os.environ
    if added_threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        with _quiet_torchrun_logs():
            return elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as exc:
        codes = {f.exitcode for f in exc.failures.values()}
        raise LaunchError(
            describe_failures(exc.failures), exit_code=2 if codes == {2} else 1
        ) from None
    except SignalException as exc:  # torchrun stopped the workers; say it as Python does
        if exc.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise LaunchError(
            f"the launcher got {signal.Signals(exc.sigval).name} and stopped the workers"
        ) from None
    finally:
        if added_threads:
            os.environ.pop("OMP_NUM_THREADS", None)


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a torch.distributed collective (another worker died or
    hung), as opposed to an error of this worker's own."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}torch{os.sep}distributed{os.sep}" in str(
        Path(tb.tb_frame.f_code.co_filename)
    )


def launch_train(args: Sequence[str], *, nproc: int, device: str, out) -> None:
    """``resnorm train ARGS`` in ``nproc`` workers on this machine (what ``resnorm train
    --nproc N`` runs: ``torchrun --standalone --nproc-per-node N -m resnorm train ...``
    through torchrun's API). A failure is a :class:`LaunchError` whose message ends with
    what to do next: resume from the checkpoint in ``out``, if one was written."""
    import sys

    from .checkpoint import load_checkpoint
    from .run import command_line

    announced = "RESNORM_COMMAND" in os.environ
    os.environ.setdefault("RESNORM_COMMAND", command_line())  # the workers' provenance
    try:
        launch(sys.executable, ["-m", "resnorm", "train", *args], nproc=nproc, device=device)
    except LaunchError as exc:
        hint = ""
        if exc.exit_code != 2:
            try:
                step = load_checkpoint(Path(out) / "checkpoint.pt")["global_step"]
                hint = f"; run the same command again to resume from step {step}"
            except (OSError, ValueError):
                hint = "; no checkpoint was written yet"
        raise LaunchError(f"{exc}{hint}", exit_code=exc.exit_code) from None
    finally:
        if not announced:
            os.environ.pop("RESNORM_COMMAND", None)


def worker_error_line(exc: BaseException, rank: int) -> str | None:
    """In a torchrun worker, the one line to print for ``exc``: a lost peer (a failed
    collective) said as such, a usage error on a rank other than 0 with its rank; ``None``
    for what the worker should report as usual."""
    import re

    from ..errors import UsageError

    if is_collective_failure(exc):
        # gloo/nccl say it as "[file:line] What happened. Advice...": keep what happened.
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        text = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0]
        return f"[rank {rank}] lost contact with the other workers ({text})"
    if rank > 0 and isinstance(exc, UsageError):
        return f"[rank {rank}] {exc}"
    return None
