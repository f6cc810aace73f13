"""mergekit's `slices` and `models` read into output slices (pure data, no checkpoint opened here).

An output slice lists its sources, each a model with a `layer_range` [start, end) and its own
`parameters`; every source of a slice spans the same number of layers. A `models:` list is one
slice of every model's full depth, with the base model added when it is not listed (mergekit's
`normalize_config`). Planning is `lazymerge.recipes.slices`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lazymerge.errors import RecipeError
from lazymerge.methods_config import _same_model, reject_unknown_keys

__all__ = ["SLICE_KEYS", "OutputSlice", "SliceSource", "mapping", "needs_slice_planner", "read_slices"]

# Keys of a recipe this planner reads (tokenizer keys are read by `lazymerge.recipes.tokenizer_union`).
SLICE_KEYS = {
    "merge_method",
    "slices",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "base_model",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
}


@dataclass(frozen=True)
class SliceSource:
    """One input of an output slice: `layers` [start, end) of `model`, with its own parameters."""

    model: str
    layers: tuple[int, int]
    parameters: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class OutputSlice:
    """Consecutive output layers made from `sources` (all of one length)."""

    sources: tuple[SliceSource, ...]
    parameters: dict = field(default_factory=dict, compare=False)
    base_model: str | None = None

    @property
    def length(self) -> int:
        start, end = self.sources[0].layers
        return end - start


def needs_slice_planner(spec: dict) -> bool:
    """Whether a recipe needs this planner (slices, passthrough, a tokenizer, a chat template)."""
    return isinstance(spec, dict) and (
        "slices" in spec
        or spec.get("merge_method") == "passthrough"
        or any(k in spec for k in ("tokenizer_source", "tokenizer", "chat_template"))
    )


def mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{where} must be a mapping")
    return value


def read_slices(spec: dict, layers_of: Callable[[str], int]) -> list[OutputSlice]:
    """The recipe's output slices (a `models:` list is one slice of every model's full depth).

    `layers_of(model)` is a model's layer count.
    """
    has_slices, has_models = "slices" in spec, "models" in spec
    if has_slices == has_models:
        raise RecipeError("a recipe gives exactly one of `models` and `slices`")
    base = spec.get("base_model")
    if base is not None and not isinstance(base, str):
        raise RecipeError("`base_model` must be a path or repo id")
    if has_models:
        models = spec["models"]
        if not isinstance(models, list) or not models:
            raise RecipeError("`models` must be a non-empty list")
        sources = []
        for i, entry in enumerate(models):
            if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
                raise RecipeError(f"models[{i}] needs a `model:` path or repo id")
            reject_unknown_keys(entry, {"model", "parameters"}, f"models[{i}]")
            params = mapping(entry.get("parameters"), f"models[{i}].parameters")
            sources.append(SliceSource(entry["model"], (0, layers_of(entry["model"])), params))
        if base is not None and not any(_same_model(s.model, base) for s in sources):
            sources.append(SliceSource(base, (0, layers_of(base))))
        return [OutputSlice(tuple(sources))]
    raw = spec["slices"]
    if not isinstance(raw, list) or not raw:
        raise RecipeError("`slices` must be a non-empty list")
    out = []
    for s, entry in enumerate(raw):
        where = f"slices[{s}]"
        reject_unknown_keys(entry, {"sources", "parameters", "base_model"}, where)
        if entry.get("base_model") is not None and not isinstance(entry["base_model"], str):
            raise RecipeError(f"{where}.base_model must be a path or repo id")
        srcs = entry.get("sources")
        if not isinstance(srcs, list) or not srcs:
            raise RecipeError(f"{where} needs a non-empty `sources` list")
        sources = []
        for j, src in enumerate(srcs):
            here = f"{where}.sources[{j}]"
            reject_unknown_keys(src, {"model", "layer_range", "parameters"}, here)
            if not isinstance(src.get("model"), str):
                raise RecipeError(f"{here} needs a `model:` path or repo id")
            rng = src.get("layer_range")
            if (
                not isinstance(rng, list | tuple)
                or len(rng) != 2
                or not all(type(x) is int for x in rng)
                or not 0 <= rng[0] <= rng[1]
            ):
                raise RecipeError(f"{here}.layer_range must be [start, end] with 0 <= start <= end, got {rng!r}")
            n = layers_of(src["model"])
            if rng[1] > n:
                raise RecipeError(f"{here}.layer_range {list(rng)} goes past {src['model']}'s {n} layers")
            params = mapping(src.get("parameters"), f"{here}.parameters")
            sources.append(SliceSource(src["model"], (rng[0], rng[1]), params))
        lengths = {b - a for a, b in (x.layers for x in sources)}
        if len(lengths) != 1:
            raise RecipeError(f"every source of {where} must span the same number of layers")
        params = mapping(entry.get("parameters"), f"{where}.parameters")
        out.append(OutputSlice(tuple(sources), params, entry.get("base_model")))
    return out
