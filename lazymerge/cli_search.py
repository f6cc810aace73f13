"""`lazymerge dogerm --eval`: the weight-search flags, and the search they run.

Every weight of `--weight` is merged in memory and scored on preference pairs
(`lazymerge.search_weights`); the best one is then written (and pushed) like a plain `dogerm` run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lazymerge.cli_common import escape, line, options_from_args, plan_warnings, stdout
from lazymerge.errors import RecipeError

__all__ = ["add_eval_args", "search_weight"]


def add_eval_args(p: argparse.ArgumentParser) -> None:
    e = p.add_argument_group("weight search (merged in memory, scored on preference pairs; needs lazymerge[eval])")
    e.add_argument(
        "--eval", metavar="PAIRS", help="JSON/JSONL/Parquet file or Hub dataset with prompt, chosen, rejected[, subset]"
    )
    e.add_argument("--eval-report", type=Path, metavar="REPORT.json", help="write every weight's accuracy as JSON")
    e.add_argument(
        "--eval-plot", type=Path, metavar="PNG", help="accuracy plot (default: REPORT.png; needs matplotlib)"
    )
    e.add_argument("--eval-split", metavar="SPLIT", help="Hub dataset split (default: its only split)")
    e.add_argument("--eval-subset", metavar="A,B", help="score only the pairs of these subsets")
    e.add_argument("--max-pairs", type=int, metavar="N", help="score the first N pairs")
    e.add_argument("--eval-batch-size", type=int, default=8, metavar="N", help="texts per forward pass (default 8)")
    e.add_argument(
        "--eval-dtype", choices=["float32", "float16", "bfloat16"], help="dtype the model scores in (default: --dtype)"
    )
    e.add_argument("--eval-max-length", type=int, metavar="TOKENS", help="truncate each text to this many tokens")
    e.add_argument(
        "--eval-resident",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="hold both inputs in memory and re-merge from there (default: on a GPU when they fit; "
        "on the CPU it costs the two models' size in RAM and is ~3x faster per weight)",
    )


def search_weight(args: argparse.Namespace) -> int:
    """`dogerm --eval`: score every weight in memory, then write/push the best one (if asked)."""
    from dataclasses import replace

    import torch

    from lazymerge.api import dogerm
    from lazymerge.pairs import load_pairs
    from lazymerge.report import print_results, print_search
    from lazymerge.search import search_weights, write_plot
    from lazymerge.sweep import Sweep

    if args.dry_run:
        raise RecipeError("--dry-run plans a written merge; a weight search (--eval) has nothing to plan")
    if args.push_to_hub is not None and args.output is None:
        raise RecipeError("--push-to-hub needs --output: the best model is written there, then pushed")
    for flag in ("max_pairs", "eval_batch_size", "eval_max_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise RecipeError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    options, hub = options_from_args(args)
    if args.output is not None:  # the output folder and the inputs checked now, not after the search
        with plan_warnings(shown=False):
            dogerm(
                args.reward_model, args.domain_model, args.weight[0], Sweep("weight", args.weight[:1]).outputs(args.output)[0],
                dtype=args.dtype, dry_run=True, options=options, hub=hub,
            )  # fmt: skip
    subsets = [s.strip() for s in args.eval_subset.split(",") if s.strip()] if args.eval_subset else None
    pairs = load_pairs(args.eval, split=args.eval_split, subsets=subsets, max_pairs=args.max_pairs, token=hub.token)
    recipe = {
        "merge_method": "dogerm",
        "reward_model": args.reward_model,
        "domain_model": args.domain_model,
        "weight": args.weight[0],
        "dtype": args.eval_dtype or args.dtype,
    }
    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    with plan_warnings(shown=True):
        result = search_weights(
            recipe, Sweep("weight", args.weight), pairs, batch_size=args.eval_batch_size,
            max_length=args.eval_max_length, device="cuda" if on_gpu else "cpu", resident=args.eval_resident,
            options=replace(options, progress=False),
        )  # fmt: skip
    print_search(stdout, result)
    if args.eval_report is not None:
        line(f"report: {escape(str(result.write_report(args.eval_report)))}")
    plot = args.eval_plot or (args.eval_report.with_suffix(".png") if args.eval_report is not None else None)
    if plot is not None:
        written = write_plot(result, plot)
        if written is None:
            line("[yellow]warning:[/] no plot: matplotlib is not installed (pip install 'lazymerge\\[bench]')")
    if args.output is None:
        return 0
    best = Sweep("weight", [result.best])
    output = best.outputs(args.output)[0]  # a {weight} template is filled with the best weight
    if hub.push_to_hub is not None:
        hub = replace(hub, push_to_hub=best.repos(hub.push_to_hub)[0])
    with plan_warnings(shown=False):  # shown once, by the search
        stats = dogerm(
            args.reward_model, args.domain_model, result.best, output, dtype=args.dtype, options=options, hub=hub
        )
    print_results(stdout, [stats])
    return 0
