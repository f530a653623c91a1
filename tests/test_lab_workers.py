"""The lab's worker processes: they die with the lab, Ctrl-C ends them at once, a resumed
run gets the threads the uninterrupted lab gave it, and runs report their epochs."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from resnorm.lab import parse_study, plan_workers, progress, run_study, runner

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="finds worker processes through /proc"
)

TINY = """
name = "tiny"
dataset = "synthetic"
[dataset_options]
shape = [8]
num_classes = 3
train_samples = {samples}
test_samples = 32
[train]
epochs = {epochs}
[[grid]]
models = ["mlp"]
depths = {depths}
norms = ["none"]
residual = [true]
batch_sizes = [32]
options = {{ width = 8 }}
"""

# The CLI, as a user starts it; spawned workers import this file, hence the guard.
LAB = textwrap.dedent("""
    import sys
    from resnorm.cli import main
    if __name__ == "__main__":
        sys.exit(main(["lab", sys.argv[1], "--out", sys.argv[2], "--workers", "2", "--quiet"]))
""")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of ``pid``, or ``None`` once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = text[text.rindex(")") + 2 :].split()[:2]
    return state, int(ppid)


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")  # a zombie has ended


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[1] == pid:
                found.append(int(entry.name))
    return found


def _is_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _wait_gone(pids, timeout: float) -> float:
    """Seconds until every one of ``pids`` ended (polled), at most ``timeout``."""
    start = time.monotonic()
    while any(_alive(p) for p in pids) and time.monotonic() - start < timeout:
        time.sleep(0.01)
    return time.monotonic() - start


def _start_lab(tmp_path):
    """A lab of 4 long runs on 2 workers, in its own session, once both workers train."""
    (tmp_path / "study.toml").write_text(
        TINY.format(samples=20000, epochs=200, depths=[1, 2, 3, 4])
    )
    (tmp_path / "lab.py").write_text(LAB)
    out = tmp_path / "lab"
    lab = subprocess.Popen(
        [sys.executable, str(tmp_path / "lab.py"), str(tmp_path / "study.toml"), str(out)],
        start_new_session=True,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert lab.poll() is None, f"the lab ended before it could be stopped: {lab.stderr.read()}"
        workers = [p for p in _children(lab.pid) if _is_worker(p)]
        if len(workers) == 2 and len(list(out.glob("runs/*"))) == 2:
            return lab, workers
        time.sleep(0.05)
    raise AssertionError("the lab's two workers did not start training within 180 s")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_workers_die_with_a_killed_lab(tmp_path, sig):
    lab, workers = _start_lab(tmp_path)
    try:
        children = _children(lab.pid)  # the workers and multiprocessing's tracker
        os.kill(lab.pid, sig)  # the lab only, not its process group
        lab.wait(timeout=30)
        _wait_gone(children, timeout=30)
        assert [p for p in children if _alive(p)] == []
        assert set(workers) <= set(children)
    finally:
        os.killpg(lab.pid, signal.SIGKILL)


def test_ctrl_c_ends_every_worker_without_waiting_for_their_runs(tmp_path):
    """The lab does not wait for running runs: it terminates its workers and kills any
    still there after a second (_stop_workers; tested below without a clock), so they
    are gone within about 2 s (measured 0.01-0.19 s; no timing is asserted here)."""
    lab, workers = _start_lab(tmp_path)
    try:
        os.killpg(lab.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        seconds = _wait_gone(workers, timeout=30)
        print(f"Ctrl-C to the last worker gone: {seconds:.3f} s")
        assert [p for p in workers if _alive(p)] == []
        assert lab.wait(timeout=30) == 130, lab.stderr.read()
        assert "interrupted" in lab.stderr.read()
    finally:
        os.killpg(lab.pid, signal.SIGKILL)
    done = list((tmp_path / "lab").glob("runs/*/summary.json"))
    assert len(done) < 4  # the queued runs were not trained


def _ignore_sigterm_and_sleep():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)


def test_stop_workers_kills_a_worker_that_ignores_termination():
    import multiprocessing

    from resnorm.lab import workers

    process = multiprocessing.get_context("fork").Process(target=_ignore_sigterm_and_sleep)
    process.start()

    class Pool:  # the part of ProcessPoolExecutor that _stop_workers uses
        _processes = {process.pid: process}
        cancelled = None

        def shutdown(self, wait, cancel_futures):
            Pool.cancelled = (wait, cancel_futures)

    time.sleep(0.3)  # let it install its handler
    workers._stop_workers(Pool())
    assert not process.is_alive() and process.exitcode == -signal.SIGKILL
    assert Pool.cancelled == (False, True)  # queued runs cancelled, nothing waited for


# A process whose spawned child uses the portable watch (not Linux's parent-death signal).
WATCHED = textwrap.dedent("""
    import multiprocessing, time
    from resnorm.lab import workers

    def child():
        workers._watch_parent()
        time.sleep(600)

    if __name__ == "__main__":
        process = multiprocessing.get_context("spawn").Process(target=child)
        process.start()
        print(process.pid, flush=True)
        time.sleep(600)
