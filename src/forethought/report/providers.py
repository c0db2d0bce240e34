"""Where the experiments of other parts of the project are wired into the report, one provider per section.

A provider is `fn(ctx: ReportContext, folder: Path) -> Finding`: it calls the experiment with the loaded model
(`ctx.lm()`), the corpus (`ctx.corpus`) and sizes that follow `ctx.settings` (quick or full), writes its PNGs
into `folder` with the library's plot function, and returns a Finding whose verdict answers the question in
plain words with its numbers (and `intervals` for every number that has one). Register it here:

    register_provider("plan", plan_answer)

Sections without a provider read `<results>/<key>.json` or say they are not available.
"""

from __future__ import annotations

from forethought.report.pending import register_provider  # noqa: F401  (the lead's providers call it here)
