"""`--ray`: the parts of a split merge (`lazymerge.parts`) as Ray tasks, finalized on the driver.

The driver plans (headers only), checks every part's output folder, then starts one task per
part; each task runs the ordinary pipeline (`job.run_job` with `RunOptions.part`) on its node, as
`--part I/N` does in a job array. Inputs are paths every node sees (a shared file system) or Hub
repo ids (each task reads only the ranges its shards need). With a shared output folder, the
driver then runs `finalize` (the folder is byte for byte a single run's). With `--push-to-hub`,
each task uploads its own shards (`preupload_lfs_files` on the worker) and the driver makes the
one commit; the output folders may then be each node's own disk.

A task whose worker dies (node lost, OOM-killed) is retried by Ray (`max_retries`); a retry, like a
rerun with `--resume`, keeps the shards its part finished (checksums verified). Ray is an optional
extra: `pip install lazymerge[ray]`.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lazymerge.assemble import finalize
from lazymerge.errors import ClusterError, LazyMergeError
from lazymerge.events import MergeStats, ProgressEvent
from lazymerge.part_folder import check_part_output, part_manifest_name
from lazymerge.parts import Part, split_shards
from lazymerge.settings import ray_address

if TYPE_CHECKING:
    from lazymerge.io.checkpoint import Checkpoint
    from lazymerge.job import MergeJob
    from lazymerge.options import HubOptions, RunOptions
    from lazymerge.plan import MergePlan

PartRunner = Callable[..., list[MergeStats]]

__all__ = ["PartResult", "default_parts", "import_ray", "run_job_on_ray"]

INSTALL_HINT = "pip install 'lazymerge[ray]' (on the driver and on every node of the cluster)"
MAX_RETRIES = 2  # a task whose worker process or node dies; an error of the merge itself is not retried


@dataclass
class PartResult:
    """What a part's task sends back: its stats, its uploads (per output), the node it ran on."""

    index: int
    stats: list[MergeStats]
    uploads: list[tuple[dict[str, Any], list[str], list[str]]] | None
    node: str


