"""The claims study's report (resnorm.lab.claims.report): the files it writes, strict JSON,
one CSV row per criterion, the claims table above the per-claim sections, escaping, and
figures that survive null values and empty series."""

import base64
import csv
import json
import math

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("jinja2")

from resnorm.lab.claims.report import claims_table, write_claims_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _criterion(what, verdict, n=5, mean=3.1, low=1.2, high=5.0, unit="points"):
    return {
        "what": what,
        "effect": "residual_deep.test_acc - plain_deep.test_acc",
        "holds_if": "> 2",
        "unit": unit,
        "n": n,
        "mean": mean,
        "low": low,
        "high": high,
        "verdict": verdict,
    }


def _results(quick=False) -> dict:
    lines = {
        "name": "claim-1-depth",
        "title": "Test accuracy by depth",
        "kind": "lines",
        "x_label": "depth",
        "y_label": "test accuracy (%)",
        "x_log": True,
        "y_log": False,
        "series": [
            {
                "label": "residual",
                "x": [2, 8, 32],
                "y": [70.0, None, 72.5],
                "low": [68.0, None, None],
                "high": [72.0, None, None],
            },
            {"label": "plain", "x": [2, 8, 32], "y": [69.0, 50.0, float("nan")]},
        ],
        "reference": 10.0,
        "reference_label": "chance",
    }
    bars = {
        "name": "claim-2-norm",
        "title": "Accuracy by normalization",
        "kind": "bars",
        "x_label": "norm",
        "y_label": "accuracy",
        "x_log": False,
        "y_log": False,
        "series": [
            {"label": "seed mean", "x": ["bn", "ln", "none"], "y": [80.0, 78.0, None]},
            {"label": "other", "x": ["bn", "ln"], "y": [79.0, 77.0], "low": [78.0, None]},
        ],
        "reference": None,
        "reference_label": None,
    }
    empty = {
        "name": "F1-empty",
        "title": "nothing",
        "kind": "lines",
        "series": [{"x": [], "y": []}],
    }
    claims = [
        {
            "id": "1",
            "kind": "claim",
            "title": "Residual connections <script>alert(1)</script> help",
            "quote": "very deep plain networks are hard to train",
            "seeds": ["000", "001"],
            "experiment": "depth",
            "design": "Plain and residual MLPs at 2 to 32 layers.",
            "verdict": "supported",
            "headline": "Residual beats plain by 3.1 points at 32 layers.",
            "criteria": [
                _criterion("gap at 32 layers", "supported"),
                _criterion("gap at 8 layers", "inconclusive", mean=float("nan")),
            ],
            "sentences": ["The gap grows with depth.", "It is 3.1 points at 32 layers."],
            "figures": [lines],
            "chosen_lr": {"residual": 0.01, "plain": None},
            "groups": {"residual": {"test_acc": [0.7, float("nan")]}},
        },
        {
            "id": "2",
            "kind": "claim",
            "title": "Normalization matters",
            "quote": "batch norm is essential",
            "seeds": ["002"],
            "experiment": "norm",
            "design": "Three norms.",
            "verdict": "not supported",
            "headline": "No difference.",
            "criteria": [_criterion("bn minus none", "not supported", n=1, low=None, high=None)],
            "sentences": ["Only one seed."],
            "figures": [bars],
            "chosen_lr": {"bn": 0.1},
            "groups": {},
        },
        {
            "id": "F1",
            "kind": "follow-up",
            "title": "Earlier result re-examined",
            "quote": "q",
            "seeds": [],
            "experiment": "batch",
            "design": "d",
            "verdict": "not judged",
            "headline": "Not judged.",
            "criteria": [_criterion("x", "not judged", n=0, mean=None, low=None, high=None)],
            "sentences": [],
            "figures": [empty],
            "chosen_lr": {},
            "groups": {},
        },
    ]
    return {
        "name": "claims",
        "description": "Fourteen claims & follow-ups.",
        "size": "quick" if quick else "default",
        "quick": quick,
        "settings": {
            "seeds": 5,
            "lrs": [0.001, 0.01, 0.1],
            "epochs": 20,
            "num_samples": 4000,
            "val_fraction": 0.2,
            "dataset": "mnist1d",
            "batch_size": 128,
        },
        "methodology": ["Five seeds per variant.", "Rules fixed before the run."],
        "provenance": {"resnorm": "0.1.0", "command": "resnorm lab claims", "seconds": 12.5},
        "seconds": 754.2,
        "counts": {"jobs": 30, "reused": 10, "trained": 20, "diverged": 1, "failed": 0},
        "claims": claims,
    }


