"""mergekit configs for every declared method: one generic resolver over the declarations.

Semantics are mergekit's (0.1.5): a per-model parameter is looked up in the model's own
`parameters`, then in the top-level `parameters`, then takes the declared default; a global one
in the top-level `parameters` only. A value is a number, a gradient (a list interpolated across
layers: layer i of n gets t = i / (n - 1), tensors outside layers get t = 0), or a list of
`{filter, value}` entries where the first whose filter is a substring of the tensor name (or has
no filter / "*") wins. Every resolved value is checked against its declaration (type, finite,
range). A weighted-sum method (linear) is lowered to weighted sources. No tensor bytes are read
here (torch-free).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lazymerge.constants import MERGEABLE_DTYPES
from lazymerge.errors import MissingTensorError, RecipeError, ShapeMismatchError
from lazymerge.io.checkpoint import Checkpoint, open_checkpoint
from lazymerge.methods import REQUIRED, MergeMethod, Parameter, get, names
from lazymerge.plan import MergePlan, OutputTensor, Segment, build_plan
from lazymerge.recipes.card import pinned_name
from lazymerge.recipes.common import carried_side_files, copy_tensor, normalize_dtype, source_at

__all__ = [
    "evaluate_setting",
    "method_tensors",
    "open_method_models",
    "plan_method",
    "reject_unknown_keys",
    "weight_sum",
    "weighted_divisor",
]

_TOP_KEYS = {"merge_method", "models", "parameters", "dtype", "out_dtype", "base_model"}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_WORDS = {1: "one", 2: "two", 3: "three"}


def evaluate_setting(tensor_name: str, setting: Any, t: float, kind: type) -> Any:
    """mergekit's `evaluate_setting`: scalars, gradients and filtered lists -> one value or None."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return _validate(setting, kind)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            values = [_validate(e, kind) for e in setting]
            if kind is bool or kind is str:
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return _validate((1 - frac) * values[i0] + frac * values[i1], kind)
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
                raise RecipeError(f"a conditional parameter is a mapping with `value` and `filter`, got {cond!r}")
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
                return evaluate_setting(tensor_name, cond["value"], t, kind)
        return None
    raise RecipeError(f"unexpected parameter value {setting!r}")


