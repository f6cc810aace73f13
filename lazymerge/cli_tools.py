"""The subcommands around a merge: `inspect` (a checkpoint), `verify` (a merged folder),
`finalize` (the parts of a split merge) and `demo` (an offline merge of two tiny models).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lazymerge.cli_common import EXIT_USER_ERROR, escape, json_arg, line, stderr, stdout

__all__ = ["add_tool_commands"]


def add_tool_commands(sub: argparse._SubParsersAction) -> None:
    """The `inspect`, `verify`, `finalize` and `demo` subcommands, in the order `lazymerge --help` lists."""
    i = sub.add_parser("inspect", help="list a checkpoint's tensors, dtypes, shapes and shards")
    i.add_argument("path", help="model folder, weight file or Hub repo id (owner/name[@revision])")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
    i.add_argument("--revision", metavar="REV", help="Hub branch, tag or commit (same as owner/name@REV)")
    i.add_argument("--token", metavar="TOKEN", help="Hub token (default: HF_TOKEN or `hf auth login`); never printed")
    i.set_defaults(func=_cmd_inspect)

    v = sub.add_parser("verify", help="check a merged model: headers, index, sizes, checksums, recomputed tensors")
    v.add_argument("path", type=Path, help="merged model folder")
    v.add_argument("--recompute", type=int, default=0, metavar="N", help="recompute N sampled tensors from the inputs")
    v.add_argument("--hub", metavar="REPO", help="also check the shards pushed to REPO[@rev] against the manifest")
    v.add_argument("--token", metavar="TOKEN", help="Hub token for --hub (default: HF_TOKEN or `hf auth login`)")
    json_arg(v, "the checks")
    v.set_defaults(func=_cmd_verify)

    f = sub.add_parser("finalize", help="assemble the parts of a split merge (--part I/N): check them, write the index")
    f.add_argument("paths", type=Path, nargs="+", metavar="OUT", help="output folder(s) the parts wrote into")
    f.add_argument("--sizes-only", action="store_true", help="check shard sizes, not checksums (no read of the shards)")
    f.set_defaults(func=_cmd_finalize)

    demo = sub.add_parser("demo", help="build a small RM + SFT pair and DogeRM-merge them (offline)")
    demo.add_argument("--output", type=Path, default=Path("lazymerge-demo"), help="work folder")
    demo.set_defaults(func=_cmd_demo)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from lazymerge.api import open_model
    from lazymerge.report import print_checkpoint

    path = args.path
    if args.revision is not None:
        from lazymerge.errors import CheckpointError
        from lazymerge.io.hub import is_repo_id

        if not is_repo_id(path) or "@" in path:
            raise CheckpointError(
                f"--revision applies to a Hub repo id, and {path!r} is not one (or already has @revision)",
                hint="give owner/name with --revision, or owner/name@revision alone",
            )
        path = f"{path}@{args.revision}"
    print_checkpoint(stdout, open_model(path, token=args.token), list_tensors=args.tensors)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from lazymerge.report import print_verify
    from lazymerge.verify import verify

    report = verify(args.path, recompute=args.recompute, hub=args.hub, token=args.token)
    if args.json:
        from lazymerge.json_report import print_document, verify_document

        print_document(verify_document(report))
    else:
        print_verify(stdout, report)
    if not report.ok:
        failed = [c.name for c in report.checks if not c.ok]
        line(f"[bold red]error:[/] {escape(str(args.path))} failed verification: {escape(', '.join(failed))}")
        return EXIT_USER_ERROR
    return 0


def _cmd_finalize(args: argparse.Namespace) -> int:
    from lazymerge.api import finalize
    from lazymerge.report import print_finalized

    for path in args.paths:
        print_finalized(stdout, finalize(path, checksums=not args.sizes_only))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lazymerge.demo import run_demo

    run_demo(args.output, stdout, stderr)
    return 0