def _strict(text):
    raise ValueError(f"not strict JSON: {text}")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("claims")
    path = write_claims_report(_results(), out)
    return out, path, path.read_text(encoding="utf-8")


def test_files_exist(written):
    out, path, _ = written
    assert path == out / "report.html"
    for name in ("claims.json", "claims.csv", "report.html"):
        assert (out / name).is_file()
    for name in ("claim-1-depth", "claim-2-norm", "F1-empty"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
        assert b"<svg" in (out / "figures" / f"{name}.svg").read_bytes()[:2000]
    assert not list(out.rglob(".*.tmp"))


def test_json_is_strict(written):
    out, _, _ = written
    data = json.loads((out / "claims.json").read_text(), parse_constant=_strict)
    assert data["claims"][0]["criteria"][1]["mean"] is None
    assert data["claims"][0]["groups"]["residual"]["test_acc"] == [0.7, None]
    assert len(data["claims"]) == 3


def test_csv_one_row_per_criterion(written):
    out, _, _ = written
    with open(out / "claims.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["claim_id"], r["criterion_verdict"]) for r in rows] == [
        ("1", "supported"),
        ("1", "inconclusive"),
        ("2", "not supported"),
        ("F1", "not judged"),
    ]
    assert rows[0]["verdict"] == "supported" and rows[2]["verdict"] == "not supported"
    assert rows[1]["mean"] == "" and rows[2]["low"] == "" and rows[2]["n"] == "1"
    assert math.isclose(float(rows[0]["mean"]), 3.1) and rows[3]["kind"] == "follow-up"


def test_html_order_verdicts_and_escaping(written):
    _, _, html = written
    table = html.index('id="claims-table"')
    assert table < html.index('id="claim-1"') < html.index('id="claim-2"')
    assert html.index('id="claim-2"') < html.index('id="claim-F1"')
    assert table < html.index("Methodology") < html.index('id="claim-1"')
    for word in ("supported", "not supported", "inconclusive", "not judged"):
        assert f">{word}</span>" in html
    assert "&lt;script&gt;" in html and "<script" not in html.lower()
    assert "2 claims: 1 supported, 1 not supported, 0 inconclusive" in html
    assert "1 follow-up" in html and "Follow-ups: earlier lab results re-examined" in html
    assert "gap at 32 layers: 3.1 [1.2, 5] points (holds if &gt; 2)" in html
    assert "bn minus none: 3.1 points, n=1, no interval (holds if &gt; 2)" in html
    assert "smoke run" not in html and "12 min 34 s" in html
    assert "0.001, 0.01, 0.1" in html and "30 jobs" in html and "resnorm lab claims" in html
    assert "http://" not in html and "https://" not in html


def test_png_embedded(written):
    out, _, html = written
    for name in ("claim-1-depth", "claim-2-norm", "F1-empty"):
        data = base64.b64encode((out / "figures" / f"{name}.png").read_bytes()).decode()
        assert f"data:image/png;base64,{data}" in html


def test_quick_title(tmp_path):
    results = _results(quick=True)
    for claim in results["claims"]:
        claim["figures"] = []
    html = write_claims_report(results, tmp_path).read_text(encoding="utf-8")
    assert "resnorm lab: claims: smoke run (--quick), no conclusions" in html


def test_claims_table_rows():
    rows = claims_table(_results())
    assert [r["id"] for r in rows] == ["1", "2", "F1"]
    assert rows[1] == {
        "id": "2",
        "title": "Normalization matters",
        "verdict": "not supported",
        "effect": "No difference.",
    }
    assert claims_table({}) == []


def test_figures_drawn_in_worker_processes_are_the_ones_drawn_here(written, tmp_path):
    """The lab hands the report its worker processes: the same PNGs (byte for byte) and
    the same page; a pool that broke during the study (a worker died) draws them here."""
    import multiprocessing
    from concurrent.futures import BrokenExecutor, ProcessPoolExecutor

    here, _, page = written
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        path = write_claims_report(_results(), tmp_path / "pool", pool)
    assert path.read_text(encoding="utf-8") == page
    names = sorted(p.name for p in (here / "figures").glob("*.png"))
    assert names == sorted(p.name for p in (tmp_path / "pool" / "figures").glob("*.png"))
    for name in names:
        drawn_there = (tmp_path / "pool" / "figures" / name).read_bytes()
        assert drawn_there == (here / "figures" / name).read_bytes(), name

    class Broken:
        def submit(self, *args):
            raise BrokenExecutor("a worker died")

    path = write_claims_report(_results(), tmp_path / "broken", Broken())
    assert path.read_text(encoding="utf-8") == page
