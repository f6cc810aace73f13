"""Read the tensor table of a PyTorch zip checkpoint (`pytorch_model*.bin`) without torch.

A zip checkpoint holds `<root>/data.pkl` (the state dict, pickled with storages as persistent
ids) and one STORED (uncompressed) member `<root>/data/<key>` per storage. We unpickle data.pkl
with an allow-list unpickler on a budget (io/bin_pickle.py) that only knows the handful of
globals a plain state dict uses and turns every tensor into a (storage, offset, shape) record, so
nothing arbitrary is ever built or called, and a pickle bomb is refused within ~100 MB. data.pkl
itself is capped (16 MiB, and 50x its size when deflated) before a byte is inflated. Each
contiguous tensor is then a byte range of the .bin file itself, read exactly like a safetensors
tensor: no torch, no copy, no full load.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lazymerge.constants import DTYPE_SIZES
from lazymerge.errors import HeaderError
from lazymerge.io.bin_pickle import MAX_DIMS, MAX_TENSORS, PickleRefused, StorageRef, TensorRecord, load_state_dict
from lazymerge.text import printable

__all__ = ["BinTensor", "read_bin_tensors"]

# data.pkl takes ~110-160 bytes a tensor; 1 KiB each is room for long names and `_metadata`.
_MAX_PICKLE_BYTES = 1024 * MAX_TENSORS
# torch stores data.pkl uncompressed; a deflated one (a re-zipped file) packs a state dict ~5-15x.
_MAX_DEFLATE_RATIO = 50


@dataclass(frozen=True)
class BinTensor:
    """One tensor of a .bin archive as a byte range of the archive file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the .bin file
    nbytes: int


