"""The public Python API: plan, merge and DogeRM in a few typed calls."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from lazymerge.constants import DEFAULT_MAX_SHARD_SIZE, parse_size
from lazymerge.errors import RecipeError
from lazymerge.io.checkpoint import Checkpoint
from lazymerge.io.hub import open_any
from lazymerge.plan import MergePlan

__all__ = ["dogerm", "merge", "open_model", "plan"]

ProgressCallback = Callable[["ProgressEvent"], None]  # noqa: F821 - see lazymerge.execute


def open_model(
    model: str | os.PathLike[str] | Checkpoint,
    *,
    low_disk: bool = False,
    token: str | bool | None = None,
) -> Checkpoint:
    """Open a model folder, a single weight file, a Hub repo id or an already opened Checkpoint.

    A Hub repo id (`owner/name` or `owner/name@revision`, when no such local path exists) is
    opened from remote metadata alone; its weight files are downloaded when the merge reads them
    (`low_disk`: into a private folder, each deleted once consumed). `token`: a Hub token
    (default HF_TOKEN or the stored login)."""
    if isinstance(model, Checkpoint):
        return model
    return open_any(model, label=str(model), low_disk=low_disk, token=token)


def plan(
    recipe: str | os.PathLike[str] | dict,
    output: str | os.PathLike[str],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    low_disk: bool = False,
    token: str | bool | None = None,
    resume: bool = False,
) -> tuple[MergePlan, list[Checkpoint]]:
    """Compute a merge plan from headers alone (nothing is read beyond headers and tokenizers).

    Args:
        recipe: a mergekit-style YAML/JSON file, or the same as a dict. `merge_method: dogerm`
            (keys `reward_model`, `domain_model`, `weight`, optional `dtype`) is accepted too.
        output: the output folder.
        max_shard_size: shard cap, bytes or a string like "5GB".
        overwrite: allow an output folder that already holds a model.
        low_disk, token: for Hub inputs, see `open_model`.
        resume: the plan continues the earlier run in `output` (see `merge`).

    Returns:
        The plan and the opened input checkpoints (pass both to `lazymerge.execute`).

    Raises:
        LazyMergeError: any problem with the recipe, the inputs or the output (see `errors`).
    """
    from lazymerge.config import load_recipe, plan_recipe

    spec = load_recipe(recipe)
    return plan_recipe(
        spec, output, max_shard_size=parse_size(max_shard_size), overwrite=overwrite, low_disk=low_disk, token=token,
        resume=resume,
    )  # fmt: skip


def merge(
    config: str | os.PathLike[str] | dict,
    output: str | os.PathLike[str],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    chunk_elements: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    delete_after_upload: bool = False,
    low_disk: bool = False,
    token: str | bool | None = None,
):
    """Merge models as a mergekit-style config describes (`merge_method: linear` or `dogerm`).

    Args:
        config: YAML/JSON path or dict.
        output: the output folder.
        resume: keep the shards a killed run of the same merge finished (checksums verified).
        device: "auto" (CUDA when a GPU and Triton are usable), "cpu" or "cuda".
        push_to_hub, private, revision, commit_message, delete_after_upload, low_disk, token:
            see `dogerm`.

    Returns:
        lazymerge.execute.MergeStats.

    Example:
        >>> lazymerge.merge({"merge_method": "linear", "models": [
        ...     {"model": "a", "parameters": {"weight": 0.5}},
        ...     {"model": "b", "parameters": {"weight": 0.5}}]}, "out")
    """
    merge_plan, checkpoints = plan(
        config,
        output,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        low_disk=low_disk,
        token=token,
        resume=resume,
    )
    pusher = _pusher(push_to_hub, private, revision, commit_message, delete_after_upload, token)
    return _execute(merge_plan, checkpoints, pusher, chunk_elements, progress, resume, device)


def _pusher(
    repo_id: str | None,
    private: bool,
    revision: str | None,
    commit_message: str | None,
    delete_after_upload: bool,
    token: str | bool | None,
):
    if repo_id is None:
        if delete_after_upload:
            raise RecipeError("delete_after_upload needs push_to_hub")
        return None
    from lazymerge.push import HubPusher

    return HubPusher(
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        delete_after_upload=delete_after_upload,
        token=token,
    )


def _execute(merge_plan, checkpoints, pusher, chunk_elements, progress, resume, device):
    from lazymerge.push import execute_and_push

    stats, _ = execute_and_push(
        merge_plan,
        checkpoints,
        pusher,
        chunk_elements=chunk_elements,
        progress=progress,
        resume=resume,
        device=device,
    )
    return stats


def dogerm(
    reward_model: str | os.PathLike[str] | Checkpoint,
    domain_model: str | os.PathLike[str] | Checkpoint,
    weight: float | list[float],
    output: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    chunk_elements: int | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    resume: bool = False,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    delete_after_upload: bool = False,
    low_disk: bool = False,
    token: str | bool | None = None,
):
    """DogeRM: merge a reward model with a domain SFT model, `(1 - weight) * RM + weight * SFT`.

    Args:
        reward_model: the general reward model (e.g. a LlamaForSequenceClassification folder).
        domain_model: the domain SFT model of the same base (math, code), `.bin` or safetensors.
        weight: lambda in [0, 1]; 0 gives the reward model, 1 the SFT model's weights.
        output: folder for the merged reward model (shards, index, config, tokenizer, card).
        dtype: output dtype for floating tensors (default: the reward model's).
        dry_run: plan only; return the MergePlan without reading a tensor byte.
        resume: keep the shards a killed run of the same merge finished (checksums verified).
        device: "auto" (CUDA when a GPU and Triton are usable), "cpu" or "cuda".
        push_to_hub: a Hub repo id (`owner/name`): each shard is uploaded as soon as it is
            written, while the next is merged, and one commit at the end adds the index, config,
            tokenizer and model card. A rerun does not upload shards the Hub already holds.
        private: create the pushed repo private. revision: the branch to commit to.
        commit_message: for the one commit. delete_after_upload: delete each local shard once
            uploaded (at most one output shard on disk; the merge waits for each upload).
        low_disk: Hub inputs are downloaded to a private folder and each shard deleted once
            consumed. token: Hub token (default HF_TOKEN or the stored login); never logged.
        Reward and domain models may be Hub repo ids (`owner/name` or `owner/name@revision`).

    Returns:
        MergeStats of the run, or the MergePlan when `dry_run`. With a list of weights (a sweep:
        `output` and `push_to_hub` are templates with `{weight}`), one of them per weight.

    Raises:
        LazyMergeError: bad inputs, mismatched shapes or vocabularies, unusable output.

    Example:
        >>> lazymerge.dogerm("llama2-7b-rm", "MetaMath-7B", 0.3, "rm-math")
    """
    from lazymerge.recipes.dogerm import plan_dogerm

    if isinstance(weight, (list, tuple)):  # a sweep: inputs read once, one output (and repo) per weight
        from lazymerge.sweep import dogerm_sweep

        rm = open_model(reward_model, low_disk=low_disk, token=token)
        sft = open_model(domain_model, low_disk=low_disk, token=token)
        return dogerm_sweep(
            rm, sft, weight, output, dtype=dtype, max_shard_size=max_shard_size, chunk_elements=chunk_elements,
            overwrite=overwrite, dry_run=dry_run, resume=resume, device=device, progress=progress,
            push_to_hub=push_to_hub, private=private, revision=revision, commit_message=commit_message,
            delete_after_upload=delete_after_upload, token=token,
        )  # fmt: skip
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise RecipeError(f"weight must be a number, got {weight!r}")
    rm = open_model(reward_model, low_disk=low_disk, token=token)
    sft = open_model(domain_model, low_disk=low_disk, token=token)
    merge_plan = plan_dogerm(
        rm,
        sft,
        weight,
        Path(output),
        dtype=dtype,
        max_shard_size=parse_size(max_shard_size),
        overwrite=overwrite,
        resume=resume,
    )
    if dry_run:
        return merge_plan
    pusher = _pusher(push_to_hub, private, revision, commit_message, delete_after_upload, token)
    return _execute(merge_plan, [rm, sft], pusher, chunk_elements, progress, resume, device)
