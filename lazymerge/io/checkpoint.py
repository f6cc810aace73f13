"""A model on disk: its shards, its index and every tensor as a byte range of a file.

Opening a checkpoint reads the index and each shard's header (or a `.bin` archive's pickled
tensor table) and nothing else. Torch-free, so planning never imports torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import ClassVar, TypeVar

from lazymerge.constants import (
    BIN_INDEX_NAME,
    BIN_SINGLE_NAME,
    DTYPE_SIZES,
    SAFE_INDEX_NAME,
    SAFE_SINGLE_NAME,
)
from lazymerge.errors import CheckpointError, HeaderError
from lazymerge.io.header import read_header
from lazymerge.io.range_source import LocalRangeSource, RangeSource
from lazymerge.io.torchbin import read_bin_tensors

__all__ = ["Checkpoint", "TensorRef", "build_checkpoint", "check_inside", "open_checkpoint", "validate_weight_map"]


@dataclass(frozen=True)
class TensorRef:
    """Where one input tensor's bytes are: a file of a checkpoint, an absolute offset, a length."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str  # file name relative to the checkpoint root
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]


class DerivedCache(dict):
    """`Checkpoint.derived`: a plain dict that pickles empty, so that a checkpoint sent to a Ray
    task does not carry megabytes of vocabulary the task can derive again if it needs them."""

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (DerivedCache, ())


@dataclass
class Checkpoint:
    """A model: where it lives, its weight files, and its tensors in file order."""

    remote: ClassVar[bool] = False  # True when reading a weight file may start a download

    label: str
    root: Path
    format: str  # "safetensors" or "bin"
    files: list[str]
    tensors: dict[str, TensorRef]
    file_sizes: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    # What a recipe derived from this checkpoint's side files (its vocabulary...), kept for the
    # next plan from the same opened checkpoint: a weight search re-plans one pair per weight.
    derived: dict[object, object] = field(default_factory=DerivedCache, repr=False, compare=False)

    def local_file(self, name: str) -> Path:
        """Path of one of the checkpoint's files on local disk (remote checkpoints fetch it)."""
        return self.root / name

    def range_source(self, name: str, reads: list[tuple[int, int]] | None = None) -> RangeSource:
        """Where the run reads `name`'s bytes: the local file (remote checkpoints may stream it).

        `reads`: the (offset, bytes) the run will read from it, in order (a remote stream fetches
        them ahead)."""
        return LocalRangeSource(self.local_file(name))

    def expect_reads(self, names: set[str]) -> None:
        """The weight files a run will read (remote: only these are prefetched)."""

    def release_file(self, name: str) -> None:
        """Called once every tensor read from `name` has been consumed (remote: may delete it)."""

    def cancel(self) -> None:
        """The run was interrupted: waits in `local_file` give up at once (remote; nothing locally)."""

    @property
    def deletes_released_files(self) -> bool:
        """Whether the inputs should be read in plan order, one output shard at a time (low-disk
        Hub inputs, streamed by range requests: each stream then moves forward through its file)."""
        return False

    def read_json(self, name: str) -> dict | None:
        """A JSON side file (config.json, tokenizer_config.json...) or None when absent."""
        path = self.side_file(name)
        if path is None:
            return None
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
            raise CheckpointError(f"{self.label}: {name} is not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{self.label}: {name} is not a JSON object")
        return obj

    def side_file(self, name: str) -> Path | None:
        """A non-weight file next to the weights (config, tokenizer), or None when absent.

        Raises:
            CheckpointError: the file is a link to somewhere outside the model folder.
        """
        path = self.root / name
        if not path.is_file():
            return None
        check_inside(self.label, self.root, name)
        return path

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def open_checkpoint(path: str | os.PathLike[str], label: str | None = None) -> Checkpoint:
    """Open a model folder or a single `.safetensors`/`.bin` file, reading headers only.

    Raises:
        CheckpointError: nothing loadable at `path`, a missing shard, a bad index.
        HeaderError: a shard's header is corrupt.
    """
    path = Path(path)
    label = label or str(path)
    if path.is_file():  # a file the user named: followed wherever it links
        return _from_files(label, path.parent, [path.name], contained=False)
    if not path.is_dir():
        raise CheckpointError(f"{label}: no such file or folder")
    for index_name in (SAFE_INDEX_NAME, BIN_INDEX_NAME):
        if (path / index_name).is_file():
            check_inside(label, path, index_name)
            weight_map = _read_index(label, path / index_name)
            files = list(dict.fromkeys(weight_map.values()))
            _check_no_unlisted_shard(label, path, files)
            return _from_files(label, path, files, weight_map)
    for single in (SAFE_SINGLE_NAME, BIN_SINGLE_NAME):
        if (path / single).is_file():
            return _from_files(label, path, [single])
    singles = sorted(p.name for p in path.glob("*.safetensors")) or sorted(
        p.name for p in path.glob("pytorch_model*.bin")
    )
    if len(singles) == 1:
        return _from_files(label, path, singles)
    raise CheckpointError(
        f"{label}: no model.safetensors, pytorch_model.bin or index file in this folder",
        hint="point at the folder that holds config.json and the weight files",
    )


