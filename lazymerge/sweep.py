"""Parameter sweeps in one read: K merges that differ only in a weight or a method parameter.

The K plans read the same input ranges, so the executor reads every chunk once, merges it K
times and writes K models, each in its own folder with its own shards, index and manifest.
Output folders come from a template: `out-{weight}` (DogeRM) or `out-{lambda}` / `out-{value}`
/ `out-{i}` (a config key); so do Hub repos (`owner/name-{weight}`: one repo and one commit per
output). `dry_run` returns the K plans; `resume` lets each output keep the shards its own
manifest records as finished.
"""

from __future__ import annotations

import copy
import os
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lazymerge.constants import DEFAULT_MAX_SHARD_SIZE, parse_size
from lazymerge.errors import RecipeError
from lazymerge.plan import MergePlan

__all__ = [
    "dogerm_plans",
    "dogerm_sweep",
    "parse_values",
    "run_sweep",
    "sweep",
    "sweep_outputs",
    "sweep_plans",
    "sweep_repos",
]


def parse_values(text: str) -> list[float]:
    """'0.1,0.2,0.3' -> [0.1, 0.2, 0.3]."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RecipeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values:
        raise RecipeError("a sweep needs at least one value")
    return values


def _fill(template: str, key: str, values: Sequence[Any], what: str) -> list[str]:
    """The template filled in for each value: `{key}` (its last dotted part), `{value}`, `{i}`."""
    key = key.split(".")[-1]
    hint = f"use {{{key}}}, {{value}} or {{i}}"
    try:  # a field is a bare name: `{weight.real}` or `{weight[0]}` would reach into the value
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise RecipeError(f"bad {what} template {template!r}: {exc}", hint=hint) from None
    if odd := [f for f in fields if f not in (key, "value", "i")]:
        raise RecipeError(f"bad {what} template {template!r}: unknown field {{{odd[0]}}}", hint=hint)
    filled = []
    for i, v in enumerate(values):
        shown = f"{v:g}" if isinstance(v, float) else str(v)
        try:
            filled.append(template.format_map({key: shown, "value": shown, "i": i}))
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
            raise RecipeError(f"bad {what} template {template!r}: {exc}", hint=hint) from None
    return filled


def sweep_outputs(template: str | os.PathLike[str], key: str, values: Sequence[Any]) -> list[Path]:
    """The output folder of each value: `{key}`, `{value}` and `{i}` are filled in."""
    text = str(template)
    outs = [Path(o) for o in _fill(text, key, values, "output")]
    if len(values) > 1 and len({o.resolve() for o in outs}) != len(outs):
        name = key.split(".")[-1]
        raise RecipeError(
            f"the output template {text!r} gives the same folder for several values",
            hint=f"put {{{name}}} (or {{i}}) in --output, e.g. 'out-{{{name}}}'",
        )
    return outs


def sweep_repos(template: str, key: str, values: Sequence[Any]) -> list[str]:
    """The Hub repo of each value (`--push-to-hub 'owner/name-{weight}'`), one per value."""
    repos = _fill(template, key, values, "--push-to-hub")
    if len({r.casefold() for r in repos}) != len(repos):  # Hub repo ids ignore case
        name = key.split(".")[-1]
        raise RecipeError(
            f"the --push-to-hub template {template!r} gives the same repo for several values",
            hint=f"put {{{name}}} (or {{i}}) in it, e.g. 'owner/merged-{{{name}}}'",
        )
    return repos


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
    low_disk: bool = False,
    token: str | bool | None = None,
    resume: bool = False,
) -> tuple[list[MergePlan], list]:
    """Plan one merge per value of the config entry `key` (a dotted path such as
    `parameters.lambda` or `models.1.parameters.weight`); `low_disk`, `token` for Hub inputs."""
    from lazymerge.config import load_recipe, plan_recipe

    spec = load_recipe(recipe)
    outs = sweep_outputs(output, key.split(".")[-1], values)
    plans, checkpoints = [], None
    for value, out in zip(values, outs, strict=True):
        variant = copy.deepcopy(spec)
        _set_path(variant, key, value)
        plan, ckpts = plan_recipe(
            variant, out, max_shard_size=parse_size(max_shard_size), overwrite=overwrite, low_disk=low_disk, token=token,
            resume=resume,
        )  # fmt: skip
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
    chunk_elements: int | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    resume: bool = False,
    device: str = "auto",
    progress: Callable | None = None,
    workers: int | None = None,
    push_to_hub: str | None = None,
    **hub_options: Any,
) -> list:
    """Merge K variants of a config (one per value of `key`) reading the inputs once.

    Args:
        dry_run: plan only; return the K MergePlans without reading a tensor byte.
        resume: each output keeps the shards a killed run finished (its own manifest).
        push_to_hub: a repo id template like `output` (`owner/name-{lambda}`): each output is
            pushed to its own repo, one commit each. `hub_options`: `private`, `revision`,
            `commit_message`, `delete_after_upload`, `token`, as for `lazymerge.merge`.

    Returns:
        One MergeStats per output (bytes_read is the shared read), or the plans when `dry_run`.

    Example:
        >>> lazymerge.sweep("ties.yml", "out-{lambda}", "parameters.lambda", [0.5, 1.0])
    """
    plans, checkpoints = sweep_plans(
        recipe, output, key, values, max_shard_size=max_shard_size, overwrite=overwrite, resume=resume
    )
    if dry_run:
        return plans
    return run_sweep(
        plans, checkpoints, key, values, push_to_hub, hub_options, resume=resume, chunk_elements=chunk_elements,
        progress=progress, device=device, workers=workers,
    )  # fmt: skip


def run_sweep(
    plans: list[MergePlan],
    checkpoints: Sequence[Any],
    key: str,
    values: Sequence[Any],
    push_to_hub: str | None,
    hub_options: dict[str, Any],
    **execute_kwargs: Any,
) -> list:
    """Execute planned sweep outputs, each pushed to its own repo when `push_to_hub` is a template."""
    from lazymerge.push import execute_sweep_and_push, sweep_pushers

    unknown = set(hub_options) - _HUB_OPTIONS
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    if push_to_hub is None:
        if hub_options.get("delete_after_upload"):
            raise RecipeError("delete_after_upload needs push_to_hub")
        pushers = None
    else:
        pushers = sweep_pushers(sweep_repos(push_to_hub, key, values), **hub_options)
    stats, _ = execute_sweep_and_push(plans, checkpoints, pushers, **execute_kwargs)
    return stats


_HUB_OPTIONS = {"private", "revision", "commit_message", "delete_after_upload", "token"}


def dogerm_plans(
    rm: Any,
    sft: Any,
    weights: Sequence[float],
    output: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    resume: bool = False,
) -> list[MergePlan]:
    """One DogeRM plan per weight (outputs from the `{weight}` template)."""
    from lazymerge.recipes.dogerm import plan_dogerm

    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise RecipeError(f"weight must be a number, got {w!r}")
    outs = sweep_outputs(output, "weight", weights)
    return [
        plan_dogerm(
            rm, sft, w, out, dtype=dtype, max_shard_size=parse_size(max_shard_size), overwrite=overwrite, resume=resume
        )
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
    chunk_elements: int | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    resume: bool = False,
    device: str = "auto",
    progress: Callable | None = None,
    workers: int | None = None,
    push_to_hub: str | None = None,
    **hub_options: Any,
) -> list:
    """DogeRM for several lambdas, reading both models once: `output` (and `push_to_hub`) are
    templates with `{weight}`. Other arguments as for `sweep`."""
    from lazymerge.api import open_model

    rm, sft = open_model(reward_model), open_model(domain_model)
    plans = dogerm_plans(
        rm, sft, weights, output, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, resume=resume
    )
    if dry_run:
        return plans
    return run_sweep(
        plans, [rm, sft], "weight", weights, push_to_hub, hub_options, resume=resume, chunk_elements=chunk_elements,
        progress=progress, device=device, workers=workers,
    )  # fmt: skip
