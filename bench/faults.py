"""A scripted fault campaign against resnorm's training runs: every fault must end either
bit-identical to an uninterrupted run of the same configuration, or in the one outcome the
library promises for it (a diverged result, one clear error line), with no row lost.

    python bench/faults.py [--quick] [--seed 0] [--json OUT] [--keep DIR]

It prints one line per fault, then a tally per kind (faults tried, survived bit-identically,
ended in their expected non-identical outcome, lost metrics rows, unexpected outcomes) and
every fault that did not survive bit-identically with what happened; the JSON (``--json
OUT``, else on stdout after the table) holds the same tally and every fault. Exit status 0
when every fault ended as expected and no row was lost, 1 otherwise. ``--quick`` tries
each kind once or a few times (11 faults, about 1.5 minutes on two busy cores); the full
campaign tries 69 (about 6 minutes). ``--seed`` seeds the random choices (kill moments,
corrupted bytes, which renames the quick campaign tries); the training runs themselves are
fixed. It needs a POSIX system with ``/proc`` (Linux): it forks, and finds lab workers
there. ``tests/test_faults.py`` runs the quick campaign.

*Survived bit-identically* means: the final weights (the model of the finished run, and
the weights in its ``checkpoint.pt``) are ``torch.equal`` to those of the uninterrupted
reference run (bit for bit where they hold NaN), ``metrics.jsonl``, ``metrics.csv`` and
``result.json``'s history hold the reference's rows (all columns but ``seconds``),
``result.json`` is strict JSON with the reference's status, and the folder holds no
temporary, pending or previous checkpoint.
*Lost rows*: reference epochs missing from ``metrics.jsonl`` or ``metrics.csv``.

Kinds of fault (the runs of kinds 1-4 are :func:`resnorm.train.fit` of a small MLP with
batch norm and dropout on Gaussian blobs, 2 epochs of 6 steps, a checkpoint every 4 steps,
each in a child process forked from this one, which never computes with torch itself):

1. ``sigkill``: SIGKILL at a random moment of the run (every other fault also kills the
   resumed run at a random moment), then a run to completion; compared with the reference.
2. ``rename``: the child wraps ``os.replace`` and SIGKILLs itself just before or just after
   its k-th call, for every k of a run (temporary -> ``checkpoint.pt.new``, latest ->
   previous, ``.new`` -> latest, the config, metrics and result writes), both sides; then
   a run to completion. The full campaign also kills the recovering run just before or
   after each of its first two renames (``CheckpointDir.recover``). The deterministic core.
3. ``corrupt``: the latest checkpoint of an interrupted run truncated, emptied, with one
   bit flipped inside a weight tensor, replaced by garbage, or by another model's
   checkpoint. With a previous checkpoint there, the run must fall back to it (a warning)
   and end bit-identical; with none (or both corrupted), or a foreign checkpoint, it must
   stop with one clear error (:class:`~resnorm.train.CheckpointError` /
   :class:`~resnorm.train.RunMismatchError`, a one-line ``UsageError``) and lose nothing:
   removing the foreign file resumes from the previous checkpoint, a restart reproduces
   the reference. Through the CLI (``python -m resnorm train`` on a finished run whose
   checkpoint is garbage, or foreign): exit status 2 and one stderr line, no traceback.
4. ``nan``: a NaN loss at a training step, a NaN test loss at evaluation (a model that
   outputs NaN at a given step, counted in a buffer so that it survives a resume), NaN in
   a checkpoint's weights, optimizer state or batch-norm running variance (with a valid
   checksum: a run gone bad, not a corrupted file) then a resume; the full campaign also
   SIGKILLs the diverged runs just before their ``result.json`` rename. The run must end
   as diverged (``diverged_in`` ``train`` or ``eval`` as the fault implies, ``result.json``
   strict JSON with status ``diverged``), without a crash, and running it again must not
   train (no step, same weights and rows).
5. ``full-disk`` (root only, where ``mount -t tmpfs`` is allowed; skipped with a note
   otherwise): ``python -m resnorm train`` into a small tmpfs that fills mid-run. It must
   exit 1 with one stderr line ``resnorm: error: No space left on device: ...``, keep a
   loadable checkpoint and no stale ``.tmp`` file; after the tmpfs is remounted bigger,
   the same command completes bit-identical to the same command run on the normal disk.
6. ``lab``: ``python -m resnorm lab STUDY.toml --workers 2`` (4 tiny runs) SIGKILLed at a
   random moment; no worker or other descendant may survive it (found through ``/proc``:
   descendants of the lab, processes naming its folder); the same command run again must
   give every run the metrics rows, final accuracy and weights of an uninterrupted lab.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from resnorm import create_model
from resnorm._io import atomic_open
from resnorm.data import DataSplit
from resnorm.errors import UsageError
from resnorm.train import TrainConfig, fit, load_checkpoint
from resnorm.train.checkpoint import content_digest

_Made = TypeVar("_Made")
KINDS = ("sigkill", "rename", "corrupt", "nan", "full-disk", "lab")
CONFIG = TrainConfig(epochs=2, batch_size=30, lr=1e-2, seed=5, checkpoint_every=4, threads=1)
CLI_TRAIN = [
    "train",
    "--model",
    "mlp",
    "--dataset",
    "synthetic",
    "--depth",
    "1",
    "--width",
    "8",
    "--epochs",
    "2",
    "--batch-size",
    "128",
    "--checkpoint-every",
    "3",
    "--threads",
    "1",
    "--quiet",
]
STUDY = """\
name = "faults"
dataset = "synthetic"
[dataset_options]
shape = [8]
num_classes = 3
train_samples = 1024
test_samples = 128
[train]
epochs = 4
checkpoint_every = 4
[[grid]]
models = ["mlp"]
depths = [1, 2]
norms = ["batch", "none"]
residual = [true]
batch_sizes = [32]
options = { width = 8 }
"""
STUDY_RUNS = 4
NO_SPACE = re.compile(r"resnorm: error: No space left on device: \S.*\n")


# ---------------------------------------------------------------------- the runs of kinds 1-4


def _blobs(n: int = 240, classes: int = 3, dim: int = 8, seed: int = 0) -> DataSplit:
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    cut = n * 3 // 4
    return DataSplit("blobs", x[:cut], y[:cut], x[cut:], y[cut:], classes)


def _model(width: int = 32) -> nn.Module:
    torch.manual_seed(1234)
    return create_model("mlp", in_features=8, num_classes=3, depth=2, width=width, dropout=0.1)


class _NanAt(nn.Module):
    """The model, with NaN outputs from the ``step``-th training forward on: in training
    (``phase="train"``, a NaN loss at that step) or in evaluation only (``phase="eval"``,
    a NaN test loss at the end of that step's epoch). Its forwards are counted in a buffer,
    so the count is checkpointed and a resumed run fails at the same step."""

    def __init__(self, step: int, phase: str) -> None:
        super().__init__()
        self.inner, self.step, self.phase = _model(), step, phase
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        y = self.inner(x)
        bad = self.calls >= self.step and self.training == (self.phase == "train")
        return y * float("nan") if bad else y


class _Steps:
    """A monitor that counts the optimizer steps of one call of ``fit``."""

    def __init__(self) -> None:
        self.count = 0

    def step(self, loss) -> None:
        self.count += 1


def _kill_at_replace(k: int, when: str) -> None:
    """From now on in this process: SIGKILL itself just ``when`` ("before"/"after") its
    k-th ``os.replace``."""
    real, calls = os.replace, [0]

    def replace(src, dst, *args, **kwargs):
        calls[0] += 1
        if calls[0] == k and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst, *args, **kwargs)
        if calls[0] == k and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace


def _log_replaces(log: list) -> None:
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        log.append(f"{_short_name(src)} -> {_short_name(dst)}")
        real(src, dst, *args, **kwargs)

    os.replace = replace


def _short_name(path) -> str:
    name = Path(path).name
    return "tmp" if name.startswith(".") and name.endswith(".tmp") else name


def train_child(
    folder: Path,
    *,
    kill: tuple[int, str] | None = None,
    resume: bool = True,
    nan: tuple[int, str] | None = None,
    width: int = 32,
    log_replaces: bool = False,
) -> dict:
    """The run of kinds 1-4 into ``folder/run`` (its final weights into ``folder/final.pt``),
    in a child process; what it reports back."""
    log: list[str] = []
    if kill is not None:
        _kill_at_replace(*kill)
    if log_replaces:
        _log_replaces(log)
    model = _NanAt(*nan) if nan is not None else _model(width)
    steps = _Steps()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(
            model,
            _blobs(),
            CONFIG,
            out=folder / "run",
            resume=resume,
            progress=False,
            monitor=steps,
        )
    torch.save(model.state_dict(), folder / "final.pt")
    return {
        "status": "diverged" if result.diverged else "finished",
        "diverged_in": result.diverged_in,
        "diverged_at_step": result.diverged_at_step,
        "resumed_from_step": result.resumed_from_step,
        "steps_trained": steps.count,
        "warnings": [str(w.message) for w in caught],
        "replaces": log,
    }


@dataclass
class Child:
    killed: bool  # ended by SIGKILL
    report: dict | None  # what the target returned (ok) or raised (error), if it ended

    @property
    def ok(self) -> bool:
        return bool(self.report and self.report["ok"])

    @property
    def value(self) -> dict:
        return self.report["value"] if self.ok else {}

    def describe(self) -> str:
        if self.killed:
            return "killed"
        if self.report is None:
            return "ended without a report"
        if self.ok:
            return "ok"
        return f"raised {self.report['type']}: {self.report['message']}"


def in_child(
    target: Callable[..., dict], *args, kill_after: float | None = None, **kwargs
) -> Child:
    """Run ``target(*args, **kwargs)`` in a forked child process (SIGKILLed after
    ``kill_after`` seconds if given) and collect what it returned or raised."""
    sys.stdout.flush()
    sys.stderr.flush()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into the campaign
        code = 0
        try:
            os.close(read)
            report = {"ok": True, "value": target(*args, **kwargs)}
        except BaseException as exc:  # noqa: BLE001 - reported to the campaign
            code = 3
            report = {
                "ok": False,
                "type": type(exc).__name__,
                "usage": isinstance(exc, UsageError),
                "message": str(exc),
                "traceback": traceback.format_exc(limit=-6),
            }
        try:
            with os.fdopen(write, "w") as pipe:
                pipe.write(json.dumps(report, default=str))
        finally:
            os._exit(code)
    os.close(write)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)  # a child that already ended is a zombie until reaped
    with os.fdopen(read) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return Child(killed, json.loads(text) if text else None)


# ---------------------------------------------------------------------- comparing runs


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _rows_jsonl(path: Path) -> list[dict]:
    return [
        {k: v for k, v in _strict_json(line).items() if k != "seconds"}
        for line in path.read_text().splitlines()
    ]


def _rows_csv(path: Path) -> list[dict]:
    return [
        {k: v for k, v in row.items() if k != "seconds"}
        for row in csv.DictReader(io.StringIO(path.read_text()))
    ]


@dataclass
class Reference:
    """What an uninterrupted run left: its weights, rows and status."""

    weights: dict
    jsonl: list[dict]
    csv: list[dict]
    status: str

    @classmethod
    def of(cls, run: Path, final: Path | None = None) -> Reference:
        weights = (
            torch.load(final, weights_only=True)
            if final is not None
            else load_checkpoint(run / "checkpoint.pt")["model"]
        )
        status = _strict_json((run / "result.json").read_text())["status"]
        return cls(
            weights, _rows_jsonl(run / "metrics.jsonl"), _rows_csv(run / "metrics.csv"), status
        )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal``, or the same bits (NaN is not equal to itself: a diverged run's
    weights are compared bit for bit)."""
    if torch.equal(a, b):
        return True
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.is_floating_point()
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def _weight_differences(weights: dict, reference: dict) -> list[str]:
    if weights.keys() != reference.keys():
        return ["other parameter names"]
    return [name for name in reference if not _same(weights[name], reference[name])]


def compare(run: Path, reference: Reference, final: Path | None = None) -> tuple[list[str], int]:
    """``(problems, lost rows)`` of the run folder ``run`` against ``reference``; no
    problem means bit-identical. ``final``: the model's own final weights, when saved."""
    problems: list[str] = []

    def read(what: str, how: Callable, path: Path):
        try:
            return how(path)
        except Exception as exc:  # noqa: BLE001 - a file the run should have left
            problems.append(f"{what}: {type(exc).__name__}: {exc}")
            return None

    sources = [("checkpoint.pt", lambda p: load_checkpoint(p)["model"], run / "checkpoint.pt")]
    if final is not None:
        sources.append(("final weights", lambda p: torch.load(p, weights_only=True), final))
    for what, how, path in sources:
        weights = read(what, how, path)
        if weights is not None:
            differ = _weight_differences(weights, reference.weights)
            if differ:
                problems.append(f"{what} differ from the reference ({', '.join(differ[:3])})")
    lost = 0
    for name, how, expected in (
        ("metrics.jsonl", _rows_jsonl, reference.jsonl),
        ("metrics.csv", _rows_csv, reference.csv),
    ):
        rows = read(name, how, run / name)
        if rows is None:
            lost = max(lost, len(expected))
            continue
        epochs = {str(row.get("epoch")) for row in rows}
        lost = max(lost, sum(str(row["epoch"]) not in epochs for row in expected))
        if rows != expected:
            problems.append(
                f"{name}: {len(rows)} rows, not the reference's {len(expected)}"
                if len(rows) != len(expected)
                else f"{name}: rows differ"
            )
    result = read("result.json", lambda p: _strict_json(p.read_text()), run / "result.json")
    if result is not None:
        if result.get("status") != reference.status:
            problems.append(
                f"result.json status {result.get('status')!r}, not {reference.status!r}"
            )
        history = [
            {k: v for k, v in row.items() if k != "seconds"} for row in result.get("history", [])
        ]
        if history != reference.jsonl:
            problems.append("result.json history differs")
    leftovers = sorted(
        p.name
        for p in run.iterdir()
        if p.name.endswith(".tmp") or p.name in ("checkpoint.pt.new", "checkpoint.prev.pt")
    )
    if leftovers:
        problems.append(f"left behind: {', '.join(leftovers)}")
    return problems, lost


# ---------------------------------------------------------------------- the campaign


@dataclass
class Fault:
    kind: str
    name: str
    expected: str  # the outcome the library promises
    outcome: str = ""  # "identical", "diverged", "clear error", "skipped", "unexpected"
    ok: bool = False  # ended as expected
    lost_rows: int = 0
    detail: str = ""  # what happened, for every fault that is not bit-identical


class Campaign:
    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root, self.rng = root, rng
        self.faults: list[Fault] = []
        self._count = 0
        self._references: dict = {}
        self.env = {**os.environ, "RESNORM_CACHE": str(root / "cache")}

    # -------------------------------------------------------------- helpers
    def folder(self, label: str) -> Path:
        self._count += 1
        path = self.root / f"{self._count:03d}-{re.sub(r'[^A-Za-z0-9]+', '-', label)[:40]}"
        path.mkdir(parents=True)
        return path

    def record(self, fault: Fault) -> None:
        self.faults.append(fault)
        mark = "ok " if fault.ok else "BAD"
        print(
            f"[{mark}] {fault.kind:9s} {fault.name}: {fault.outcome}"
            + (f" ({fault.detail})" if fault.detail and fault.outcome != "identical" else "")
            + (f" LOST {fault.lost_rows} ROWS" if fault.lost_rows else ""),
            flush=True,
        )

    def judge(
        self, fault: Fault, problems: list[str], lost: int, outcome_if_clean: str = "identical"
    ) -> Fault:
        fault.lost_rows = lost
        if problems:
            fault.outcome, fault.ok = "unexpected", False
            fault.detail = "; ".join(problems)
        else:
            fault.outcome, fault.ok = outcome_if_clean, outcome_if_clean == fault.expected
        return fault

    def reference(self, key, make: Callable[[], _Made]) -> _Made:
        """``make()``, once per ``key``."""
        if key not in self._references:
            self._references[key] = make()
        return self._references[key]

    def fit_reference(self, nan: tuple[int, str] | None = None) -> tuple[Reference, dict]:
        """The uninterrupted run of kinds 1-4 (with ``nan``, the diverging one) and what
        its child reported (its renames, its duration)."""

        def make():
            folder = self.folder(f"reference-{nan}")
            start = time.perf_counter()
            child = in_child(train_child, folder, nan=nan, log_replaces=True)
            seconds = time.perf_counter() - start
            if not child.ok:
                raise RuntimeError(
                    f"the reference run failed: {child.describe()}\n"
                    f"{(child.report or {}).get('traceback', '')}"
                )
            report = {**child.value, "seconds": seconds, "folder": folder}
            return Reference.of(folder / "run", folder / "final.pt"), report

        return self.reference(("fit", nan), make)

    def finish_and_compare(
        self, fault: Fault, folder: Path, reference: Reference, **kwargs
    ) -> Fault:
        """Run the faulted folder to completion (resume) and compare with ``reference``."""
        child = in_child(train_child, folder, **kwargs)
        if not child.ok:
            fault.outcome, fault.detail = "unexpected", f"the resumed run {child.describe()}"
            return fault
        problems, lost = compare(folder / "run", reference, folder / "final.pt")
        return self.judge(fault, problems, lost)

    def cli(self, *args, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "resnorm", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=self.root,
        )

    def cli_reference(self) -> tuple[Path, Reference]:
        def make():
            run = self.folder("cli-reference") / "run"
            proc = self.cli(*CLI_TRAIN, "--out", run)
            if proc.returncode != 0:
                raise RuntimeError(f"the CLI reference run failed:\n{proc.stderr}")
            return run, Reference.of(run)

        return self.reference("cli", make)

    # -------------------------------------------------------------- 1. random SIGKILLs
    def sigkill(self, count: int) -> None:
        reference, made = self.fit_reference()
        duration = made["seconds"]
        for i in range(count):
            kills = 2 if i % 2 else 1
            moments = []
            for attempt in range(4):  # a kill that came after the end is retried earlier
                folder = self.folder(f"sigkill-{i}")
                moment = self.rng.uniform(0.02, 0.95) * duration / 2**attempt
                if in_child(train_child, folder, kill_after=moment).killed:
                    moments.append(moment)
                    break
            if kills == 2 and moments:
                moment = self.rng.uniform(0.02, 0.9) * duration
                if in_child(train_child, folder, kill_after=moment).killed:
                    moments.append(moment)
            when = ", then ".join(f"{m * 1e3:.0f} ms" for m in moments) or "no moment"
            fault = Fault("sigkill", f"SIGKILL at {when}", "identical")
            if not moments:
                fault.outcome, fault.detail = "unexpected", "the run always ended before the kill"
            else:
                self.finish_and_compare(fault, folder, reference)
            self.record(fault)

    # -------------------------------------------------------------- 2. renames
    def renames(self, choices: list[tuple[int, str]] | None = None, recovery: bool = False) -> None:
        reference, made = self.fit_reference()
        calls = made["replaces"]
        if choices is None:
            choices = [(k, when) for k in range(1, len(calls) + 1) for when in ("before", "after")]
        for k, when in choices:
            folder = self.folder(f"rename-{k}-{when}")
            fault = Fault(
                "rename", f"SIGKILL {when} replace {k}/{len(calls)} ({calls[k - 1]})", "identical"
            )
            child = in_child(train_child, folder, kill=(k, when))
            if not child.killed:
                fault.outcome, fault.detail = "unexpected", f"the run {child.describe()}"
            else:
                self.finish_and_compare(fault, folder, reference)
            self.record(fault)
        if not recovery:
            return
        # A kill just before a ".new -> latest" rename leaves a complete pending checkpoint
        # that recover() renames into place: kill the recovering run at those renames too.
        pending = next(
            k
            for k, call in enumerate(calls, 1)
            if call == "checkpoint.pt.new -> checkpoint.pt" and k > 4
        )
        for j in (1, 2):
            for when in ("before", "after"):
                folder = self.folder(f"recover-{j}-{when}")
                fault = Fault(
                    "rename",
                    f"SIGKILL before replace {pending} ({calls[pending - 1]}), "
                    f"then {when} the recovering run's replace {j}",
                    "identical",
                )
                first = in_child(train_child, folder, kill=(pending, "before"))
                second = in_child(train_child, folder, kill=(j, when))
                if not (first.killed and second.killed):
                    fault.outcome = "unexpected"
                    fault.detail = f"runs {first.describe()}, {second.describe()}"
                else:
                    self.finish_and_compare(fault, folder, reference)
                self.record(fault)

    # -------------------------------------------------------------- 3. corrupted checkpoints
    def _interrupted(self, label: str, save: int) -> tuple[Path, list[str]]:
        """A run SIGKILLed just after its ``save``-th checkpoint is in place."""
        _, made = self.fit_reference()
        calls = made["replaces"]
        k = [i for i, c in enumerate(calls, 1) if c == "checkpoint.pt.new -> checkpoint.pt"][
            save - 1
        ]
        folder = self.folder(label)
        child = in_child(train_child, folder, kill=(k, "after"))
        if not child.killed:
            raise RuntimeError(f"the run to interrupt {child.describe()}")
        return folder, calls

    def _foreign_checkpoint(self) -> Path:
        def make():
            folder = self.folder("foreign")
            child = in_child(train_child, folder, width=8)
            if not child.ok:
                raise RuntimeError(f"the foreign run {child.describe()}")
            return folder / "run" / "checkpoint.pt"

        return self.reference("foreign", make)

    def _corrupt(self, path: Path, how: str) -> str:
        raw = path.read_bytes()
        if how == "truncated":
            keep = int(len(raw) * self.rng.uniform(0.1, 0.95))
            path.write_bytes(raw[:keep])
            return f"{keep} of {len(raw)} bytes kept"
        if how == "empty":
            path.write_bytes(b"")
            return "0 bytes"
        if how == "garbage":
            path.write_bytes(self.rng.randbytes(len(raw)))
            return f"{len(raw)} random bytes"
        if how == "bit-flip":
            weights = torch.load(path, weights_only=True)["model"]
            name = max(
                (n for n in weights if n.endswith("weight")), key=lambda n: weights[n].numel()
            )
            data = weights[name].contiguous().view(torch.uint8).numpy().tobytes()
            start = raw.find(data[:64])
            if start < 0:
                raise RuntimeError(f"{name}'s bytes are not stored as they are in {path}")
            at, bit = start + self.rng.randrange(len(data)), self.rng.randrange(8)
            flipped = bytearray(raw)
            flipped[at] ^= 1 << bit
            path.write_bytes(bytes(flipped))
            return f"bit {bit} of byte {at} (inside {name}) flipped"
        if how == "foreign":
            shutil.copyfile(self._foreign_checkpoint(), path)
            return "another model's checkpoint copied in"
        raise ValueError(how)

    def _clear_error(self, child: Child, types: tuple[str, ...]) -> str | None:
        """``None`` if ``child`` stopped with one clear error of ``types``, else what it did."""
        if child.ok or child.report is None:
            return f"the run {child.describe()} instead of one clear error"
        report = child.report
        if report["type"] not in types or not report["usage"] or "\n" in report["message"]:
            return (
                f"{report['type']} (usage error: {report['usage']}): {report['message']}\n"
                f"{report['traceback']}"
            )
        return None

    def corrupt(self, cases: list[tuple[str, str]], cli_cases: list[str]) -> None:
        """``cases``: (how, setting) with setting "with-prev", "no-prev" or "both";
        ``cli_cases``: corruptions of a finished CLI run's only checkpoint."""
        reference, _ = self.fit_reference()
        for how, setting in cases:
            save = {"with-prev": self.rng.randint(2, 4), "no-prev": 1, "both": 3}[setting]
            folder, _ = self._interrupted(f"corrupt-{how}-{setting}", save)
            run = folder / "run"
            what = self._corrupt(run / "checkpoint.pt", how)
            if setting == "both":
                what += "; previous: " + self._corrupt(run / "checkpoint.prev.pt", "truncated")
            has_prev = (run / "checkpoint.prev.pt").exists() and setting == "with-prev"
            fallback = has_prev and how != "foreign"
            fault = Fault(
                "corrupt",
                f"latest checkpoint {how} ({what}), "
                f"{'previous one there' if has_prev else setting}",
                "identical" if fallback else "clear error",
            )
            child = in_child(train_child, folder)
            if fallback:
                if not child.ok:
                    fault.outcome, fault.detail = "unexpected", f"the run {child.describe()}"
                elif not any("previous good checkpoint" in w for w in child.value["warnings"]):
                    fault.outcome = "unexpected"
                    fault.detail = f"no fallback warning ({child.value['warnings']})"
                else:
                    problems, lost = compare(run, reference, folder / "final.pt")
                    self.judge(fault, problems, lost)
                self.record(fault)
                continue
            types = ("RunMismatchError",) if how == "foreign" else ("CheckpointError",)
            wrong = self._clear_error(child, types)
            if wrong:
                fault.outcome, fault.detail = "unexpected", wrong
                self.record(fault)
                continue
            # Nothing is lost: without the foreign file the run resumes from its previous
            # checkpoint; with nothing usable left, a restart reproduces the reference.
            if has_prev:
                (run / "checkpoint.pt").unlink()
                again, recovery = in_child(train_child, folder), "resumed without the foreign file"
            else:
                again, recovery = in_child(train_child, folder, resume=False), "restarted"
            message = child.report["message"]
            if not again.ok:
                fault.outcome, fault.detail = "unexpected", f"then {recovery}: {again.describe()}"
            else:
                problems, lost = compare(run, reference, folder / "final.pt")
                self.judge(fault, [f"{recovery}: {p}" for p in problems], lost, "clear error")
                if fault.ok:
                    fault.detail = f"{child.report['type']}: {message}; {recovery}: identical"
            self.record(fault)
        for how in cli_cases:
            self._corrupt_cli(how)

    def _corrupt_cli(self, how: str) -> None:
        source, _ = self.cli_reference()
        run = self.folder(f"cli-{how}") / "run"
        shutil.copytree(source, run)
        what = self._corrupt(run / "checkpoint.pt", how)
        fault = Fault("corrupt", f"CLI: a finished run's checkpoint {how} ({what})", "clear error")
        proc = self.cli(*CLI_TRAIN, "--out", run)
        expected = "different configuration" if how == "foreign" else "checkpoint"
        if (
            proc.returncode == 2
            and proc.stderr.count("\n") == 1
            and proc.stdout == ""
            and proc.stderr.startswith("resnorm: error: ")
            and expected in proc.stderr
            and "Traceback" not in proc.stderr
        ):
            fault.outcome, fault.ok = "clear error", True
            fault.detail = f"exit 2: {proc.stderr.strip()}"
        else:
            fault.outcome = "unexpected"
            fault.detail = f"exit {proc.returncode}; stderr: {proc.stderr.strip()[-2000:]}"
        self.record(fault)

    # -------------------------------------------------------------- 4. NaN
    def _check_diverged(
        self,
        fault: Fault,
        folder: Path,
        first: Child,
        phase: str,
        step: int,
        nan: tuple[int, str] | None,
        reference: Reference | None = None,
    ) -> None:
        """``first`` (a run of ``train_child(nan=nan)``) ended the run in ``folder`` as
        diverged in ``phase`` at ``step``; a second run must not train. With
        ``reference``: bit-identical to it."""
        run = folder / "run"
        problems = []
        value = first.value
        if not first.ok:
            problems.append(f"the run {first.describe()}")
        elif (value["status"], value["diverged_in"], value["diverged_at_step"]) != (
            "diverged",
            phase,
            step,
        ):
            problems.append(
                f"ended {value['status']} (diverged_in={value['diverged_in']}, "
                f"at step {value['diverged_at_step']}), not diverged in {phase} "
                f"at step {step}"
            )
        lost = 0
        if not problems:
            try:
                saved = _strict_json((run / "result.json").read_text())
                _rows_jsonl(run / "metrics.jsonl")
            except (OSError, ValueError) as exc:
                saved = {}
                problems.append(f"result.json/metrics.jsonl: {exc}")
            if saved and (saved.get("status"), saved.get("diverged_in")) != ("diverged", phase):
                problems.append(
                    f"result.json says {saved.get('status')}/{saved.get('diverged_in')}"
                )
            before = Reference.of(run, folder / "final.pt")
            again = in_child(train_child, folder, nan=nan)
            if not again.ok:
                problems.append(f"the second run {again.describe()}")
            elif again.value["steps_trained"] or again.value["status"] != "diverged":
                problems.append(
                    f"the second run trained {again.value['steps_trained']} steps "
                    f"and ended {again.value['status']}"
                )
            else:
                more, lost = compare(run, reference or before, folder / "final.pt")
                problems += more
        self.judge(fault, problems, lost, "diverged")
        if fault.ok:
            fault.detail = (
                f"diverged in {phase} at step {value['diverged_at_step']}; run again: not trained"
            )

    def nan(self, full: bool) -> None:
        for phase, step in (("train", 8), ("eval", 5)):
            reference, made = self.fit_reference((step, phase))
            where = (
                f"a NaN loss at training step {step}"
                if phase == "train"
                else f"NaN outputs in evaluation from step {step} (a NaN test loss)"
            )
            folder = self.folder(f"nan-{phase}")
            fault = Fault("nan", where, "diverged")
            expected_step = step if phase == "train" else 6  # eval: at the end of epoch 1
            self._check_diverged(
                fault,
                folder,
                in_child(train_child, folder, nan=(step, phase)),
                phase,
                expected_step,
                (step, phase),
            )
            self.record(fault)
            if full:  # killed between its divergence and its result.json
                k = made["replaces"].index("tmp -> result.json") + 1
                folder = self.folder(f"nan-{phase}-killed")
                fault = Fault(
                    "nan", f"{where}, SIGKILL before replace {k} (tmp -> result.json)", "diverged"
                )
                killed = in_child(train_child, folder, nan=(step, phase), kill=(k, "before"))
                finished = in_child(train_child, folder, nan=(step, phase))
                if not killed.killed:
                    fault.outcome, fault.detail = "unexpected", f"the run {killed.describe()}"
                else:
                    self._check_diverged(
                        fault, folder, finished, phase, expected_step, (step, phase), reference
                    )
                self.record(fault)
        edits = [("weights", "train", 7)]
        if full:
            edits += [("optimizer state", "train", 8), ("running variance", "eval", 12)]
        for what, phase, step in edits:
            folder, _ = self._interrupted(f"nan-checkpoint-{what}", 2)  # end of epoch 1
            path = folder / "run" / "checkpoint.pt"
            state = load_checkpoint(path)
            if what == "weights":
                state["model"][
                    "input.weight"
                    if "input.weight" in state["model"]
                    else next(iter(state["model"]))
                ].view(-1)[0] = float("nan")
            elif what == "optimizer state":
                moments = next(iter(state["optimizer"]["state"].values()))
                moments["exp_avg_sq"].view(-1)[0] = float("nan")
            else:
                name = next(n for n in state["model"] if n.endswith("running_var"))
                state["model"][name].view(-1)[0] = float("nan")
            state["checksum"] = content_digest(state)  # a run gone bad, not a broken file
            with atomic_open(path, "wb") as f:
                torch.save(state, f)
            fault = Fault("nan", f"NaN in the latest checkpoint's {what}, then resumed", "diverged")
            self._check_diverged(fault, folder, in_child(train_child, folder), phase, step, None)
            self.record(fault)

    # -------------------------------------------------------------- 5. full disk
    def full_disk(self, factors: list[float]) -> None:
        reason = None
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            reason = "not root: cannot mount a tmpfs"
        elif shutil.which("mount") is None or shutil.which("umount") is None:
            reason = "no mount/umount command"
        if reason is None:
            probe = self.folder("mount-probe")
            proc = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                reason = f"mount -t tmpfs is not allowed here ({proc.stderr.strip()})"
            else:
                subprocess.run(["umount", str(probe)], check=True)
        if reason is not None:
            fault = Fault(
                "full-disk",
                "python -m resnorm train into a full tmpfs",
                "identical",
                outcome="skipped",
                ok=True,
                detail=reason,
            )
            self.record(fault)
            return
        source, reference = self.cli_reference()
        size = (source / "checkpoint.pt").stat().st_size
        for factor in factors:
            kib = int(size * factor) // 1024 + 8  # + config.json and the metrics files
            disk = self.folder(f"full-disk-{kib}k")
            fault = Fault(
                "full-disk",
                f"python -m resnorm train into a {kib} KiB tmpfs ({factor:g} checkpoints)",
                "identical",
            )
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(disk)],
                check=True,
                capture_output=True,
            )
            try:
                self._fill_disk(fault, disk, reference)
            finally:
                if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
                    subprocess.run(["umount", "-l", str(disk)], capture_output=True)
            self.record(fault)

    def _fill_disk(self, fault: Fault, disk: Path, reference: Reference) -> None:
        run = disk / "run"
        full = self.cli(*CLI_TRAIN, "--out", run)
        problems = []
        if full.returncode != 1 or not NO_SPACE.fullmatch(full.stderr):  # one line, exit 1
            problems.append(f"exit {full.returncode}, stderr: {full.stderr.strip()[-3000:]}")
        try:
            step = load_checkpoint(run / "checkpoint.pt")["global_step"]
        except Exception as exc:  # noqa: BLE001 - reported
            step = None
            problems.append(f"the checkpoint left is not loadable: {type(exc).__name__}: {exc}")
        stale = sorted(p.name for p in run.glob(".*.tmp")) if run.is_dir() else []
        if stale:
            problems.append(f"stale temporaries: {', '.join(stale)}")
        subprocess.run(
            ["mount", "-o", "remount,size=64m", str(disk)], check=True, capture_output=True
        )
        again = self.cli(*CLI_TRAIN, "--out", run)
        if again.returncode != 0:
            problems.append(
                f"after freeing space: exit {again.returncode}, "
                f"stderr: {again.stderr.strip()[-2000:]}"
            )
            self.judge(fault, problems, len(reference.jsonl))
            return
        more, lost = compare(run, reference, None)
        self.judge(fault, problems + [f"after freeing space: {p}" for p in more], lost)
        if fault.ok:
            fault.detail = (
                f"{full.stderr.strip()} (checkpoint at step {step} kept); after "
                f"freeing space: identical"
            )

    # -------------------------------------------------------------- 6. killed labs
    def _lab_command(self, study: Path, out: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "resnorm",
            "lab",
            str(study),
            "--workers",
            "2",
            "--out",
            str(out),
            "--quiet",
        ]

    def _start_lab(self, study: Path, out: Path) -> subprocess.Popen:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f"{out.name}.stderr.txt", "w") as stderr:
            return subprocess.Popen(
                self._lab_command(study, out),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=self.env,
                cwd=self.root,
                start_new_session=True,
            )

    def lab(self, count: int) -> None:
        if not Path("/proc/self/stat").exists():
            self.record(
                Fault(
                    "lab",
                    "killed lab parent",
                    "identical",
                    outcome="skipped",
                    ok=True,
                    detail="no /proc to find the workers",
                )
            )
            return
        base = self.folder("lab")
        study = base / "study.toml"
        study.write_text(STUDY)
        reference = base / "reference"
        # Uninterrupted, watched: when training starts (a run folder appears), when it
        # ends (every summary written) and when the lab ends (after its report).
        lab, start, training = self._start_lab(study, reference), time.perf_counter(), None
        while lab.poll() is None:
            runs = list(reference.glob("runs/*"))
            if runs and training is None:
                training = [time.perf_counter() - start, None]
            if (
                training
                and training[1] is None
                and len(list(reference.glob("runs/*/summary.json"))) == STUDY_RUNS
            ):
                training[1] = time.perf_counter() - start
            time.sleep(0.01)
        duration = time.perf_counter() - start
        if lab.wait() != 0 or training is None or training[1] is None:
            raise RuntimeError(
                "the reference lab failed: " + (base / "reference.stderr.txt").read_text()[-3000:]
            )
        references = {run.name: Reference.of(run) for run in sorted((reference / "runs").iterdir())}
        accuracies = {
            name: _strict_json((reference / "runs" / name / "summary.json").read_text())[
                "final_test_acc"
            ]
            for name in references
        }
        for i in range(count):
            # Two of three kills while the workers train (timed from the first run folder),
            # the others at any moment of the lab (start-up, training, the report).
            if i % 3 < 2:
                self._kill_lab(i, study, True, training[1] - training[0], references, accuracies)
            else:
                self._kill_lab(i, study, False, duration, references, accuracies)

    def _kill_lab(
        self,
        i: int,
        study: Path,
        in_training: bool,
        window: float,
        references: dict,
        accuracies: dict,
    ) -> None:
        fault = Fault("lab", "lab parent SIGKILLed", "identical")
        for attempt in range(4):  # a lab that ended before its kill is tried again earlier
            out = self.folder(f"lab-{i}-{attempt}") / "lab"
            delay = self.rng.uniform(0.0, window) / 2**attempt
            lab, start = self._start_lab(study, out), time.perf_counter()
            seen: set[int] = set()
            try:
                moment = None if in_training else delay
                while lab.poll() is None:
                    seen |= _descendants(lab.pid)
                    now = time.perf_counter() - start
                    if moment is None and any(out.glob("runs/*")):
                        moment = now + delay
                    if moment is not None and now >= moment:
                        break
                    time.sleep(0.01)
                seen |= _descendants(lab.pid)
                if lab.poll() is not None:
                    continue
                phase = (
                    f"{len(list(out.glob('runs/*/summary.json')))}/{STUDY_RUNS} runs "
                    f"done, {len(list(out.glob('runs/*/checkpoint.pt')))} with a checkpoint"
                )
                os.kill(lab.pid, signal.SIGKILL)
                lab.wait(timeout=30)
                survivors = _wait_gone(seen, timeout=30) | _naming(out)
            finally:
                # Whatever is left of this lab (its session), so that nothing outlives us.
                try:
                    os.killpg(lab.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                lab.wait(timeout=30)
            when = f"{delay:.2f} s into training" if in_training else f"at {delay:.2f} s"
            fault.name = f"lab parent SIGKILLed {when} ({phase}; {len(seen)} descendants seen)"
            problems = [f"survived the lab: {_describe(pid)}" for pid in sorted(survivors)]
            proc = subprocess.run(
                self._lab_command(study, out),
                capture_output=True,
                text=True,
                timeout=600,
                env=self.env,
                cwd=self.root,
            )
            if proc.returncode != 0:
                problems.append(
                    f"the lab run again: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"
                )
            lost = 0
            for name, reference in references.items():
                run = out / "runs" / name
                if not run.is_dir():
                    problems.append(f"{name}: missing")
                    lost += len(reference.jsonl)
                    continue
                more, missing = compare(run, reference)
                lost += missing
                problems += [f"{name}: {p}" for p in more]
                try:
                    accuracy = _strict_json((run / "summary.json").read_text())["final_test_acc"]
                except (OSError, ValueError, KeyError) as exc:
                    accuracy = f"unreadable ({exc})"
                if accuracy != accuracies[name]:
                    problems.append(f"{name}: final accuracy {accuracy} != {accuracies[name]}")
            self.judge(fault, problems, lost)
            break
        else:
            fault.outcome, fault.detail = "unexpected", "the lab always ended before the kill"
        self.record(fault)

    # -------------------------------------------------------------- tally
    def tally(self) -> dict:
        kinds = {}
        for kind in KINDS:
            faults = [f for f in self.faults if f.kind == kind]
            kinds[kind] = {
                "tried": sum(f.outcome != "skipped" for f in faults),
                "identical": sum(f.outcome == "identical" for f in faults),
                "expected_other": sum(
                    f.ok and f.outcome not in ("identical", "skipped") for f in faults
                ),
                "lost_rows": sum(f.lost_rows for f in faults),
                "unexpected": sum(not f.ok for f in faults),
                "skipped": sum(f.outcome == "skipped" for f in faults),
            }
        total = {
            key: sum(k[key] for k in kinds.values())
            for key in (
                "tried",
                "identical",
                "expected_other",
                "lost_rows",
                "unexpected",
                "skipped",
            )
        }
        return {
            "total": total,
            "kinds": kinds,
            "otherwise": [asdict(f) for f in self.faults if f.outcome != "identical"],
            "faults": [asdict(f) for f in self.faults],
        }


# ---------------------------------------------------------------------- processes


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = text[text.rindex(")") + 2 :].split()[:2]
    return state, int(ppid)


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _descendants(root: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                parents[int(entry.name)] = stat[1]
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _naming(folder: Path) -> set[int]:
    """Live processes (not this one) whose command line names ``folder``."""
    needle = str(folder).encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in Path(entry, "cmdline").read_bytes() and _alive(int(entry.name)):
                    found.add(int(entry.name))
            except OSError:
                pass
    return found


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return {p for p in pids if _alive(p)}


def _describe(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        cmdline = "?"
    return f"pid {pid} ({cmdline.strip()[:200]})"


# ---------------------------------------------------------------------- main


def run_campaign(root: Path, seed: int, quick: bool) -> dict:
    rng = random.Random(seed)
    campaign = Campaign(root, rng)
    _, made = campaign.fit_reference()
    calls = made["replaces"]
    if quick:

        def pick(call: str) -> tuple[int, str]:
            ks = [k for k, c in enumerate(calls, 1) if c == call]
            return rng.choice(ks), rng.choice(("before", "after"))

        campaign.sigkill(1)
        campaign.renames(
            [
                pick("tmp -> checkpoint.pt.new"),
                pick("checkpoint.pt -> checkpoint.prev.pt"),
                pick("checkpoint.pt.new -> checkpoint.pt"),
            ]
        )
        campaign.corrupt([("bit-flip", "with-prev")], ["garbage"])
        campaign.nan(full=False)
        campaign.full_disk([2.5])
        campaign.lab(1)
    else:
        campaign.sigkill(6)
        campaign.renames(recovery=True)
        how = ("truncated", "empty", "bit-flip", "garbage", "foreign")
        campaign.corrupt(
            [(h, "with-prev") for h in how] + [(h, "no-prev") for h in how] + [("garbage", "both")],
            ["garbage", "foreign"],
        )
        campaign.nan(full=True)
        campaign.full_disk([1.5, 2.5])
        campaign.lab(3)
    return campaign.tally()


def print_tally(tally: dict, seconds: float) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(
        title=f"fault campaign ({seconds:.0f} s)",
        caption="identical: survived bit-identically; expected: ended in the "
        "diverged result or the one clear error promised",
    )
    for column in ("kind", "tried", "identical", "expected", "lost rows", "unexpected", "skipped"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for kind, row in [*tally["kinds"].items(), ("total", tally["total"])]:
        table.add_row(
            kind,
            *(
                str(row[k])
                for k in (
                    "tried",
                    "identical",
                    "expected_other",
                    "lost_rows",
                    "unexpected",
                    "skipped",
                )
            ),
            style="bold" if kind == "total" else None,
        )
    console = Console(soft_wrap=True)
    console.print(table)
    if tally["otherwise"]:
        console.print("Faults that did not end bit-identical:")
        for fault in tally["otherwise"]:
            mark = "expected" if fault["ok"] else "[red]UNEXPECTED[/]"
            console.print(
                f"- {mark} {fault['kind']}: {escape(fault['name'])}: "
                f"{fault['outcome']}: {escape(fault['detail'])}",
                highlight=False,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each kind once or a few times")
    parser.add_argument("--seed", type=int, default=0, help="seeds the faults' random choices")
    parser.add_argument("--json", type=Path, help="write the tally and every fault here")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it")
    args = parser.parse_args(argv)
    if not hasattr(os, "fork"):
        parser.error("the campaign forks its training runs: it needs a POSIX system")
    torch.set_num_threads(1)  # this process never computes; its forked children use 1 thread
    start = time.perf_counter()
    if args.keep:
        args.keep.mkdir(parents=True)
        tally = run_campaign(args.keep.resolve(), args.seed, args.quick)
    else:
        with tempfile.TemporaryDirectory(prefix="resnorm-faults-") as tmp:
            tally = run_campaign(Path(tmp), args.seed, args.quick)
    seconds = time.perf_counter() - start
    tally = {"seed": args.seed, "quick": args.quick, "seconds": seconds, **tally}
    print_tally(tally, seconds)
    text = json.dumps(tally, indent=2, default=str)
    if args.json:
        with atomic_open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0 if tally["total"]["unexpected"] == 0 and tally["total"]["lost_rows"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
