"""The DogeRM recipe (Lin, Li, Lee, Chen, EMNLP 2024, arXiv 2407.01470) as a plan.

theta = (1 - lam) * theta_RM + lam * theta_SFT for every parameter both models have, norms
included; the reward head (`score.*`, a value head) comes from the RM; the SFT `lm_head` is
dropped unless the RM has one too (a value-head RM keeps its causal-LM head). Every
vocabulary-shaped tensor (the token embedding, and an output head both models have; a tied SFT
head is its embedding) covers the union vocabulary, keyed by token string (recipes/vocab.py):
shared tokens averaged, one-sided tokens keep their own model's row, an SFT-only token whose id
the RM uses for another token appended after the last row. Unlike the official script, a row only
the RM has keeps its trained value instead of a random re-initialisation, so the merge is
deterministic. The roles are checked first (recipes/roles.py): swapped models are refused.

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
from lazymerge.recipes.card import model_card, pinned_name
from lazymerge.recipes.common import copy_tensor, normalize_dtype, output_config, source_at
from lazymerge.recipes.roles import OUTPUT_HEAD_NAMES, REWARD_HEAD_PREFIXES, check_roles
from lazymerge.recipes.vocab import add_tokens, load_vocab, union_rows

__all__ = ["HEAD_PREFIXES", "plan_dogerm"]

RM, SFT = 0, 1
HEAD_PREFIXES = REWARD_HEAD_PREFIXES  # the name earlier releases exported
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
    unknown_heads = check_roles(rm, sft, EMBEDDING_SUFFIXES)
    vocabs = _Vocabs.of(rm, sft)
    tensors: list[OutputTensor] = []
    warnings: list[str] = []
    vocab_rows: int | None = None
    added: list[tuple[int, str]] = []
    for name, ref in rm.tensors.items():
        other, tied = sft.tensors.get(name), False
        if other is None and name in OUTPUT_HEAD_NAMES:
            other = _tied_output_head(sft)  # the SFT's output head is its input embedding
            tied = other is not None
        vocab_shaped = name.endswith(EMBEDDING_SUFFIXES) or name in OUTPUT_HEAD_NAMES
        if other is None:
            if name in unknown_heads:
                warnings.append(f"{name} is not in the domain model: copied from the reward model")
            how = "reward model (head)" if name.startswith(REWARD_HEAD_PREFIXES) else "reward model"
            tensors.append(copy_tensor(RM, ref, override, how))
        elif vocab_shaped and len(ref.shape) == 2 and len(other.shape) == 2 and ref.shape[1] == other.shape[1]:
            emb, new_tokens = _union_embedding(vocabs, ref, other, lam, override or ref.dtype, tied)
            if name.endswith(EMBEDDING_SUFFIXES):
                vocab_rows, added = emb.shape[0], new_tokens
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
        "reward_model": pinned_name(rm),
        "domain_model": pinned_name(sft),
        "weight": lam,
        "dtype": override,  # None: every tensor keeps the reward model's dtype
    }
    side = _side_files(rm, sft, vocabs.tokenizer_files(rm, added), override, vocab_rows, recipe, max_shard_size)
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


class _Vocabs:
    """Both tokenizers' token -> id tables, read once for every vocabulary-shaped tensor, and what
    planning derives from them alone (the union's rows, the output's tokenizer files).

    None of it depends on lambda: a weight search re-plans the same opened pair for every weight,
    and the union of two 32k vocabularies with its tokenizer files is most of a plan's time
    (0.2 of 0.26 s for the 1B pair), so one instance is kept on the reward model's checkpoint.
    """

    def __init__(self, rm: Checkpoint, sft: Checkpoint) -> None:
        self.rm, self.sft = load_vocab(rm), load_vocab(sft)
        self._sft = sft
        self._unions: dict[tuple[int, int], tuple[list, list[tuple[int, str]]]] = {}
        self._tokenizer_files: dict[tuple[tuple[int, str], ...], dict[str, bytes]] = {}

    @classmethod
    def of(cls, rm: Checkpoint, sft: Checkpoint) -> _Vocabs:
        key = ("dogerm-vocabs", id(sft))
        vocabs = rm.derived.get(key)
        if not isinstance(vocabs, _Vocabs) or vocabs._sft is not sft:  # the id of another, freed checkpoint
            vocabs = rm.derived[key] = cls(rm, sft)
        return vocabs

    def union(self, rm_rows: int, sft_rows: int) -> tuple[list, list[tuple[int, str]]]:
        """`union_rows` of the two vocabularies for embeddings of these row counts."""
        if (rm_rows, sft_rows) not in self._unions:
            self._unions[rm_rows, sft_rows] = union_rows(self.rm, self.sft, rm_rows, sft_rows)
        return self._unions[rm_rows, sft_rows]

    def tokenizer_files(self, rm: Checkpoint, added: list[tuple[int, str]]) -> dict[str, bytes]:
        """`add_tokens`: the reward model's tokenizer files with the SFT-only tokens added (a copy)."""
        key = tuple(added)
        if key not in self._tokenizer_files:
            self._tokenizer_files[key] = add_tokens(rm, self._sft, added)
        return dict(self._tokenizer_files[key])