""")


def test_the_portable_watch_ends_a_worker_whose_parent_was_killed(tmp_path):
    (tmp_path / "watched.py").write_text(WATCHED)
    parent = subprocess.Popen(
        [sys.executable, str(tmp_path / "watched.py")],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        child = int(parent.stdout.readline())
        time.sleep(0.5)  # let the child reach its sleep
        assert _alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        _wait_gone([child], timeout=30)
        assert not _alive(child)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)


def test_plan_workers_threads_depend_on_the_grid_not_the_runs_left():
    assert plan_workers(12, cores=2, runs_left=1) == (1, 1)
    assert plan_workers(12, cores=2, runs_left=12) == plan_workers(12, cores=2) == (2, 1)
    assert plan_workers(3, workers=8, cores=16, runs_left=1) == (1, 5)
    assert plan_workers(4, workers=2, cores=4, runs_left=0) == (1, 2)


def test_a_resumed_run_trains_with_the_threads_of_the_uninterrupted_lab(tmp_path, monkeypatch):
    import torch

    study = parse_study(TINY.format(samples=96, epochs=1, depths=[1, 2, 3, 4]))
    run_study(study, tmp_path, workers=1, progress=False)
    last = study.runs()[-1].run_id
    (tmp_path / "runs" / last / "summary.json").unlink()  # as if the lab was killed
    threads = {}
    execute = runner._execute

    def recording(spec, *args, **kwargs):
        threads[spec.run_id] = torch.get_num_threads()
        return execute(spec, *args, **kwargs)

    monkeypatch.setattr(runner, "_execute", recording)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    run_study(study, tmp_path, progress=False)
    # Uninterrupted, 4 runs on 4 cores are 4 workers of one thread each.
    assert threads == {last: 1}


class _Recording(progress._LabProgress):
    events: list = []

    def started(self, run_id):
        self.events.append(("started", run_id))
        super().started(run_id)

    def epoch(self, run_id, epoch):
        self.events.append(("epoch", run_id, epoch))
        super().epoch(run_id, epoch)

    def finished(self, run_id):
        self.events.append(("finished", run_id))
        super().finished(run_id)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_progress_display_hears_every_epoch_of_every_run(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(runner, "_LabProgress", _Recording)
    monkeypatch.setattr(_Recording, "events", [])
    study = parse_study(TINY.format(samples=96, epochs=3, depths=[1, 2]))
    run_study(study, tmp_path, workers=workers, progress=True)
    for spec in study.runs():
        mine = [e for e in _Recording.events if e[1] == spec.run_id]
        assert mine == [("started", spec.run_id)] + [
            ("epoch", spec.run_id, e) for e in (1, 2, 3)
        ] + [("finished", spec.run_id)]


def test_execute_run_passes_every_epoch_row_to_on_epoch(tmp_path):
    study = parse_study(TINY.format(samples=96, epochs=3, depths=[1]))
    rows = []
    summary = runner.execute_run(
        study.runs()[0], study, str(tmp_path / "run"), "cpu", 1, on_epoch=rows.append
    )
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert rows == summary["history"]


def test_the_eta_comes_from_measured_epochs_and_counts_down():
    now = [0.0]
    bar = progress._LabProgress(False, total=5, done=1, epochs=10, workers=2, clock=lambda: now[0])
    bar.started("a")
    bar.started("b")
    assert bar.seconds_left() is None  # nothing measured: no estimate
    now[0] = 10.0
    bar.epoch("a", 1)  # 10 s per epoch, run b resumed at epoch 6:
    now[0] = 12.0
    bar.epoch("b", 7)  # 22 s for 2 epochs
    # left: a 9, b 3, two runs not started 20: 32 epochs x 11 s / 2 workers
    assert bar.seconds_left() == pytest.approx(32 * 11 / 2)
    now[0] = 20.0
    assert bar.seconds_left() == pytest.approx(32 * 11 / 2 - 8)
    bar.finished("a")  # ended (diverged) after its epoch 1
    assert bar.seconds_left() == pytest.approx((3 + 20) * 11 / 2)
    for run in ("b", "c", "d"):
        bar.finished(run)
    assert bar.seconds_left() == 0.0


def test_the_eta_of_an_init_only_study_counts_runs():
    now = [0.0]
    bar = progress._LabProgress(False, total=4, done=0, epochs=0, workers=1, clock=lambda: now[0])
    bar.started("a")
    now[0] = 3.0
    bar.finished("a")
    assert bar.seconds_left() == pytest.approx(3 * 3.0)
