"""Parse, validate and build safetensors headers. Pure Python: no torch, no tensor bytes.

Layout: 8-byte little-endian u64 N, N bytes of UTF-8 JSON, then the data buffer. Validation is
strict because headers come from strangers: every entry must have a known dtype, a shape of
non-negative ints, offsets inside the file whose span equals numel x itemsize, and the spans must
tile the buffer exactly (contiguous, no holes, no overlap), as the reference implementation
demands.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from lazymerge.constants import DTYPE_SIZES, SAFETENSORS_MAX_HEADER
from lazymerge.errors import HeaderError

__all__ = ["SafetensorsHeader", "TensorEntry", "build_header", "parse_header", "read_header"]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file; `begin`/`end` are relative to the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors by name, `__metadata__`, and where the data buffer starts."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 8
    file_size: int | None = None

    @property
    def data_size(self) -> int:
        return max((t.end for t in self.tensors.values()), default=0)


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file without touching tensor bytes.

    Raises:
        HeaderError: the file is truncated, the header is corrupt, or offsets are inconsistent.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise HeaderError(path, f"file is {size} bytes, too short for a safetensors header")
            n = int.from_bytes(prefix, "little")
            _check_header_length(path, n, size)
            raw = f.read(n)
    except OSError as exc:
        raise HeaderError(path, f"cannot read: {exc.strerror or exc}") from exc
    return parse_header(prefix + raw, file_size=size, source=path)


def _check_header_length(source: object, n: int, file_size: int | None) -> None:
    if n < 2:
        raise HeaderError(source, f"header length {n} is too small")
    if n > SAFETENSORS_MAX_HEADER:
        raise HeaderError(source, f"header length {n} exceeds the 100 MB limit")
    if file_size is not None and 8 + n > file_size:
        raise HeaderError(source, f"header length {n} runs past the end of the file ({file_size} bytes): truncated?")


def parse_header(data: bytes, *, file_size: int | None = None, source: object = "<bytes>") -> SafetensorsHeader:
    """Validate `data` (the 8-byte prefix followed by at least the header JSON).

    `file_size`, when known, checks that every tensor lies inside the file and that the file
    is exactly as long as its last tensor needs.
    """
    if len(data) < 8:
        raise HeaderError(source, "too short for a safetensors header")
    n = int.from_bytes(data[:8], "little")
    _check_header_length(source, n, file_size)
    if len(data) < 8 + n:
        raise HeaderError(source, f"header length {n} runs past the end of the data")
    try:
        obj = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise HeaderError(
            source, f"header has the key {exc.key!r} twice", hint="the file is damaged or forged"
        ) from None
    except (ValueError, RecursionError) as exc:  # ValueError: also a number of > 4300 digits
        raise HeaderError(source, f"header is not valid UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise HeaderError(source, "header JSON is not an object")
    metadata = _parse_metadata(source, obj.pop("__metadata__", None))
    tensors: dict[str, TensorEntry] = {}
    for name, info in obj.items():
        tensors[name] = _parse_entry(source, name, info)
    data_start = 8 + n
    _check_layout(source, tensors, data_start, file_size)
    return SafetensorsHeader(tensors=tensors, metadata=metadata, data_start=data_start, file_size=file_size)


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key[:200]


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json keeps the last of two equal keys; the reference parser (serde) refuses the header, and
    # two readers that disagree on a file's tensors (or its __metadata__) is how forgeries work.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _parse_metadata(source: object, meta: object) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise HeaderError(source, "__metadata__ must map strings to strings")
    return dict(meta)


def _parse_entry(source: object, name: str, info: object) -> TensorEntry:
    if not isinstance(info, dict):
        raise HeaderError(source, f"entry {name!r} is not an object")
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise HeaderError(source, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise HeaderError(source, f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise HeaderError(source, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    entry = TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])
    expected = entry.numel * DTYPE_SIZES[dtype]
    if entry.nbytes != expected:
        raise HeaderError(
            source,
            f"tensor {name!r} spans {entry.nbytes} bytes but {dtype} {list(shape)} needs {expected}",
        )
    return entry


def _is_count(value: object) -> bool:
    # bool is an int subclass; JSON true must not pass as 1.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _check_layout(source: object, tensors: dict[str, TensorEntry], data_start: int, file_size: int | None) -> None:
    position = 0
    for entry in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if entry.begin < position:
            raise HeaderError(source, f"tensor {entry.name!r} overlaps the tensor before it")
        if entry.begin > position:
            raise HeaderError(source, f"hole of {entry.begin - position} bytes before {entry.name!r}")
        position = entry.end
    if file_size is not None:
        data_size = file_size - data_start
        if position > data_size:
            raise HeaderError(
                source,
                f"tensors need {position} data bytes but the file holds {data_size}: truncated?",
            )
        if position < data_size:
            raise HeaderError(source, f"{data_size - position} trailing bytes after the last tensor")


def build_header(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Lay out tensors the way the reference writer does and return (header bytes, offsets).

    Tensors are ordered by dtype size (largest first) then name, the JSON is compact with
    `__metadata__` first and sorted keys, and the header is space-padded to a multiple of 8 so the
    data buffer stays aligned. Returns the full prefix (8-byte length + JSON) and each tensor's
    (begin, end) relative to the data buffer.
    """
    ordered = sorted(entries, key=lambda e: (-DTYPE_SIZES[e[1]], e[0]))
    offsets: dict[str, tuple[int, int]] = {}
    body: dict[str, object] = {}
    if metadata:
        body["__metadata__"] = dict(sorted(metadata.items()))
    position = 0
    for name, dtype, shape in ordered:
        if name in offsets:
            raise ValueError(f"duplicate tensor name {name!r}")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        offsets[name] = (position, position + nbytes)
        body[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + nbytes]}
        position += nbytes
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, offsets
