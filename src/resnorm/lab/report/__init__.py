"""The lab's report: what a study's runs show, as files a reader can open anywhere.

:func:`write_report` writes into one folder ``results.json`` (every run, strict JSON),
``results.csv`` (one row per run), ``figures/*.png`` and ``figures/*.svg``, and a
self-contained ``report.html`` (images embedded as base64 PNG, no external resource, every
user-controlled string escaped), each written atomically. :func:`summarize_findings` says
in sentences what the numbers show, and :func:`summary_table` is the terminal's view.

The parts: ``groups`` reads the results (variants, points, the swept axis), ``findings``
writes the sentences, ``table`` the terminal table, ``figures`` the figures, ``page`` the
HTML page (from the template ``report.html.j2``) and ``files`` the JSON and CSV files and
the whole folder.

Conventions, in one place:

- A *variant* is a result's ``variant`` label: everything but the swept axis (``study["x"]``,
  ``"depth"`` or ``"batch_size"``) and the seed. Runs sharing a variant and an x value are
  seeds of one point. Should one label cover runs that differ in anything else (the other
  axis, options, data set, ...), the differing fields are appended to the label so that
  different configurations are never averaged together.
- A point's accuracy is the mean ``final_test_acc`` of its *finished* runs; its seed spread
  is their max - min. Diverged and failed runs are never averaged in: they are drawn as
  crosses at their last accuracy (or noted when they have none) and counted.
- Along the axis, the *easy* end is the smallest depth or the largest batch and the *hard*
  end the largest depth or the smallest batch; changes are reported from easy to hard.
  A variant *degrades* when its hard-end mean is below its easy-end mean by more than
  both 1 point and the larger of the two seed spreads; otherwise it *holds*.
"""

from __future__ import annotations

from .figures import FIGURES
from .files import CSV_COLUMNS, write_report
from .findings import SMOKE_NOTE, summarize_findings
from .groups import AXES
from .table import summary_table

__all__ = [
    "AXES",
    "CSV_COLUMNS",
    "FIGURES",
    "SMOKE_NOTE",
    "summarize_findings",
    "summary_table",
    "write_report",
]
