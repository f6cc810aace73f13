"""mergekit configs for the task-vector methods, SLERP and Model Stock: parameters resolved per tensor.

Semantics are mergekit's (0.1.5): a parameter is looked up in the model's own `parameters`, then
in the top-level `parameters`, then takes the method's default; a value is a number, a gradient
(a list interpolated across layers: layer i of n gets t = i / (n - 1), tensors outside layers
get t = 0), or a list of `{filter, value}` entries where the first whose filter is a substring
of the tensor name (or has no filter / "*") wins. No tensor bytes are read here (torch-free).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lazymerge.constants import MERGEABLE_DTYPES
from lazymerge.errors import MissingTensorError, RecipeError, ShapeMismatchError
from lazymerge.io.checkpoint import Checkpoint, open_checkpoint
from lazymerge.plan import MergePlan, OutputTensor, Segment, build_plan

__all__ = ["METHODS", "evaluate_setting", "method_tensors", "open_method_models", "plan_method"]

# method -> (default normalize, default rescale, per-model parameters)
_GTA: dict[str, tuple[bool, bool, tuple[str, ...]]] = {
    "task_arithmetic": (False, False, ("weight",)),
    "ties": (True, False, ("weight", "density")),
    "dare_linear": (False, True, ("weight", "density")),
    "dare_ties": (False, True, ("weight", "density")),
    "breadcrumbs": (False, False, ("weight", "density", "gamma")),
    "breadcrumbs_ties": (False, False, ("weight", "density", "gamma")),
    "della": (True, True, ("weight", "density", "epsilon")),
    "della_linear": (False, True, ("weight", "density", "epsilon")),
}
# Methods whose statistics need no task-vector parameters: only these top-level keys.
_OTHER: dict[str, tuple[str, ...]] = {
    "slerp": ("t",),
    "model_stock": ("filter_wise",),
    "multislerp": ("weight", "normalize_weights", "eps"),
}
METHODS = (*_GTA, *_OTHER)
_SHARED = {
    "normalize": bool,
    "rescale": bool,
    "lambda": float,
    "int8_mask": bool,
    "seed": int,  # lazymerge: DARE's mask seed
    "global_magnitude": bool,  # lazymerge: one magnitude threshold per model over all tensors
}
_DEFAULTS = {
    "lambda": 1.0,
    "int8_mask": False,
    "seed": 0,
    "global_magnitude": False,
    "density": 1.0,
    "gamma": 0.01,
    "epsilon": 0.15,
}
_TYPES = {
    "weight": float,
    "density": float,
    "gamma": float,
    "epsilon": float,
    "t": float,
    "filter_wise": bool,
    "normalize_weights": bool,
    "eps": float,
    **_SHARED,
}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


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
    except (TypeError, ValueError):
        raise RecipeError(f"parameter value {value!r} is not a {kind.__name__}") from None


def _resolve(name: str, scopes: list[dict], tensor: str, t: float, default: Any, where: str) -> Any:
    for scope in scopes:
        if name in scope:
            value = evaluate_setting(tensor, scope[name], t, _TYPES[name])
            if value is not None:
                return value
    if default is None:
        raise RecipeError(
            f"missing required parameter `{name}` for {where}", hint=f"give {name} in the model's parameters"
        )
    return default


_TOP_KEYS = {"merge_method", "models", "parameters", "dtype", "out_dtype", "base_model"}


def plan_method(
    spec: dict,
    output: str | os.PathLike[str],
    max_shard_size: int,
    overwrite: bool,
    check_disk: bool,
    opener: Callable[..., Checkpoint] = open_checkpoint,
    *,
    resume: bool = False,
) -> tuple[MergePlan, list[Checkpoint]]:
    """Plan a task_arithmetic / ties / dare / breadcrumbs / della / slerp / model_stock merge from a mergekit config."""
    import json

    from lazymerge.recipes.common import normalize_dtype

    reject_unknown_keys(spec, _TOP_KEYS, "the recipe")
    out_dtype = normalize_dtype(spec.get("out_dtype")) or normalize_dtype(spec.get("dtype"))
    checkpoints, model_params = open_method_models(spec, opener)
    tensors, dropped = method_tensors(spec, checkpoints, model_params, out_dtype)
    return plan_checkpoints(
        json.loads(json.dumps(spec, default=str)),
        checkpoints,
        tensors,
        dropped,
        out_dtype,
        output=output,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        resume=resume,
        check_disk=check_disk,
    )


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


def plan_checkpoints(
    recipe: dict,
    checkpoints: list[Checkpoint],
    tensors: list[OutputTensor],
    dropped: list[str],
    out_dtype: str | None,
    *,
    output: str | os.PathLike[str],
    max_shard_size: int,
    overwrite: bool,
    check_disk: bool,
    resume: bool = False,
) -> tuple[MergePlan, list[Checkpoint]]:
    """The plan writing `tensors` of a merge of `checkpoints` (first = side files' source) to `output`.

    Shared by the linear planner (config.py) and the method planner; returns the plan and `checkpoints`."""
    from lazymerge.recipes.common import carried_side_files

    side = carried_side_files(checkpoints[0], checkpoints, recipe, out_dtype)
    plan = build_plan(
        recipe=recipe,
        inputs=[c.label for c in checkpoints],
        input_dirs=[c.root for c in checkpoints],
        output_dir=Path(output),
        tensors=tensors,
        max_shard_size=max_shard_size,
        side_files=side,
        dropped=dropped,
        overwrite=overwrite,
        resume=resume,
        check_disk=check_disk,
    )
    return plan, checkpoints


def open_method_models(
    spec: dict, opener: Callable[..., Checkpoint] = open_checkpoint
) -> tuple[list[Checkpoint], list[dict]]:
    """The base model first, then every other model, with each one's `parameters` mapping."""
    method = spec["merge_method"]
    base = spec.get("base_model")
    if not isinstance(base, str):
        raise RecipeError(f"merge_method {method} needs `base_model`")
    models = spec.get("models")
    if not isinstance(models, list) or not models:
        raise RecipeError(f"merge_method {method} needs a `models` list")
    per_model = _GTA[method][2] if method in _GTA else ("weight",) if method == "multislerp" else ()
    others: list[tuple[str, dict]] = []
    for i, entry in enumerate(models):
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise RecipeError(f"models[{i}] needs a `model:` path or repo id")
        unknown = sorted(set(entry) - {"model", "parameters"})
        if unknown:
            raise RecipeError(f"models[{i}] has unsupported key(s): {', '.join(unknown)}")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise RecipeError(f"models[{i}].parameters must be a mapping")
        bad = sorted(set(params) - set(per_model) - set(_SHARED))
        if bad:
            raise RecipeError(
                f"models[{i}].parameters has unsupported key(s) for {method}: {', '.join(bad)}",
                hint=f"supported here: {', '.join(per_model) or '(none)'}",
            )
        if _same_model(entry["model"], base):
            continue  # mergekit ignores the base model's per-model parameters
        others.append((entry["model"], params))
    if method == "slerp" and len(others) != 1:
        raise RecipeError("slerp merges exactly two models: `base_model` and one other")
    if method == "model_stock" and len(others) < 2:
        raise RecipeError("model_stock needs `base_model` and at least two other models")
    if not others:
        raise RecipeError(f"merge_method {method} needs at least one model besides the base model")
    checkpoints = [opener(base, label=base)] + [opener(m, label=m) for m, _ in others]
    return checkpoints, [{}] + [p for _, p in others]


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return Path(a).exists() and Path(b).exists() and os.path.samefile(a, b)
    except OSError:
        return False


def method_tensors(
    spec: dict, checkpoints: list[Checkpoint], model_params: list[dict], out_dtype: str | None
) -> tuple[list[OutputTensor], list[str]]:
    """One OutputTensor per tensor of the base model, with its resolved per-tensor parameters."""
    method = spec["merge_method"]
    top = spec.get("parameters") or {}
    if not isinstance(top, dict):
        raise RecipeError("`parameters` must be a mapping")
    allowed = set(_OTHER[method]) if method in _OTHER else set(_SHARED) | set(_GTA[method][2])
    bad = sorted(set(top) - allowed)
    if bad:
        raise RecipeError(
            f"`parameters` has unsupported key(s) for {method}: {', '.join(bad)}",
            hint=f"supported here: {', '.join(sorted(allowed))}",
        )
    base = checkpoints[0]
    n_layers = _num_layers(base)
    tensors: list[OutputTensor] = []
    ordinal = 0
    for name, ref in base.tensors.items():
        refs = []
        for ckpt in checkpoints:
            other = ckpt.tensors.get(name)
            if other is None:
                raise MissingTensorError(name, ckpt.label, hint=f"every model of a {method} merge needs every tensor")
            if other.shape != ref.shape:
                raise ShapeMismatchError(name, base.label, ref.shape, ckpt.label, other.shape)
            refs.append(other)
        from lazymerge.recipes.common import copy_tensor, source_at

        if any(r.dtype not in MERGEABLE_DTYPES for r in refs) or ref.numel == 0:
            tensors.append(copy_tensor(0, ref, out_dtype, f"base model ({ref.dtype} is copied, not merged)"))
            continue
        t = _layer_t(name, n_layers)
        params = _tensor_params(method, name, t, top, model_params, ref.shape)
        params["ordinal"] = ordinal
        ordinal += 1
        sources = tuple(source_at(i, r, 0) for i, r in enumerate(refs))
        how = f"{method} of base + {len(refs) - 1} model(s)"
        tensors.append(
            OutputTensor(
                name,
                out_dtype or ref.dtype,
                ref.shape,
                (Segment(0, ref.numel, sources),),
                how,
                method=method,
                params=params,
            )
        )
    _check_global(method, tensors)
    dropped = sorted({n for c in checkpoints[1:] for n in c.tensors if n not in base.tensors})
    return tensors, dropped


def _tensor_params(
    method: str, name: str, t: float, top: dict, model_params: list[dict], shape: tuple[int, ...]
) -> dict:
    if method == "slerp":
        return {"tensor": name, "t": _resolve("t", [top], name, t, None, name)}
    if method == "model_stock":
        if _resolve("filter_wise", [top], name, t, False, name):
            raise RecipeError(
                "model_stock `filter_wise: true` (one angle per row) is not supported",
                hint="remove `filter_wise`: lazymerge computes one angle per tensor, mergekit's default",
            )
        return {"tensor": name}
    if method == "multislerp":
        weights = [
            _resolve("weight", [scope, top], name, t, None, f"models[{i}] tensor {name}")
            for i, scope in enumerate(model_params[1:])
        ]
        return {
            "tensor": name,
            "weights": weights,
            "normalize_weights": _resolve("normalize_weights", [top], name, t, True, name),
            "eps": _resolve("eps", [top], name, t, 1e-8, name),
        }
    default_normalize, default_rescale, per_model = _GTA[method]
    params: dict[str, Any] = {"tensor": name}
    defaults = {**_DEFAULTS, "normalize": default_normalize, "rescale": default_rescale}
    for key in ("normalize", "rescale", "lambda", "seed", "global_magnitude"):
        params[key] = _resolve(key, [top], name, t, defaults[key], name)
    params["global"] = params.pop("global_magnitude")
    if params["global"] and method not in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        raise RecipeError("`global_magnitude` applies to ties and breadcrumbs only")
    for key in per_model:
        values = []
        for i, scope in enumerate(model_params[1:]):
            values.append(_resolve(key, [scope, top], name, t, _DEFAULTS.get(key), f"models[{i}] tensor {name}"))
        params[f"{key}s" if key != "density" else "densities"] = values
    if method in ("della", "della_linear"):
        # mergekit ranks magnitudes along each row (dim 1 of a 2-D tensor; a 1-D one is one row).
        params["row"] = shape[-1] if len(shape) >= 2 else max(1, _numel(shape))
        for i, (d, e) in enumerate(zip(params["densities"], params["epsilons"], strict=True)):
            if 0 < d < 1 and (d + e >= 1 or d - e <= 0):
                raise RecipeError(
                    f"models[{i}] tensor {name}: della needs density +/- epsilon in (0, 1), "
                    f"got density {d} and epsilon {e}",
                    hint="lower `epsilon` (mergekit raises the same error)",
                )
    return params


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_global(method: str, tensors: list[OutputTensor]) -> None:
    merged = [t for t in tensors if t.method == method and t.params.get("global")]
    if merged and any(t.params["densities"] != merged[0].params["densities"] for t in merged):
        raise RecipeError("with `global_magnitude: true` each model's density must be the same for every tensor")
    if merged and any(t.params["rescale"] != merged[0].params["rescale"] for t in merged):
        raise RecipeError("with `global_magnitude: true`, `rescale` must be the same for every tensor")


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