def import_ray() -> Any:
    """The `ray` module, or a one-line ClusterError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray needs Ray, which is not installed", hint=INSTALL_HINT) from None
    return ray


def default_parts(ray: Any) -> int:
    """One part per live node: each node streams its part at its own disk's or link's speed.
    (Several parts on one node would share its disk; `--parts N` says otherwise.)"""
    return max(1, sum(1 for node in ray.nodes() if node.get("Alive")))


def run_job_on_ray(job: MergeJob, run_part: PartRunner) -> list[MergeStats]:
    """Run `job` split into parts on a Ray cluster; one MergeStats per output, as `run_job`.

    `run_part(plans, inputs, options, hub)` runs one part on a worker (`job.run_part_job`: the
    ordinary run path; passed in, so this module does not import the one that dispatches to it)."""
    ray = import_ray()
    start = time.perf_counter()
    if not ray.is_initialized():
        try:
            ray.init(address=ray_address(), log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"cannot start or reach the Ray cluster: {exc}") from None
    count = job.options.parts or default_parts(ray)
    parts = [Part(i, count) for i in range(count)]
    split = split_shards(job.plans, count)
    for plan in job.plans:
        for part in parts:  # every refusal before any task starts
            check_part_output(plan, part, split[part.index], job.checkpoints, resume=job.options.resume)
    pushers = [_pusher(repo, job.hub) for repo in job.repos] if job.repos is not None else None
    try:
        # SPREAD: one part per node where there are enough nodes (Ray would pack 1-CPU tasks on one).
        task = ray.remote(max_retries=MAX_RETRIES, scheduling_strategy="SPREAD")(_run_part)
        inputs = [_portable(c) for c in job.checkpoints]
        options = replace(job.options, ray=False, parts=None, progress=False, resume=True)
        # A task reads the ranges its shards need and nothing more: Hub inputs are streamed by
        # range requests (as --low-disk), never downloaded whole on every node.
        hub = replace(job.hub, low_disk=True)
        refs = [
            task.remote(run_part, job.plans, inputs, options, hub, job.repos, part)
            for part in parts  # an empty part too: its manifest tells finalize it wrote nothing
        ]
        try:
            results: list[PartResult] = ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), LazyMergeError) else None
            if cause is not None:
                raise cause from None
            raise ClusterError(f"a part failed on the cluster: {_first_line(exc)}", hint=_rerun_hint(job)) from None
        except ray.exceptions.RayError as exc:
            raise ClusterError(f"a part was lost on the cluster: {_first_line(exc)}", hint=_rerun_hint(job)) from None
        return _finish(job, count, results, pushers, time.perf_counter() - start)
    finally:
        for pusher in pushers or ():
            pusher.close()


def _pusher(repo: str, hub: HubOptions, *, worker: bool = False) -> Any:
    from lazymerge.io.hub_upload import HubPusher

    return HubPusher(
        repo, private=hub.private, revision=hub.revision, commit_message=hub.commit_message, token=hub.token,
        delete_after_upload=worker and hub.delete_after_upload,
    )  # fmt: skip


def _finish(
    job: MergeJob, count: int, results: list[PartResult], pushers: list | None, seconds: float
) -> list[MergeStats]:
    """Finalize each output folder the driver sees whole (a shared one); commit each push."""
    out: list[MergeStats] = []
    for v, plan in enumerate(job.plans):
        if not job.hub.delete_after_upload and _all_parts_here(plan, count, results):
            finalize(plan.output_dir, checksums=False)  # each task verified its own shards as it wrote them
        elif pushers is None:
            raise ClusterError(
                f"the parts were written to {plan.output_dir} on each node's own disk, not a folder the driver sees",
                hint="give --output a folder every node sees (a shared file system), or add --push-to-hub",
            )
        push = None
        if pushers is not None:
            for r in results:
                pushers[v].adopt(*r.uploads[v])  # type: ignore[index]
            push = pushers[v].commit(plan)
        stats = [r.stats[v] for r in results]
        out.append(
            MergeStats(
                tensors=len(plan.tensors),
                bytes_read=sum(s.bytes_read for s in stats),
                bytes_written=sum(s.size for s in plan.shards),
                seconds=seconds,
                peak_rss_bytes=max((s.peak_rss_bytes for s in stats), default=0),
                device=f"ray: {len(results)} parts on {len({r.node for r in results})} node(s); {stats[0].device}",
                files=[plan.output_dir / s.name for s in plan.shards],
                resumed_shards=sum(s.resumed_shards for s in stats),
                output_dir=plan.output_dir,
                push=push,
            )
        )
    return out


def _all_parts_here(plan: MergePlan, count: int, results: list[PartResult]) -> bool:
    """Whether the driver sees every part's manifest in the output folder (a shared file system)."""
    folder = plan.output_dir
    return all((folder / part_manifest_name(Part(r.index, count))).is_file() for r in results)


def _portable(checkpoint: Checkpoint) -> Checkpoint | str:
    """What a task gets for an input: the opened Checkpoint (plain data) for a local one; for a Hub
    one the repo id pinned to the commit the driver planned from (`owner/name@sha`), which the task
    opens again: a push to the repo during the run cannot change what a part reads."""
    if not checkpoint.remote:
        return checkpoint
    commit = getattr(checkpoint, "commit", None)
    return f"{checkpoint.repo_id}@{commit}" if commit else checkpoint.label  # type: ignore[attr-defined]


def _run_part(
    run_part: PartRunner,
    plans: list[MergePlan],
    inputs: list[Checkpoint | str],
    options: RunOptions,
    hub: HubOptions,
    repos: list[str] | None,
    part: Part,
) -> PartResult:
    """A Ray task: one part through the ordinary run path, its shards uploaded as they close."""
    pushers = [_pusher(repo, hub, worker=True) for repo in repos] if repos is not None else []
    folders = {p.output_dir.resolve(): pusher for p, pusher in zip(plans, pushers, strict=True)} if pushers else {}

    def route(event: ProgressEvent) -> None:
        if event.kind in ("shard", "skip") and event.path is not None and folders:
            folders[Path(event.path).parent.resolve()].submit(event.shard, Path(event.path))

    try:
        run = replace(options, part=part, progress=route if pushers else False)
        stats = run_part(plans, inputs, run, hub)
        uploads = [pusher.uploads() for pusher in pushers] if pushers else None
    finally:
        for pusher in pushers:
            pusher.close()
    return PartResult(part.index, stats, uploads, socket.gethostname())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def _rerun_hint(job: MergeJob) -> str:
    return "run the same command again with --resume: finished parts and shards are kept"
