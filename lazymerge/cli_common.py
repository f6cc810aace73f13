"""What every `lazymerge` subcommand shares: the two consoles, one-line messages on stderr,
planning warnings as lines, the `--json` flag, and flags -> options objects.

The CLI modules (`cli`, `cli_merge`, `cli_search`, `cli_tools`) print only through these consoles
(and `report`, which draws on them), so a file or a pipe never gets wrapped lines.
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

from lazymerge.consoles import LogConsole
from lazymerge.errors import PlanWarning
from lazymerge.options import HubOptions, RunOptions

__all__ = ["EXIT_USER_ERROR", "escape", "json_arg", "line", "options_from_args", "plan_warnings", "stderr", "stdout"]

EXIT_USER_ERROR = 2

# Never wrapped when the stream is a file or a pipe (`--dry-run > plan.txt`, a batch log).
stdout = LogConsole(highlight=False)
stderr = LogConsole(stderr=True, highlight=False)


def line(markup: str) -> None:
    """One message line on stderr: never wrapped at the terminal width (a path can be long),
    and no `:emoji:` codes expanded inside file names."""
    stderr.print(markup, soft_wrap=True, emoji=False)


def escape(text: str) -> str:
    """Rich markup escaped, and control characters (a name or path from a stranger) shown as `\\x1b`."""
    from lazymerge.report import escape as report_escape

    return report_escape(text)


def json_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--json", action="store_true", help=f"print {what} as one JSON document on stdout (progress stays on stderr)"
    )


def options_from_args(args: argparse.Namespace) -> tuple[RunOptions, HubOptions]:
    """The options objects from the flags of the same names (checked by their constructors)."""
    from dataclasses import fields

    run = {f.name: getattr(args, f.name) for f in fields(RunOptions) if hasattr(args, f.name)}
    hub = {f.name: getattr(args, f.name) for f in fields(HubOptions) if hasattr(args, f.name)}
    return RunOptions(**run, progress=not args.quiet), HubOptions(**hub)


@contextlib.contextmanager
def plan_warnings(shown: bool) -> Iterator[None]:
    """Planning warnings as one stderr line each (a --dry-run lists them with the plan instead)."""

    def show(message: Warning | str, category: type[Warning], *rest: Any, **kw: Any) -> None:
        if issubclass(category, PlanWarning):
            line(f"[yellow]warning:[/] {escape(str(message))}")
        else:
            default(message, category, *rest, **kw)

    with warnings.catch_warnings():
        default = warnings.showwarning
        warnings.simplefilter("always" if shown else "ignore", PlanWarning)
        warnings.showwarning = show
        yield
