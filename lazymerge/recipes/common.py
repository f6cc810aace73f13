"""Pieces every recipe uses: positioned sources, copy tensors, dtype resolution, config edits."""

from __future__ import annotations

import json

from lazymerge.constants import CONFIG_DTYPE_NAMES, DTYPE_ALIASES, MERGEABLE_DTYPES
from lazymerge.errors import RecipeError
from lazymerge.io.checkpoint import Checkpoint, TensorRef
from lazymerge.plan import OutputTensor, Segment, Source

__all__ = ["copy_tensor", "dump_json", "normalize_dtype", "output_config", "source_at"]


def normalize_dtype(name: str | None) -> str | None:
    """'bfloat16' / 'bf16' / 'BF16' -> 'BF16'; None stays None."""
    if name is None:
        return None
    key = str(name).strip()
    if key.upper() in MERGEABLE_DTYPES:
        return key.upper()
    if key.lower() in DTYPE_ALIASES:
        return DTYPE_ALIASES[key.lower()]
    raise RecipeError(f"unsupported dtype {name!r}", hint="use float32, float16 or bfloat16")


def source_at(ckpt_index: int, ref: TensorRef, start: int, weight: float = 1.0) -> Source:
    """A Source reading `ref` from element `start` on."""
    return Source(ckpt_index, ref.file, ref.offset + start * ref.itemsize, ref.dtype, weight)


def copy_tensor(ckpt_index: int, ref: TensorRef, out_dtype: str | None, how: str) -> OutputTensor:
    """An output tensor copied from one input; float tensors may change dtype on the way."""
    dtype = out_dtype if (out_dtype and ref.dtype in MERGEABLE_DTYPES) else ref.dtype
    segments = (Segment(0, ref.numel, (source_at(ckpt_index, ref, 0),)),) if ref.numel else ()
    return OutputTensor(ref.name, dtype, ref.shape, segments, how)


def output_config(ckpt: Checkpoint, out_dtype: str | None, **updates: object) -> bytes | None:
    """The checkpoint's config.json with `updates` applied and the dtype field set to the output's."""
    config = ckpt.read_json("config.json")
    if config is None:
        return None
    config.update(updates)
    if out_dtype is not None:
        # transformers >= 4.56 writes "dtype"; older ones "torch_dtype". Keep whichever is there.
        key = "dtype" if "dtype" in config and "torch_dtype" not in config else "torch_dtype"
        config[key] = CONFIG_DTYPE_NAMES[out_dtype]
    return dump_json(config)


def dump_json(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def dominant_dtype(ckpt: Checkpoint) -> str | None:
    """The float dtype holding most of a checkpoint's bytes (the "model dtype")."""
    totals: dict[str, int] = {}
    for ref in ckpt.tensors.values():
        if ref.dtype in MERGEABLE_DTYPES:
            totals[ref.dtype] = totals.get(ref.dtype, 0) + ref.nbytes
    return max(totals, key=totals.__getitem__) if totals else None


def carried_side_files(
    base: Checkpoint,
    checkpoints: list[Checkpoint],
    recipe: dict,
    out_dtype: str | None,
    max_shard_size: int | None = None,
) -> dict[str, bytes]:
    """Side files of a merge that keeps one model's architecture: its tokenizer and carried files,
    its config (dtype updated) and a model card naming every input."""
    from lazymerge.constants import CARRIED_FILES, TOKENIZER_FILES
    from lazymerge.recipes.card import model_card

    side = {name: path.read_bytes() for name in (*TOKENIZER_FILES, *CARRIED_FILES) if (path := base.side_file(name))}
    config = output_config(base, out_dtype)
    if config is not None:
        side["config.json"] = config
    card = model_card(recipe, [c.label for c in checkpoints], checkpoints=checkpoints, max_shard_size=max_shard_size)
    side["README.md"] = card.encode("utf-8")
    return side
