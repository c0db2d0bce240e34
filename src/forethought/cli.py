"""The `forethought` command line, assembled: every command lives in `forethought.commands` (one module per
area, shared options in `commands/common.py`); this module registers them and turns a user's error into one line
on stderr and exit code 2."""

from __future__ import annotations

import sys

import typer

from forethought.commands.common import Stdout, app, err_console
from forethought.errors import ForethoughtError

try:  # recent typer vendors its own click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older typer on real click
    from click.exceptions import ClickException, NoArgsIsHelpError

__all__ = ["app", "main"]


def _register_commands() -> None:
    import importlib
    import pkgutil

    import forethought.commands as package

    importlib.import_module("forethought.commands.generate")  # first in --help: the model itself
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"forethought.commands.{module.name}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    _register_commands()
    command = typer.main.get_command(app)
    Stdout.mid_line = False
    try:
        try:
            command.main(args=argv, prog_name="forethought", standalone_mode=False)
        finally:
            Stdout.end_line()
    except ForethoughtError as e:
        err_console.print(f"error: {e}", markup=False, soft_wrap=True)
        return 2
    except NoArgsIsHelpError as e:
        print(e.ctx.get_help())
        return 0
    except ClickException as e:
        err_console.print(f"error: {e.format_message()}", markup=False, soft_wrap=True)
        return 2
    except typer.Abort:
        err_console.print("aborted", markup=False)
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        return 130
    except FileNotFoundError as e:
        err_console.print(f"error: {e.strerror}: {e.filename}", markup=False, soft_wrap=True)
        return 2
    except OSError as e:  # a write the machine refused (full disk, read-only, permissions) that no check caught
        from forethought.paths import WRITE_ERRNOS, reason

        if e.errno not in WRITE_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        err_console.print(f"error: {where}cannot write: {reason(e)}", markup=False, soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
