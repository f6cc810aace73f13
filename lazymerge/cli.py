"""The `lazymerge` command: parse the flags, build the options, call the public API, render.

The only module that prints (with `report`): tables, one-line errors. Every merge goes through
`lazymerge.merge`/`plan_merge`/`dogerm`, the calls a Python user makes.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lazymerge._version import __version__
from lazymerge.consoles import LogConsole
from lazymerge.errors import LazyMergeError, PlanWarning
from lazymerge.options import DEVICES, HubOptions, RunOptions
from lazymerge.settings import debug_enabled, quiet_hub_logging

if TYPE_CHECKING:
    from lazymerge.sweep import Sweep

EXIT_USER_ERROR = 2

# Never wrapped when the stream is a file or a pipe (`--dry-run > plan.txt`, a batch log).
_stdout = LogConsole(highlight=False)
_stderr = LogConsole(stderr=True, highlight=False)


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
        _line(f"[bold red]error:[/] {_escape(exc.message)}")
        if exc.hint:
            _line(f"[dim]hint: {_escape(exc.hint)}[/]")
        return _failed(as_json, type(exc).__name__, exc.message, exc.hint, EXIT_USER_ERROR)
    except KeyboardInterrupt:
        message = "no output file that looks complete was left behind"
        _line(f"[bold red]interrupted[/]: {message}")
        return _failed(as_json, "KeyboardInterrupt", f"interrupted: {message}", None, 130)
    except OSError as exc:  # an environment problem we did not anticipate: still one line
        if debug_enabled():
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        _line(f"[bold red]error:[/] {_escape(exc.strerror or str(exc))}{_escape(where)}")
        return _failed(as_json, type(exc).__name__, f"{exc.strerror or exc}{where}", None, EXIT_USER_ERROR)
    except Exception as exc:
        if debug_enabled():
            raise
        hint = "rerun with LAZYMERGE_DEBUG=1 for a traceback and report it"
        _line(f"[bold red]internal error:[/] {type(exc).__name__}: {_escape(str(exc))}")
        _line(f"[dim]hint: {hint}[/]")
        return _failed(as_json, type(exc).__name__, f"internal error: {exc}", hint, 1)


def _failed(as_json: bool, kind: str, message: str, hint: str | None, code: int) -> int:
    """The exit code of a failed command; with --json, the error as a JSON document on stdout too
    (the one-line message is already on stderr)."""
    if as_json:
        from lazymerge.json_report import error_document, print_document
        from lazymerge.text import one_line

        print_document(error_document(kind, one_line(message), hint and one_line(hint), code))
    return code


def _line(markup: str) -> None:
    """One message line on stderr: never wrapped at the terminal width (a path can be long),
    and no `:emoji:` codes expanded inside file names."""
    _stderr.print(markup, soft_wrap=True, emoji=False)


def _escape(text: str) -> str:
    """Rich markup escaped, and control characters (a name or path from a stranger) shown as `\\x1b`."""
    from lazymerge.report import escape

    return escape(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazymerge",
        description="Merge large checkpoints while streaming, in bounded memory.",
    )
    parser.add_argument("--version", action="version", version=f"lazymerge {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    d = sub.add_parser("dogerm", help="DogeRM: merge a reward model with a domain SFT model")
    d.add_argument("--reward-model", required=True, metavar="RM", help="reward model folder or file")
    d.add_argument("--domain-model", required=True, metavar="SFT", help="domain SFT model folder or file")
    d.add_argument(
        "--weight",
        required=True,
        type=_weights,
        metavar="LAMBDA",
        help="lambda in [0, 1]; a list (0.1,0.2,0.3) sweeps in one read: --output 'out-{weight}'",
    )
    d.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="output dtype (default: the RM's)")
    _common_output_args(d)
    d.set_defaults(func=_cmd_dogerm)

    m = sub.add_parser("merge", help="merge models as a mergekit YAML config describes")
    m.add_argument(
        "config", type=Path, help="mergekit-style YAML (linear, task_arithmetic, ties, dare, slerp, dogerm...)"
    )
    m.add_argument(
        "--sweep",
        metavar="KEY=V1,V2",
        help="merge once per value of a config key (e.g. parameters.lambda=0.5,1) in one read; --output 'out-{lambda}'",
    )
    _common_output_args(m)
    m.set_defaults(func=_cmd_merge)

    i = sub.add_parser("inspect", help="list a checkpoint's tensors, dtypes, shapes and shards")
    i.add_argument("path", help="model folder or weight file")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
    i.set_defaults(func=_cmd_inspect)

    v = sub.add_parser("verify", help="check a merged model: headers, index, sizes, checksums, recomputed tensors")
    v.add_argument("path", type=Path, help="merged model folder")
    v.add_argument("--recompute", type=int, default=0, metavar="N", help="recompute N sampled tensors from the inputs")
    v.add_argument("--hub", metavar="REPO", help="also check the shards pushed to REPO[@rev] against the manifest")
    v.add_argument("--token", metavar="TOKEN", help="Hub token for --hub (default: HF_TOKEN or `hf auth login`)")
    _json_arg(v, "the checks")
    v.set_defaults(func=_cmd_verify)

    f = sub.add_parser("finalize", help="assemble the parts of a split merge (--part I/N): check them, write the index")
    f.add_argument("paths", type=Path, nargs="+", metavar="OUT", help="output folder(s) the parts wrote into")
    f.add_argument("--sizes-only", action="store_true", help="check shard sizes, not checksums (no read of the shards)")
    f.set_defaults(func=_cmd_finalize)

    demo = sub.add_parser("demo", help="build a small RM + SFT pair and DogeRM-merge them (offline)")
    demo.add_argument("--output", type=Path, default=Path("lazymerge-demo"), help="work folder")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _common_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", required=True, type=Path, help="output folder")
    p.add_argument("--max-shard-size", default="5GB", help="shard cap (default 5GB)")
    p.add_argument("--chunk-elements", default=None, type=int, help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="print the plan and every check; read no tensor")
    p.add_argument("--overwrite", action="store_true", help="allow an output folder that holds a model")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or progress lines")
    p.add_argument(
        "--progress-interval",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="when stderr is not a terminal: a progress line every SECONDS (default 10; 0: per shard only)",
    )
    _json_arg(p, "the plan (with --dry-run) or what the run did")
    p.add_argument(
        "--resume", action="store_true", help="keep shards a killed run of the same command finished; redo the rest"
    )
    p.add_argument("--device", choices=DEVICES, default="auto", help="where to merge (default auto)")
    p.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)
    _cluster_args(p)
    _hub_args(p)


def _json_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--json", action="store_true", help=f"print {what} as one JSON document on stdout (progress stays on stderr)"
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _cluster_args(p: argparse.ArgumentParser) -> None:
    split = p.add_argument_group("Split over machines (whole shards per part; `lazymerge finalize OUT` assembles)")
    split.add_argument(
        "--part", metavar="I/N", help="write part I of N (0 <= I < N), e.g. --part $SLURM_ARRAY_TASK_ID/16"
    )
    split.add_argument("--parts", type=int, metavar="N", help="number of parts for --ray (or --dry-run)")
    split.add_argument(
        "--ray", action="store_true", help="run the parts as Ray tasks (RAY_ADDRESS, else a local cluster); finalize"
    )


def _hub_args(p: argparse.ArgumentParser) -> None:
    hub = p.add_argument_group("Hugging Face Hub (models may also be given as owner/name[@revision])")
    hub.add_argument(
        "--push-to-hub", metavar="REPO_ID", help="upload each shard as it is written; commit once at the end"
    )
    hub.add_argument("--private", action="store_true", help="create the pushed repo private")
    hub.add_argument("--revision", metavar="BRANCH", help="branch to commit to (created if missing; default main)")
    hub.add_argument("--commit-message", metavar="MSG", help="message of the one commit")
    hub.add_argument(
        "--delete-after-upload", action="store_true", help="delete each local shard once uploaded (at most two on disk)"
    )
    hub.add_argument(
        "--low-disk", action="store_true", help="stream Hub inputs with range requests (no input weight on disk)"
    )
    hub.add_argument("--token", metavar="TOKEN", help="Hub token (default: HF_TOKEN or `hf auth login`); never printed")


def _cmd_dogerm(args: argparse.Namespace) -> int:
    from lazymerge.api import dogerm
    from lazymerge.sweep import Sweep

    options, hub = _options(args)
    sweep = Sweep("weight", args.weight) if len(args.weight) > 1 else None
    weight = args.weight if sweep is not None else args.weight[0]
    with _plan_warnings(shown=not args.dry_run):
        result = dogerm(
            args.reward_model, args.domain_model, weight, args.output, dtype=args.dtype, dry_run=args.dry_run,
            options=options, hub=hub,
        )  # fmt: skip
    return _render(result, args, sweep, hub, options)


def _cmd_merge(args: argparse.Namespace) -> int:
    from lazymerge.api import merge, plan_merge
    from lazymerge.sweep import Sweep

    options, hub = _options(args)
    sweep = Sweep.parse(args.sweep) if args.sweep else None
    with _plan_warnings(shown=not args.dry_run):
        verb = plan_merge if args.dry_run else merge
        result = verb(args.config, args.output, sweep=sweep, options=options, hub=hub)
    return _render(result, args, sweep, hub, options)


def _options(args: argparse.Namespace) -> tuple[RunOptions, HubOptions]:
    """The options objects from the flags of the same names (checked by their constructors)."""
    from dataclasses import fields

    run = {f.name: getattr(args, f.name) for f in fields(RunOptions) if hasattr(args, f.name)}
    hub = {f.name: getattr(args, f.name) for f in fields(HubOptions) if hasattr(args, f.name)}
    return RunOptions(**run, progress=not args.quiet), HubOptions(**hub)


@contextlib.contextmanager
def _plan_warnings(shown: bool) -> Iterator[None]:
    """Planning warnings as one stderr line each (a --dry-run lists them with the plan instead)."""

    def show(message: Warning | str, category: type[Warning], *rest: Any, **kw: Any) -> None:
        if issubclass(category, PlanWarning):
            _line(f"[yellow]warning:[/] {_escape(str(message))}")
        else:
            default(message, category, *rest, **kw)

    with warnings.catch_warnings():
        default = warnings.showwarning
        warnings.simplefilter("always" if shown else "ignore", PlanWarning)
        warnings.showwarning = show
        yield


def _render(result: Any, args: argparse.Namespace, sweep: Sweep | None, hub: HubOptions, options: RunOptions) -> int:
    from lazymerge.json_report import plan_document, print_document, results_document
    from lazymerge.report import print_parts, print_plan, print_results

    results = result if isinstance(result, list) else [result]
    labels, repos = sweep.labels() if sweep is not None else [], hub.repo_ids(sweep) or []
    if args.json:
        print_document(plan_document(results, labels, repos) if args.dry_run else results_document(results))
        return 0
    if not args.dry_run:
        print_results(_stdout, results)
        return 0
    print_plan(_stdout, results, labels, repos)
    part = options.part if not isinstance(options.part, str) else None
    count = part.count if part is not None else options.parts
    if count is not None:
        print_parts(_stdout, results, count, part.index if part is not None else None)
    return 0


def _weights(text: str) -> list[float]:
    from lazymerge.sweep import parse_values

    try:
        return parse_values(text)
    except LazyMergeError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _cmd_inspect(args: argparse.Namespace) -> int:
    from lazymerge.api import open_model
    from lazymerge.report import print_checkpoint

    print_checkpoint(_stdout, open_model(args.path), list_tensors=args.tensors)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from lazymerge.report import print_verify
    from lazymerge.verify import verify

    report = verify(args.path, recompute=args.recompute, hub=args.hub, token=args.token)
    if args.json:
        from lazymerge.json_report import print_document, verify_document

        print_document(verify_document(report))
    else:
        print_verify(_stdout, report)
    if not report.ok:
        failed = [c.name for c in report.checks if not c.ok]
        _line(f"[bold red]error:[/] {_escape(str(args.path))} failed verification: {_escape(', '.join(failed))}")
        return EXIT_USER_ERROR
    return 0


def _cmd_finalize(args: argparse.Namespace) -> int:
    from lazymerge.api import finalize
    from lazymerge.report import print_finalized

    for path in args.paths:
        print_finalized(_stdout, finalize(path, checksums=not args.sizes_only))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lazymerge.demo import run_demo

    run_demo(args.output, _stdout, _stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