_SHARD_NAME = re.compile(r"(?P<stem>.+)-(?P<k>\d{5})-of-(?P<n>\d{5})\.(?P<ext>safetensors|bin)")


def _check_no_unlisted_shard(label: str, root: Path, files: list[str]) -> None:
    """A `STEM-0000k-of-0000N` shard on disk that the index leaves out would have its tensors
    silently missing from the model: refuse it."""
    names = {m.group("stem", "n", "ext") for f in files if (m := _SHARD_NAME.fullmatch(f))}
    if len(names) != 1:
        return
    stem, n, ext = names.pop()
    for k in range(1, int(n) + 1):
        shard = f"{stem}-{k:05d}-of-{n}.{ext}"
        if shard not in files and (root / shard).exists():
            raise CheckpointError(
                f"{label}: {shard} is in the folder but not in the index",
                hint="the index and the shards disagree; re-download the model or add its tensors to the index",
            )


def _read_index(label: str, index_path: Path) -> dict[str, str]:
    try:
        obj = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise CheckpointError(f"{label}: {index_path.name} is not valid JSON ({exc})") from None
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{label}: {index_path.name} has no weight_map")
    validate_weight_map(label, index_path.name, weight_map)
    return weight_map


def validate_weight_map(label: str, index_name: str, weight_map: dict) -> None:
    """Every value must be a relative file name inside the model folder (indexes come from strangers)."""
    for tensor, file in weight_map.items():
        if not isinstance(tensor, str) or not isinstance(file, str) or not file:
            raise CheckpointError(f"{label}: {index_name} has a malformed weight_map entry")
        pure = PurePosixPath(file.replace("\\", "/"))
        if pure.is_absolute() or ".." in pure.parts or ":" in file or file.startswith("~"):
            raise CheckpointError(
                f"{label}: {index_name} maps {tensor!r} to {file!r}, outside the model folder",
                hint="the index is malformed or malicious; do not use this model",
            )


def check_inside(label: str, root: Path, name: str) -> None:
    """Refuse a file of the model folder `root` whose real location (every link followed) is
    outside that folder: a downloaded folder must not make lazymerge read, merge and upload
    another file of the user's. The folder itself may be a link. A Hugging Face cache snapshot
    (`models--O--N/snapshots/REV/`) links each file to `../../blobs/SHA`, outside the snapshot:
    a file there may resolve into its own repo's `blobs/`.

    Raises:
        CheckpointError: the file resolves outside `root` (and outside its cache repo's blobs).
    """
    try:
        base = root.resolve(strict=True)
        target = (root / name).resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise CheckpointError(f"{label}: cannot resolve {name[:120]!r} ({exc})") from None
    if target.is_relative_to(base) or _in_cache_blobs(base, target):
        return
    raise CheckpointError(
        f"{label}: {name} links to {target}, outside the model folder",
        hint="a model folder's files must lie inside it; copy the file in if you trust it",
    )


