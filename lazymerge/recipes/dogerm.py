"""The DogeRM recipe (Lin, Li, Lee, Chen, EMNLP 2024, arXiv 2407.01470) as a plan.

theta = (1 - lam) * theta_RM + lam * theta_SFT for every parameter both models have, norms
included; the reward head (`score.*`) comes from the RM; the SFT `lm_head` is dropped; the token
embedding covers the union vocabulary (shared tokens averaged, one-sided tokens keep their own
model's row). Unlike the official script, a row only the RM has keeps its trained value instead
of a random re-initialisation, so the merge is deterministic.

At lambda = 0 and 1 the merged tensors are the RM's / the SFT's values, selected rather than
multiplied (0 * inf is NaN): the plan reads only the selected model, as a one-source segment
with weight 1, so the bytes are a copy when the dtype is kept, and the same fp32 -> dtype cast
as every other merged tensor when it changes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from lazymerge.constants import CARRIED_FILES, DEFAULT_MAX_SHARD_SIZE, MERGEABLE_DTYPES
from lazymerge.errors import RecipeError, ShapeMismatchError
from lazymerge.io.checkpoint import Checkpoint, TensorRef
from lazymerge.plan import MergePlan, OutputTensor, Segment, Source, build_plan
from lazymerge.recipes.card import hub_base_models, model_card
from lazymerge.recipes.common import copy_tensor, normalize_dtype, output_config, source_at
from lazymerge.recipes.vocab import add_tokens, load_vocab, union_rows

__all__ = ["HEAD_PREFIXES", "plan_dogerm"]

RM, SFT = 0, 1
# Reward / classification heads that only the reward model has.
HEAD_PREFIXES = ("score.", "classifier.", "v_head.", "reward_head.")
EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
)


def plan_dogerm(
    reward_model: Checkpoint,
    domain_model: Checkpoint,
    weight: float,
    output: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> MergePlan:
    """Plan a DogeRM merge from headers and tokenizer files alone.

    Raises:
        RecipeError: lambda outside [0, 1] or an unknown dtype.
        ShapeMismatchError: a shared non-embedding tensor has different shapes.
        VocabularyError: the tokenizers give one token two ids.
        OutputError / DiskSpaceError: see `build_plan`.
    """
    lam = check_weight(weight)
    # Each tensor keeps the reward model's dtype unless --dtype overrides it.
    override = normalize_dtype(dtype)
    rm, sft = reward_model, domain_model
    tensors: list[OutputTensor] = []
    warnings: list[str] = []
    vocab_rows: int | None = None
    added: list[tuple[int, str]] = []
    for name, ref in rm.tensors.items():
        other = sft.tensors.get(name)
        if other is None:
            if not name.startswith(HEAD_PREFIXES):
                warnings.append(f"{name} is not in the domain model: copied from the reward model")
            tensors.append(copy_tensor(RM, ref, override, "reward model (head)"))
        elif name.endswith(EMBEDDING_SUFFIXES) and len(ref.shape) == 2 and ref.shape[1:] == other.shape[1:]:
            emb, added = _union_embedding(rm, sft, ref, other, lam, override or ref.dtype)
            vocab_rows = emb.shape[0]
            tensors.append(emb)
        elif ref.shape != other.shape:
            raise ShapeMismatchError(name, rm.label, ref.shape, sft.label, other.shape)
        elif ref.dtype not in MERGEABLE_DTYPES or other.dtype not in MERGEABLE_DTYPES:
            tensors.append(copy_tensor(RM, ref, None, f"reward model ({ref.dtype} is copied, not merged)"))
        else:
            sources = _mix(ref, other, 0, lam)
            segments = (Segment(0, ref.numel, sources),) if ref.numel else ()
            how = {0.0: "reward model (lambda 0)", 1.0: "domain model (lambda 1)"}.get(
                lam, f"{1 - lam:g} x RM + {lam:g} x SFT"
            )
            tensors.append(OutputTensor(name, override or ref.dtype, ref.shape, segments, how))
    dropped = [name for name in sft.tensors if name not in rm.tensors]
    recipe = {
        "merge_method": "dogerm",
        "reward_model": rm.label,
        "domain_model": sft.label,
        "weight": lam,
        "dtype": override,  # None: every tensor keeps the reward model's dtype
    }
    side = _side_files(rm, sft, added, override, vocab_rows, recipe)
    return build_plan(
        recipe=recipe,
        inputs=[rm.label, sft.label],
        output_dir=Path(output),
        tensors=tensors,
        max_shard_size=max_shard_size,
        side_files=side,
        dropped=dropped,
        warnings=warnings,
        overwrite=overwrite,
    )


def check_weight(weight: object) -> float:
    """DogeRM's lambda as a float: a finite number in [0, 1] (NaN and infinities refused).

    Raises:
        RecipeError: anything else.
    """
    try:
        lam = float(weight)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        lam = math.nan
    if isinstance(weight, bool) or not (math.isfinite(lam) and 0.0 <= lam <= 1.0):
        raise RecipeError(f"--weight must be between 0 and 1, got {weight}", hint="DogeRM's lambda: 0 = RM, 1 = SFT")
    return lam


def _mix(rm: TensorRef, sft: TensorRef, start: int, lam: float) -> tuple[Source, ...]:
    """`(1 - lam) * RM + lam * SFT` from element `start`; at 0 or 1 the one model alone."""
    if lam == 0.0:
        return (source_at(RM, rm, start),)
    if lam == 1.0:
        return (source_at(SFT, sft, start),)
    return (source_at(RM, rm, start, 1.0 - lam), source_at(SFT, sft, start, lam))


def _union_embedding(
    rm: Checkpoint, sft: Checkpoint, ref: TensorRef, other: TensorRef, lam: float, out_dtype: str
) -> tuple[OutputTensor, list[tuple[int, str]]]:
    runs, added = union_rows(load_vocab(rm), load_vocab(sft), ref.shape[0], other.shape[0])
    width = ref.shape[1]
    segments: list[Segment] = []
    parts: list[str] = []
    for run in runs:
        start = run.start * width
        if run.sources == ("rm", "sft"):
            sources = _mix(ref, other, start, lam)
            label = "averaged"
        elif run.sources == ("rm",):
            sources, label = (source_at(RM, ref, start),), "reward model"
        else:
            sources, label = (source_at(SFT, other, start),), "domain model"
        segments.append(Segment(start, run.count * width, sources))
        last = run.start + run.count - 1
        parts.append(f"rows {run.start}-{last} {label}" if run.count > 1 else f"row {run.start} {label}")
    rows = max(ref.shape[0], other.shape[0])
    dtype = out_dtype if ref.dtype in MERGEABLE_DTYPES else ref.dtype
    return OutputTensor(ref.name, dtype, (rows, width), tuple(segments), "; ".join(parts)), added


def _side_files(
    rm: Checkpoint,
    sft: Checkpoint,
    added: list[tuple[int, str]],
    dtype_override: str | None,
    vocab_rows: int | None,
    recipe: dict,
) -> dict[str, bytes]:
    files = add_tokens(rm, sft, added)
    updates = {"vocab_size": vocab_rows} if vocab_rows is not None else {}
    config = output_config(rm, dtype_override, **updates)
    if config is not None:
        files["config.json"] = config
    for name in CARRIED_FILES:
        if (path := rm.side_file(name)) is not None:
            files[name] = path.read_bytes()
    files["README.md"] = model_card(recipe, [rm.label, sft.label], hub_base_models([rm, sft])).encode("utf-8")
    return files
