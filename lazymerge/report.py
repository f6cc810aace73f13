"""What the CLI shows: the plan of a merge or a sweep (--dry-run), a live progress bar, what a run
did, `inspect`, `verify`.

Rendering only; the CLI decides when. Everything goes to the Console it is given.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape as _markup_escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from lazymerge.io.checkpoint import Checkpoint
from lazymerge.plan import MergePlan
from lazymerge.text import printable
from lazymerge.units import Throughput, duration_text, human, rate_text

if TYPE_CHECKING:
    from lazymerge.assemble import FinalizeResult
    from lazymerge.execute import MergeStats
    from lazymerge.search import SearchResult
    from lazymerge.verify import VerifyReport

__all__ = [
    "human",
    "print_checkpoint",
    "print_finalized",
    "print_parts",
    "print_plan",
    "print_results",
    "print_search",
    "print_stats",
    "print_verify",
    "progress_bar",
]


def escape(text: str) -> str:
    """Rich markup escaped, and control characters of names from strangers shown as `\\x1b`..."""
    return _markup_escape(printable(text))


def _table(title: str) -> Table:
    # The title (a folder path, often) is never wrapped to the table's width: one line, whole.
    heading = Text.from_markup(title, style="table.title", overflow="ignore")
    heading.no_wrap = True
    return Table(title=heading, title_justify="left", show_edge=False, pad_edge=False)


def print_plan(
    console: Console, plans: MergePlan | Sequence[MergePlan], labels: Sequence[str] = (), repos: Sequence[str] = ()
) -> None:
    """--dry-run: what a merge (one plan: every tensor and shard) or a sweep (K plans: each output,
    `labels[k]`, `repos[k]` if pushed) would write, and the checks that passed. From headers only."""
    if isinstance(plans, MergePlan):
        plans = [plans]
    if len(plans) == 1 and not labels:
        _print_one_plan(console, plans[0], repos[0] if repos else None)
    else:
        _print_sweep_plan(console, plans, labels, repos)


def _print_one_plan(console: Console, plan: MergePlan, repo: str | None) -> None:
    tensors = _table(f"Plan: {len(plan.tensors)} output tensors")
    for col in ("tensor", "dtype", "shape", "made from", "shard"):
        tensors.add_column(col, overflow="fold")
    for t in sorted(plan.tensors, key=lambda t: (t.shard, t.offset)):
        tensors.add_row(escape(t.name), t.dtype, str(list(t.shape)), escape(t.how), str(t.shard + 1))
    console.print(tensors)
    shards = _table(f"Output shards in {escape(str(plan.output_dir))}")
    for col in ("file", "tensors", "size"):
        shards.add_column(col)
    for s in plan.shards:
        shards.add_row(s.name, str(len(s.tensors)), human(s.size))
    console.print(shards)
    console.print(f"inputs: {', '.join(escape(i) for i in plan.inputs)}")
    if repo is not None:
        console.print(f"pushes to: {escape(repo)}")
    console.print(f"total tensor bytes (index total_size): {plan.total_size} ({human(plan.total_size)})")
    console.print(f"reads {human(plan.input_bytes)} from the inputs, writes {human(plan.bytes_on_disk)}")
    extra = ", ".join(sorted(plan.side_files))
    console.print(f"side files: {escape(extra)}")
    if plan.dropped:
        console.print(f"dropped (not in the output architecture): {escape(', '.join(plan.dropped))}")
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")
    checks = "shapes and dtypes consistent; every tensor present"
    if plan.free_bytes is not None:
        checks += f"; free space {human(plan.free_bytes)} >= {human(plan.bytes_on_disk)} needed"
    console.print(f"[green]checks passed:[/] {checks}")


@contextmanager
def progress_bar(
    console: Console, plans: Sequence[MergePlan], disable: bool = False, upload: bool = False
) -> Iterator[Callable]:
    """A rich progress bar (bytes written by all `plans`, the input read rate, ETA, current shard)
    fed by executor events; for a terminal or a notebook (rich draws a widget there). Until the
    first bytes are merged (the merge backend loads) it says "starting…" and pulses.

    With `upload`, a second line shows the bytes pushed to the Hub; the yielded callback then has
    an `upload(done, total)` attribute for the pusher to call (from its own thread)."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[sizes]}"),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[eta]}"),
        console=console,
        disable=disable,
        transient=False,
    )
    total = sum(s.size for p in plans for s in p.shards)
    meter = Throughput()
    task = progress.add_task("starting…", total=None, sizes=f"0 B/{human(total)} written", rate="", eta="")

    def callback(event) -> None:
        fields: dict = {
            "completed": event.bytes_written,
            "sizes": f"{human(event.bytes_written)}/{human(total)} written",
        }
        if event.kind == "skip":
            fields["description"] = f"kept {escape(event.shard)}"
        else:  # a kept shard moved no byte: it stays out of the rate
            meter.add(event.bytes_read, event.bytes_written)
            fields["rate"] = rate_text(meter.read_rate())
            fields["eta"] = f"ETA {duration_text(meter.eta(total - event.bytes_written))}"
            fields["description"] = {"chunk": "merging", "shard": "closed", "done": "done"}.get(event.kind, event.kind)
            if event.shard:
                fields["description"] += f" {escape(event.shard)}"
        progress.update(task, total=total, **fields)

    if upload:
        up = progress.add_task("uploading (waits for the first shard)", total=total, sizes="", rate="", eta="")

        def on_upload(done: int, upload_total: int) -> None:
            label = "uploaded, committing" if done >= upload_total else "uploading to the Hub"
            upload_total = upload_total or total
            sizes = f"{human(done)}/{human(upload_total)} uploaded"
            progress.update(up, completed=done, total=upload_total, description=label, sizes=sizes)

        callback.upload = on_upload  # type: ignore[attr-defined]

    with progress:
        yield callback