def _tied_output_head(sft: Checkpoint) -> TensorRef | None:
    """The SFT's input embedding when its output head is tied to it (no output head stored)."""
    if any(name in sft.tensors for name in OUTPUT_HEAD_NAMES):
        return None
    return next((ref for name, ref in sft.tensors.items() if name.endswith(EMBEDDING_SUFFIXES)), None)


def _union_embedding(
    vocabs: _Vocabs, ref: TensorRef, other: TensorRef, lam: float, out_dtype: str, tied: bool
) -> tuple[OutputTensor, list[tuple[int, str]]]:
    runs, added = vocabs.union(ref.shape[0], other.shape[0])
    width = ref.shape[1]
    segments: list[Segment] = []
    parts: list[str] = []
    sft_name = f"domain model ({other.name}, tied)" if tied else "domain model"
    for run in runs:
        start, sft_start = run.start * width, run.sft_row * width
        if run.sources == ("rm", "sft"):
            sources = _mix(ref, other, start, lam)
            label = "averaged" if not tied else f"averaged with {sft_name}"
        elif run.sources == ("rm",):
            sources, label = (source_at(RM, ref, start),), "reward model"
        else:
            sources, label = (source_at(SFT, other, sft_start),), sft_name
            if run.sft_start is not None:
                label += (
                    f" rows {run.sft_row}-{run.sft_row + run.count - 1}" if run.count > 1 else f" row {run.sft_row}"
                )
        segments.append(Segment(start, run.count * width, sources))
        last = run.start + run.count - 1
        parts.append(f"rows {run.start}-{last} {label}" if run.count > 1 else f"row {run.start} {label}")
    rows = runs[-1].start + runs[-1].count if runs else 0
    dtype = out_dtype if ref.dtype in MERGEABLE_DTYPES else ref.dtype
    return OutputTensor(ref.name, dtype, (rows, width), tuple(segments), "; ".join(parts)), added


def _side_files(
    rm: Checkpoint,
    sft: Checkpoint,
    files: dict[str, bytes],
    dtype_override: str | None,
    vocab_rows: int | None,
    recipe: dict,
    max_shard_size: int,
) -> dict[str, bytes]:
    updates = {"vocab_size": vocab_rows} if vocab_rows is not None else {}
    config = output_config(rm, dtype_override, **updates)
    if config is not None:
        files["config.json"] = config
    for name in CARRIED_FILES:
        if (path := rm.side_file(name)) is not None:
            files[name] = path.read_bytes()
    card = model_card(recipe, [rm.label, sft.label], checkpoints=[rm, sft], max_shard_size=max_shard_size)
    files["README.md"] = card.encode("utf-8")
    return files
