"""mergekit `slices`: layer stacking ("passthrough" frankenmerges, depth up-scaling) and per-slice merges.

mergekit 0.1.5's semantics (`MergePlanner.plan_slice` / `plan_module`): an output slice lists its
sources, each a model with a `layer_range` [start, end); every source of a slice spans the same
number of layers. Output layers are numbered on from the previous slices. Layer `i` of a slice of
`n` layers gets `t = i / (n - 1)` (1 for a one-layer slice) for gradients; the tensors outside
layers get `t = 0` and come from the first slice's sources (embeddings: mergekit's "pre weights")
or the last slice's (final norm, `lm_head`: "post weights"). A parameter is looked up in the
source's `parameters`, then the slice's, then the top-level `parameters`. `passthrough` takes one
source per slice and copies it (times the optional per-model `scale`). A `models:` config is one
slice of every model's full depth, the base model added when it is not listed.

The plan stays pure data: a copied tensor is one source of weight 1 (the executor moves its bytes
without conversion); the output config's layer count is the sum of the slices' lengths.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazymerge.constants import MERGEABLE_DTYPES, TOKENIZER_FILES
from lazymerge.errors import MissingTensorError, RecipeError, ShapeMismatchError
from lazymerge.io.checkpoint import Checkpoint, TensorRef, open_checkpoint
from lazymerge.methods import MergeMethod
from lazymerge.methods_config import (
    _check_count,
    _check_global,
    _method,
    _num_layers,
    _resolve,
    _same_model,
    evaluate_setting,
    reject_unknown_keys,
    weighted_divisor,
)
from lazymerge.plan import MergePlan, OutputTensor, Segment, build_plan
from lazymerge.recipes.common import carried_side_files, copy_tensor, dump_json, normalize_dtype, source_at
from lazymerge.recipes.slice_config import SLICE_KEYS, OutputSlice, SliceSource, mapping, read_slices
from lazymerge.recipes.tokenizer_union import VocabularyPlan

__all__ = ["plan_slices"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
# Tensors outside the layers that precede them (mergekit's "pre weights"): the input embeddings.
_PRE = re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe|word_embeddings|embed_in|tok_embeddings)\.")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class _Layers:
    """A checkpoint's tensors by layer: layer -> [(name prefix, name suffix, ref)] in file order."""

    by_layer: dict[int, list[tuple[str, str, TensorRef]]]
    others: list[TensorRef]

    @classmethod
    def of(cls, ckpt: Checkpoint) -> _Layers:
        by_layer: dict[int, list[tuple[str, str, TensorRef]]] = {}
        others = []
        for name, ref in ckpt.tensors.items():
            m = _LAYER.search(name)
            if m is None:
                others.append(ref)
            else:
                by_layer.setdefault(int(m.group(1)), []).append((name[: m.start(1)], name[m.end(1) :], ref))
        return cls(by_layer, others)


def plan_slices(
    spec: dict,
    output: str | os.PathLike[str],
    max_shard_size: int,
    overwrite: bool,
    opener: Callable[..., Checkpoint] = open_checkpoint,
) -> tuple[MergePlan, list[Checkpoint]]:
    """Plan a mergekit config with `slices` (or `passthrough`, a tokenizer, a chat template).

    Raises:
        RecipeError: an unknown key, a bad `layer_range`, slices of different lengths, a missing
            parameter, passthrough with more than one source.
        MissingTensorError, ShapeMismatchError: a layer's tensors differ between the sources.
    """
    reject_unknown_keys(spec, SLICE_KEYS, "the recipe")
    name = spec.get("merge_method")
    passthrough = name == "passthrough"
    method = None if passthrough else _method(name)
    out_dtype = normalize_dtype(spec.get("out_dtype")) or normalize_dtype(spec.get("dtype"))
    top = mapping(spec.get("parameters"), "`parameters`")
    _check_top(method, top)

    opened: dict[str, int] = {}
    checkpoints: list[Checkpoint] = []
    layers: list[_Layers] = []

    def index(model: str) -> int:
        for known, i in opened.items():
            if _same_model(known, model):
                return i
        checkpoints.append(opener(model, label=model))
        layers.append(_Layers.of(checkpoints[-1]))
        opened[model] = len(checkpoints) - 1
        return opened[model]

    base = spec.get("base_model")
    if isinstance(base, str):
        index(base)
    slices = read_slices(spec, lambda m: _num_layers(checkpoints[index(m)]))
    _check_parameter_keys(method, slices)
    vocab = VocabularyPlan.from_recipe(spec, checkpoints, index, slices)

    planner = _Planner(method, top, out_dtype, checkpoints, index, vocab, base if isinstance(base, str) else None)
    tensors: list[OutputTensor] = []
    first, last = slices[0], slices[-1]
    lead_first = layers[index(first.sources[0].model)]
    lead_last = layers[index(last.sources[0].model)]
    for ref in lead_first.others:
        if _PRE.search(ref.name):
            tensors.append(planner.tensor(ref.name, first, 0, [ref.name] * len(first.sources), 0.0))
    out_layer = 0
    for s, sl in enumerate(slices):
        for offset in range(sl.length):
            t = offset / (sl.length - 1) if sl.length > 1 else 1.0
            lead = layers[index(sl.sources[0].model)].by_layer.get(sl.sources[0].layers[0] + offset, [])
            for prefix, suffix, _ in lead:
                names = [f"{prefix}{src.layers[0] + offset}{suffix}" for src in sl.sources]
                tensors.append(planner.tensor(f"{prefix}{out_layer}{suffix}", sl, s, names, t))
            out_layer += 1
    for ref in lead_last.others:
        if not _PRE.search(ref.name):
            tensors.append(planner.tensor(ref.name, last, len(slices) - 1, [ref.name] * len(last.sources), 0.0))
    if method is not None:
        _check_global(method, tensors)

    recipe = json.loads(json.dumps(spec, default=str))
    donor = checkpoints[index(base if isinstance(base, str) else first.sources[0].model)]
    side = carried_side_files(donor, checkpoints, recipe, out_dtype)
    config = donor.read_json("config.json")
    if config is not None:
        updates: dict[str, Any] = {k: out_layer for k in _LAYER_KEYS if isinstance(config.get(k), int)}
        updates.update(vocab.config_updates())
        config.update(updates)
        side["config.json"] = _with_dtype(config, out_dtype)
    files = vocab.tokenizer_files()
    if files is not None:  # written as mergekit writes them, in place of the donor's
        for name in TOKENIZER_FILES:
            side.pop(name, None)
        side.update(files)
    produced = {t.name for t in tensors}
    dropped = sorted({r.name for ly in layers for r in ly.others if r.name not in produced})
    plan = build_plan(
        recipe=recipe,
        inputs=[c.label for c in checkpoints],
        output_dir=Path(output),
        tensors=tensors,
        max_shard_size=max_shard_size,
        side_files=side,
        dropped=dropped,
        warnings=vocab.warnings,
        overwrite=overwrite,
    )
    return plan, checkpoints


