"""Where experiments that live elsewhere in the project are wired into the report: one provider per section.

A provider is `fn(ctx: ReportContext, folder: Path) -> Finding`. It calls the experiment in-process with the
loaded model (`ctx.lm()`; `.model`, `.tokenizer`, `.name`), the corpus (`ctx.corpus`) and sizes that follow
`ctx.settings` (quick or full), writes its PNGs into `folder` with the library's own plot function, and returns
a Finding: a verdict that answers the section's question in plain words with its numbers, `numbers` (name ->
value), `intervals` (name -> [low, high], 95%) for every number that has one, `figures` (file name in `folder`,
caption, the exact command that regenerates it), `commands` and `data` (the result's `to_dict()`). The runner
caches what it returns by model, corpus and `ctx.settings`. Register it below:

    def plan_answer(ctx, folder):
        result = <issue 11's experiment>(ctx.lm().model, ...)
        <its plot>(result, folder / "plan.png")
        return Finding(<verdict>, numbers={...}, intervals={...},
                       figures=[Figure("plan.png", "<caption>", "forethought <command> --plot plan.png")],
                       data=result.to_dict())

    register_provider("plan", plan_answer)

"plan", "speculative" and "architectures" are wired below (`plan.py`, `speculative.py`, `architectures.py`); each
imports its experiment inside the function, so a missing optional dependency fails only that section.

The pending keys are "plan", "architectures", "speculative" and "second_model" (which `--compare` also answers).
A section without a provider reads `<results>/<key>.json` (a Finding as JSON) or says it is not available.
"""

from __future__ import annotations

from forethought.report.architectures import architectures
from forethought.report.pending import register_provider
from forethought.report.plan import plan_answer
from forethought.report.speculative import speculative

register_provider("plan", plan_answer)
register_provider("speculative", speculative)
register_provider("architectures", architectures)
