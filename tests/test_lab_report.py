"""The lab's report: files, self-contained HTML, escaping, and findings computed from the
numbers. Synthetic results only (no training), so the whole file takes seconds."""

from __future__ import annotations

import base64
import csv
import json
import zlib
from html.parser import HTMLParser

import markupsafe
import pytest

from resnorm.lab.report import CSV_COLUMNS, summarize_findings, summary_table, write_report

XSS = "mlp, residual, layer norm <script>alert(1)</script>"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURE_NAMES = ("accuracy", "loss_curves", "init_grad_norms", "init_signal")


def _history(final_acc, epochs=3, final_loss=0.5, diverge=False):
    rows = []
    for e in range(1, epochs + 1):
        frac = e / epochs
        rows.append(
            {
                "epoch": e,
                "train_loss": 2.3 - (2.3 - final_loss) * frac,
                "train_acc": final_acc * frac,
                "test_loss": 2.0 - frac,
                "test_acc": final_acc * frac,
                "lr": 1e-3,
                "seconds": 0.1 * e,
            }
        )
    if diverge:
        rows[-1]["train_loss"] = float("nan")
        rows[-1]["test_loss"] = float("inf")
    return rows


def _init(depth, verdict="healthy", ratio=2.0, decay=1.0):
    layers = [
        {"name": f"blocks.{i}.fc", "kind": "Linear", "grad_norm": 0.1 * decay ** (depth - i)}
        for i in range(depth)
    ]
    blocks = [
        {
            "name": f"blocks.{i}",
            "sq_mean": 0.5 * decay**i,
            "var": 1.0 + i,
            "branch_var": 0.5 if verdict == "healthy" else None,
        }
        for i in range(depth)
    ]
    return {"verdict": verdict, "grad_ratio": ratio, "layers": layers, "blocks": blocks}


def _run(
    variant,
    *,
    depth=8,
    batch_size=128,
    seed=0,
    acc=0.8,
    residual=True,
    norm="batch",
    model="mlp",
    status="finished",
    history=True,
    init=True,
    verdict="healthy",
    ratio=2.0,
    error=None,
    diverged_at_step=None,
):
    finished = status == "finished" and acc is not None
    hist = (
        _history(acc if acc is not None else 0.1, diverge=status == "diverged")
        if history and status != "failed"
        else []
    )
    return {
        "run_id": f"{model}-d{depth}-{norm}-{'res' if residual else 'plain'}-post-b{batch_size}"
        f"-s{seed}-{zlib.crc32(variant.encode()) % 1000}",
        "variant": variant,
        "family": model,
        "model": model,
        "depth": depth,
        "norm": norm,
        "residual": residual,
        "placement": "post",
        "batch_size": batch_size,
        "seed": seed,
        "dataset": "mnist1d",
        "status": status,
        "error": error,
        "diverged_at_step": diverged_at_step,
        "final_test_acc": acc if finished else None,
        "best_test_acc": acc if finished else None,
        "final_train_loss": (hist[-1]["train_loss"] if hist else None),
        "parameters": 1000 * depth,
        "seconds": 1.5,
        "history": hist,
        "init": _init(depth, verdict, ratio, decay=1.0 if residual else 0.3) if init else None,
    }


DEPTH_STUDY = {
    "name": "depth <b>bold</b>",
    "description": "Plain vs residual & norms.",
    "x": "depth",
}