def _print_sweep_plan(
    console: Console, plans: Sequence[MergePlan], labels: Sequence[str], repos: Sequence[str]
) -> None:
    first = plans[0]
    console.print(f"[bold]Sweep: {len(plans)} outputs from one read[/]")
    for k, (plan, label) in enumerate(zip(plans, labels, strict=True)):
        repo = f" -> {escape(repos[k])}" if repos else ""
        size = f"{len(plan.shards)} shard(s), {human(plan.bytes_on_disk)}"
        console.print(f"  {escape(str(plan.output_dir))}  {escape(label)}  {size}{repo}", soft_wrap=True)
    need = sum(p.bytes_on_disk for p in plans)
    console.print(f"inputs: {', '.join(escape(i) for i in first.inputs)}", soft_wrap=True)
    shards = ", ".join(s.name for s in first.shards)
    console.print(f"{len(first.tensors)} output tensors per model; shards: {shards}", soft_wrap=True)
    console.print(f"reads {human(first.input_bytes)} from the inputs once, writes {human(need)} in all")
    for warning in dict.fromkeys(w for p in plans for w in p.warnings):
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if first.free_bytes is not None and first.free_bytes < need:
        console.print(f"[yellow]warning:[/] free space {human(first.free_bytes)} < {human(need)} for all outputs")
    console.print(
        "[green]checks passed:[/] shapes and dtypes consistent; every tensor present; same reads for all",
        soft_wrap=True,
    )


def print_results(console: Console, stats: Sequence[MergeStats]) -> None:
    """What a run did: the closing table of a merge, or a line per output of a sweep; where each
    output was pushed."""
    if len(stats) == 1:
        print_stats(console, stats[0])
    else:
        for one in stats:
            kept = f" ({one.resumed_shards} shard(s) kept from the earlier run)" if one.resumed_shards else ""
            console.print(f"{escape(str(one.output_dir))}: {human(one.bytes_written)} written{kept}", soft_wrap=True)
    for one in stats:
        if one.push is not None:
            reused = f" ({len(one.push.reused)} shard(s) already on the Hub, not re-sent)" if one.push.reused else ""
            where = f"{one.push.repo_id}@{one.push.revision}"
            console.print(f"pushed to {escape(where)}{reused}: {escape(one.push.commit_url)}", soft_wrap=True)
    if len(stats) > 1:
        first = stats[0]
        console.print(
            f"{len(stats)} models from one read of {human(first.bytes_read)} in {first.seconds:.1f} s "
            f"({rate_text(first.read_rate)})"
        )


