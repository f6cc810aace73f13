"""The public Python API: one function per verb, each a few lines over `lazymerge.job`.

`plan_merge` plans, `merge` plans and runs, `dogerm` is the DogeRM preset; a sweep (several values
of one parameter, inputs read once) is the same call with `sweep=` (or a list of DogeRM weights)
and returns a list. How to run is a `RunOptions`, what to do with the Hub a `HubOptions`; their
fields may also be given as keywords (`merge(cfg, out, device="cpu")`). The CLI calls these very
functions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal, overload

from lazymerge.assemble import finalize
from lazymerge.events import MergeStats
from lazymerge.io.checkpoint import Checkpoint
from lazymerge.job import open_input, plan_dogerm_job, plan_recipe_job, run_job
from lazymerge.options import HubOptions, RunOptions, split_settings
from lazymerge.plan import MergePlan
from lazymerge.sweep import Sweep

__all__ = ["dogerm", "finalize", "merge", "open_model", "plan_merge"]

PathLike = str | os.PathLike[str]
Recipe = PathLike | dict


def open_model(model: PathLike | Checkpoint, *, low_disk: bool = False, token: str | bool | None = None) -> Checkpoint:
    """Open a model folder, a single weight file, a Hub repo id or an already opened Checkpoint.

    A Hub repo id (`owner/name` or `owner/name@revision`, when no such local path exists) is
    opened from remote metadata alone; its weight files are downloaded when the merge reads them
    (`low_disk`: streamed with range requests instead, nothing on disk). `token`: a Hub token
    (default HF_TOKEN or the stored login)."""
    return open_input(model, HubOptions(low_disk=low_disk, token=token))


@overload
def plan_merge(
    recipe: Recipe, output: PathLike, *, sweep: None = None, options: RunOptions | None = None,
    hub: HubOptions | None = None, **settings: Any,
) -> MergePlan: ...  # fmt: skip
@overload
def plan_merge(
    recipe: Recipe, output: PathLike, *, sweep: Sweep, options: RunOptions | None = None,
    hub: HubOptions | None = None, **settings: Any,
) -> list[MergePlan]: ...  # fmt: skip
def plan_merge(
    recipe: Recipe,
    output: PathLike,
    *,
    sweep: Sweep | None = None,
    options: RunOptions | None = None,
    hub: HubOptions | None = None,
    **settings: Any,
) -> MergePlan | list[MergePlan]:
    """Plan a merge from headers alone (nothing is read beyond headers and tokenizers), with every
    check a run makes before its first tensor byte.

    Args:
        recipe: a mergekit-style YAML/JSON file, or the same as a dict. `merge_method: dogerm`
            (keys `reward_model`, `domain_model`, `weight`, optional `dtype`) is accepted too.
        output: the output folder; with `sweep`, a template such as `out-{lambda}`.
        sweep: one output per value of a config entry, e.g. `Sweep("parameters.lambda", [0.5, 1])`.
        options, hub, settings: see `merge` (`max_shard_size`, `overwrite`, `resume`, `low_disk`
            and `token` matter when planning).

    Returns:
        The MergePlan, or one per value with `sweep`. Planning warnings are also issued as
        `lazymerge.errors.PlanWarning` (`warnings.warn`).

    Raises:
        LazyMergeError: any problem with the recipe, the inputs, the options or the output.
    """
    options, hub = split_settings(options, hub, settings)
    plans = plan_recipe_job(recipe, output, sweep, options, hub).plans
    return plans if sweep is not None else plans[0]


@overload
def merge(
    recipe: Recipe, output: PathLike, *, sweep: None = None, options: RunOptions | None = None,
    hub: HubOptions | None = None, **settings: Any,
) -> MergeStats: ...  # fmt: skip
@overload
def merge(
    recipe: Recipe, output: PathLike, *, sweep: Sweep, options: RunOptions | None = None,
    hub: HubOptions | None = None, **settings: Any,
) -> list[MergeStats]: ...  # fmt: skip
def merge(
    recipe: Recipe,
    output: PathLike,
    *,
    sweep: Sweep | None = None,
    options: RunOptions | None = None,
    hub: HubOptions | None = None,
    **settings: Any,
) -> MergeStats | list[MergeStats]:
    """Merge models as a mergekit-style config describes (linear, task_arithmetic, ties, dare,
    slerp, dogerm...), streaming, in bounded memory.

    Args:
        recipe: YAML/JSON path or dict.
        output: the output folder; with `sweep`, a template (`out-{lambda}`, `{value}`, `{i}`).
        sweep: K merges that differ in one config entry, inputs read once (`Sweep(key, values)`).
        options: how to run (`RunOptions`: shard size, chunk size, overwrite, resume, device,
            workers, write lanes, progress).
        hub: Hub inputs and push (`HubOptions`: push_to_hub, private, revision, commit_message,
            delete_after_upload, low_disk, token). With a sweep, `push_to_hub` is a template too.
        settings: fields of RunOptions or HubOptions as keywords, applied over `options`/`hub`.

    Returns:
        MergeStats (its `.push` says where it was pushed), or one per value with `sweep`
        (`bytes_read` is the shared read).

    Raises:
        LazyMergeError: bad recipe, inputs, options or output; a Hub failure.

    Example:
        >>> lazymerge.merge({"merge_method": "linear", "models": [
        ...     {"model": "a", "parameters": {"weight": 0.5}},
        ...     {"model": "b", "parameters": {"weight": 0.5}}]}, "out", device="cpu", progress=True)
        >>> lazymerge.merge("ties.yml", "out-{lambda}", sweep=Sweep("parameters.lambda", [0.5, 1.0]))
    """
    options, hub = split_settings(options, hub, settings)
    stats = run_job(plan_recipe_job(recipe, output, sweep, options, hub))
    return stats if sweep is not None else stats[0]


@overload
def dogerm(
    reward_model: PathLike | Checkpoint, domain_model: PathLike | Checkpoint, weight: float, output: PathLike,
    *, dtype: str | None = None, dry_run: Literal[False] = False, options: RunOptions | None = None,
    hub: HubOptions | None = None, **settings: Any,
) -> MergeStats: ...  # fmt: skip
@overload
def dogerm(
    reward_model: PathLike | Checkpoint, domain_model: PathLike | Checkpoint, weight: float, output: PathLike,
    *, dtype: str | None = None, dry_run: Literal[True], options: RunOptions | None = None,
    hub: HubOptions | None = None, **settings: Any,
) -> MergePlan: ...  # fmt: skip
@overload
def dogerm(
    reward_model: PathLike | Checkpoint, domain_model: PathLike | Checkpoint, weight: Sequence[float],
    output: PathLike, *, dtype: str | None = None, dry_run: Literal[False] = False,
    options: RunOptions | None = None, hub: HubOptions | None = None, **settings: Any,
) -> list[MergeStats]: ...  # fmt: skip
@overload
def dogerm(
    reward_model: PathLike | Checkpoint, domain_model: PathLike | Checkpoint, weight: Sequence[float],
    output: PathLike, *, dtype: str | None = None, dry_run: Literal[True], options: RunOptions | None = None,
    hub: HubOptions | None = None, **settings: Any,
) -> list[MergePlan]: ...  # fmt: skip
def dogerm(
    reward_model: PathLike | Checkpoint,
    domain_model: PathLike | Checkpoint,
    weight: float | Sequence[float],
    output: PathLike,
    *,
    dtype: str | None = None,
    dry_run: bool = False,
    options: RunOptions | None = None,
    hub: HubOptions | None = None,
    **settings: Any,
) -> MergeStats | MergePlan | list[MergeStats] | list[MergePlan]:
    """DogeRM: merge a reward model with a domain SFT model, `(1 - weight) * RM + weight * SFT`.

    Args:
        reward_model: the general reward model (e.g. a LlamaForSequenceClassification folder).
        domain_model: the domain SFT model of the same base (math, code), `.bin` or safetensors.
        Both may be Hub repo ids (`owner/name` or `owner/name@revision`) or opened Checkpoints.
        weight: lambda in [0, 1]; 0 gives the reward model, 1 the SFT model's weights. A list of
            weights is a sweep: both models read once, `output` (and `push_to_hub`) are templates
            with `{weight}`.
        output: folder for the merged reward model (shards, index, config, tokenizer, card).
        dtype: output dtype for floating tensors (default: the reward model's).
        dry_run: plan only; return the MergePlan without reading a tensor byte.
        options, hub, settings: as for `merge`.

    Returns:
        MergeStats of the run, or the MergePlan when `dry_run`; a list of them for a list of weights.

    Raises:
        LazyMergeError: bad inputs, mismatched shapes or vocabularies, unusable output.

    Example:
        >>> lazymerge.dogerm("llama2-7b-rm", "MetaMath-7B", 0.3, "rm-math", push_to_hub="me/rm-math")
    """
    options, hub = split_settings(options, hub, settings)
    sweep = isinstance(weight, Sequence) and not isinstance(weight, str)
    weights = list(weight) if sweep else [weight]  # type: ignore[arg-type]
    job = plan_dogerm_job(
        reward_model, domain_model, weights, output, sweep=sweep, dtype=dtype, options=options, hub=hub
    )
    result: list[Any] = job.plans if dry_run else run_job(job)
    return result if sweep else result[0]