def depth_results():
    results = []
    accs = {
        ("mlp, residual, batch norm", True): {2: (0.80, 0.81), 8: (0.80, 0.80), 24: (0.79, 0.81)},
        ("mlp, plain, batch norm", False): {2: (0.80, 0.80), 8: (0.60, 0.62), 24: (0.30, 0.30)},
        (XSS, True): {2: (0.75, 0.77), 8: (0.74, 0.76), 24: (0.75, 0.75)},
    }
    for (variant, residual), by_depth in accs.items():
        norm = "layer" if variant == XSS else "batch"
        for depth, seeds in by_depth.items():
            for seed, acc in enumerate(seeds):
                verdict = "healthy" if residual or depth == 2 else "exploding"
                kwargs = {}
                if variant == "mlp, plain, batch norm" and depth == 24 and seed == 1:
                    kwargs = {"status": "diverged", "acc": None, "diverged_at_step": 17}
                if variant == XSS and depth == 8 and seed == 0:
                    kwargs = {
                        "status": "failed",
                        "acc": None,
                        "init": False,
                        "error": "RuntimeError: boom <img src=x onerror=alert(2)>",
                    }
                results.append(
                    _run(
                        variant,
                        depth=depth,
                        seed=seed,
                        residual=residual,
                        norm=norm,
                        verdict=verdict,
                        ratio=2.0 if residual else 10.0**depth,
                        **{"acc": acc, **kwargs},
                    )
                )
    # a non-finite number the JSON must turn into null
    results[0]["seconds"] = float("inf")
    return results


class _Page(HTMLParser):
    """Collects the tags, the src/href attributes, the <img> sources and the rows of
    the table with id="results"."""

    def __init__(self):
        super().__init__()
        self.tags, self.links, self.images, self.rows = [], [], [], []
        self._table = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        for key in ("src", "href"):
            if key in attrs:
                self.links.append(attrs[key])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "table":
            self._table = attrs.get("id")
        if self._table == "results" and tag == "tr":
            self.rows.append([])
        if self._table == "results" and tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(html):
    page = _Page()
    page.feed(html)
    return page


def _strict_json(path):
    def refuse(name):
        raise AssertionError(f"non-strict JSON constant {name} in {path}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def _check_common(out, results, page, html, n_figures):
    """What every report must satisfy."""
    data = _strict_json(out / "results.json")
    assert [r["run_id"] for r in data] == [r["run_id"] for r in results]
    # one embedded PNG per figure drawn, nothing fetched from anywhere
    assert len(page.images) == n_figures
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG_MAGIC)
    for link in page.links:
        assert not link.lower().startswith(("http://", "https://", "//", "file:")), link
    assert "script" not in page.tags and "link" not in page.tags
    assert "http://" not in html and "https://" not in html
    # the runs table matches results.json: same run ids in order, same accuracies
    header, *rows = page.rows
    assert header[:6] == ["run_id", "variant", header[2], "seed", "status", "final test acc (%)"]
    assert [row[0] for row in rows] == [r["run_id"] for r in data]
    for row, run in zip(rows, data):
        if run["final_test_acc"] is None:
            assert row[5] == ""
        else:
            assert float(row[5]) == pytest.approx(run["final_test_acc"] * 100, abs=0.005)
        assert row[4] == run["status"]
    # results.csv: one row per run, the same values
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        csv_rows = list(reader)
    assert [r["run_id"] for r in csv_rows] == [r["run_id"] for r in data]
    for row, run in zip(csv_rows, data):
        assert row["variant"] == run["variant"] and row["status"] == run["status"]
        acc = run["final_test_acc"]
        assert (row["final_test_acc"] == "") if acc is None else float(row["final_test_acc"]) == acc
        init = run["init"] or {}
        assert row["init_verdict"] == (init.get("verdict") or "")
        assert int(row["depth"]) == run["depth"] and int(row["seed"]) == run["seed"]
    assert not list(out.rglob("*.tmp"))
    return data


