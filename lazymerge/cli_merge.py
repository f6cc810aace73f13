"""`lazymerge dogerm` and `lazymerge merge`: their flags (output, split, Hub), the call to
`lazymerge.dogerm`/`merge`/`plan_merge`, and what is shown after (a plan, or what the run did).

The weight search (`dogerm --eval`) has its own module, `cli_search`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lazymerge.cli_common import json_arg, options_from_args, plan_warnings, stdout
from lazymerge.cli_search import add_eval_args, search_weight
from lazymerge.errors import LazyMergeError, RecipeError
from lazymerge.options import DEVICES, HubOptions, RunOptions

if TYPE_CHECKING:
    from lazymerge.sweep import Sweep

__all__ = ["add_merge_commands", "cmd_dogerm", "cmd_merge"]


def add_merge_commands(sub: argparse._SubParsersAction) -> None:
    """The `dogerm` and `merge` subcommands, in that order (the order `lazymerge --help` lists)."""
    d = sub.add_parser("dogerm", help="DogeRM: merge a reward model with a domain SFT model")
    d.add_argument("--reward-model", required=True, metavar="RM", help="reward model folder or file")
    d.add_argument("--domain-model", required=True, metavar="SFT", help="domain SFT model folder or file")
    d.add_argument(
        "--weight",
        required=True,
        type=_weights,
        metavar="LAMBDA",
        help="lambda in [0, 1]; a list (0.1,0.2,0.3) or range (0:1:0.05, stop included) sweeps in one read: "
        "--output 'out-{weight}'",
    )
    d.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="output dtype (default: the RM's)")
    _output_args(d, output_required=False)
    add_eval_args(d)
    d.set_defaults(func=cmd_dogerm)

    m = sub.add_parser("merge", help="merge models as a mergekit YAML config describes")
    m.add_argument(
        "config", type=Path, help="mergekit-style YAML (linear, task_arithmetic, ties, dare, slerp, dogerm...)"
    )
    m.add_argument(
        "--sweep",
        metavar="KEY=V1,V2",
        help="merge once per value of a config key (e.g. parameters.lambda=0.5,1) in one read; --output 'out-{lambda}'",
    )
    _output_args(m)
    m.set_defaults(func=cmd_merge)


def _output_args(p: argparse.ArgumentParser, output_required: bool = True) -> None:
    p.add_argument("--output", "-o", required=output_required, type=Path, help="output folder")
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
    json_arg(p, "the plan (with --dry-run) or what the run did")
    p.add_argument(
        "--resume", action="store_true", help="keep shards a killed run of the same command finished; redo the rest"
    )
    p.add_argument("--device", choices=DEVICES, default="auto", help="where to merge (default auto)")
    p.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)
    _cluster_args(p)
    _hub_args(p)


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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _weights(text: str) -> list[float]:
    from lazymerge.sweep import parse_values

    try:
        return parse_values(text)
    except LazyMergeError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def cmd_dogerm(args: argparse.Namespace) -> int:
    from lazymerge.api import dogerm
    from lazymerge.sweep import Sweep

    if args.eval is not None:
        return search_weight(args)
    if args.output is None:
        raise RecipeError("dogerm needs --output (or --eval to search the weight)", hint="add --output FOLDER")
    options, hub = options_from_args(args)
    sweep = Sweep("weight", args.weight) if len(args.weight) > 1 else None
    weight = args.weight if sweep is not None else args.weight[0]
    with plan_warnings(shown=not args.dry_run):
        result = dogerm(
            args.reward_model, args.domain_model, weight, args.output, dtype=args.dtype, dry_run=args.dry_run,
            options=options, hub=hub,
        )  # fmt: skip
    return _render(result, args, sweep, hub, options)


def cmd_merge(args: argparse.Namespace) -> int:
    from lazymerge.api import merge, plan_merge
    from lazymerge.sweep import Sweep

    options, hub = options_from_args(args)
    sweep = Sweep.parse(args.sweep) if args.sweep else None
    with plan_warnings(shown=not args.dry_run):
        verb = plan_merge if args.dry_run else merge
        result = verb(args.config, args.output, sweep=sweep, options=options, hub=hub)
    return _render(result, args, sweep, hub, options)


def _render(result: Any, args: argparse.Namespace, sweep: Sweep | None, hub: HubOptions, options: RunOptions) -> int:
    from lazymerge.json_report import plan_document, print_document, results_document
    from lazymerge.report import print_parts, print_plan, print_results

    results = result if isinstance(result, list) else [result]
    labels, repos = sweep.labels() if sweep is not None else [], hub.repo_ids(sweep) or []
    if args.json:
        print_document(plan_document(results, labels, repos) if args.dry_run else results_document(results))
        return 0
    if not args.dry_run:
        print_results(stdout, results)
        return 0
    print_plan(stdout, results, labels, repos)
    part = options.part if not isinstance(options.part, str) else None
    count = part.count if part is not None else options.parts
    if count is not None:
        print_parts(stdout, results, count, part.index if part is not None else None)
    return 0