def _with_dtype(config: dict, out_dtype: str | None) -> bytes:
    from lazymerge.constants import CONFIG_DTYPE_NAMES

    if out_dtype is not None:
        key = "dtype" if "dtype" in config and "torch_dtype" not in config else "torch_dtype"
        config[key] = CONFIG_DTYPE_NAMES[out_dtype]
    return dump_json(config)


def _check_parameter_keys(method: MergeMethod | None, slices: list[OutputSlice]) -> None:
    """A slice's and a source's `parameters` name only what the method declares (per model for a source)."""
    every = {"scale"} if method is None else {p.name for p in method.parameters}
    per_model = {"scale"} if method is None else {p.name for p in method.per_model}
    for s, sl in enumerate(slices):
        bad = sorted(set(sl.parameters) - every)
        if bad:
            raise RecipeError(
                f"slices[{s}].parameters has unsupported key(s): {', '.join(bad)}",
                hint=f"supported: {', '.join(sorted(every)) or '(none)'}",
            )
        for j, src in enumerate(sl.sources):
            bad = sorted(set(src.parameters) - per_model)
            if bad:
                raise RecipeError(
                    f"the parameters of {src.model} (slices[{s}].sources[{j}]) have unsupported key(s): {', '.join(bad)}",
                    hint=f"supported per model: {', '.join(sorted(per_model)) or '(none)'}; others go in `parameters`",
                )


def _check_top(method: MergeMethod | None, top: dict) -> None:
    allowed = {"scale"} if method is None else {p.name for p in method.parameters}
    bad = sorted(set(top) - allowed)
    if bad:
        raise RecipeError(
            f"`parameters` has unsupported key(s): {', '.join(bad)}",
            hint=f"supported by {method.name if method else 'passthrough'}: {', '.join(sorted(allowed)) or '(none)'}",
        )


