"""The lab: the classic experiments as studies (grids of runs), run in parallel and
resumably, with a report of figures and numbers."""

from .lab import LabResult, run_lab
from .runner import RunSummary, execute_run, plan_workers, run_study
from .study import BUILTIN, RunSpec, Study, StudyError, load_study, parse_study

__all__ = [
    "BUILTIN",
    "LabResult",
    "RunSpec",
    "RunSummary",
    "Study",
    "StudyError",
    "execute_run",
    "load_study",
    "parse_study",
    "plan_workers",
    "run_lab",
    "run_study",
]
