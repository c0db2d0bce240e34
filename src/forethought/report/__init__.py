"""`forethought report`: the thread's questions answered for one model, on one page.

Sections (`sections.py`) each answer one question with a `Finding`; `runner.py` runs them in isolation with a
cache keyed by model, corpus and settings; `writers.py` renders index.html, report.md and report.json.
"""

from forethought.report.context import ReportContext, ReportSettings
from forethought.report.finding import Figure, Finding, Unavailable
from forethought.report.runner import Report, run_report
from forethought.report.sections import SECTIONS, Section, select
from forethought.report.writers import write_report

__all__ = [
    "SECTIONS",
    "Figure",
    "Finding",
    "Report",
    "ReportContext",
    "ReportSettings",
    "Section",
    "Unavailable",
    "run_report",
    "select",
    "write_report",
]
