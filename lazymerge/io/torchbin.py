"""Read the tensor table of a PyTorch zip checkpoint (`pytorch_model*.bin`) without torch.

A zip checkpoint holds `<root>/data.pkl` (the state dict, pickled with storages as persistent
ids) and one STORED (uncompressed) member `<root>/data/<key>` per storage. We unpickle data.pkl
with an allow-list unpickler that only knows the handful of globals a plain state dict uses and
turns every tensor into a (storage, offset, shape) record, so nothing arbitrary is ever built or
called. Each contiguous tensor is then a byte range of the .bin file itself, read exactly like a
safetensors tensor: no torch, no copy, no full load.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lazymerge.constants import DTYPE_SIZES
from lazymerge.errors import HeaderError

__all__ = ["BinTensor", "read_bin_tensors"]

_MAX_PICKLE_BYTES = 256 * 1024 * 1024

# torch dtype globals, as `_rebuild_tensor_v3` pickles them for dtypes without a typed storage.
_TORCH_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}

_STORAGE_DTYPES = {
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "DoubleStorage": "F64",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
    "Float8_e4m3fnStorage": "F8_E4M3",
    "Float8_e5m2Storage": "F8_E5M2",
}


@dataclass(frozen=True)
class BinTensor:
    """One tensor of a .bin archive as a byte range of the archive file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the .bin file
    nbytes: int


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _TensorRecord:
    storage: _StorageRef
    storage_offset: int  # in elements of `dtype`
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class _DtypeMarker:
    dtype: str


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _TensorRecord(storage, int(storage_offset), tuple(size), tuple(stride), storage.dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, _grad, _hooks, dtype, *_ignored):
    # Used for dtypes without a typed storage (float8, uint16...): the storage is untyped bytes.
    if not isinstance(dtype, _DtypeMarker):
        raise ValueError("bad dtype in _rebuild_tensor_v3")
    return _TensorRecord(storage, int(storage_offset), tuple(size), tuple(stride), dtype.dtype)


def _rebuild_parameter(data, *_ignored):
    return data


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals of a plain tensor state dict."""

    def __init__(self, file, source: object) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return _rebuild_tensor_v3
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch.storage" and name == "UntypedStorage":
            return _StorageType("ByteStorage")
        if module == "torch" and name in _TORCH_DTYPES:
            return _DtypeMarker(_TORCH_DTYPES[name])
        raise HeaderError(
            self._source,
            f"the pickle references {module}.{name}, which a plain state dict never needs",
            hint="only tensor state dicts are read; re-save the model with save_pretrained",
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise HeaderError(self._source, f"unexpected persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:]
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
            raise HeaderError(self._source, "malformed storage record in the pickle")
        return _StorageRef(str(key), storage_type.dtype, numel)


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
        pkl_info = members[pkl_name]
        if pkl_info.file_size > _MAX_PICKLE_BYTES:
            raise HeaderError(path, f"data.pkl is {pkl_info.file_size} bytes; refusing to read it")
        try:
            with zf.open(pkl_info) as f:
                state = _StateDictUnpickler(f, path).load()
        except HeaderError:
            raise
        except Exception as exc:  # any malformed pickle: one clear error, never a crash
            raise HeaderError(path, f"cannot read the pickled state dict ({type(exc).__name__})") from None
        if not isinstance(state, dict):
            raise HeaderError(path, "the pickle is not a state dict")
        size = raw.seek(0, os.SEEK_END)
        return [_locate(path, raw, size, members, root, name, record) for name, record in state.items()]


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


def _locate(path: object, raw, size: int, members: dict, root: str, name: object, record: object) -> BinTensor:
    if not isinstance(name, str) or not isinstance(record, _TensorRecord):
        raise HeaderError(path, f"state dict entry {name!r:.80} is not a tensor")
    storage = record.storage
    itemsize = DTYPE_SIZES[record.dtype]
    capacity = storage.numel * DTYPE_SIZES[storage.dtype]  # storage size in bytes
    shape = record.shape
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise HeaderError(path, f"tensor {name!r} has an invalid shape {shape!r}")
    numel = math.prod(shape)
    if numel > 1 and record.stride != _contiguous_strides(shape):
        raise HeaderError(
            path,
            f"tensor {name!r} is not contiguous in its storage",
            hint="re-save the model with save_pretrained or convert it to safetensors",
        )
    if record.storage_offset < 0 or (record.storage_offset + numel) * itemsize > capacity:
        raise HeaderError(path, f"tensor {name!r} lies outside its storage")
    info = members.get(f"{root}/data/{storage.key}")
    if info is None:
        raise HeaderError(path, f"storage {storage.key} of tensor {name!r} is missing from the archive")
    if info.compress_type != zipfile.ZIP_STORED:
        raise HeaderError(path, f"storage {storage.key} is compressed; cannot read it lazily")
    if info.file_size < capacity:
        raise HeaderError(path, f"storage {storage.key} is shorter than its {storage.numel} elements")
    start = _member_data_offset(path, raw, size, info)
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


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))
