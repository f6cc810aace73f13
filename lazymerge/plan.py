"""MergePlan: pure data computed from headers, describing every byte of the output.

A recipe (DogeRM, linear...) turns input checkpoints into `OutputTensor`s, each a list of
`Segment`s (runs of output elements made from the same input ranges with the same weights).
`build_plan` then lays the tensors out into shards exactly as the files will be written (header
bytes included) and runs every check that needs no tensor bytes. The executor only follows it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lazymerge.constants import DTYPE_SIZES, MERGEABLE_DTYPES, SAFE_INDEX_NAME, SAFE_SINGLE_NAME
from lazymerge.errors import PlanError
from lazymerge.io.header import build_header
from lazymerge.methods import get as get_method

__all__ = [
    "ChunkTask",
    "MergePlan",
    "OutputShard",
    "OutputTensor",
    "Segment",
    "Source",
    "build_plan",
    "iter_chunks",
    "shard_file_name",
]


@dataclass(frozen=True)
class Source:
    """An input range: `checkpoint` indexes `MergePlan.inputs`; `offset` is the absolute byte
    offset (in `file`) of the segment's first element."""

    checkpoint: int
    file: str
    offset: int
    dtype: str
    weight: float = 1.0
    # A derived row (mergekit's vocabulary fallbacks, `lazymerge.recipes.tokenizer_union`): "zero",
    # or the "mean" of `parts` (plain Sources) computed in `dtype` as mergekit computes it. A
    # derived source has no bytes of its own (checkpoint -1); `leaves` are the reads it needs.
    derived: str = ""
    parts: tuple[Source, ...] = ()

    def leaves(self) -> tuple[Source, ...]:
        """The plain input ranges this source reads: itself, or a derived row's parts."""
        return self.parts if self.derived else (self,)

    def shifted(self, elements: int) -> Source:
        """The same source, `elements` further on (a derived row's parts move with it)."""
        return Source(
            self.checkpoint,
            self.file,
            self.offset + elements * DTYPE_SIZES[self.dtype] if not self.derived else 0,
            self.dtype,
            self.weight,
            self.derived,
            tuple(p.shifted(elements) for p in self.parts),
        )


@dataclass(frozen=True)
class Segment:
    """Output elements [start, start + count) of a tensor, made from `sources`."""

    start: int
    count: int
    sources: tuple[Source, ...]


