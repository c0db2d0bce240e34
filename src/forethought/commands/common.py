"""What every command shares: the Typer app the commands register on, the consoles, the common options
(model, device, dtype, --json, --plot), loading a model, and parsing integer lists. `forethought.cli` only
assembles these commands and turns user errors into one line."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from forethought.errors import ForethoughtError
from forethought.progress import Progress
from forethought.weights.registry import DEFAULT_MODEL

__all__ = ["DEFAULT_MODEL"]  # re-exported: commands write `model: ModelOpt = DEFAULT_MODEL`

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Run a language model offline with an explicit KV cache and measure what it carries between tokens.",
)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Named model or path to a .gguf file / HF folder.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
DtypeOpt = Annotated[
    str,
    typer.Option("--dtype", help="float32, bfloat16, float16, float64, or int8 (8-bit weights, float32 activations)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Write a PNG of the result to this file.")]


class Stdout:
    """Streamed text goes through here, so an error or interruption that stops it mid-line starts its own line
    (the `error:` line must never be glued to the end of the prompt or the generated text)."""

    mid_line = False

    @classmethod
    def write(cls, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            cls.mid_line = not text.endswith("\n")

    @classmethod
    def end_line(cls) -> None:
        if cls.mid_line:
            cls.mid_line = False
            try:
                sys.stdout.write("\n")
                sys.stdout.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more to keep apart
                pass


def load(model: str, device: str, dtype: str, quiet: bool = False):
    # looked up at call time, so a test (tests/fuzzing.py) can watch every command's load in one place
    import forethought.weights as weights

    if quiet:
        return weights.load_model(model, device, dtype)
    with err_console.status(f"loading {model} …"):
        return weights.load_model(model, device, dtype)


def check_plot(plot: Path | None) -> None:
    """Before any work: --plot writes a PNG, so its name must say so."""
    if plot is not None and plot.suffix.lower() != ".png":
        raise ForethoughtError(f"--plot writes a PNG: give a file name ending in .png, not {str(plot)!r}")
    if plot is not None:
        from forethought.paths import output_file

        output_file(plot, "--plot")  # a folder, a read-only or missing parent: said now, not after the work


def plotted(path: Path) -> None:
    console.print(f"[dim]plot written to {path}[/dim]")


def emit_json(obj: dict) -> None:
    print(json.dumps(obj, default=str))


def prompt_ids(lm, prompt: str) -> list[int]:
    ids = lm.tokenizer.encode(prompt)
    if not ids:
        raise ForethoughtError("the prompt is empty: give at least one token of text")
    return ids


def parse_int_list(text: str, what: str, upper: int | None = None, empty_ok: bool = False) -> list[int]:
    """'all', '0,5,10', '1-4' or a mix ('0-3,8') -> sorted unique ints; `what` is the flag's name without dashes.
    With `empty_ok`, a blank text means "no subset" and gives []."""
    text = text.strip()
    if not text and empty_ok:
        return []
    if text == "all":
        if upper is None:
            raise ForethoughtError(f"--{what} all needs a known range")
        return list(range(upper))
    values: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                values.update(range(int(lo), int(hi) + 1))
            else:
                values.add(int(part))
    except ValueError:
        raise ForethoughtError(f"--{what} {text!r}: use 'all', a list like 0,5,10 or a range like 1-4") from None
    if not values:
        raise ForethoughtError(f"--{what} is empty")
    if upper is not None and (min(values) < 0 or max(values) >= upper):
        raise ForethoughtError(f"--{what} {text!r}: values must lie in 0..{upper - 1}")
    return sorted(values)


@contextmanager
def progress_bar(label: str, unit: str | None = None, quiet: bool = False) -> Iterator[Progress | None]:
    """A bar on stderr for compute code that reports (done, total) (`forethought.progress`); None when quiet
    (--json), so nothing but the JSON reaches the terminal. `unit` adds a rate, e.g. "tok" -> "1,234 tok/s"."""
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:  # over the whole run so far: steadier than rich's windowed speed
            return Text(f"{task.completed / task.elapsed if task.elapsed else 0.0:,.0f} {unit}/s")

    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), *([Rate()] if unit else []), TimeElapsedColumn()]
    with Progress(*columns, console=err_console) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
