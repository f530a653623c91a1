"""The fault campaign of bench/faults.py in its quick mode: every kind of fault (random and
rename-exact SIGKILLs, corrupted checkpoints, NaN, a full disk, killed labs) ends
bit-identical or in its promised outcome, with no metrics row lost."""

import contextlib
import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnorm.train import CheckpointDir, checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "faults.py"


@pytest.mark.slow
@pytest.mark.skipif(
    not hasattr(os, "fork") or not Path("/proc/self/stat").exists(),
    reason="the campaign forks its runs and finds lab workers through /proc",
)
def test_quick_fault_campaign_loses_nothing(tmp_path):
    out = tmp_path / "faults.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--seed",
            "3",
            "--json",
            str(out),
            "--keep",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.exists(), proc.stdout[-5000:] + proc.stderr[-5000:]
    tally = json.loads(out.read_text())
    unexpected = [
        f"{f['kind']}: {f['name']}: {f['detail']}" for f in tally["otherwise"] if not f["ok"]
    ]
    assert unexpected == [] and proc.returncode == 0, "\n".join(unexpected) or proc.stderr
    assert tally["total"]["lost_rows"] == 0
    assert tally["total"]["tried"] >= 10
    for kind, row in tally["kinds"].items():
        assert row["tried"] or (kind == "full-disk" and row["skipped"]), kind
    # Kills, renames, fallbacks, full disks and labs survive bit-identically; a corrupted
    # checkpoint with nothing to fall back on is one clear error, NaN a diverged result.
    kinds = tally["kinds"]
    for kind in ("sigkill", "rename", "lab"):
        assert kinds[kind]["identical"] == kinds[kind]["tried"], kind
    assert kinds["nan"]["expected_other"] == kinds["nan"]["tried"]
    assert kinds["corrupt"]["identical"] >= 1 and kinds["corrupt"]["expected_other"] >= 1
    assert "Faults that did not end bit-identical" in proc.stdout


class _FullDisk(io.RawIOBase):
    """A file on a disk that fills after ``room`` bytes."""

    def __init__(self, room: int) -> None:
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return len(data)


def test_a_disk_full_during_torch_save_raises_the_os_error_naming_the_file(tmp_path, monkeypatch):
    """What the campaign's full-disk fault found: torch.save's zip writer, closing the
    archive after a failed write, raises a RuntimeError ("unexpected pos") over the OSError,
    which the CLI showed as an internal error with a traceback. The save raises the OSError,
    naming the checkpoint it was writing (the CLI's one line, exit 1)."""
    with pytest.raises(RuntimeError, match="unexpected pos") as hidden:
        torch.save({"w": torch.zeros(10_000)}, _FullDisk(1000))
    assert isinstance(hidden.value.__context__, OSError)  # what torch does

    monkeypatch.setattr(
        checkpoint,
        "atomic_open",
        contextlib.contextmanager(lambda path, mode: (yield _FullDisk(1000))),
    )
    with pytest.raises(OSError) as info:
        CheckpointDir(tmp_path).save({"model": {"w": torch.zeros(10_000)}})
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(tmp_path / "checkpoint.pt.new")
