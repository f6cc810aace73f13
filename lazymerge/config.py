"""Recipes from mergekit-style YAML/JSON (or dicts): parsing, validation, and planning.

Supported: every method declared in `lazymerge.methods.registry` (linear, task arithmetic, TIES,
DARE, breadcrumbs, DELLA, SLERP, Model Stock, Multi-SLERP; mergekit's semantics), planned by the
generic resolver `lazymerge.methods_config`, and `merge_method: dogerm`. Any key we do not
implement is named in the error instead of being silently ignored.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

from lazymerge.constants import DEFAULT_MAX_SHARD_SIZE
from lazymerge.errors import RecipeError
from lazymerge.io.checkpoint import Checkpoint
from lazymerge.io.hub import open_any
from lazymerge.methods_config import plan_method, reject_unknown_keys
from lazymerge.plan import MergePlan
from lazymerge.recipes.slice_config import needs_slice_planner
from lazymerge.recipes.slices import plan_slices

__all__ = ["load_recipe", "plan_recipe"]

_DOGERM_KEYS = {"merge_method", "reward_model", "domain_model", "weight", "dtype"}


def load_recipe(recipe: str | os.PathLike[str] | dict) -> dict:
    """Read a recipe file (YAML or JSON) or validate a dict; returns a plain dict."""
    if isinstance(recipe, dict):
        return recipe
    from lazymerge.io.yaml_recipe import read_recipe_file  # imports yaml: only when a file is read

    path = Path(recipe)
    obj = read_recipe_file(path)
    if not isinstance(obj, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with merge_method and models")
    return obj


def plan_recipe(
    spec: dict,
    output: str | os.PathLike[str],
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    low_disk: bool = False,
    token: str | bool | None = None,
) -> tuple[MergePlan, list[Checkpoint]]:
    """Plan the merge a recipe describes. Returns the plan and the opened checkpoints.

    A model may be a local folder/file or a Hub repo id (`owner/name[@revision]`, opened from
    remote headers; `low_disk` and `token` apply to those)."""
    opener = functools.partial(open_any, low_disk=low_disk, token=token)
    if spec.get("merge_method") == "dogerm":
        return _plan_dogerm(spec, output, max_shard_size, overwrite, opener)
    if isinstance(spec, dict) and "modules" in spec:
        raise RecipeError(
            "`modules` (per-module configs of multi-module models) is not supported",
            hint="give `slices` or `models` for a text model",
        )
    if needs_slice_planner(spec):
        return plan_slices(spec, output, max_shard_size, overwrite, opener)
    return plan_method(spec, output, max_shard_size, overwrite, opener)


def _plan_dogerm(
    spec: dict,
    output: str | os.PathLike[str],
    max_shard_size: int,
    overwrite: bool,
    opener: Callable[..., Checkpoint] = open_any,
) -> tuple[MergePlan, list[Checkpoint]]:
    from lazymerge.recipes.dogerm import plan_dogerm

    reject_unknown_keys(spec, _DOGERM_KEYS, "the dogerm recipe")
    for key in ("reward_model", "domain_model", "weight"):
        if key not in spec:
            raise RecipeError(f"the dogerm recipe needs `{key}`")
    weight = spec["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise RecipeError("`weight` must be a number between 0 and 1")
    rm = opener(str(spec["reward_model"]), label=str(spec["reward_model"]))
    sft = opener(str(spec["domain_model"]), label=str(spec["domain_model"]))
    plan = plan_dogerm(
        rm,
        sft,
        weight,
        output,
        dtype=spec.get("dtype"),
        max_shard_size=max_shard_size,
        overwrite=overwrite,
    )
    return plan, [rm, sft]