class _Planner:
    """Builds one OutputTensor from a slice's sources (the base model first for methods that need one)."""

    def __init__(
        self,
        method: MergeMethod | None,
        top: dict,
        out_dtype: str | None,
        checkpoints: list[Checkpoint],
        index: Callable[[str], int],
        vocab: Any,
        base: str | None,
    ) -> None:
        self.method = method
        self.top = top
        self.out_dtype = out_dtype
        self.checkpoints = checkpoints
        self.index = index
        self.vocab = vocab
        self.base = base
        self.ordinal = 0

    def _ordered(self, sl: OutputSlice, s: int, names: list[str]) -> list[tuple[int, SliceSource, str]]:
        """(source position, source, input tensor name), the base model's first."""
        items = [(j, src, n) for j, (src, n) in enumerate(zip(sl.sources, names, strict=True))]
        method = self.method
        if method is None:
            if len(items) != 1:
                raise RecipeError(f"passthrough takes one source per slice; slices[{s}] has {len(items)}")
            return items
        base = sl.base_model or self.base
        if method.needs_base:
            if base is None:
                raise RecipeError(f"merge_method {method.name} needs `base_model`")
            at = [k for k, (_, src, _) in enumerate(items) if _same_model(src.model, base)]
            if not at:
                raise RecipeError(
                    f"slices[{s}] has no source from the base model {base}",
                    hint=f"add a source of {base} with the same layer_range length",
                )
            items.insert(0, items.pop(at[0]))
        _check_count(method, len(items) - (1 if method.needs_base else 0))
        return items

    def _scopes(self, sl: OutputSlice, s: int, j: int) -> list[tuple[str, dict]]:
        return [
            (f"slices[{s}].sources[{j}].parameters", sl.sources[j].parameters),
            (f"slices[{s}].parameters", sl.parameters),
            ("parameters", self.top),
        ]

    def tensor(self, out_name: str, sl: OutputSlice, s: int, names: list[str], t: float) -> OutputTensor:
        items = self._ordered(sl, s, names)
        refs: list[tuple[int, TensorRef]] = []
        for _, src, n in items:
            ci = self.index(src.model)
            ref = self.checkpoints[ci].tensors.get(n)
            if ref is None:
                raise MissingTensorError(n, src.model, hint="every source of a slice needs the same tensors")
            refs.append((ci, ref))
        rows = self.vocab.rows_for(out_name, [ci for ci, _ in refs], [r for _, r in refs])
        if rows is None:
            first = refs[0][1]
            for (_, r), (_, src, _) in zip(refs, items, strict=True):
                if r.shape != first.shape:
                    raise ShapeMismatchError(n, items[0][1].model, first.shape, src.model, r.shape)
        ci0, ref0 = refs[0]
        shape = ref0.shape if rows is None else rows.shape(ref0)
        if any(r.dtype not in MERGEABLE_DTYPES for _, r in refs) or ref0.numel == 0:
            return _renamed(copy_tensor(ci0, ref0, self.out_dtype, f"{items[0][1].model} (copied)"), out_name)
        method = self.method
        if method is None:
            scale = self._passthrough_scale(sl, s, items[0][0], names[0], t)
            weights = [1.0 if scale is None else scale]
            how = f"copy of {items[0][1].model}" + ("" if scale is None else f" x {scale:g}")
            return self._weighted(out_name, refs, weights, None, how, rows, "weighted_sum")
        merged = items[1:] if method.needs_base else items
        params: dict[str, Any] = {"tensor": out_name}
        for p in method.parameters:
            if p.ignored:
                _resolve(p, [(f"slices[{s}].parameters", sl.parameters), ("parameters", self.top)], out_name, t)
            elif p.per_model:
                params[p.params_key] = [_resolve(p, self._scopes(sl, s, j), names[j], t) for j, _, _ in merged]
            else:
                scopes = [(f"slices[{s}].parameters", sl.parameters), ("parameters", self.top)]
                params[p.params_key] = _resolve(p, scopes, out_name, t)
        if method.check_tensor is not None:
            method.check_tensor(params, shape, out_name)
        if method.weighted_sum:
            weights = params["weights"]
            divisor = weighted_divisor(weights, params["normalize"])  # mergekit's fp32 sum, as for `models:`
            how = " + ".join(f"{w:g} x {src.model}" for w, (_, src, _) in zip(weights, items, strict=True))
            return self._weighted(out_name, refs, weights, divisor, how, rows, method.name)
        params["ordinal"] = self.ordinal
        self.ordinal += 1
        if rows is None:
            segments = (Segment(0, ref0.numel, tuple(source_at(ci, r, 0) for ci, r in refs)),)
        else:
            segments = rows.segments(refs, [1.0] * len(refs))
        return OutputTensor(
            out_name,
            self.out_dtype or ref0.dtype,
            shape,
            segments,
            f"{method.name} of {len(refs)} model(s)",
            method=method.name,
            params=params,
        )

    def _weighted(
        self,
        out_name: str,
        refs: list[tuple[int, TensorRef]],
        weights: list[float],
        divisor: float | None,
        how: str,
        rows: Any,
        method: str,
    ) -> OutputTensor:
        ref0 = refs[0][1]
        if rows is None:
            sources = tuple(source_at(ci, r, 0, w) for (ci, r), w in zip(refs, weights, strict=True))
            segments: tuple[Segment, ...] = (Segment(0, ref0.numel, sources),)
            shape = ref0.shape
        else:
            segments = rows.segments(refs, weights)
            shape = rows.shape(ref0)
        if divisor is not None:
            how = f"({how}) / {divisor:g}"
        return OutputTensor(out_name, self.out_dtype or ref0.dtype, shape, segments, how, divisor, method=method)

    def _passthrough_scale(self, sl: OutputSlice, s: int, j: int, name: str, t: float) -> float | None:
        for where, scope in self._scopes(sl, s, j):
            bad = sorted(set(scope) - {"scale"})
            if bad:
                raise RecipeError(
                    f"{where} has unsupported key(s): {', '.join(bad)}", hint="passthrough takes only `scale`"
                )
            if "scale" in scope:
                value = evaluate_setting(name, scope["scale"], t, float)
                if value is not None:
                    return value
        return None


def _renamed(t: OutputTensor, name: str) -> OutputTensor:
    t.name = name
    return t