def _in_cache_blobs(base: Path, target: Path) -> bool:
    for folder in (base, *base.parents):
        if folder.parent.name == "snapshots":
            repo = folder.parent.parent
            return "--" in repo.name and target.parent == repo / "blobs"
    return False


def _from_files(
    label: str, root: Path, files: list[str], weight_map: dict[str, str] | None = None, *, contained: bool = True
) -> Checkpoint:
    sizes: dict[str, int] = {}
    tables: list[tuple[list[TensorRef], dict[str, str]]] = []
    for file in files:
        path = root / file
        try:
            found = path.is_file()
            size = path.stat().st_size if found else 0
        except OSError as exc:  # a name too long for the file system, a permission problem...
            raise CheckpointError(f"{label}: cannot open shard {file[:120]!r} ({exc.strerror or exc})") from None
        if not found:
            raise CheckpointError(
                f"{label}: shard {file} is listed in the index but missing",
                hint="the download is incomplete; fetch the missing shard",
            )
        if contained:
            check_inside(label, root, file)
        sizes[file] = size
        tables.append(_read_file_tensors(path, file))
    return build_checkpoint(Checkpoint, label, root, files, tables, sizes, weight_map)


_C = TypeVar("_C", bound=Checkpoint)


def build_checkpoint(
    cls: type[_C],
    label: str,
    root: Path,
    files: list[str],
    tables: list[tuple[list[TensorRef], dict[str, str]]],
    sizes: dict[str, int],
    weight_map: dict[str, str] | None = None,
) -> _C:
    """A `cls` checkpoint from each weight file's (tensors, metadata), `tables[i]` being `files[i]`'s.

    With an index (`weight_map`) a tensor is taken only from the file the index names, every
    tensor the index names must be found, and every tensor of a shard must be in the index;
    tensors are ordered by file, then offset. The metadata is the first non-empty one. Shared by
    local folders and Hub repos (io/hub.py).

    Raises:
        CheckpointError: the index names a tensor its shard lacks, or a shard holds a tensor the
            index does not name (it would silently be missing from the output).
    """
    tensors: dict[str, TensorRef] = {}
    metadata: dict[str, str] = {}
    for file, (refs, file_metadata) in zip(files, tables, strict=True):
        metadata = metadata or file_metadata
        for ref in refs:
            if weight_map is not None and ref.name not in weight_map:
                raise CheckpointError(
                    f"{label}: shard {file} holds {ref.name!r}, which the index does not list",
                    hint="the index and the shards disagree; re-download the model or add the tensor to the index",
                )
            if weight_map is not None and weight_map[ref.name] != file:
                continue  # the index is authoritative, as in transformers
            tensors[ref.name] = ref
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in tensors:
                raise CheckpointError(f"{label}: the index puts {name!r} in {file}, but that shard lacks it")
    ordered = dict(sorted(tensors.items(), key=lambda kv: (files.index(kv[1].file), kv[1].offset)))
    fmt = "bin" if files[0].endswith(".bin") else "safetensors"
    return cls(label, root, fmt, files, ordered, sizes, metadata)


def _read_file_tensors(path: Path, file: str) -> tuple[list[TensorRef], dict[str, str]]:
    if file.endswith(".bin") or file.endswith(".pt"):
        refs = [TensorRef(t.name, t.dtype, t.shape, file, t.offset, t.nbytes) for t in read_bin_tensors(path)]
        return refs, {}
    if not file.endswith(".safetensors"):
        raise HeaderError(path, "unknown weight file type (expected .safetensors or .bin)")
    header = read_header(path)
    refs = [
        TensorRef(e.name, e.dtype, e.shape, file, header.data_start + e.begin, e.nbytes)
        for e in header.tensors.values()
    ]
    return refs, header.metadata