def read_bin_tensors(source: str | os.PathLike[str] | BinaryIO, *, name: str | None = None) -> list[BinTensor]:
    """List the tensors of a PyTorch zip checkpoint as byte ranges of the file.

    `source` is a path, or an open seekable binary file object (for example a ranged reader of a
    remote file: only the zip directory, data.pkl and each storage's local header are read).
    `name` labels errors (default: the path, or the file object's `name`).

    Raises:
        HeaderError: not a zip checkpoint, an unsupported object in the pickle, a compressed or
            missing storage, a non-contiguous tensor, or a tensor outside its storage.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label: object = name or path
        try:
            raw = open(path, "rb")
        except OSError as exc:
            raise HeaderError(label, f"cannot read: {exc.strerror or exc}") from exc
        with raw:
            return _read_bin(raw, label)
    return _read_bin(source, name or getattr(source, "name", "<file object>"))


def _read_bin(raw: BinaryIO, path: object) -> list[BinTensor]:
    try:
        zf = zipfile.ZipFile(raw)
    except OSError as exc:
        raise HeaderError(path, f"cannot read: {exc.strerror or exc}") from exc
    except Exception:  # BadZipFile, or a damaged directory (undecodable name, bad offsets...)
        raise HeaderError(
            path,
            "not a zip-format PyTorch checkpoint (legacy or truncated .bin)",
            hint="re-save it with torch>=1.6 or convert it to safetensors",
        ) from None
    with zf:
        members = {info.filename: info for info in zf.infolist()}
        pkl_name = next((n for n in members if n.endswith("data.pkl") and n.count("/") == 1), None)
        if pkl_name is None:
            raise HeaderError(path, "zip archive has no <root>/data.pkl: not a PyTorch checkpoint")
        root = pkl_name.rsplit("/", 1)[0]
        _check_byteorder(path, zf, members, root)
        state = _load_pickle(path, zf, members[pkl_name])
        if not isinstance(state, dict):
            raise HeaderError(path, "the pickle is not a state dict")
        if len(state) > MAX_TENSORS:
            raise HeaderError(path, f"the state dict has {len(state):,} entries; at most {MAX_TENSORS:,} are read")
        size = raw.seek(0, os.SEEK_END)
        starts: dict[str, int] = {}  # storage key -> data offset: one local-header read per storage
        return [_locate(path, raw, size, members, root, name, record, starts) for name, record in state.items()]


def _load_pickle(path: object, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> object:
    # Sizes are checked before a byte is inflated: the directory's numbers bound what zipfile reads.
    if info.file_size > _MAX_PICKLE_BYTES:
        raise HeaderError(
            path,
            f"data.pkl is {info.file_size:,} bytes, more than a state dict of {MAX_TENSORS:,} tensors needs",
            hint="convert the model to safetensors",
        )
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 65536:
        raise HeaderError(
            path,
            f"data.pkl inflates {info.compress_size:,} bytes to {info.file_size:,}, far more than a state dict does",
            hint="the file is not a PyTorch checkpoint (a zip bomb?); do not use it",
        )
    try:
        with zf.open(info) as f:
            return load_state_dict(f.read())
    except PickleRefused as exc:
        raise HeaderError(
            path, str(exc), hint="only tensor state dicts are read; re-save the model with save_pretrained"
        ) from None
    except Exception as exc:  # any malformed pickle or member: one clear error, never a crash
        raise HeaderError(path, f"cannot read the pickled state dict ({type(exc).__name__})") from None


def _check_byteorder(path: object, zf: zipfile.ZipFile, members: dict, root: str) -> None:
    info = members.get(f"{root}/byteorder")
    if info is None:
        return
    if info.file_size > 64:
        raise HeaderError(path, f"{root}/byteorder is {info.file_size} bytes; expected 'little' or 'big'")
    try:
        order = zf.read(info)
    except Exception as exc:  # a damaged member (bad local header, compression, name): one clear error
        raise HeaderError(path, f"cannot read {root}/byteorder ({type(exc).__name__})") from None
    if order.strip() not in (b"little", b""):
        raise HeaderError(path, "big-endian checkpoint; only little-endian files are supported")


def _locate(
    path: object, raw, size: int, members: dict, root: str, name: object, record: object, starts: dict[str, int]
) -> BinTensor:
    if not isinstance(name, str):
        raise HeaderError(path, f"the state dict has a key of type {type(name).__name__}, not a tensor name")
    if not isinstance(record, TensorRecord):
        raise HeaderError(path, f"state dict entry {printable(name[:200])!r} is not a tensor")
    storage, shape = record.storage, _dims(record.shape)
    if (
        not isinstance(storage, StorageRef)
        or not isinstance(storage.key, str)
        or len(storage.key) > 64  # torch numbers its storages: "0", "1"...
        or not _is_count(storage.numel)
        or record.dtype not in DTYPE_SIZES
    ):
        raise HeaderError(path, f"tensor {printable(name[:200])!r} has a malformed storage record")
    if shape is None:
        raise HeaderError(path, f"tensor {printable(name[:200])!r} has an invalid shape")
    itemsize = DTYPE_SIZES[record.dtype]
    capacity = storage.numel * DTYPE_SIZES[storage.dtype]  # storage size in bytes
    numel = math.prod(shape)
    if numel > 1 and _dims(record.stride) != _contiguous_strides(shape):
        raise HeaderError(
            path,
            f"tensor {name!r} is not contiguous in its storage",
            hint="re-save the model with save_pretrained or convert it to safetensors",
        )
    if not _is_count(record.storage_offset) or (record.storage_offset + numel) * itemsize > capacity:
        raise HeaderError(path, f"tensor {name!r} lies outside its storage")
    info = members.get(f"{root}/data/{storage.key}")
    if info is None:
        raise HeaderError(path, f"storage {storage.key} of tensor {name!r} is missing from the archive")
    if info.compress_type != zipfile.ZIP_STORED:
        raise HeaderError(path, f"storage {storage.key} is compressed; cannot read it lazily")
    if info.file_size < capacity:
        raise HeaderError(path, f"storage {storage.key} is shorter than its {storage.numel} elements")
    start = starts.get(storage.key)
    if start is None:
        start = starts[storage.key] = _member_data_offset(path, raw, size, info)
    offset = start + record.storage_offset * itemsize
    return BinTensor(name, record.dtype, shape, offset, numel * itemsize)


def _member_data_offset(path: object, raw, size: int, info: zipfile.ZipInfo) -> int:
    # The central directory gives the local header's position; the data follows that header,
    # whose name and extra-field lengths can differ from the central copy.
    raw.seek(info.header_offset)
    local = raw.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise HeaderError(path, f"bad local zip header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > size:
        raise HeaderError(path, f"member {info.filename} runs past the end of the file: truncated?")
    return start


def _is_count(value: object) -> bool:
    # bool is an int subclass: a dimension `True` must not pass as 1 (it would be written as `true`).
    return type(value) is int and 0 <= value < 2**63


def _dims(value: object) -> tuple[int, ...] | None:
    """`value` as a shape or stride (a tuple or list of at most MAX_DIMS counts), else None."""
    if type(value) not in (tuple, list) or len(value) > MAX_DIMS or not all(_is_count(d) for d in value):
        return None
    return tuple(value)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))