def print_stats(console: Console, stats: MergeStats) -> None:
    """The closing table of a merge."""
    table = _table("Merged")
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("output", escape(str(stats.output_dir))),
        ("tensors", str(stats.tensors)),
        ("shards", str(len(stats.files))),
        ("read", human(stats.bytes_read)),
        ("written", human(stats.bytes_written)),
        ("wall time", f"{stats.seconds:.2f} s"),
        ("read rate", rate_text(stats.read_rate)),
        ("peak RSS", "not measured" if stats.peak_rss_bytes is None else human(stats.peak_rss_bytes)),
        ("device", stats.device),
    ]
    if stats.resumed_shards:
        rows.append(("kept from the earlier run", f"{stats.resumed_shards} shard(s), checksums verified"))
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def print_search(console: Console, result: SearchResult) -> None:
    """A weight search (`dogerm --eval`): accuracy per value, per subset when the data has them, the
    time each re-merge and scoring took, and the best value."""
    subsets = sorted({name for r in result.results for name in r.subsets})
    best = result.best
    table = _table(f"Accuracy on {result.results[0].pairs} preference pairs (chosen scored higher)")
    table.add_column(escape(result.key), justify="right")
    table.add_column("accuracy", justify="right")
    for name in subsets:
        table.add_column(escape(name), justify="right")
    table.add_column("merge s", justify="right")
    table.add_column("score s", justify="right")
    for r in result.results:
        cells = [f"{r.accuracy:.4f}"]
        cells += [f"{r.subsets[n][0] / r.subsets[n][1]:.4f}" if n in r.subsets else "-" for n in subsets]
        mark = " *" if r.weight == best else ""
        table.add_row(f"{r.weight:g}{mark}", *cells, f"{r.merge_seconds:.2f}", f"{r.score_seconds:.2f}")
    console.print(table)
    console.print(f"best {escape(result.key)}: {best:g} (model built and first merge in {result.load_seconds:.1f} s)")


def print_checkpoint(console: Console, ckpt: Checkpoint, list_tensors: bool = False) -> None:
    """`lazymerge inspect`: format, shards, dtypes, and optionally every tensor."""
    console.print(
        f"[bold]{escape(ckpt.label)}[/]  ({ckpt.format}, {len(ckpt.files)} file(s), "
        f"{len(ckpt.tensors)} tensors, {human(ckpt.total_bytes)})"
    )
    files = _table("Files")
    for col in ("file", "tensors", "size"):
        files.add_column(col)
    per_file = Counter(t.file for t in ckpt.tensors.values())
    for f in ckpt.files:
        files.add_row(escape(f), str(per_file[f]), human(ckpt.file_sizes.get(f, 0)))
    console.print(files)
    dtypes = Counter()
    for t in ckpt.tensors.values():
        dtypes[t.dtype] += t.nbytes
    console.print("dtypes: " + ", ".join(f"{d} {human(n)}" for d, n in dtypes.most_common()))
    params = sum(t.numel for t in ckpt.tensors.values())
    console.print(f"parameters: {params:,}")
    if list_tensors:
        table = _table("Tensors")
        for col in ("tensor", "dtype", "shape", "file"):
            table.add_column(col, overflow="fold")
        for t in ckpt.tensors.values():
            table.add_row(escape(t.name), t.dtype, str(list(t.shape)), escape(t.file))
        console.print(table)


def print_verify(console: Console, report: VerifyReport) -> None:
    """`lazymerge verify`: one row per check."""
    table = _table(f"Verify {escape(str(report.folder))}")
    for col in ("check", "result", "detail"):
        table.add_column(col, overflow="fold")
    for c in report.checks:
        table.add_row(escape(c.name), "[green]ok[/]" if c.ok else "[bold red]FAIL[/]", escape(c.detail))
    console.print(table)


def print_parts(console: Console, plans: Sequence[MergePlan], count: int, part: int | None = None) -> None:
    """--dry-run of a split merge: the shards each of `count` parts writes, what it reads and
    writes (`part`: the one this process runs, marked)."""
    from lazymerge.parts import part_costs

    costs = part_costs(plans, count)
    table = _table(f"Split into {count} parts (whole shards, balanced by bytes)")
    for col in ("part", "shards", "reads", "writes"):
        table.add_column(col)
    for c in costs:
        names = [plans[0].shards[k].name for k in c.shards]
        shown = f"{len(names)}: {names[0]}" + (f" ... {names[-1]}" if len(names) > 1 else "") if names else "none"
        reads = human(c.read_bytes) + (f" + {human(c.statistics_bytes)} statistics" if c.statistics_bytes else "")
        mark = " [bold](this one)[/]" if part == c.index else ""
        table.add_row(f"{c.index}/{count}{mark}", shown, reads, human(c.write_bytes))
    console.print(table)
    heaviest = max(max(c.read_bytes, c.write_bytes) for c in costs)
    total = sum(max(c.read_bytes, c.write_bytes) for c in costs)
    console.print(f"balance: the heaviest part does {heaviest / max(total, 1) * count:.2f}x an even share")


def print_finalized(console: Console, result: FinalizeResult) -> None:
    """`lazymerge finalize`: what was assembled."""
    console.print(
        f"[green]finalized[/] {escape(str(result.output_dir))}: {result.parts} parts, {result.shards} shards, "
        f"{human(result.bytes)} checked in {result.seconds:.1f} s",
        soft_wrap=True,
    )
