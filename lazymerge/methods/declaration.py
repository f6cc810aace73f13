"""What a merge method is, declared once: its parameters, its inputs, its chunk function,
its statistics passes and its GPU kernel (mergekit's `MergeMethod.parameters()` /
`tensor_parameters()`, sd-mecha's typed signature).

Torch-free on purpose: planning reads declarations before torch is imported (the start-up
prefetch overlaps that import). The chunk function, the statistics factory and the GPU kernel
are named as "module:attribute" and imported the first time they are used.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from lazymerge.errors import RecipeError

__all__ = ["ACCUMULATIONS", "REQUIRED", "GpuKernel", "MergeMethod", "Parameter", "Range", "check_value"]

# How a weighted sum accumulates `x_i * w_i` in fp32 (every backend implements both, bit for bit):
# "rounded": the product and the sum each rounded on their own (DogeRM's reference arithmetic);
# "fused": one rounding of `acc + x_i * w_i`, a fused multiply-add from +0 (mergekit's `addcmul_`).
ACCUMULATIONS = ("rounded", "fused")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # a parameter without a default: the recipe must give it


@dataclass(frozen=True)
class Range:
    """An interval of allowed numbers; `None` is unbounded. Printed as `[0, 1]`, `(0, inf)`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def __str__(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{lo}, {hi}{right}"


UNIT = Range(0.0, 1.0)


def check_value(
    name: str, value: Any, kind: type, allowed: Range | None = None, where: str = "", context: str = ""
) -> Any:
    """`value` as a `kind` (bool, int or float), finite and inside `allowed`, else a RecipeError.

    Numbers written as strings (`'0.5'`, as YAML gives `'1e309'`) are read as numbers first, as
    mergekit does; NaN and infinities are never a valid parameter. The message names the value
    as `where.name` and ends with `context` (e.g. the tensor a gradient was evaluated for).
    """
    label = f"{where}.{name}" if where else name
    ctx = f" ({context})" if context else ""
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if kind is int:
            if not math.isfinite(number) or int(number) != number:
                raise ValueError
            number = int(number)
    except (TypeError, ValueError, OverflowError):
        raise RecipeError(f"{label} must be {_article(kind)}, got {value!r}{ctx}") from None
    if not math.isfinite(number) and allowed is None:
        raise RecipeError(f"{label} must be a finite number, got {value!r}{ctx}")
    if allowed is not None and (not math.isfinite(number) or number not in allowed):
        raise RecipeError(f"{label} must be in {allowed}, got {value!r}{ctx}")
    return number


def _article(kind: type) -> str:
    return {bool: "true or false", int: "an integer"}.get(kind, "a number")


@dataclass(frozen=True)
class Parameter:
    """One parameter of a method.

    Args:
        name: the recipe key (mergekit's name).
        kind: bool, int or float.
        default: the value when the recipe gives none; `REQUIRED` when it must be given.
        per_model: given per model (`models[i].parameters`, falling back to the top-level
            `parameters`), mergekit's tensor parameters; else global (top-level only).
        allowed: the interval a number must lie in (numbers are always finite).
        key: where the resolved value goes in `OutputTensor.params` (per-model values as a list).
        per_tensor: a gradient or a filtered list may give it per tensor; False: one number.
        statistics: the statistics passes read it, so a model-wide (global) method needs it to
            be the same for every tensor.
        ignored: accepted for mergekit compatibility and without effect here.
        choices: the only values accepted (for a bool lazymerge supports one way only).
        hint: what to do when a value is refused.
    """

    name: str
    kind: type = float
    default: Any = REQUIRED
    per_model: bool = False
    allowed: Range | None = None
    key: str = ""
    per_tensor: bool = True
    statistics: bool = False
    ignored: bool = False
    choices: tuple[Any, ...] | None = None
    hint: str | None = None

    @property
    def params_key(self) -> str:
        return self.key or self.name

    def check(self, value: Any, where: str = "", context: str = "") -> Any:
        """The value as the declared type, finite, in range and among the choices."""
        value = check_value(self.name, value, self.kind, self.allowed, where, context)
        if self.choices is not None and value not in self.choices:
            shown = " or ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in self.choices)
            label = f"{where}.{self.name}" if where else self.name
            raise RecipeError(f"{label} must be {shown}, got {value!r}", hint=self.hint)
        return value


@dataclass(frozen=True)
class GpuKernel:
    """A fused GPU kernel for a method ("module:function") and how many inputs one launch takes."""

    kernel: str
    min_inputs: int = 1
    max_inputs: int | None = None

    def accepts(self, n_inputs: int) -> bool:
        return self.min_inputs <= n_inputs and (self.max_inputs is None or n_inputs <= self.max_inputs)


_ChunkFn = Callable[..., Any]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method, declared once.

    Args:
        name: mergekit's method name.
        reference_url: the paper or post it comes from.
        parameters: every parameter the recipe may give.
        chunk: "module:function", `combine(xs, params, statistics, element_start) -> fp32 chunk`
            on fp32 chunks, the base model first when `needs_base`.
        needs_base: the recipe names a `base_model`, merged as input 0.
        min_models / max_models: how many models besides the base (all models without a base).
        statistics: "module:factory", `factory(params, numel) -> StatisticsAccumulator`, for a
            method that needs whole-tensor statistics before its chunks can be merged.
        global_flag: the params key that, when true, makes the statistics model-wide (one
            accumulator over every tensor of the method).
        gpu: the fused GPU kernel, if any; otherwise the method runs on the CPU backend.
        weighted_sum: the method is a weighted sum of its inputs (`sum w_i x_i`, optionally
            divided): the planner lowers it to weighted sources, so it takes the executor's
            fast path and a one-source chunk with weight 1 is a byte copy.
        accumulation: how a weighted sum accumulates (`ACCUMULATIONS`): "fused" is mergekit's
            `addcmul_` (`acc = fma(x_i, w_i, acc)` from +0), "rounded" rounds product and sum
            apart. Every backend reads it from here; a run's bytes never depend on the backend.
        internal: built by lazymerge's own recipes (DogeRM, copies), never named in a recipe.
        family / options: a configured instance of a family (mergekit's registry): the task-
            vector methods share one chunk arithmetic, told apart by `options`.
        check_tensor: torch-free planner hook `(params, shape, where) -> None` that derives
            shape-dependent parameters and checks parameters against each other.
    """

    name: str
    reference_url: str
    parameters: tuple[Parameter, ...]
    chunk: str
    needs_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    statistics: str | None = None
    global_flag: str | None = None
    gpu: GpuKernel | None = None
    weighted_sum: bool = False
    accumulation: str = "rounded"
    internal: bool = False
    family: str = ""
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    check_tensor: Callable[[dict, tuple[int, ...], str], None] | None = None

    def __post_init__(self) -> None:
        if self.accumulation not in ACCUMULATIONS:
            raise ValueError(f"{self.name}: accumulation must be one of {ACCUMULATIONS}, got {self.accumulation!r}")

    def parameter(self, name: str) -> Parameter | None:
        return next((p for p in self.parameters if p.name == name), None)

    @property
    def per_model(self) -> tuple[Parameter, ...]:
        return tuple(p for p in self.parameters if p.per_model)

    @property
    def global_parameters(self) -> tuple[Parameter, ...]:
        return tuple(p for p in self.parameters if not p.per_model)

    @property
    def needs_statistics(self) -> bool:
        return self.statistics is not None

    def is_global(self, params: Mapping[str, Any]) -> bool:
        """Whether this tensor's statistics span every tensor of the method (global TIES)."""
        return self.global_flag is not None and bool(params.get(self.global_flag, False))

    def gpu_capable(self, n_inputs: int) -> bool:
        """Whether the GPU backend can merge a chunk of this method with `n_inputs` sources."""
        return self.gpu is not None and self.gpu.accepts(n_inputs)

    @property
    def combine(self) -> _ChunkFn:
        """The chunk function (imports its module, and so torch, on first use)."""
        return _resolve(self.chunk)

    @property
    def gpu_kernel(self) -> _ChunkFn:
        """The fused GPU kernel (imports Triton); see `lazymerge.kernels.cuda` for its call."""
        if self.gpu is None:
            raise ValueError(f"merge method {self.name!r} has no GPU kernel")
        return _resolve(self.gpu.kernel)

    def new_statistics(self, params: Mapping[str, Any], numel: int) -> Any:
        """A fresh statistics accumulator for `numel` elements (of a tensor, or of every tensor)."""
        if self.statistics is None:
            raise ValueError(f"merge method {self.name!r} has no statistics passes")
        return _resolve(self.statistics)(params, numel)


def _resolve(ref: str) -> Any:
    # Not cached: a module reloaded (the Triton interpreter build in tests) must be seen anew.
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)
