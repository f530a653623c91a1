"""The files of a run folder, written atomically."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .._io import atomic_open, json_safe
from .checkpoint import CheckpointDir

METRIC_KEYS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds")


class RunFiles:
    """The files of a run directory: ``config.json``, ``metrics.jsonl``, ``metrics.csv``,
    ``checkpoint.pt`` (+ ``checkpoint.prev.pt``), ``result.json``, ``monitor.jsonl``."""

    def __init__(self, root) -> None:
        self.root = Path(root)
        self.checkpoints = CheckpointDir(self.root)

    def write_json(self, name: str, payload: dict) -> None:
        with atomic_open(self.root / name, "w") as f:
            json.dump(payload, f, indent=2, allow_nan=False, default=str)
            f.write("\n")

    def read_json(self, name: str) -> dict | None:
        """A JSON file of the run folder, or ``None`` if it is missing or unreadable."""
        try:
            value = json.loads((self.root / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def write_metrics(self, history: list[dict]) -> None:
        """Rewrite both metrics files from the history (so a resumed run never repeats or
        loses a row). Values that are not finite are written as null (JSON) and empty
        cells (CSV)."""
        history = json_safe(history)
        with atomic_open(self.root / "metrics.jsonl", "w") as f:
            for row in history:
                f.write(json.dumps(row, allow_nan=False) + "\n")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRIC_KEYS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        with atomic_open(self.root / "metrics.csv", "w") as f:
            f.write(buffer.getvalue())
