"""The public Python API: plan, merge and DogeRM in a few typed calls."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from lazymerge.constants import DEFAULT_CHUNK_ELEMENTS, DEFAULT_MAX_SHARD_SIZE, parse_size
from lazymerge.errors import RecipeError
from lazymerge.io.checkpoint import Checkpoint, open_checkpoint
from lazymerge.plan import MergePlan

__all__ = ["dogerm", "merge", "open_model", "plan"]

ProgressCallback = Callable[["ProgressEvent"], None]  # noqa: F821 - see lazymerge.execute


def open_model(model: str | os.PathLike[str] | Checkpoint) -> Checkpoint:
    """Open a model folder, a single weight file, or an already opened Checkpoint."""
    if isinstance(model, Checkpoint):
        return model
    return open_checkpoint(model, label=str(model))


def plan(
    recipe: str | os.PathLike[str] | dict,
    output: str | os.PathLike[str],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> tuple[MergePlan, list[Checkpoint]]:
    """Compute a merge plan from headers alone (nothing is read beyond headers and tokenizers).

    Args:
        recipe: a mergekit-style YAML/JSON file, or the same as a dict. `merge_method: dogerm`
            (keys `reward_model`, `domain_model`, `weight`, optional `dtype`) is accepted too.
        output: the output folder.
        max_shard_size: shard cap, bytes or a string like "5GB".
        overwrite: allow an output folder that already holds a model.

    Returns:
        The plan and the opened input checkpoints (pass both to `lazymerge.execute`).

    Raises:
        LazyMergeError: any problem with the recipe, the inputs or the output (see `errors`).
    """
    from lazymerge.config import load_recipe, plan_recipe

    spec = load_recipe(recipe)
    return plan_recipe(spec, output, max_shard_size=parse_size(max_shard_size), overwrite=overwrite)


def merge(
    config: str | os.PathLike[str] | dict,
    output: str | os.PathLike[str],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    overwrite: bool = False,
    resume: bool = False,
    device: str = "auto",
    progress: ProgressCallback | None = None,
):
    """Merge models as a mergekit-style config describes (`merge_method: linear` or `dogerm`).

    Args:
        config: YAML/JSON path or dict.
        output: the output folder.
        resume: keep the shards a killed run of the same merge finished (checksums verified).
        device: "auto" (CUDA when a GPU and Triton are usable), "cpu" or "cuda".

    Returns:
        lazymerge.execute.MergeStats.

    Example:
        >>> lazymerge.merge({"merge_method": "linear", "models": [
        ...     {"model": "a", "parameters": {"weight": 0.5}},
        ...     {"model": "b", "parameters": {"weight": 0.5}}]}, "out")
    """
    from lazymerge.execute import execute

    merge_plan, checkpoints = plan(config, output, max_shard_size=max_shard_size, overwrite=overwrite or resume)
    return execute(
        merge_plan, checkpoints, chunk_elements=chunk_elements, progress=progress, resume=resume, device=device
    )


def dogerm(
    reward_model: str | os.PathLike[str] | Checkpoint,
    domain_model: str | os.PathLike[str] | Checkpoint,
    weight: float,
    output: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    overwrite: bool = False,
    dry_run: bool = False,
    resume: bool = False,
    device: str = "auto",
    progress: ProgressCallback | None = None,
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

    Returns:
        MergeStats of the run, or the MergePlan when `dry_run`.

    Raises:
        LazyMergeError: bad inputs, mismatched shapes or vocabularies, unusable output.

    Example:
        >>> lazymerge.dogerm("llama2-7b-rm", "MetaMath-7B", 0.3, "rm-math")
    """
    from lazymerge.recipes.dogerm import plan_dogerm

    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise RecipeError(f"weight must be a number, got {weight!r}")
    rm, sft = open_model(reward_model), open_model(domain_model)
    merge_plan = plan_dogerm(
        rm,
        sft,
        weight,
        Path(output),
        dtype=dtype,
        max_shard_size=parse_size(max_shard_size),
        overwrite=overwrite or resume,
    )
    if dry_run:
        return merge_plan
    from lazymerge.execute import execute

    return execute(
        merge_plan, [rm, sft], chunk_elements=chunk_elements, progress=progress, resume=resume, device=device
    )