def test_report_depth_study(tmp_path):
    results = depth_results()
    path = write_report(results, DEPTH_STUDY, tmp_path / "lab")
    out = tmp_path / "lab"
    assert path == out / "report.html" and path.exists()
    html = path.read_text(encoding="utf-8")
    page = _parse(html)
    data = _check_common(out, results, page, html, n_figures=4)

    # strict JSON: inf and NaN became null, everything else kept
    assert data[0]["seconds"] is None
    diverged = next(r for r in data if r["status"] == "diverged")
    assert diverged["history"][-1]["train_loss"] is None
    assert diverged["final_train_loss"] is None
    assert data[1]["history"] == results[1]["history"]

    # escaping: user strings appear escaped, never raw
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(2)&gt;" in html
    assert "<b>bold</b>" not in html and "depth &lt;b&gt;bold&lt;/b&gt;" in html
    assert "<title>resnorm lab: depth &lt;b&gt;bold&lt;/b&gt;</title>" in html

    # summary line, findings, verdict table
    assert "18 runs: 16 finished, 1 diverged, 1 failed" in html
    assert "What this run shows" in html
    assert 'id="verdicts"' in html and "exploding" in html and "grad ratio 1.0e+24" in html

    for name in FIGURE_NAMES:
        assert (out / "figures" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
        assert "<svg" in (out / "figures" / f"{name}.svg").read_text(encoding="utf-8")[:2000]

    # findings for this data, with its numbers
    findings = summarize_findings(results, DEPTH_STUDY)
    assert (
        "mlp, plain, batch norm: 80.0% at 2 blocks -> 30.0% at 24 blocks (-50.0 points; "
        "1 diverged of 2 runs at 24 blocks, not averaged)." in findings
    )
    assert (
        "mlp, residual, batch norm: 80.5% at 2 blocks -> 80.0% at 24 blocks (-0.5 points)."
        in findings
    )
    assert any(f.startswith("1 of 18 runs diverged: ") and "(at step 17)" in f for f in findings)
    assert any(
        f.startswith("1 of 18 runs failed: ") and "RuntimeError: boom" in f for f in findings
    )
    for f in findings:  # every finding is on the page, escaped
        assert f"<li>{markupsafe.escape(f)}</li>" in html


BATCH_STUDY = {"name": "batch-size", "description": "Batch norm needs batches.", "x": "batch_size"}


def batch_results():
    accs = {
        ("mlp, residual, batch norm", "batch"): {
            256: (0.80, 0.80),
            32: (0.70, 0.72),
            2: (0.40, 0.40),
        },
        ("mlp, residual, layer norm", "layer"): {
            256: (0.78, 0.78),
            32: (0.78, 0.78),
            2: (0.775, 0.775),
        },
    }
    results = []
    for (variant, norm), by_batch in accs.items():
        for batch, seeds in by_batch.items():
            for seed, acc in enumerate(seeds):
                results.append(_run(variant, batch_size=batch, seed=seed, acc=acc, norm=norm))
    return results


def test_report_batch_size_study(tmp_path):
    results = batch_results()
    out = tmp_path / "batch"
    html = write_report(results, BATCH_STUDY, out).read_text(encoding="utf-8")
    page = _parse(html)
    _check_common(out, results, page, html, n_figures=4)
    assert page.rows[0][2] == "batch size"
    findings = summarize_findings(results, BATCH_STUDY)
    # from the largest batch to the smallest
    assert (
        "mlp, residual, batch norm: 80.0% at batch size 256 -> 40.0% at batch size 2 "
        "(-40.0 points)."
    ) in findings
    assert (
        "mlp, residual, layer norm: 78.0% at batch size 256 -> 77.5% at batch size 2 (-0.5 points)."
    ) in findings
    by_norm = next(f for f in findings if f.startswith("By norm kind"))
    assert "batch norm 80.0% at batch size 256 -> 40.0% at batch size 2 (-40.0 points)" in by_norm
    assert "layer norm 78.0% at batch size 256 -> 77.5% at batch size 2 (-0.5 points)" in by_norm
    degrade = next(f for f in findings if f.startswith("Degrade as the batch shrinks"))
    assert "batch norm" in degrade and "layer norm" not in degrade
    assert any(
        f.startswith("Best at batch size 2: mlp, residual, layer norm with 77.5%") for f in findings
    )


def test_summarize_findings_exact_numbers():
    study = {"name": "t", "description": "", "x": "depth"}
    results = []

    def add(variant, residual, by_depth, norm="none"):
        for depth, seeds in by_depth.items():
            for seed, acc in enumerate(seeds):
                results.append(
                    _run(
                        variant,
                        depth=depth,
                        seed=seed,
                        acc=acc,
                        norm=norm,
                        residual=residual,
                        history=False,
                        init=False,
                    )
                )

    add("plain mlp, no norm", False, {2: (0.8, 0.8), 8: (0.6, 0.6), 24: (0.3, 0.3)})
    add("residual mlp, no norm", True, {2: (0.81, 0.79), 8: (0.8, 0.8), 24: (0.8, 0.8)})
    # a 3-point drop, but the seeds disagree by 10 points at depth 2: within the noise
    add("noisy mlp", True, {2: (0.85, 0.75), 24: (0.78, 0.76)}, norm="layer")
    # a 1.5-point drop with identical seeds: beyond 1 point, so it degrades
    add("slipping mlp", True, {2: (0.80, 0.80), 24: (0.785, 0.785)}, norm="rms")

    findings = summarize_findings(results, study)
    assert "plain mlp, no norm: 80.0% at 2 blocks -> 30.0% at 24 blocks (-50.0 points)." in findings
    assert (
        "residual mlp, no norm: 80.0% at 2 blocks -> 80.0% at 24 blocks (+0.0 points)." in findings
    )
    assert "noisy mlp: 80.0% at 2 blocks -> 77.0% at 24 blocks (-3.0 points)." in findings
    assert "slipping mlp: 80.0% at 2 blocks -> 78.5% at 24 blocks (-1.5 points)." in findings
    degrade = next(f for f in findings if f.startswith("Degrade with depth"))
    assert "plain mlp, no norm (-50.0 points)" in degrade
    assert "slipping mlp (-1.5 points)" in degrade
    assert "residual mlp" not in degrade and "noisy" not in degrade
    hold = next(f for f in findings if f.startswith("Hold with depth"))
    assert "residual mlp, no norm (+0.0 points, allowance 2.0)" in hold
    assert "noisy mlp (-3.0 points, allowance 10.0)" in hold
    assert "plain" not in hold and "slipping" not in hold
    assert (
        "residual mlp, no norm vs plain mlp, no norm: residual minus plain +0.0 points at "
        "2 blocks, +20.0 points at 8 blocks, +50.0 points at 24 blocks."
    ) in findings
    assert (
        "Best at 24 blocks: residual mlp, no norm with 80.0% (2 seeds), 1.5 points ahead "
        "of slipping mlp (78.5%)."
    ) in findings
    assert "20 of 20 runs finished; none diverged or failed." in findings
    assert not any(f.startswith("At initialization") for f in findings)

    # nothing degrades: no "Degrade" sentence at all
    holding = [r for r in results if not r["variant"].startswith(("plain", "slipping"))]
    assert not any(f.startswith("Degrade") for f in summarize_findings(holding, study))


def test_init_only_training_only_and_empty(tmp_path):
    # an init study: diagnostics, no training, no accuracy
    init_results = [
        _run(
            v,
            depth=d,
            seed=0,
            acc=None,
            residual=res,
            history=False,
            verdict="healthy" if res else "vanishing",
            ratio=3.0 if res else 1e-30,
        )
        for v, res in (("mlp, residual, no norm", True), ("mlp, plain, no norm", False))
        for d in (8, 20)
    ]
    for r in init_results:
        r["status"] = "finished"
    out = tmp_path / "init"
    html = write_report(
        init_results, {"name": "init", "description": "", "x": "depth"}, out
    ).read_text(encoding="utf-8")
    page = _parse(html)
    _check_common(out, init_results, page, html, n_figures=2)
    assert html.count("Not drawn:") == 2
    assert not (out / "figures" / "accuracy.png").exists()
    assert (out / "figures" / "init_grad_norms.svg").exists()
    findings = summarize_findings(init_results, {"x": "depth"})
    init_line = next(f for f in findings if f.startswith("At initialization"))
    assert "vanishing: mlp, plain, no norm (20 blocks, grad ratio 1.0e-30)" in init_line
    assert "healthy: mlp, residual, no norm (20 blocks, grad ratio 3.0e+00)" in init_line

    # a training study without init diagnostics, into the same folder: the stale init
    # figures go, the verdict table says there is nothing
    train_results = [
        _run("mlp, residual, batch norm", depth=d, seed=s, acc=0.8, init=False)
        for d in (2, 8)
        for s in (0, 1)
    ]
    html = write_report(train_results, {"name": "train", "x": "depth"}, out).read_text(
        encoding="utf-8"
    )
    page = _parse(html)
    _check_common(out, train_results, page, html, n_figures=2)
    assert "No initialization diagnostics in these results." in html
    assert not (out / "figures" / "init_grad_norms.png").exists()
    assert (out / "figures" / "accuracy.svg").exists()

    # no runs at all
    empty = tmp_path / "empty"
    html = write_report([], {"name": "nothing", "x": "batch_size"}, empty).read_text(
        encoding="utf-8"
    )
    assert _parse(html).images == []
    assert _strict_json(empty / "results.json") == []
    assert (empty / "results.csv").read_text().strip() == ",".join(CSV_COLUMNS)
    assert summarize_findings([], {"x": "depth"}) == ["No runs in these results."]
    assert not list(tmp_path.rglob("*.tmp"))


def test_bad_axis_is_refused(tmp_path):
    with pytest.raises(ValueError, match="width"):
        write_report([], {"name": "x", "x": "width"}, tmp_path)


def test_summary_table():
    from rich.console import Console

    results = depth_results()
    results.append(_run("[red]odd[/red] variant", depth=2, acc=0.5))
    table = summary_table(results, DEPTH_STUDY)
    assert table.row_count == 3 * 3 + 1
    console = Console(record=True, width=250, color_system=None)
    console.print(table)
    text = console.export_text()
    assert "[red]odd[/red] variant" in text  # markup in a name is shown, not interpreted
    assert "80.5%" in text and "±1.0" in text
    assert "30.0%" in text
    empty = summary_table([], {"name": "none", "x": "depth"})
    assert empty.row_count == 0


def test_depth_counts_one_thing_per_plot_and_sentence(tmp_path):
    """An MLP's depth counts residual blocks, a 1-D ResNet's weight layers: the findings say
    which, 'Best at' never ranks an MLP against a ResNet at the same number, and the
    accuracy figure draws one panel per unit, each axis labelled with its unit."""
    import matplotlib

    matplotlib.use("Agg")
    from resnorm.lab.report import figures
    from resnorm.lab.report.groups import _groups

    results = []
    for model, depths, accs in (
        ("mlp", (8, 20), (0.7, 0.6)),
        ("mlp", (8, 20), (0.72, 0.5)),
        ("resnet1d", (8, 20), (0.8, 0.9)),
    ):
        plain = len(results) == 2
        for depth, acc in zip(depths, accs):
            results.append(
                _run(
                    f"{model}{', plain' if plain else ''}",
                    depth=depth,
                    acc=acc,
                    model=model,
                    residual=not plain,
                    history=False,
                    init=False,
                )
            )
    findings = summarize_findings(results, {"name": "t", "x": "depth"})
    assert (
        "resnet1d: 80.0% at 8 weight layers -> 90.0% at 20 weight layers (+10.0 points)."
        in findings
    )
    assert "mlp: 70.0% at 8 blocks -> 60.0% at 20 blocks (-10.0 points)." in findings
    best = [f for f in findings if f.startswith("Best at")]
    assert best == [
        "Best at 20 blocks: mlp with 60.0% (1 seed), 10.0 points ahead of mlp, plain (50.0%)."
    ]
    fig, _ = figures._accuracy_figure(_groups(results, "depth"), "depth")
    try:
        labels = sorted(ax.get_xlabel() for ax in fig.axes)
        assert labels == ["depth (blocks)", "depth (weight layers)"]
    finally:
        matplotlib.pyplot.close(fig)