@dataclass
class OutputTensor:
    """One output tensor: how it is made, and (after layout) where it goes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    segments: tuple[Segment, ...]
    how: str  # human-readable, for --dry-run
    divisor: float | None = None
    shard: int = -1
    offset: int = -1  # absolute byte offset in the shard file
    # The declared method (lazymerge.methods). A weighted-sum method (linear; weighted_sum, what
    # DogeRM and copies build) is carried by the sources' weights and `divisor`; any other reads
    # its sources in order (the base model first) and takes its per-tensor parameters from `params`.
    method: str = "weighted_sum"
    params: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]

    @property
    def weighted_sum(self) -> bool:
        """Whether the tensor is a weighted sum of its sources (the executor's fast path)."""
        return get_method(self.method).weighted_sum

    def segment_is_copy(self, segment: Segment) -> bool:
        """True when a segment is a plain byte copy (one source, same dtype, no arithmetic)."""
        if len(segment.sources) != 1 or self.divisor is not None or not self.weighted_sum:
            return False
        src = segment.sources[0]
        return not src.derived and src.dtype == self.dtype and (src.weight == 1.0 or self.dtype not in MERGEABLE_DTYPES)


@dataclass
class OutputShard:
    """One output file: its final name, its header bytes, its tensors in file order."""

    name: str
    header: bytes
    tensors: list[OutputTensor]
    size: int  # total file size in bytes


@dataclass(repr=False)  # the generated repr would list every tensor and header byte
class MergePlan:
    """Everything the executor needs, and everything --dry-run shows."""

    recipe: dict
    inputs: list[str]
    output_dir: Path
    tensors: list[OutputTensor]
    shards: list[OutputShard]
    side_files: dict[str, bytes] = field(default_factory=dict)  # config, tokenizer, model card
    dropped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    free_bytes: int | None = None
    # --overwrite: the run may replace what the folder holds (`lazymerge.output_folder`).
    overwrite: bool = False

    def __repr__(self) -> str:
        method = self.recipe.get("merge_method", "?")
        return (
            f"MergePlan({method} of {', '.join(self.inputs)} -> {str(self.output_dir)!r}: "
            f"{len(self.tensors)} tensors, {len(self.shards)} shard(s), {self.total_size} bytes"
            f"{f', {len(self.warnings)} warning(s)' if self.warnings else ''})"
        )

    @property
    def total_size(self) -> int:
        """Tensor bytes, as transformers' index reports `total_size`."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def bytes_on_disk(self) -> int:
        return sum(s.size for s in self.shards) + sum(len(b) for b in self.side_files.values())

    @property
    def input_bytes(self) -> int:
        """Bytes the executor reads from the inputs."""
        return sum(
            seg.count * DTYPE_SIZES[leaf.dtype]
            for t in self.tensors
            for seg in t.segments
            for src in seg.sources
            for leaf in src.leaves()
        )

    def checks(self) -> list[dict[str, Any]]:
        """The checks the plan passed, each `{"name", "ok", "detail"}` (as `lazymerge verify`
        reports its own). Planning raises on a failed one, so each is ok; free space is known once
        the output folder was checked (`lazymerge.output_folder.check_plan_output`)."""
        checks: list[dict[str, Any]] = [
            {"name": "shapes and dtypes", "ok": True, "detail": "consistent across the inputs"},
            {"name": "tensors", "ok": True, "detail": "every tensor present"},
        ]
        if self.free_bytes is not None:
            ok = self.free_bytes >= self.bytes_on_disk
            detail = f"{self.free_bytes} bytes free, {self.bytes_on_disk} needed"
            checks.append({"name": "free space", "ok": ok, "detail": detail})
        return checks

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (what `lazymerge ... --dry-run --json` prints per output).

        Keys: `output_dir`, `method`, `recipe`, `inputs`, `reads` (bytes read from each input),
        `input_bytes`, `total_size` (tensor bytes), `bytes_on_disk`, `free_bytes` (or null),
        `shards` (`name`, `size`, `tensors`: a count), `tensors` in file order (`name`, `dtype`,
        `shape`, `how`, `shard`: the file name, `nbytes`), `side_files`, `dropped`, `warnings`
        and `checks` (see `checks`). Sizes are bytes."""
        reads = [0] * len(self.inputs)
        for t in self.tensors:
            for seg in t.segments:
                for src in seg.sources:
                    reads[src.checkpoint] += seg.count * DTYPE_SIZES[src.dtype]
        ordered = sorted(self.tensors, key=lambda t: (t.shard, t.offset))
        return {
            "output_dir": str(self.output_dir),
            "method": self.recipe.get("merge_method"),
            "recipe": self.recipe,
            "inputs": list(self.inputs),
            "reads": [{"input": name, "bytes": n} for name, n in zip(self.inputs, reads, strict=True)],
            "input_bytes": sum(reads),
            "total_size": self.total_size,
            "bytes_on_disk": self.bytes_on_disk,
            "free_bytes": self.free_bytes,
            "shards": [{"name": s.name, "size": s.size, "tensors": len(s.tensors)} for s in self.shards],
            "tensors": [
                {
                    "name": t.name,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "how": t.how,
                    "shard": self.shards[t.shard].name if t.shard >= 0 else None,
                    "nbytes": t.nbytes,
                }
                for t in ordered
            ],
            "side_files": sorted(self.side_files),
            "dropped": list(self.dropped),
            "warnings": list(self.warnings),
            "checks": self.checks(),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """`to_dict()` as a JSON document."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, default=str)

    def index_json(self) -> bytes | None:
        """The `model.safetensors.index.json` content, or None for a single-file output."""
        if len(self.shards) == 1:
            return None
        weight_map = {t.name: self.shards[t.shard].name for t in sorted(self.tensors, key=lambda t: t.name)}
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        return (json.dumps(index, indent=2, sort_keys=False) + "\n").encode()


def shard_file_name(k: int, n: int) -> str:
    """transformers' names: model.safetensors alone, else model-0000k-of-0000N.safetensors."""
    return SAFE_SINGLE_NAME if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def build_plan(
    *,
    recipe: dict,
    inputs: list[str],
    output_dir: str | os.PathLike[str],
    tensors: list[OutputTensor],
    max_shard_size: int,
    side_files: dict[str, bytes] | None = None,
    dropped: list[str] | None = None,
    warnings: list[str] | None = None,
    overwrite: bool = False,
    edge_shard_size: int | None = None,
) -> MergePlan:
    """Lay `tensors` (in the order given: the executor's order) into shards. Pure: it touches no
    file; the output folder and its free space are checked by `output_folder.check_plan_output`.

    `overwrite` is recorded: what the run may remove in the output folder (`lazymerge.output_folder`).
    `edge_shard_size`: the first and the last shard hold at most this many bytes of tensors (at
    least one tensor each; see `with_short_edge_shards`).

    Raises:
        PlanError: two output tensors share a name.
    """
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise PlanError("the recipe produces duplicate tensor names")
    output_dir = Path(output_dir)
    metadata = {"format": "pt", "lazymerge_recipe": json.dumps(recipe, sort_keys=True)}
    shards = _layout(tensors, max_shard_size, metadata, edge_shard_size)
    plan = MergePlan(
        recipe=recipe,
        inputs=inputs,
        output_dir=output_dir,
        tensors=tensors,
        shards=shards,
        side_files=dict(side_files or {}),
        dropped=list(dropped or []),
        warnings=list(warnings or []),
        overwrite=overwrite,
    )
    index = plan.index_json()
    if index is not None:
        plan.side_files[SAFE_INDEX_NAME] = index
    return plan


def with_short_edge_shards(plan: MergePlan, max_shard_size: int) -> MergePlan:
    """`plan` laid out again with a short first and last shard: an eighth of `max_shard_size`, at
    most 128 MB (`EDGE_SHARD_SIZE`).

    For a merge pushed as it runs: nothing can be uploaded before the first shard closes (the
    Hub's LFS protocol wants each file's sha256 first), and the last shard is uploaded after
    the last input byte arrived, so both are time in which one direction of the network waits.
    DogeRM writes half what it reads, so at the usual 2:1 down/up rates both directions are busy
    for the whole run and each edge shard's time adds to the wall. The first shard takes the
    small tensors of what would be the first shard (`_small_first`), the other tensors keep their
    order; a first or last tensor larger than the edge gets its shard alone.
    """
    return build_plan(
        recipe=plan.recipe,
        inputs=plan.inputs,
        output_dir=plan.output_dir,
        tensors=plan.tensors,
        max_shard_size=max_shard_size,
        side_files={name: data for name, data in plan.side_files.items() if name != SAFE_INDEX_NAME},
        dropped=plan.dropped,
        warnings=plan.warnings,
        overwrite=plan.overwrite,
        edge_shard_size=max(1, min(max_shard_size // 8, EDGE_SHARD_SIZE)),
    )


# The most an edge shard holds when pushing (`with_short_edge_shards`): 1.3 s at 100 MB/s up.
EDGE_SHARD_SIZE = 128_000_000


def _layout(
    tensors: list[OutputTensor], max_shard_size: int, metadata: dict[str, str], edge_size: int | None = None
) -> list[OutputShard]:
    # Greedy, in execution order, like transformers: a tensor larger than the cap gets a shard
    # alone. With `edge_size`, the first and the last shard are filled only up to it.
    head = tail = 0
    if edge_size is not None and len(tensors) > 1:
        tensors = _small_first(tensors, max_shard_size, edge_size)
        head = _prefix_within(tensors, edge_size)
        tail = min(_prefix_within(tensors[::-1], edge_size), len(tensors) - head)
    groups: list[list[OutputTensor]] = [list(tensors[:head])] if head else []
    groups.append([])
    size = 0
    for t in tensors[head : len(tensors) - tail]:
        if groups[-1] and size + t.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    if not groups[-1]:
        groups.pop()
    if tail:
        groups.append(list(tensors[len(tensors) - tail :]))
    shards = []
    for k, group in enumerate(groups):
        header, offsets = build_header([(t.name, t.dtype, t.shape) for t in group], metadata)
        for t in group:
            t.shard = k
            t.offset = len(header) + offsets[t.name][0]
        ordered = sorted(group, key=lambda t: t.offset)
        size = len(header) + sum(t.nbytes for t in group)
        shards.append(OutputShard(shard_file_name(k, len(groups)), header, ordered, size))
    return shards


def _small_first(tensors: list[OutputTensor], max_shard_size: int, edge_size: int) -> list[OutputTensor]:
    """`tensors` with the ones that fit in `edge_size` moved to the front, in order, chosen among
    those a plain first shard would hold: models usually start with their largest tensor (the
    embedding, 131 MB for a 1B Llama, 1 GB for Llama 3 8B), which would make the short first shard
    as long as that. The rest keep their order; the reads move back once, within that shard."""
    picked: list[OutputTensor] = []
    budget = edge_size
    for t in tensors[: _prefix_within(tensors, max_shard_size)]:
        if t.nbytes <= budget:
            picked.append(t)
            budget -= t.nbytes
    if not picked:
        return tensors
    chosen = {id(t) for t in picked}
    return picked + [t for t in tensors if id(t) not in chosen]


def _prefix_within(tensors: list[OutputTensor], budget: int) -> int:
    """How many leading tensors fit in `budget` bytes (at least one)."""
    size = 0
    for n, t in enumerate(tensors):
        size += t.nbytes
        if n and size > budget:
            return n
    return len(tensors)


@dataclass(frozen=True)
class ChunkTask:
    """One bounded unit of work: `count` output elements at `out_offset` of shard `shard`."""

    shard: int
    out_offset: int
    count: int
    out_dtype: str
    sources: tuple[Source, ...]
    divisor: float | None
    copy: bool  # a plain byte copy from sources[0]
    method: str = "weighted_sum"
    params: dict | None = field(default=None, compare=False)
    tensor: str = ""  # the output tensor's name (keys counter-based randomness)
    element_start: int = 0  # index in the tensor of the chunk's first element
    statistics: object = field(default=None, compare=False)  # from the method's statistics passes

    @property
    def out_nbytes(self) -> int:
        return self.count * DTYPE_SIZES[self.out_dtype]


def iter_chunks(plan: MergePlan, chunk_elements: int, shards: list[int] | None = None):
    """Yield ("start", k) / ChunkTask / ("end", k) in execution order: shard by shard, each shard in
    file order, each segment cut into chunks of at most `chunk_elements` elements."""
    if chunk_elements <= 0:
        raise ValueError("chunk_elements must be positive")
    for k in shards if shards is not None else range(len(plan.shards)):
        shard = plan.shards[k]
        yield ("start", k)
        for t in shard.tensors:
            itemsize = DTYPE_SIZES[t.dtype]
            weighted = t.weighted_sum
            for seg in t.segments:
                copy = t.segment_is_copy(seg)
                # Copies never pass through a buffer, so they can move in larger pieces.
                step = chunk_elements * (8 if copy else 1)
                for first in range(0, seg.count, step):
                    n = min(step, seg.count - first)
                    sources = tuple(s.shifted(first) for s in seg.sources)
                    out_offset = t.offset + (seg.start + first) * itemsize
                    if weighted:
                        yield ChunkTask(k, out_offset, n, t.dtype, sources, t.divisor, copy, t.method)
                    else:
                        yield ChunkTask(
                            k,
                            out_offset,
                            n,
                            t.dtype,
                            sources,
                            None,
                            False,
                            t.method,
                            t.params,
                            t.name,
                            seg.start + first,
                        )
        yield ("end", k)
