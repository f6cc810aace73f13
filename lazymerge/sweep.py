"""Parameter sweeps in one read: K merges that differ only in a weight or a method parameter.

The K plans read the same input ranges, so the executor reads every chunk once, merges it K
times and writes K models, each in its own folder with its own shards, index and manifest.
Output folders come from a template: `out-{weight}` (DogeRM) or `out-{lambda}` / `out-{value}`
/ `out-{i}` (a config key).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lazymerge.constants import DEFAULT_CHUNK_ELEMENTS, DEFAULT_MAX_SHARD_SIZE, parse_size
from lazymerge.errors import RecipeError
from lazymerge.plan import MergePlan

__all__ = ["dogerm_sweep", "parse_values", "sweep", "sweep_outputs", "sweep_plans"]


def parse_values(text: str) -> list[float]:
    """'0.1,0.2,0.3' -> [0.1, 0.2, 0.3]."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RecipeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values:
        raise RecipeError("a sweep needs at least one value")
    return values


def sweep_outputs(template: str | os.PathLike[str], key: str, values: Sequence[Any]) -> list[Path]:
    """The output folder of each value: `{key}`, `{value}` and `{i}` are filled in."""
    text = str(template)
    outs = []
    for i, v in enumerate(values):
        shown = f"{v:g}" if isinstance(v, float) else str(v)
        try:
            outs.append(Path(text.format_map({key: shown, "value": shown, "i": i})))
        except (KeyError, IndexError, ValueError) as exc:
            raise RecipeError(
                f"bad output template {text!r}: {exc}", hint=f"use {{{key}}}, {{value}} or {{i}}"
            ) from None
    if len(values) > 1 and len({o.resolve() for o in outs}) != len(outs):
        raise RecipeError(
            f"the output template {text!r} gives the same folder for several values",
            hint=f"put {{{key}}} (or {{i}}) in --output, e.g. 'out-{{{key}}}'",
        )
    return outs


def _set_path(spec: dict, path: str, value: Any) -> None:
    node: Any = spec
    parts = path.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            try:
                node = node[int(part)]
            except (ValueError, IndexError):
                raise RecipeError(f"sweep key {path!r}: no list item {part!r}") from None
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise RecipeError(f"sweep key {path!r}: {part!r} is not a mapping or a list")
    if not isinstance(node, dict):
        raise RecipeError(f"sweep key {path!r} does not name a mapping entry")
    node[parts[-1]] = value


def sweep_plans(
    recipe: str | os.PathLike[str] | dict,
    output: str | os.PathLike[str],
    key: str,
    values: Sequence[Any],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> tuple[list[MergePlan], list]:
    """Plan one merge per value of the config entry `key` (a dotted path such as
    `parameters.lambda` or `models.1.parameters.weight`)."""
    from lazymerge.config import load_recipe, plan_recipe

    spec = load_recipe(recipe)
    outs = sweep_outputs(output, key.split(".")[-1], values)
    plans, checkpoints = [], None
    for value, out in zip(values, outs, strict=True):
        variant = copy.deepcopy(spec)
        _set_path(variant, key, value)
        plan, ckpts = plan_recipe(variant, out, max_shard_size=parse_size(max_shard_size), overwrite=overwrite)
        plans.append(plan)
        checkpoints = checkpoints or ckpts
    return plans, checkpoints or []


def sweep(
    recipe: str | os.PathLike[str] | dict,
    output: str | os.PathLike[str],
    key: str,
    values: Sequence[Any],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    overwrite: bool = False,
    device: str = "auto",
    progress: Callable | None = None,
    workers: int | None = None,
) -> list:
    """Merge K variants of a config (one per value of `key`) reading the inputs once.

    Returns:
        One MergeStats per output (bytes_read is the shared read).

    Example:
        >>> lazymerge.sweep("ties.yml", "out-{lambda}", "parameters.lambda", [0.5, 1.0])
    """
    from lazymerge.execute import execute_sweep

    plans, checkpoints = sweep_plans(recipe, output, key, values, max_shard_size=max_shard_size, overwrite=overwrite)
    return execute_sweep(
        plans, checkpoints, chunk_elements=chunk_elements, progress=progress, device=device, workers=workers
    )


def dogerm_plans(
    rm: Any,
    sft: Any,
    weights: Sequence[float],
    output: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> list[MergePlan]:
    """One DogeRM plan per weight (outputs from the `{weight}` template)."""
    from lazymerge.recipes.dogerm import plan_dogerm

    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise RecipeError(f"weight must be a number, got {w!r}")
    outs = sweep_outputs(output, "weight", weights)
    return [
        plan_dogerm(rm, sft, w, out, dtype=dtype, max_shard_size=parse_size(max_shard_size), overwrite=overwrite)
        for w, out in zip(weights, outs, strict=True)
    ]


def dogerm_sweep(
    reward_model: Any,
    domain_model: Any,
    weights: Sequence[float],
    output: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    overwrite: bool = False,
    device: str = "auto",
    progress: Callable | None = None,
    workers: int | None = None,
) -> list:
    """DogeRM for several lambdas, reading both models once: `output` is a template with `{weight}`."""
    from lazymerge.api import open_model
    from lazymerge.execute import execute_sweep

    rm, sft = open_model(reward_model), open_model(domain_model)
    plans = dogerm_plans(rm, sft, weights, output, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)
    return execute_sweep(
        plans, [rm, sft], chunk_elements=chunk_elements, progress=progress, device=device, workers=workers
    )
