"""The `lazymerge` command: parse the flags, build the options, call the public API, render.

This module is the entry point and the error contract (a LazyMergeError is one line, a hint and
exit code 2); the subcommands live in `cli_merge` (dogerm, merge), `cli_search` (dogerm --eval)
and `cli_tools` (inspect, verify, finalize, demo), over `cli_common`. They and `report` are the
only modules that print. Every merge goes through `lazymerge.merge`/`plan_merge`/`dogerm`, the
calls a Python user makes.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
from collections.abc import Sequence
from typing import Any

from lazymerge._version import __version__
from lazymerge.cli_common import EXIT_USER_ERROR, escape, line
from lazymerge.cli_merge import add_merge_commands, cmd_dogerm, cmd_merge
from lazymerge.cli_tools import add_tool_commands
from lazymerge.errors import LazyMergeError
from lazymerge.settings import debug_enabled, quiet_hub_logging


def run() -> None:
    """The `lazymerge` console script: `main()`, then a quick exit.

    Once torch is loaded, the interpreter's own teardown (module finalisation, torch's C++
    destructors) takes 0.2-0.5 s on the 2-core CI machine, about 5% of a 1B merge. Nothing
    is left for it to do: every output file is already fsynced and renamed, so the exit
    handlers run (temporary download folders, logging), the streams are flushed, and the
    process ends."""
    code = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the command line (`run` is the console script). Returns the exit code."""
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _check_flags(parser, argv)  # before argparse: it would report a missing flag, not the misspelt one
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    quiet_hub_logging()
    as_json = getattr(args, "json", False)
    try:
        return args.func(args) or 0
    except LazyMergeError as exc:
        if debug_enabled():
            raise
        line(f"[bold red]error:[/] {escape(exc.message)}")
        if exc.hint:
            line(f"[dim]hint: {escape(exc.hint)}[/]")
        return _failed(as_json, type(exc).__name__, exc.message, exc.hint, EXIT_USER_ERROR)
    except KeyboardInterrupt:
        message = "no output file that looks complete was left behind"
        line(f"[bold red]interrupted[/]: {message}")
        hint = None
        if args.func in (cmd_dogerm, cmd_merge) and not args.dry_run:
            hint = "rerun the same command with --resume to keep the shards already finished"
            line(f"[dim]hint: {hint}[/]")
        return _failed(as_json, "KeyboardInterrupt", f"interrupted: {message}", hint, 130)
    except OSError as exc:  # an environment problem we did not anticipate: still one line
        if debug_enabled():
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        line(f"[bold red]error:[/] {escape(exc.strerror or str(exc))}{escape(where)}")
        return _failed(as_json, type(exc).__name__, f"{exc.strerror or exc}{where}", None, EXIT_USER_ERROR)
    except Exception as exc:
        if debug_enabled():
            raise
        hint = "rerun with LAZYMERGE_DEBUG=1 for a traceback and report it"
        line(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}")
        line(f"[dim]hint: {hint}[/]")
        return _failed(as_json, type(exc).__name__, f"internal error: {exc}", hint, 1)


def _failed(as_json: bool, kind: str, message: str, hint: str | None, code: int) -> int:
    """The exit code of a failed command; with --json, the error as a JSON document on stdout too
    (the one-line message is already on stderr)."""
    if as_json:
        from lazymerge.json_report import error_document, print_document
        from lazymerge.text import one_line

        print_document(error_document(kind, one_line(message), hint and one_line(hint), code))
    return code


class _Parser(argparse.ArgumentParser):
    """argparse without prefix matching: `--weigh 0.3` is not taken for `--weight`, and a flag added
    later can never change what an old command line means."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def _check_flags(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Name an unknown `--flag` (with the closest known one) before argparse reports something else."""
    import difflib

    commands: dict[str, argparse.ArgumentParser] = getattr(parser, "commands", {})
    sub = next((i for i, a in enumerate(argv) if a in commands), None)
    if sub is None:
        return
    p = commands[argv[sub]]
    known = p._option_string_actions  # every option string of the subcommand, with its action
    i = sub + 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            action = known.get(flag)
            if action is None:
                close = difflib.get_close_matches(flag, [o for o in known if o.startswith("--")], n=1, cutoff=0.6)
                p.error(f"unrecognized argument {flag}" + (f" (did you mean {close[0]}?)" if close else ""))
            if action.nargs != 0 and "=" not in arg:
                i += 1  # its value, which may itself start with "--"
        i += 1


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lazymerge",
        description="Merge large checkpoints while streaming, in bounded memory.",
    )
    parser.add_argument("--version", action="version", version=f"lazymerge {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")
    add_merge_commands(sub)
    add_tool_commands(sub)
    parser.commands = dict(sub.choices)  # type: ignore[attr-defined]
    return parser


if __name__ == "__main__":
    sys.exit(main())
