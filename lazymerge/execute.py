"""Run merge plans: `execute_sweep` (K plans, one read of the inputs) and `execute`, a sweep of one.

Everything around the stream: the output folders (created, locked), the backend, the shards kept
by --resume (checked against the manifest), the side files (the index last: it is what makes a
folder look like a finished model) and the closing MergeStats. The streaming itself, read ->
merge -> write in overlapping stages in bounded memory, is `lazymerge.pipeline`. The library
never prints; progress goes to a callback.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from lazymerge._platform import peak_rss_bytes, tune_allocator
from lazymerge.errors import OutputError
from lazymerge.events import MergeStats, ProgressEvent
from lazymerge.io.checkpoint import Checkpoint
from lazymerge.io.writer import write_side_file
from lazymerge.kernels.base import Backend, DeviceError
from lazymerge.kernels.device import gpu_capable, numpy_capable, select_backend
from lazymerge.lock import OutputLock
from lazymerge.output_folder import checkpoint_paths, prepare_output_folder
from lazymerge.part_folder import part_lock_name, prepare_part_folder, stage_side_files
from lazymerge.parts import Part
from lazymerge.pipeline import MergeRun
from lazymerge.plan import MergePlan
from lazymerge.recompute import tensor_bytes

if TYPE_CHECKING:
    import torch

__all__ = ["MergeStats", "ProgressEvent", "execute", "execute_into", "execute_sweep", "tensor_bytes"]


def execute(plan: MergePlan, checkpoints: Sequence[Checkpoint], **options: Any) -> MergeStats:
    """Write the merged model described by `plan` into `plan.output_dir`: `execute_sweep([plan])`.

    Args:
        plan: from `lazymerge.plan_merge(...)` or a recipe's planner.
        checkpoints: the opened inputs, in `plan.inputs` order.
        options: `chunk_elements`, `progress`, `resume`, `device`, `workers`, `write_lanes`, as
            for `execute_sweep`.

    Returns:
        MergeStats of the run.
    """
    return execute_sweep([plan], checkpoints, **options)[0]


def execute_sweep(
    plans: Sequence[MergePlan],
    checkpoints: Sequence[Checkpoint],
    *,
    chunk_elements: int | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    resume: bool = False,
    device: str = "cpu",
    workers: int | None = None,
    write_lanes: int | None = None,
    part: Part | None = None,
    sha256: bool = False,
    uploaded: Sequence[Callable[[str, dict], bool]] | None = None,
) -> list[MergeStats]:
    """Write K merged models that read the same input ranges (a parameter sweep) in one pass; K = 1
    for a single merge.

    Every chunk of the inputs is read once and merged K times, once per plan; each output has
    its own folder, writer, manifest and index. The plans must read the same inputs in the same
    order (same recipe shape, different weights or parameters). With `resume`, each output keeps
    the shards its own manifest records as finished; a shard is merged only for the outputs that
    lack it, and each input range is still read once.

    Args:
        plans: the K plans (`lazymerge.plan_merge(..., sweep=...)`), each with its own output folder.
        checkpoints: the opened inputs, in `plan.inputs` order.
        chunk_elements: elements per chunk; bounds memory. Default: 2 Mi on CPU, 8 Mi on CUDA.
        progress: called with a ProgressEvent after every chunk and when each shard closes.
        resume: keep shards that an earlier run of the same plan finished (checked against the
            manifest's sizes and checksums), redo the rest.
        device: "cpu", "cuda" or "auto" (CUDA when a GPU and Triton are usable).
        workers: CPU merge threads (default: the number of cores).
        write_lanes: output shards written at once (`lazymerge.lanes.write_lanes`; default 3 on
            CUDA, 1 on CPU; always 1 with low-disk Hub inputs, and the pusher asks for 1 when
            shards are deleted once uploaded).
        part: write only this part's shards (`lazymerge.parts`), with the part's own lock and
            manifest, side files staged for `lazymerge finalize` (`lazymerge.part_folder`).
        sha256: also compute each shard's plain sha256 while writing it and record it in the
            manifest (a Hub push uses it as the LFS object id instead of reading the shard again).
        uploaded: per plan, with `resume`: whether a shard deleted once uploaded is held by the
            Hub (then it is kept, not merged again; `Pushes.held_checks`).

    Returns:
        One MergeStats per plan (`bytes_read` is the shared read).

    Raises:
        OutputError: a folder is locked by another run, or holds a different merge (`resume`).
        DiskSpaceError, HeaderError: disk full, or an input truncated since it was planned.
        PlanError: the plans do not read the same input ranges.
    """
    start = time.perf_counter()
    tune_allocator()
    plans = list(plans)
    dirs = [p.output_dir for p in plans]
    if len({d.resolve() for d in dirs}) != len(dirs):
        raise OutputError("two outputs of the sweep go to the same folder", hint="put {weight} in --output")
    for out_dir in dirs:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {out_dir}: {exc.strerror}") from exc
    backend, reason = _backend(plans, device)
    own = range(len(plans[0].shards)) if part is None else part.shards(plans)
    with contextlib.ExitStack() as stack:
        for out_dir in dirs:
            stack.enter_context(OutputLock(out_dir) if part is None else OutputLock(out_dir, part_lock_name(part)))
        stack.enter_context(backend)
        # Checked again under the lock; the earlier output cleared, the new manifest written first.
        if part is None:
            states = [
                prepare_output_folder(
                    p, checkpoint_paths(checkpoints), resume=resume, uploaded=uploaded[v] if uploaded else None
                )
                for v, p in enumerate(plans)
            ]
        else:
            states = [prepare_part_folder(p, part, own, checkpoint_paths(checkpoints), resume=resume) for p in plans]
        # Side files first: none of them makes the folder look like a finished model; the index
        # does, so it goes last. A split merge's go to `finalize`, staged by part 0.
        for p in plans:
            if part is not None:
                if part.index == 0:
                    stage_side_files(p)
                continue
            for name, data in p.side_files.items():
                if not name.endswith(".index.json"):
                    write_side_file(p.output_dir, name, data)
        # Shards grouped by which outputs still need them (one group unless the outputs of a
        # resumed sweep kept different shards): one pass per group, so each range is read once.
        groups: dict[tuple[int, ...], list[int]] = {}
        for k in own:
            who = tuple(v for v, (_, done) in enumerate(states) if k not in done)
            if who:
                groups.setdefault(who, []).append(k)
        total = sum(p.shards[k].size for p in plans for k in own)
        written = sum(p.shards[k].size for p, (_, done) in zip(plans, states, strict=True) for k in done)
        read = 0
        for v, (_, done) in enumerate(states):
            for k in sorted(done):
                if progress is not None:
                    name = plans[v].shards[k].name
                    progress(ProgressEvent("skip", name, written, total, read, dirs[v] / name))
        for who, shards in groups.items():
            manifests = [states[v][0] for v in who]
            run = MergeRun(
                [plans[v] for v in who],
                checkpoints,
                chunk_elements,
                None,
                backend,
                workers,
                shards,
                manifests,
                lanes=write_lanes,
                sha256=sha256,
            )
            begun = run.bytes_written  # a run counts its plans' other shards as written: report sweep totals
            if progress is not None:
                run.progress = lambda e, shift=written - begun, before=read: progress(
                    replace(
                        e, bytes_written=e.bytes_written + shift, total_bytes=total, bytes_read=e.bytes_read + before
                    )
                )
            run.go()
            written += run.bytes_written - begun
            read += run.bytes_read
        for p in plans if part is None else ():
            for name, data in p.side_files.items():
                if name.endswith(".index.json"):
                    write_side_file(p.output_dir, name, data)
    if progress:
        progress(ProgressEvent("done", "", written, total, read))
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    return [
        MergeStats(
            tensors=len(p.tensors),
            bytes_read=read,
            bytes_written=sum(p.shards[k].size for k in own),
            seconds=seconds,
            peak_rss_bytes=peak,
            device=reason,
            files=[p.output_dir / p.shards[k].name for k in own],
            resumed_shards=len(done),
            output_dir=p.output_dir,
        )
        for p, (_, done) in zip(plans, states, strict=True)
    ]


def execute_into(
    plan: MergePlan,
    checkpoints: Sequence[Checkpoint],
    targets: Mapping[str, torch.Tensor],
    *,
    chunk_elements: int | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    device: str = "cpu",
    workers: int | None = None,
    unused: Collection[str] = (),
) -> MergeStats:
    """Merge `plan` into tensors in memory instead of files: every output tensor's bytes go into
    `targets[name]` (preallocated, contiguous, of the plan's dtype and shape; CPU or CUDA), chunk by
    chunk, with the same bounded buffers as a file run. Nothing is written to disk; the input pages
    stay in the page cache, for a re-merge with another weight.

    Args:
        plan: the plan (its output folder and shard layout only name the byte ranges).
        checkpoints: the opened inputs, in `plan.inputs` order.
        targets: output tensor name -> tensor to fill.
        unused: output tensors with no target, merged and discarded.
        chunk_elements, progress, device, workers: as for `execute_sweep`.

    Returns:
        MergeStats (`bytes_written` is the tensor bytes filled, `files` is empty).

    Raises:
        PlanError: a plan tensor has no target or a mismatched one.
    """
    from lazymerge.io.tensor_sink import TensorSink

    start = time.perf_counter()
    tune_allocator()
    sink = TensorSink(plan, targets, unused)
    backend, reason = _backend([plan], device)
    with backend:
        run = MergeRun(
            [plan], checkpoints, chunk_elements, progress, backend, workers, list(range(len(plan.shards))), [],
            lanes=1, sink=sink,
        )  # fmt: skip
        run.go()
    return MergeStats(
        tensors=len(plan.tensors),
        bytes_read=run.bytes_read,
        bytes_written=plan.total_size,
        seconds=time.perf_counter() - start,
        peak_rss_bytes=peak_rss_bytes(),
        device=reason,
        files=[],
        resumed_shards=0,
        output_dir=None,
    )


def _backend(plans: Sequence[MergePlan], device: str) -> tuple[Backend, str]:
    """The compute backend for `device` and why: methods without a GPU kernel keep "auto" on the
    CPU; weighted sums only (linear, DogeRM) run on numpy's CPU backend, never importing torch."""
    cpu_only = sorted(
        {
            t.method
            for p in plans
            for t in p.tensors
            if not all(gpu_capable(t.method, len(seg.sources)) for seg in t.segments)
        }
    )
    numpy_ok = numpy_capable(plans)
    if cpu_only and device == "auto":
        return select_backend("cpu", numpy_ok=numpy_ok)[0], f"cpu: {', '.join(cpu_only)} run on the CPU backend"
    if cpu_only and device == "cuda":
        raise DeviceError(f"merge method {cpu_only[0]} runs on the CPU backend only", hint="use --device cpu or auto")
    return select_backend(device, numpy_ok=numpy_ok)
