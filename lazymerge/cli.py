"""The `lazymerge` command. The only module that prints: rich progress, tables, one-line errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from lazymerge import __version__
from lazymerge.constants import DEFAULT_CHUNK_ELEMENTS, debug_enabled, parse_size
from lazymerge.errors import LazyMergeError
from lazymerge.plan import MergePlan

EXIT_USER_ERROR = 2

_stdout = Console(highlight=False)
_stderr = Console(stderr=True, highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lazymerge` console script. Returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return args.func(args) or 0
    except LazyMergeError as exc:
        if debug_enabled():
            raise
        _line(f"[bold red]error:[/] {_escape(exc.message)}")
        if exc.hint:
            _line(f"[dim]hint: {_escape(exc.hint)}[/]")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _line("[bold red]interrupted[/]: no output file that looks complete was left behind")
        return 130
    except OSError as exc:  # an environment problem we did not anticipate: still one line
        if debug_enabled():
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        _line(f"[bold red]error:[/] {_escape(exc.strerror or str(exc))}{_escape(where)}")
        return EXIT_USER_ERROR
    except Exception as exc:
        if debug_enabled():
            raise
        _line(f"[bold red]internal error:[/] {type(exc).__name__}: {_escape(str(exc))}")
        _line("[dim]hint: rerun with LAZYMERGE_DEBUG=1 for a traceback and report it[/]")
        return 1


def _line(markup: str) -> None:
    """One message line on stderr: never wrapped at the terminal width (a path can be long),
    and no `:emoji:` codes expanded inside file names."""
    _stderr.print(markup, soft_wrap=True, emoji=False)


def _escape(text: str) -> str:
    from rich.markup import escape

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
    d.add_argument("--weight", required=True, type=float, metavar="LAMBDA", help="lambda in [0, 1]")
    d.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="output dtype (default: the RM's)")
    _common_output_args(d)
    d.set_defaults(func=_cmd_dogerm)

    m = sub.add_parser("merge", help="merge models as a mergekit YAML config describes")
    m.add_argument("config", type=Path, help="mergekit-style YAML (merge_method: linear | dogerm)")
    _common_output_args(m)
    m.set_defaults(func=_cmd_merge)

    i = sub.add_parser("inspect", help="list a checkpoint's tensors, dtypes, shapes and shards")
    i.add_argument("path", help="model folder or weight file")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
    i.set_defaults(func=_cmd_inspect)

    v = sub.add_parser("verify", help="check a merged model: headers, index, sizes, checksums, recomputed tensors")
    v.add_argument("path", type=Path, help="merged model folder")
    v.add_argument("--recompute", type=int, default=0, metavar="N", help="recompute N sampled tensors from the inputs")
    v.set_defaults(func=_cmd_verify)

    demo = sub.add_parser("demo", help="build a small RM + SFT pair and DogeRM-merge them (offline)")
    demo.add_argument("--output", type=Path, default=Path("lazymerge-demo"), help="work folder")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _common_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", required=True, type=Path, help="output folder")
    p.add_argument("--max-shard-size", default="5GB", type=parse_size, help="shard cap (default 5GB)")
    p.add_argument("--chunk-elements", default=DEFAULT_CHUNK_ELEMENTS, type=int, help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="print the plan and every check; read no tensor")
    p.add_argument("--overwrite", action="store_true", help="allow an output folder that holds a model")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument(
        "--resume", action="store_true", help="keep shards a killed run of the same command finished; redo the rest"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to merge (default auto)")
    p.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)


def _cmd_dogerm(args: argparse.Namespace) -> int:
    from lazymerge.api import open_model
    from lazymerge.recipes.dogerm import plan_dogerm

    rm, sft = open_model(args.reward_model), open_model(args.domain_model)
    plan = plan_dogerm(
        rm,
        sft,
        args.weight,
        args.output,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite or args.resume,
    )
    return _run(plan, [rm, sft], args)


def _cmd_merge(args: argparse.Namespace) -> int:
    from lazymerge.api import plan

    merge_plan, checkpoints = plan(
        args.config, args.output, max_shard_size=args.max_shard_size, overwrite=args.overwrite or args.resume
    )
    return _run(merge_plan, checkpoints, args)


def _run(plan: MergePlan, checkpoints: list, args: argparse.Namespace) -> int:
    from lazymerge.report import print_plan, print_stats, progress_bar

    if args.dry_run:
        print_plan(_stdout, plan)
        return 0
    for warning in plan.warnings:
        _line(f"[yellow]warning:[/] {_escape(warning)}")
    from lazymerge.execute import execute

    with progress_bar(_stderr, plan, disable=args.quiet) as callback:
        stats = execute(
            plan,
            checkpoints,
            chunk_elements=args.chunk_elements,
            progress=callback,
            resume=args.resume,
            device=args.device,
            workers=args.workers,
        )
    print_stats(_stdout, plan, stats)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from lazymerge.api import open_model
    from lazymerge.report import print_checkpoint

    print_checkpoint(_stdout, open_model(args.path), list_tensors=args.tensors)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from lazymerge.report import print_verify
    from lazymerge.verify import verify

    report = verify(args.path, recompute=args.recompute)
    print_verify(_stdout, report)
    if not report.ok:
        failed = [c.name for c in report.checks if not c.ok]
        _line(f"[bold red]error:[/] {_escape(str(args.path))} failed verification: {_escape(', '.join(failed))}")
        return EXIT_USER_ERROR
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lazymerge.demo import run_demo

    run_demo(args.output, _stdout, _stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
