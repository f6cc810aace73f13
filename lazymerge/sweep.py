"""Parameter sweeps: K merges that differ only in a weight or a method parameter.

The K plans read the same input ranges, so the executor reads every chunk once, merges it K
times and writes K models, each in its own folder with its own shards, index and manifest.
A `Sweep` names what varies: a config entry (`parameters.lambda`, `models.1.parameters.weight`)
or DogeRM's `weight`. Output folders come from a template: `out-{weight}` (DogeRM) or
`out-{lambda}` / `out-{value}` / `out-{i}` (a config key); so do Hub repos (`owner/name-{weight}`:
one repo and one commit per output). This module is pure data: templates and config variants.
"""

from __future__ import annotations

import copy
import math
import os
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazymerge.errors import RecipeError

__all__ = ["Sweep", "parse_values", "sweep_outputs", "sweep_repos"]


@dataclass(frozen=True)
class Sweep:
    """What a sweep varies: the dotted config `key` and its `values`, one output per value.

    Example:
        >>> lazymerge.merge("ties.yml", "out-{lambda}", sweep=Sweep("parameters.lambda", [0.5, 1.0]))
    """

    key: str
    values: tuple[Any, ...]

    def __init__(self, key: str, values: Sequence[Any]) -> None:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise RecipeError(f"a sweep needs a non-empty list of values, got {values!r}")
        object.__setattr__(self, "key", key.strip())
        object.__setattr__(self, "values", tuple(values))

    @classmethod
    def parse(cls, text: str) -> Sweep:
        """`KEY=V1,V2` (the CLI's `--sweep`) -> Sweep(KEY, [V1, V2])."""
        key, _, values = text.partition("=")
        if not key.strip():
            raise RecipeError(f"--sweep {text!r} names no key", hint="use KEY=V1,V2, e.g. parameters.lambda=0.5,1")
        return cls(key, parse_values(values))

    @property
    def name(self) -> str:
        """The template field of the values: the key's last dotted part (`{lambda}`)."""
        return self.key.split(".")[-1]

    def labels(self) -> list[str]:
        """`key=value` of each output, for listings."""
        return [f"{self.key}={_shown(v)}" for v in self.values]

    def outputs(self, template: str | os.PathLike[str]) -> list[Path]:
        return sweep_outputs(template, self.key, self.values)

    def repos(self, template: str) -> list[str]:
        return sweep_repos(template, self.key, self.values)

    def variants(self, spec: dict) -> Iterator[dict]:
        """A copy of the recipe `spec` per value, with the key set to it."""
        for value in self.values:
            variant = copy.deepcopy(spec)
            _set_path(variant, self.key, value)
            yield variant


def _shown(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


# A range longer than this is a typo (0:1:0.0001), not a sweep.
MAX_RANGE_VALUES = 1000


def parse_values(text: str) -> list[float]:
    """'0.1,0.2,0.3' -> [0.1, 0.2, 0.3]; an item `a:b:step` is the range from a to b inclusive
    (`0:1:0.05` -> 0, 0.05, ..., 1: 21 values), each rounded to the decimals written in a, b and
    step, so 0.15 is 0.15 and not 0.15000000000000002. Items may be mixed: '0,0.5:1:0.25'.

    Raises:
        RecipeError: not numbers, an empty list, or a range with a step <= 0, b < a, or more
            than MAX_RANGE_VALUES values.
    """
    values: list[float] = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        if ":" in item:
            values += _range(item)
            continue
        try:
            values.append(float(item))
        except ValueError:
            raise RecipeError(f"{text!r} is not a comma-separated list of numbers or a:b:step ranges") from None
    if not values:
        raise RecipeError("a sweep needs at least one value")
    return values


def _range(item: str) -> list[float]:
    hint = "write a range as start:stop:step, e.g. 0:1:0.05 (stop included)"
    parts = item.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        a, b, step = (float(p) for p in parts)
    except ValueError:
        raise RecipeError(f"{item!r} is not a range", hint=hint) from None
    if not (math.isfinite(a) and math.isfinite(b) and math.isfinite(step)) or step <= 0 or b < a:
        raise RecipeError(f"{item!r}: a range needs finite start <= stop and a step > 0", hint=hint)
    decimals = max(_decimals(p) for p in parts)
    # The count from the decimal text: (1 - 0) / 0.05 is 20.000000000000004 in binary floats.
    steps = (b - a) / step
    n = math.floor(steps + 1e-9) + 1
    if n > MAX_RANGE_VALUES:
        raise RecipeError(f"{item!r} gives {n} values, more than {MAX_RANGE_VALUES}", hint=hint)
    return [round(a + i * step, decimals) + 0.0 for i in range(n)]  # + 0.0: never -0.0


def _decimals(number: str) -> int:
    """Digits after the point of a decimal written in `number` ('0.05' -> 2, '1e-3' -> 3, '1' -> 0)."""
    number = number.strip().lower()
    mantissa, _, exponent = number.partition("e")
    digits = len(mantissa.partition(".")[2])
    return max(0, digits - int(exponent or 0))


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
        shown = _shown(v)
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
