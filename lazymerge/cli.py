"""The `lazymerge` command. The only module that prints: rich progress, tables, one-line errors."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console

from lazymerge import __version__
from lazymerge.constants import debug_enabled, parse_size
from lazymerge.errors import LazyMergeError
from lazymerge.plan import MergePlan

EXIT_USER_ERROR = 2

_stdout = Console(highlight=False)
_stderr = Console(stderr=True, highlight=False)


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
    _quiet_hub_warnings()
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


def _quiet_hub_warnings() -> None:
    """huggingface_hub logs every retry of a failed download on stderr (an "Error while
    downloading ... Trying to resume download..." pair each time): 12 lines before our one-line
    error. Its logger shows errors only, then, unless the user set HF_HUB_VERBOSITY or
    LAZYMERGE_DEBUG=1. The variable is what huggingface_hub reads when first imported; the
    level covers an import that happened already."""
    if debug_enabled() or "HF_HUB_VERBOSITY" in os.environ:
        return
    os.environ["HF_HUB_VERBOSITY"] = "error"
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


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
    v.set_defaults(func=_cmd_verify)

    demo = sub.add_parser("demo", help="build a small RM + SFT pair and DogeRM-merge them (offline)")
    demo.add_argument("--output", type=Path, default=Path("lazymerge-demo"), help="work folder")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _common_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", required=True, type=Path, help="output folder")
    p.add_argument("--max-shard-size", default="5GB", type=parse_size, help="shard cap (default 5GB)")
    p.add_argument("--chunk-elements", default=None, type=int, help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="print the plan and every check; read no tensor")
    p.add_argument("--overwrite", action="store_true", help="allow an output folder that holds a model")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument(
        "--resume", action="store_true", help="keep shards a killed run of the same command finished; redo the rest"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to merge (default auto)")
    p.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)
    _hub_args(p)


def _hub_args(p: argparse.ArgumentParser) -> None:
    hub = p.add_argument_group("Hugging Face Hub (models may also be given as owner/name[@revision])")
    hub.add_argument(
        "--push-to-hub", metavar="REPO_ID", help="upload each shard as it is written; commit once at the end"
    )
    hub.add_argument("--private", action="store_true", help="create the pushed repo private")
    hub.add_argument("--revision", metavar="BRANCH", help="branch to commit to (created if missing; default main)")
    hub.add_argument("--commit-message", metavar="MSG", help="message of the one commit")
    hub.add_argument(
        "--delete-after-upload", action="store_true", help="delete each local shard once uploaded (about one on disk)"
    )
    hub.add_argument(
        "--low-disk", action="store_true", help="download Hub inputs to a private folder; delete each shard once read"
    )
    hub.add_argument("--token", metavar="TOKEN", help="Hub token (default: HF_TOKEN or `hf auth login`); never printed")


def _cmd_dogerm(args: argparse.Namespace) -> int:
    from lazymerge.api import open_model
    from lazymerge.recipes.dogerm import plan_dogerm

    rm = open_model(args.reward_model, low_disk=args.low_disk, token=args.token)
    sft = open_model(args.domain_model, low_disk=args.low_disk, token=args.token)
    if len(args.weight) > 1:
        from lazymerge.sweep import dogerm_plans

        repos = _sweep_checks(args, "weight", args.weight)
        plans = dogerm_plans(
            rm, sft, args.weight, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size,
            overwrite=args.overwrite, resume=args.resume,
        )  # fmt: skip
        return _run_sweep(plans, [rm, sft], args, _labels("weight", args.weight), repos)
    plan = plan_dogerm(
        rm,
        sft,
        args.weight[0],
        args.output,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        resume=args.resume,
    )
    return _run(plan, [rm, sft], args)


def _cmd_merge(args: argparse.Namespace) -> int:
    from lazymerge.api import plan

    if args.sweep:
        from lazymerge.sweep import parse_values, sweep_plans

        key, _, text = args.sweep.partition("=")
        key, values = key.strip(), parse_values(text)
        repos = _sweep_checks(args, key, values)
        plans, checkpoints = sweep_plans(
            args.config, args.output, key, values, max_shard_size=args.max_shard_size,
            overwrite=args.overwrite, low_disk=args.low_disk, token=args.token, resume=args.resume,
        )  # fmt: skip
        return _run_sweep(plans, checkpoints, args, _labels(key, values), repos)

    merge_plan, checkpoints = plan(
        args.config,
        args.output,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        low_disk=args.low_disk,
        token=args.token,
        resume=args.resume,
    )
    return _run(merge_plan, checkpoints, args)


def _weights(text: str) -> list[float]:
    from lazymerge.sweep import parse_values

    try:
        return parse_values(text)
    except LazyMergeError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _sweep_checks(args: argparse.Namespace, key: str, values: list) -> list[str] | None:
    """A sweep's Hub options, checked before planning: the repo of each value, or None."""
    from lazymerge.sweep import sweep_repos

    if args.push_to_hub is None:
        if args.delete_after_upload:
            raise LazyMergeError(
                "--delete-after-upload needs --push-to-hub", hint="add --push-to-hub 'OWNER/NAME-{...}'"
            )
        return None
    return sweep_repos(args.push_to_hub, key, values)


def _labels(key: str, values: list) -> list[str]:
    return [f"{key}={v:g}" if isinstance(v, float) else f"{key}={v}" for v in values]


def _run_sweep(
    plans: list[MergePlan], checkpoints: list, args: argparse.Namespace, labels: list[str], repos: list[str] | None
) -> int:
    """K outputs from one read of the inputs; with --push-to-hub, one repo (one commit) per output."""
    from dataclasses import replace

    from lazymerge.push import execute_sweep_and_push, sweep_pushers
    from lazymerge.report import human, print_sweep_plan, progress_bar

    if args.dry_run:
        print_sweep_plan(_stdout, plans, labels, repos)
        return 0
    for warning in dict.fromkeys(w for p in plans for w in p.warnings):
        _line(f"[yellow]warning:[/] {_escape(warning)}")
    pushers = None
    if repos is not None:
        pushers = sweep_pushers(
            repos, private=args.private, revision=args.revision, commit_message=args.commit_message,
            delete_after_upload=args.delete_after_upload, token=args.token,
        )  # fmt: skip
    every = replace(plans[0], shards=[s for p in plans for s in p.shards])  # the bar counts all K outputs
    with progress_bar(_stderr, every, disable=args.quiet, upload=pushers is not None) as callback:
        if pushers is not None:
            _sum_uploads(pushers, sum(s.size for s in every.shards), callback.upload)
        all_stats, pushed = execute_sweep_and_push(
            plans, checkpoints, pushers, chunk_elements=args.chunk_elements, progress=callback, resume=args.resume,
            device=args.device, workers=args.workers,
        )  # fmt: skip
    for plan, stats in zip(plans, all_stats, strict=True):
        kept = f" ({stats.resumed_shards} shard(s) kept from the earlier run)" if stats.resumed_shards else ""
        written = human(stats.bytes_written)
        _stdout.print(f"{_escape(str(plan.output_dir))}: {written} written{kept}", soft_wrap=True)
    for result in pushed or []:
        reused = f" ({len(result.reused)} shard(s) already on the Hub, not re-sent)" if result.reused else ""
        where = f"{result.repo_id}@{result.revision}"
        _stdout.print(f"pushed to {_escape(where)}{reused}: {_escape(result.commit_url)}", soft_wrap=True)
    first = all_stats[0]
    _stdout.print(f"{len(plans)} models from one read of {human(first.bytes_read)} in {first.seconds:.1f} s")
    return 0


def _sum_uploads(pushers: list, total: int, report: Callable[[int, int], None]) -> None:
    """One upload line for the K pushers (each calls from its own thread)."""
    import threading

    done, lock = [0] * len(pushers), threading.Lock()

    def on_upload(v: int, n: int) -> None:
        with lock:
            done[v] = n
            now = sum(done)
        report(now, total)

    for v, pusher in enumerate(pushers):
        pusher.on_upload = lambda n, _total, v=v: on_upload(v, n)


def _run(plan: MergePlan, checkpoints: list, args: argparse.Namespace) -> int:
    from lazymerge.report import print_plan, print_stats, progress_bar

    if args.dry_run:
        print_plan(_stdout, plan)
        return 0
    for warning in plan.warnings:
        _line(f"[yellow]warning:[/] {_escape(warning)}")
    from lazymerge.push import execute_and_push

    pusher = _pusher(args)
    with progress_bar(_stderr, plan, disable=args.quiet, upload=pusher is not None) as callback:
        if pusher is not None:
            pusher.on_upload = callback.upload
        stats, pushed = execute_and_push(
            plan,
            checkpoints,
            pusher,
            chunk_elements=args.chunk_elements,
            progress=callback,
            resume=args.resume,
            device=args.device,
            workers=args.workers,
        )
    print_stats(_stdout, plan, stats)
    if pushed is not None:
        reused = f" ({len(pushed.reused)} shard(s) already on the Hub, not re-sent)" if pushed.reused else ""
        where = f"{pushed.repo_id}@{pushed.revision}"
        _stdout.print(f"pushed to {_escape(where)}{reused}: {_escape(pushed.commit_url)}")
    return 0


def _pusher(args: argparse.Namespace):
    if args.push_to_hub is None:
        if args.delete_after_upload:
            raise LazyMergeError("--delete-after-upload needs --push-to-hub", hint="add --push-to-hub OWNER/NAME")
        return None
    from lazymerge.push import HubPusher

    return HubPusher(
        args.push_to_hub,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        delete_after_upload=args.delete_after_upload,
        token=args.token,
    )


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