def _validate(value: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or int(value) != value:
                raise ValueError
            return int(value)
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise RecipeError(f"parameter value {value!r} is not a {kind.__name__}") from None


def _is_scalar(setting: Any) -> bool:
    return isinstance(setting, (bool, int, float, str))


def _resolve(param: Parameter, scopes: list[tuple[str, dict]], tensor: str, t: float) -> Any:
    """The parameter's value for one tensor: the first scope that gives it, else the default."""
    for where, scope in scopes:
        if param.name not in scope:
            continue
        setting = scope[param.name]
        if not param.per_tensor and not _is_scalar(setting):
            raise RecipeError(f"{where}.{param.name} must be a number (per-tensor lists are not supported)")
        if _is_scalar(setting):  # checked as written, so the message shows it ('1e309', not inf)
            return param.check(setting, where)
        value = evaluate_setting(tensor, setting, t, param.kind)
        if value is not None:
            return param.check(value, where, f"tensor {tensor}")
    if param.default is REQUIRED:
        raise RecipeError(
            f"missing required parameter `{param.name}` for {scopes[0][0]}" + (f" (tensor {tensor})" if tensor else ""),
            hint=f"give {param.name} in the model's parameters" if param.per_model else f"give parameters.{param.name}",
        )
    return param.default


def plan_method(
    spec: dict,
    output: str | os.PathLike[str],
    max_shard_size: int,
    overwrite: bool,
    opener: Callable[..., Checkpoint] = open_checkpoint,
) -> tuple[MergePlan, list[Checkpoint]]:
    """Plan a merge of any declared method from a mergekit config.

    Raises:
        RecipeError: an unknown method or key, a missing or out-of-range parameter, too few models.
    """
    method = _method(spec.get("merge_method"))
    reject_unknown_keys(spec, _TOP_KEYS, "the recipe")
    out_dtype = normalize_dtype(spec.get("out_dtype")) or normalize_dtype(spec.get("dtype"))
    checkpoints, model_params = open_method_models(spec, opener)
    tensors, dropped = method_tensors(spec, checkpoints, model_params, out_dtype)
    top = _top(spec)
    scalar = all(_is_scalar(v) for _, scope in model_params for v in scope.values()) and all(
        _is_scalar(v) for v in top.values()
    )
    if method.weighted_sum and scalar:
        # One number per model: recorded resolved, as the merge uses them.
        scopes = [("parameters", top)]
        weight = _param(method, "weight")
        weights = [
            _resolve(weight, [(f"models[{i}].parameters", scope), *scopes], "", 0.0) for i, scope in model_params
        ]
        recipe: dict = {
            "merge_method": method.name,
            "models": [
                {"model": pinned_name(c), "parameters": {"weight": w}}
                for c, w in zip(checkpoints, weights, strict=True)
            ],
            "parameters": {"normalize": _resolve(_param(method, "normalize"), scopes, "", 0.0)},
            "dtype": out_dtype,
        }
    else:  # gradients and filter lists: as written (each tensor's values are in the plan)
        recipe = _pinned(json.loads(json.dumps(spec, default=str)), checkpoints)
    side = carried_side_files(checkpoints[0], checkpoints, recipe, out_dtype, max_shard_size)
    plan = build_plan(
        recipe=recipe,
        inputs=[c.label for c in checkpoints],
        output_dir=Path(output),
        tensors=tensors,
        max_shard_size=max_shard_size,
        side_files=side,
        dropped=dropped,
        overwrite=overwrite,
    )
    return plan, checkpoints


def _pinned(recipe: dict, checkpoints: list[Checkpoint]) -> dict:
    """The recipe with each Hub input named at the commit it resolved to (`owner/name@sha`)."""
    names = {c.label: pinned_name(c) for c in checkpoints}
    if isinstance(recipe.get("base_model"), str):
        recipe["base_model"] = names.get(recipe["base_model"], recipe["base_model"])
    for entry in recipe.get("models") or []:
        if isinstance(entry, dict) and isinstance(entry.get("model"), str):
            entry["model"] = names.get(entry["model"], entry["model"])
    return recipe


def _method(name: Any) -> MergeMethod:
    try:
        method = get(name)
        if method.internal:
            raise KeyError(name)
        return method
    except (KeyError, TypeError):
        raise RecipeError(
            f"merge_method {name!r} is not supported", hint=f"supported: dogerm, {', '.join(names())}"
        ) from None


def _param(method: MergeMethod, name: str) -> Parameter:
    param = method.parameter(name)
    assert param is not None, f"{method.name} declares no {name}"
    return param


def _top(spec: dict) -> dict:
    top = spec.get("parameters") or {}
    if not isinstance(top, dict):
        raise RecipeError("`parameters` must be a mapping")
    return top


def reject_unknown_keys(obj: dict, allowed: set[str], where: str) -> None:
    """A recipe mapping may hold only `allowed` keys; the error names the others and what is supported."""
    if not isinstance(obj, dict):
        raise RecipeError(f"{where} must be a mapping")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise RecipeError(
            f"{where} has unsupported key(s): {', '.join(unknown)}",
            hint=f"supported here: {', '.join(sorted(allowed))}",
        )


def open_method_models(
    spec: dict, opener: Callable[..., Checkpoint] = open_checkpoint
) -> tuple[list[Checkpoint], list[tuple[int, dict]]]:
    """The base model first (when the method needs one), then every other model, with each one's
    index in `models` and `parameters` mapping (the base's: -1 and {})."""
    method = _method(spec.get("merge_method"))
    base = spec.get("base_model")
    if method.needs_base and not isinstance(base, str):
        raise RecipeError(f"merge_method {method.name} needs `base_model`")
    models = spec.get("models")
    if not isinstance(models, list) or not models:
        raise RecipeError(f"merge_method {method.name} needs a `models` list")
    per_model = {p.name for p in method.per_model}
    global_names = {p.name for p in method.global_parameters}
    others: list[tuple[int, str, dict]] = []
    for i, entry in enumerate(models):
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise RecipeError(f"models[{i}] needs a `model:` path or repo id")
        unknown = sorted(set(entry) - {"model", "parameters"})
        if unknown:
            raise RecipeError(f"models[{i}] has unsupported key(s): {', '.join(unknown)}")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise RecipeError(f"models[{i}].parameters must be a mapping")
        bad = sorted(set(params) - per_model)
        if bad:
            misplaced = [k for k in bad if k in global_names]
            raise RecipeError(
                f"models[{i}].parameters has unsupported key(s): {', '.join(bad)}",
                hint=f"{misplaced[0]} is a global parameter of {method.name}: give it in the top-level `parameters`"
                if misplaced
                else f"supported per model by {method.name}: {', '.join(sorted(per_model)) or '(none)'}",
            )
        if method.needs_base and _same_model(entry["model"], base):
            continue  # mergekit ignores the base model's per-model parameters
        others.append((i, entry["model"], params))
    _check_count(method, len(others))
    checkpoints = [opener(m, label=m) for _, m, _ in others]
    model_params = [(i, p) for i, _, p in others]
    if method.needs_base:
        checkpoints.insert(0, opener(base, label=base))
        model_params.insert(0, (-1, {}))
    return checkpoints, model_params


def _check_count(method: MergeMethod, n: int) -> None:
    lo, hi = method.min_models, method.max_models
    if lo <= n and (hi is None or n <= hi):
        return
    if not method.needs_base:
        raise RecipeError(f"a {method.name} merge needs a `models` list with at least {_WORDS.get(lo, lo)} entries")
    if hi == lo:
        total = _WORDS.get(lo + 1, lo + 1)
        raise RecipeError(f"{method.name} merges exactly {total} models: `base_model` and {_WORDS.get(lo, lo)} other")
    if lo == 1:
        raise RecipeError(f"merge_method {method.name} needs at least one model besides the base model")
    raise RecipeError(f"{method.name} needs `base_model` and at least {_WORDS.get(lo, lo)} other models")


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return Path(a).exists() and Path(b).exists() and os.path.samefile(a, b)
    except OSError:
        return False


def method_tensors(
    spec: dict, checkpoints: list[Checkpoint], model_params: list[tuple[int, dict]], out_dtype: str | None
) -> tuple[list[OutputTensor], list[str]]:
    """One OutputTensor per tensor of the first model (the base), with its resolved parameters."""
    method = _method(spec.get("merge_method"))
    top = _top(spec)
    allowed = {p.name for p in method.parameters}
    bad = sorted(set(top) - allowed)
    if bad:
        raise RecipeError(
            f"`parameters` has unsupported key(s): {', '.join(bad)}",
            hint=f"supported by {method.name}: {', '.join(sorted(allowed)) or '(none)'}",
        )
    first = checkpoints[0]
    merged = model_params[1:] if method.needs_base else model_params
    n_layers = _num_layers(first)
    tensors: list[OutputTensor] = []
    ordinal = 0
    for name, ref in first.tensors.items():
        refs = []
        for ckpt in checkpoints:
            other = ckpt.tensors.get(name)
            if other is None:
                raise MissingTensorError(
                    name, ckpt.label, hint=f"every model of a {method.name} merge needs every tensor"
                )
            if other.shape != ref.shape:
                raise ShapeMismatchError(name, first.label, ref.shape, ckpt.label, other.shape)
            refs.append(other)
        if any(r.dtype not in MERGEABLE_DTYPES for r in refs) or ref.numel == 0:
            which = "base model" if method.needs_base else "first model"
            tensors.append(copy_tensor(0, ref, out_dtype, f"{which} ({ref.dtype} is copied, not merged)"))
            continue
        params = _tensor_params(method, name, _layer_t(name, n_layers), top, merged, ref.shape)
        # Without `dtype`/`out_dtype`, mergekit brings a tensor's inputs to their promoted type
        # (fp16 + bf16 -> fp32) and writes that: so does this plan.
        dtype = out_dtype or promoted_dtype([r.dtype for r in refs])
        if method.weighted_sum:
            tensors.append(_weighted_tensor(method, name, ref, refs, params, dtype))
            continue
        params["ordinal"] = ordinal
        ordinal += 1
        sources = tuple(source_at(i, r, 0) for i, r in enumerate(refs))
        tensors.append(
            OutputTensor(
                name,
                dtype,
                ref.shape,
                (Segment(0, ref.numel, sources),),
                f"{method.name} of base + {len(refs) - 1} model(s)",
                method=method.name,
                params=params,
            )
        )
    _check_global(method, tensors)
    dropped = sorted({n for c in checkpoints[1:] for n in c.tensors if n not in first.tensors})
    return tensors, dropped


def promoted_dtype(dtypes: list[str]) -> str:
    """torch's type promotion over mergeable safetensors dtypes: one dtype stays; fp16 with bf16,
    or either with fp32, is fp32."""
    return dtypes[0] if len(set(dtypes)) == 1 else "F32"


def _tensor_params(
    method: MergeMethod, name: str, t: float, top: dict, merged: list[tuple[int, dict]], shape: tuple[int, ...]
) -> dict:
    params: dict[str, Any] = {"tensor": name}
    for p in method.parameters:
        if p.ignored:
            _resolve(p, [("parameters", top)], name, t)  # checked, without effect
        elif p.per_model:
            params[p.params_key] = [
                _resolve(p, [(f"models[{i}].parameters", scope), ("parameters", top)], name, t) for i, scope in merged
            ]
        else:
            params[p.params_key] = _resolve(p, [("parameters", top)], name, t)
    if method.check_tensor is not None:
        method.check_tensor(params, shape, name)
    return params


def _weighted_tensor(
    method: MergeMethod, name: str, ref: Any, refs: list[Any], params: dict, out_dtype: str | None
) -> OutputTensor:
    """A weighted-sum method as weighted sources (the executor's fast path)."""
    weights = params["weights"]
    divisor = weighted_divisor(weights, params["normalize"])
    sources = tuple(source_at(i, r, 0, w) for i, (r, w) in enumerate(zip(refs, weights, strict=True)))
    how = " + ".join(f"{w:g} x #{i}" for i, w in enumerate(weights))
    if divisor is not None:
        how = f"({how}) / {divisor:g}"
    segments = (Segment(0, ref.numel, sources),)
    return OutputTensor(name, out_dtype or ref.dtype, ref.shape, segments, how, divisor, method=method.name)


def weighted_divisor(weights: list[float], normalize: bool) -> float | None:
    """What a weighted sum divides by: mergekit's weight sum with `normalize`, else nothing.

    Raises:
        RecipeError: `normalize` with weights that sum to 0.
    """
    if not normalize:
        return None
    divisor = weight_sum(weights)
    if divisor == 0:
        raise RecipeError("the weights sum to 0, so `normalize: true` would divide by zero")
    return divisor


def weight_sum(weights: list[float]) -> float:
    """The sum of the weights as mergekit's `normalize` computes it: the weights rounded to fp32
    and added in fp32 in the order torch's CPU sum uses (`weight.sum(dim=1)` over the models).

    Up to 4 models (and 8) torch adds in order; for 5-7 it adds the models past the fourth into
    the first one's lane, then the other three lanes (measured on x86 with torch 2.x). Python's
    float64 sum differs from this in the last bit for about one weight list in four, which then
    shifts merged values by one ulp. Past 8 models torch's lane order is not emulated: the sum
    is in order, and may differ from mergekit's in the last bit.
    """
    w = [_f32(x) for x in weights]
    order = w if len(w) <= 4 or len(w) >= 8 else [w[0], *w[4:], *w[1:4]]
    total = order[0]
    for x in order[1:]:
        total = _f32(total + x)
    return total


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _check_global(method: MergeMethod, tensors: list[OutputTensor]) -> None:
    """A model-wide statistics pass needs the parameters it reads to be the same for every tensor."""
    merged = [t for t in tensors if t.method == method.name and method.is_global(t.params)]
    if not merged:
        return
    flag = next(p.name for p in method.parameters if p.params_key == method.global_flag)
    for p in method.parameters:
        if p.statistics and any(t.params[p.params_key] != merged[0].params[p.params_key] for t in merged):
            per = "each model's " if p.per_model else ""
            raise RecipeError(f"with `{flag}: true`, {per}`{p.name}` must be the same for every tensor")


def _num_layers(ckpt: Checkpoint) -> int:
    config = ckpt.read_json("config.json") or {}
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    indices = [int(m.group(1)) for n in ckpt.tensors if (m := _LAYER.search(n))]
    return max(indices) + 1 if indices else 0


def _layer_t(name: str, n_layers: int) -> float:
    m = _LAYER.search(name)
    if m is None:
        return 0.0
    return int(m.group(1)) / (n_layers - 1) if n_layers > 1 else 1.0
