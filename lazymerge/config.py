"""Recipes from mergekit-style YAML/JSON (or dicts): parsing, validation, and planning.

Supported now: `merge_method: linear` (mergekit's semantics: `sum(w_i * x_i)`, divided by
`sum(w_i)` when `normalize`, the default) for two or more models, and `merge_method: dogerm`.
Any key we do not implement is named in the error instead of being silently ignored.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

from lazymerge.constants import DEFAULT_MAX_SHARD_SIZE, MERGEABLE_DTYPES
from lazymerge.errors import MissingTensorError, RecipeError, ShapeMismatchError
from lazymerge.io.checkpoint import Checkpoint
from lazymerge.io.hub import open_any
from lazymerge.methods_config import METHODS, plan_checkpoints, reject_unknown_keys
from lazymerge.plan import MergePlan, OutputTensor, Segment
from lazymerge.recipes.common import copy_tensor, normalize_dtype, source_at

__all__ = ["load_recipe", "plan_recipe"]

_TOP_KEYS = {"merge_method", "models", "parameters", "dtype", "out_dtype", "base_model"}
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
    check_disk: bool = True,
    low_disk: bool = False,
    token: str | bool | None = None,
) -> tuple[MergePlan, list[Checkpoint]]:
    """Plan the merge a recipe describes. Returns the plan and the opened checkpoints.

    A model may be a local folder/file or a Hub repo id (`owner/name[@revision]`, opened from
    remote headers; `low_disk` and `token` apply to those)."""
    method = spec.get("merge_method")
    opener = functools.partial(open_any, low_disk=low_disk, token=token)
    if method == "dogerm":
        return _plan_dogerm(spec, output, max_shard_size, overwrite, check_disk, opener)
    if method in METHODS:
        from lazymerge.methods_config import plan_method

        return plan_method(spec, output, max_shard_size, overwrite, check_disk, opener)
    if method != "linear":
        raise RecipeError(
            f"merge_method {method!r} is not supported",
            hint=f"supported: linear, dogerm, {', '.join(METHODS)}",
        )
    reject_unknown_keys(spec, _TOP_KEYS, "the recipe")
    models = spec.get("models")
    if not isinstance(models, list) or len(models) < 2:
        raise RecipeError("a linear merge needs a `models` list with at least two entries")
    params = spec.get("parameters") or {}
    reject_unknown_keys(params, {"normalize"}, "`parameters`")
    normalize = params.get("normalize", True)
    if not isinstance(normalize, bool):
        raise RecipeError("`parameters.normalize` must be true or false")
    checkpoints, weights = [], []
    for i, entry in enumerate(models):
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise RecipeError(f"models[{i}] needs a `model:` path or repo id")
        reject_unknown_keys(entry, {"model", "parameters"}, f"models[{i}]")
        mparams = entry.get("parameters") or {}
        reject_unknown_keys(mparams, {"weight"}, f"models[{i}].parameters")
        weight = mparams.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise RecipeError(
                f"models[{i}].parameters.weight must be a number (per-tensor weight lists are not supported)"
            )
        checkpoints.append(opener(entry["model"], label=entry["model"]))
        weights.append(float(weight))
    divisor = None
    if normalize:
        divisor = sum(weights)
        if divisor == 0:
            raise RecipeError("the weights sum to 0, so `normalize: true` would divide by zero")
    out_dtype = normalize_dtype(spec.get("out_dtype")) or normalize_dtype(spec.get("dtype"))
    tensors, dropped = _linear_tensors(checkpoints, weights, divisor, out_dtype)
    recipe = {
        "merge_method": "linear",
        "models": [{"model": c.label, "parameters": {"weight": w}} for c, w in zip(checkpoints, weights, strict=True)],
        "parameters": {"normalize": normalize},
        "dtype": out_dtype,
    }
    return plan_checkpoints(
        recipe,
        checkpoints,
        tensors,
        dropped,
        out_dtype,
        output=output,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        check_disk=check_disk,
    )


def _linear_tensors(
    checkpoints: list[Checkpoint], weights: list[float], divisor: float | None, out_dtype: str | None
) -> tuple[list[OutputTensor], list[str]]:
    first = checkpoints[0]
    tensors: list[OutputTensor] = []
    for name, ref in first.tensors.items():
        refs = []
        for ckpt in checkpoints:
            other = ckpt.tensors.get(name)
            if other is None:
                raise MissingTensorError(name, ckpt.label, hint="every model of a linear merge needs every tensor")
            if other.shape != ref.shape:
                raise ShapeMismatchError(name, first.label, ref.shape, ckpt.label, other.shape)
            refs.append(other)
        if any(r.dtype not in MERGEABLE_DTYPES for r in refs):
            tensors.append(copy_tensor(0, ref, None, f"first model ({ref.dtype} is copied, not merged)"))
            continue
        sources = tuple(source_at(i, r, 0, w) for i, (r, w) in enumerate(zip(refs, weights, strict=True)))
        how = " + ".join(f"{w:g} x #{i}" for i, w in enumerate(weights))
        if divisor is not None:
            how = f"({how}) / {divisor:g}"
        segments = (Segment(0, ref.numel, sources),) if ref.numel else ()
        tensors.append(OutputTensor(name, out_dtype or ref.dtype, ref.shape, segments, how, divisor))
    dropped = sorted({n for c in checkpoints[1:] for n in c.tensors if n not in first.tensors})
    return tensors, dropped


def _plan_dogerm(
    spec: dict,
    output: str | os.PathLike[str],
    max_shard_size: int,
    overwrite: bool,
    check_disk: bool,
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
        check_disk=check_disk,
    )
    return plan, [rm, sft]
