"""One merge job and the one path that runs it, for every entry point (API and CLI alike).

A job is K plans (K = 1 for a single merge: a single merge is a sweep of one), the opened inputs
they share, and where each output goes on the Hub, if anywhere. Running it is always the same
three steps: warm the page cache while the compute library is imported (`StartupPrefetch`: torch,
or only numpy for a weighted-sum merge on the CPU, which never imports torch), `execute_sweep`
(every input chunk read once, merged K times), then one Hub commit per pushed output. Planning is
torch-free, and so is this module.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lazymerge.errors import PlanWarning, RecipeError
from lazymerge.io.checkpoint import Checkpoint
from lazymerge.io.hub import open_any
from lazymerge.manifest import Manifest, plan_fingerprint
from lazymerge.options import HubOptions, ProgressCallback, RunOptions
from lazymerge.output_folder import check_plan_output
from lazymerge.part_folder import check_part_output
from lazymerge.parts import Part
from lazymerge.plan import MergePlan, with_short_edge_shards
from lazymerge.sweep import Sweep

if TYPE_CHECKING:
    import torch

    from lazymerge.execute import MergeStats
    from lazymerge.io.hub_pushes import Pushes

__all__ = [
    "IN_MEMORY",
    "MergeJob",
    "open_input",
    "open_inputs",
    "plan_dogerm_job",
    "plan_memory_job",
    "plan_recipe_job",
    "run_job",
    "run_job_into",
    "run_part_job",
]

PathLike = str | os.PathLike[str]
# The output folder of a plan whose outputs are tensors in memory: it only names the plan.
IN_MEMORY = Path("(in memory)")
# Hub repos opened at once (a recipe of many models): enough to hide the round trips.
_OPEN_AT_ONCE = 4


@dataclass
class MergeJob:
    """K plans over the same inputs, with the options they run under.

    `repos[k]` is the Hub repo of output k (None: no push)."""

    plans: list[MergePlan]
    checkpoints: list[Checkpoint]
    repos: list[str] | None
    options: RunOptions
    hub: HubOptions


def open_input(model: PathLike | Checkpoint, hub: HubOptions) -> Checkpoint:
    """A local folder or file, a Hub repo id (`owner/name[@revision]`) or an opened Checkpoint."""
    if isinstance(model, Checkpoint):
        return model
    return open_any(model, label=str(model), low_disk=hub.low_disk, token=hub.token)


def open_inputs(models: Sequence[PathLike | Checkpoint], hub: HubOptions) -> list[Checkpoint]:
    """`open_input` for each, side by side: opening a Hub repo costs about ten round trips (repo
    info, index, headers, config, tokenizer), so two repos opened one after the other double the
    wait before the first weight byte. The first error (in the order given) is raised. (Recipes
    open their models as they plan: `lazymerge.config`.)"""
    if len(models) < 2 or all(isinstance(m, Checkpoint) or os.path.exists(m) for m in models):
        return [open_input(m, hub) for m in models]
    opened: list[Checkpoint | None] = [None] * len(models)
    failed: list[BaseException | None] = [None] * len(models)

    at_once = threading.BoundedSemaphore(_OPEN_AT_ONCE - 1)  # the caller's thread opens one more

    def open_one(k: int) -> None:
        try:
            with at_once:
                opened[k] = open_input(models[k], hub)
        except BaseException as exc:  # raised in the caller's thread, below
            failed[k] = exc

    # Daemon threads: a Ctrl-C in the caller's thread never waits for a stalled request here.
    others = [threading.Thread(target=open_one, args=(k,), daemon=True) for k in range(1, len(models))]
    for thread in others:
        thread.start()
    opened[0] = open_input(models[0], hub)  # its error, or a Ctrl-C, goes up at once
    for thread in others:
        thread.join()
    for exc in failed:
        if exc is not None:
            raise exc
    return [c for c in opened if c is not None]


def _outputs(output: PathLike, sweep: Sweep | None, hub: HubOptions) -> tuple[list[Path], list[str] | None]:
    """Each output's folder and repo: the names as given for one merge, filled templates for a sweep
    (checked before planning, so that a bad template costs no header read)."""
    return [Path(output)] if sweep is None else sweep.outputs(output), hub.repo_ids(sweep)


def _finish(
    plans: list[MergePlan], checkpoints: list[Checkpoint], repos: list[str] | None, options: RunOptions, hub: HubOptions
) -> MergeJob:
    part = options.part
    if part is not None and repos is not None:
        raise RecipeError(
            "--push-to-hub does not combine with --part: one part cannot make the one commit",
            hint="use --ray --push-to-hub (each task uploads its shards), or push the folder after finalize",
        )
    if repos is not None:  # pushed as it runs: the upload starts after the first shard closes
        plans = [_pushed_layout(plan, options) for plan in plans]
    # Ray's default number of parts is known once the cluster is reached: checked again there.
    split = [part] if isinstance(part, Part) else [Part(i, options.parts or 1) for i in range(options.parts or 1)]
    for plan in plans:  # build_plan touched no file
        if isinstance(part, Part) or options.ray:
            for one in split:
                check_part_output(plan, one, one.shards(plans), checkpoints, resume=options.resume)
        else:
            check_plan_output(plan, checkpoints, resume=options.resume)
    for warning in dict.fromkeys(w for p in plans for w in p.warnings):
        warnings.warn(warning, PlanWarning, stacklevel=4)  # at the caller of lazymerge.merge/plan_merge/dogerm
    return MergeJob(plans, checkpoints, repos, options, hub)


def _pushed_layout(plan: MergePlan, options: RunOptions) -> MergePlan:
    """A pushed plan with short edge shards (`with_short_edge_shards`), unless `--resume` finds the
    plain layout's shards in the output folder (a local run, finished or killed, now pushed):
    those are kept as they are, not merged again for another layout."""
    if options.resume:
        previous = Manifest.load(plan.output_dir)
        if previous is not None and previous.fingerprint == plan_fingerprint(plan):
            return plan
    return with_short_edge_shards(plan, options.max_shard_size)


def plan_recipe_job(
    recipe: PathLike | dict, output: PathLike, sweep: Sweep | None, options: RunOptions, hub: HubOptions
) -> MergeJob:
    """Plan a mergekit-style recipe (one output, or one per value of `sweep`) from headers alone."""
    from lazymerge.config import RECIPE_FILE_NAME, load_recipe, plan_recipe, recipe_file_bytes

    spec = load_recipe(recipe)
    outs, repos = _outputs(output, sweep, hub)
    variants = [spec] if sweep is None else list(sweep.variants(spec))
    plans: list[MergePlan] = []
    checkpoints: list[Checkpoint] = []
    for variant, out in zip(variants, outs, strict=True):
        plan, opened = plan_recipe(
            variant, out, max_shard_size=options.max_shard_size, overwrite=options.overwrite, low_disk=hub.low_disk,
            token=hub.token,
        )  # fmt: skip
        # The user's config as written; in a sweep, each output's own variant (what reproduces it).
        plan.side_files[RECIPE_FILE_NAME] = recipe_file_bytes(recipe if sweep is None else variant)
        plans.append(plan)
        checkpoints = checkpoints or opened
    return _finish(plans, checkpoints, repos, options, hub)


def plan_dogerm_job(
    reward_model: PathLike | Checkpoint,
    domain_model: PathLike | Checkpoint,
    weights: Sequence[float],
    output: PathLike,
    *,
    sweep: bool,
    dtype: str | None,
    options: RunOptions,
    hub: HubOptions,
) -> MergeJob:
    """Plan DogeRM for each weight (`sweep`: `output` and `push_to_hub` are `{weight}` templates)."""
    from lazymerge.recipes.dogerm import plan_dogerm

    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise RecipeError(f"weight must be a number, got {w!r}")
    outs, repos = _outputs(output, Sweep("weight", weights) if sweep else None, hub)
    rm, sft = open_inputs([reward_model, domain_model], hub)
    plans = [
        plan_dogerm(rm, sft, w, out, dtype=dtype, max_shard_size=options.max_shard_size, overwrite=options.overwrite)
        for w, out in zip(weights, outs, strict=True)
    ]
    return _finish(plans, [rm, sft], repos, options, hub)


def run_job(job: MergeJob) -> list[MergeStats]:
    """Run a planned job: one MergeStats per output, each with its Hub push (if any) in `.push`."""
    from lazymerge.io.hub_pushes import Pushes
    from lazymerge.io.prefetch import StartupPrefetch
    from lazymerge.kernels.device import needs_torch

    options = job.options
    if options.device == "cuda":  # asked for explicitly: refused before any folder is made or bar drawn
        from lazymerge import execute  # the executor's own choice (it selects again when it runs)

        execute.select_backend(options.device)
    if options.ray:
        from lazymerge.cluster import run_job_on_ray

        return run_job_on_ray(job, run_part_job)
    if options.parts is not None and options.part is None:
        raise RecipeError(
            "--parts N splits a merge for --ray (or --dry-run)",
            hint="add --ray, or run each part with --part I/N (a job array), then `lazymerge finalize`",
        )
    for k, ckpt in enumerate(job.checkpoints):
        ckpt.expect_reads({leaf.file for p in job.plans for t in p.tensors for g in t.segments for s in g.sources
                           for leaf in s.leaves() if leaf.checkpoint == k})  # fmt: skip
    pushes = Pushes(job.plans, job.repos, job.hub) if job.repos is not None else None  # a bad token fails here
    try:
        with _progress(job.plans, options, pushes) as progress:
            library = "torch" if needs_torch(job.plans, options.device) else "numpy"
            # A part's first shard is not the plan's: no prefetch of a guess (it is what resume does).
            with StartupPrefetch(
                job.plans[0], job.checkpoints, resume=options.resume or options.part is not None, module=library
            ):
                with contextlib.suppress(ImportError):  # not installed: the executor says so, in one line
                    importlib.import_module(library)  # time the disk need not sit idle
                from lazymerge.execute import execute_sweep
            lanes = 1 if pushes is not None and pushes.delete_after_upload else options.write_lanes
            stats = execute_sweep(
                job.plans, job.checkpoints, chunk_elements=options.chunk_elements,
                progress=pushes.wrap(progress) if pushes is not None else progress, resume=options.resume,
                device=options.device, workers=options.workers, write_lanes=lanes, part=options.part,
                sha256=pushes is not None, uploaded=pushes.held_checks() if pushes is not None and options.resume else None,
            )  # fmt: skip
            if pushes is None:
                return stats
            return [replace(s, push=r) for s, r in zip(stats, pushes.commit(), strict=True)]
    finally:
        if pushes is not None:
            pushes.close()


def run_part_job(
    plans: list[MergePlan], inputs: Sequence[Checkpoint | str], options: RunOptions, hub: HubOptions
) -> list[MergeStats]:
    """One part of a split merge on a cluster node (`options.part`): the inputs opened again where
    they are repo ids, then the ordinary `run_job` (no push: the node's uploads go to the driver)."""
    return run_job(MergeJob(plans, open_inputs(inputs, hub), None, options, hub))


def plan_memory_job(
    recipe: PathLike | dict, options: RunOptions, hub: HubOptions, opened: dict[str, Checkpoint] | None = None
) -> MergeJob:
    """Plan a recipe whose output is a model in memory (`lazymerge.load`): no output folder, so
    none is checked. `opened` maps a model string to its already opened Checkpoint (a re-merge
    with another weight reuses them); models opened now are added to it."""
    from lazymerge.config import load_recipe, plan_recipe

    opened = {} if opened is None else opened

    def opener(model: str, label: str | None = None) -> Checkpoint:
        if model not in opened:
            opened[model] = open_any(model, label=label or model, low_disk=False, token=hub.token)
        return opened[model]

    spec = load_recipe(recipe)
    plan, checkpoints = plan_recipe(spec, IN_MEMORY, max_shard_size=options.max_shard_size, opener=opener)
    for warning in plan.warnings:
        warnings.warn(warning, PlanWarning, stacklevel=4)
    return MergeJob([plan], checkpoints, None, options, hub)


def run_job_into(job: MergeJob, targets: Mapping[str, torch.Tensor], unused: Collection[str] = ()) -> MergeStats:
    """Run a one-plan job into tensors in memory (`lazymerge.execute.execute_into`)."""
    from lazymerge.execute import execute_into

    options = job.options
    with _progress(job.plans, options, None) as progress:
        return execute_into(
            job.plans[0], job.checkpoints, targets, chunk_elements=options.chunk_elements, progress=progress,
            device=options.device, workers=options.workers, unused=unused,
        )  # fmt: skip


@contextlib.contextmanager
def _progress(plans: list[MergePlan], options: RunOptions, pushes: Pushes | None) -> Iterator[ProgressCallback | None]:
    """The executor's callback: the user's, progress on stderr (True: a bar where someone watches,
    plain lines in a log), or none (False)."""
    if options.progress is False:
        yield None
        return
    if options.progress is not True:
        yield options.progress
        return
    from lazymerge.consoles import LogConsole
    from lazymerge.progress_lines import progress_display

    console = LogConsole(stderr=True, highlight=False)
    with progress_display(console, plans, upload=pushes is not None, interval=options.progress_interval) as callback:
        if pushes is not None:
            pushes.report_uploads(callback.upload)
        yield callback
