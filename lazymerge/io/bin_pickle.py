"""Unpickle the `data.pkl` of a PyTorch zip checkpoint on a budget, building nothing arbitrary.

The pickle comes from a stranger. Two defences:

- **Nothing is called or built but a tensor table.** `find_class` knows only the globals a plain
  state dict uses, and each becomes an inert record (`TensorRecord`, `StorageRef`): no code from
  the file ever runs.
- **Work is bounded by what a real checkpoint needs, not by the input.** A pickle opcode of one
  byte can build a 60-200-byte object, and the C unpickler sizes its memo by an index read from
  the file: 16 MB of `EMPTY_LIST` took 1.2 GB, one `LONG_BINPUT` of 9 bytes took 1.3 GB. So the
  pure-Python unpickler runs with every opcode counted against a budget sized for the largest
  plausible state dict (`MAX_TENSORS` tensors of about 40 opcodes each); opcodes a state dict
  never uses (sets, buffers, instance creation, extensions) are refused; and the handful whose
  cost is not one object (BUILD copies its state, OrderedDict(...) copies its argument, a dict
  key is hashed) are replaced by versions that copy nothing. Whatever the input, a refusal comes
  within `MAX_OPS` opcodes: measured, at most ~115 MB peak RSS for the whole process (16 MB of
  MEMOIZE) and under 2 s; a real state dict reads ~1.5x slower than with the C unpickler
  (0.16 s for 3,500 tensors).
"""

from __future__ import annotations

import io
import pickle
import pickletools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "MAX_DIMS",
    "MAX_NAME",
    "MAX_OPS",
    "MAX_TENSORS",
    "PickleRefused",
    "StorageRef",
    "TensorRecord",
    "load_state_dict",
]

# More tensors than any single `.bin` weight file holds (the largest seen: ~5k, an MoE).
MAX_TENSORS = 16_384
# A torch.save'd state dict takes ~36 opcodes a tensor (its `_metadata` included); 64 is headroom.
MAX_OPS = 64 * MAX_TENSORS
# A tensor has at most this many dimensions (torch caps at 64 too).
MAX_DIMS = 64
# The longest tensor name (a state dict key) accepted; real ones are under 200 characters.
MAX_NAME = 4096


class PickleRefused(Exception):
    """The pickle is not a plain state dict or exceeds the budget (the caller adds the file name)."""


@dataclass(frozen=True)
class StorageRef:
    """A storage as its persistent id names it: zip member `data/<key>`, dtype, element count."""

    key: object
    dtype: str
    numel: object


@dataclass(frozen=True)
class TensorRecord:
    """A tensor as the pickle describes it; values are as found (the caller validates them)."""

    storage: object
    storage_offset: object
    shape: object
    stride: object
    dtype: object


@dataclass(frozen=True)
class _DtypeMarker:
    dtype: str


@dataclass(frozen=True)
class _StorageType:
    dtype: str


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
_STORAGE_TYPES = {name: _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()}
_DTYPE_MARKERS = {name: _DtypeMarker(dtype) for name, dtype in _TORCH_DTYPES.items()}


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> TensorRecord:
    dtype = storage.dtype if isinstance(storage, StorageRef) else None
    return TensorRecord(storage, storage_offset, size, stride, dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, _grad, _hooks, dtype, *_ignored) -> TensorRecord:
    # Used for dtypes without a typed storage (float8, uint16...): the storage is untyped bytes.
    if not isinstance(dtype, _DtypeMarker):
        raise PickleRefused("the pickle calls _rebuild_tensor_v3 without a torch dtype")
    return TensorRecord(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, *_ignored):
    return data


def _ordered_dict(*args) -> OrderedDict:
    # OrderedDict pickles as OrderedDict() + SETITEMS; an argument would be a copy made for free.
    if args:
        raise PickleRefused("the pickle calls OrderedDict with arguments, which a plain state dict never does")
    return OrderedDict()


def _globals(module: str, name: str) -> object | None:
    if module == "collections" and name == "OrderedDict":
        return _ordered_dict
    if module == "torch._utils":
        return {
            "_rebuild_tensor": _rebuild_tensor,
            "_rebuild_tensor_v2": _rebuild_tensor,
            "_rebuild_tensor_v3": _rebuild_tensor_v3,
            "_rebuild_parameter": _rebuild_parameter,
        }.get(name)
    if module == "torch":
        return _STORAGE_TYPES.get(name) or _DTYPE_MARKERS.get(name)
    if module == "torch.storage" and name == "UntypedStorage":
        return _STORAGE_TYPES["ByteStorage"]
    return None


# -- the opcode table ----------------------------------------------------------------------------

# Opcodes a tensor state dict never needs, each a way to build objects or run code cheaply.
_REFUSED = {
    "EMPTY_SET",
    "ADDITEMS",
    "FROZENSET",
    "BYTEARRAY8",
    "NEXT_BUFFER",
    "READONLY_BUFFER",
    "EXT1",
    "EXT2",
    "EXT4",
    "INST",
    "OBJ",
    "NEWOBJ",
    "NEWOBJ_EX",
}
_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
_Load = Callable[["_BudgetUnpickler"], None]


def _check_key(key: object) -> None:
    # Hashing a nested tuple costs its expanded size (2**k for k shared levels), a big int its
    # length each time, and two equal long strings are compared in full: keys are short strings.
    if type(key) is not str:
        raise PickleRefused(f"the pickle has a dict key of type {type(key).__name__}, which a state dict never has")
    if len(key) > MAX_NAME:
        raise PickleRefused(f"the pickle has a dict key of {len(key):,} characters (at most {MAX_NAME:,})")


def _load_setitem(self: _BudgetUnpickler) -> None:
    stack = self.stack
    value = stack.pop()
    key = stack.pop()
    _check_key(key)
    target = stack[-1]
    if not isinstance(target, dict):
        raise PickleRefused(f"the pickle sets an item of a {type(target).__name__}")
    target[key] = value


def _load_setitems(self: _BudgetUnpickler) -> None:
    items = self.pop_mark()
    target = self.stack[-1]
    if not isinstance(target, dict):
        raise PickleRefused(f"the pickle sets items of a {type(target).__name__}")
    for i in range(0, len(items) - 1, 2):
        _check_key(items[i])
        target[items[i]] = items[i + 1]


def _load_dict(self: _BudgetUnpickler) -> None:
    items = self.pop_mark()
    for key in items[::2]:
        _check_key(key)
    self.append({items[i]: items[i + 1] for i in range(0, len(items) - 1, 2)})


def _load_build(self: _BudgetUnpickler) -> None:
    # A state dict's BUILD sets `_metadata` on an OrderedDict; nothing here reads it, so the
    # state is dropped rather than copied (a copy per BUILD would multiply a shared state).
    self.stack.pop()
    if type(self.stack[-1]) is not OrderedDict:
        raise PickleRefused(f"the pickle sets the state of a {type(self.stack[-1]).__name__} (BUILD)")


_OVERRIDES: dict[str, _Load] = {
    "SETITEM": _load_setitem,
    "SETITEMS": _load_setitems,
    "DICT": _load_dict,
    "BUILD": _load_build,
}


def _refuse(name: str) -> _Load:
    def load(self: _BudgetUnpickler) -> None:
        raise PickleRefused(f"the pickle uses opcode {name}, which a plain state dict never needs")

    return load


def _counted(load: _Load) -> _Load:
    def op(self: _BudgetUnpickler) -> None:
        self.ops_left -= 1
        if self.ops_left < 0:
            raise PickleRefused(
                f"the pickle runs more than {MAX_OPS:,} opcodes, more than a state dict of {MAX_TENSORS:,} tensors needs"
            )
        load(self)

    return op


def _dispatch() -> dict[int, _Load]:
    table: dict[int, _Load] = {}
    for code in range(256):
        name = _NAMES.get(code, f"0x{code:02x}")
        load = _OVERRIDES.get(name) or pickle._Unpickler.dispatch.get(code)  # type: ignore[attr-defined]
        table[code] = _refuse(name) if load is None or name in _REFUSED else _counted(load)
    return table


class _BudgetUnpickler(pickle._Unpickler):  # type: ignore[name-defined]  # the pure-Python one: per-opcode hooks
    dispatch = _dispatch()

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.ops_left = MAX_OPS

    def find_class(self, module: str, name: str) -> object:
        found = _globals(module, name)
        if found is None:
            raise PickleRefused(
                f"the pickle references {module[:80]}.{name[:80]}, which a plain state dict never needs"
            )
        return found

    def persistent_load(self, pid: object) -> StorageRef:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise PickleRefused(f"the pickle has an unexpected persistent id (a {type(pid).__name__})")
        storage_type, key, _location, numel = pid[1:]
        if not isinstance(storage_type, _StorageType):
            raise PickleRefused("the pickle has a storage record without a storage type")
        return StorageRef(key, storage_type.dtype, numel)


def load_state_dict(data: bytes) -> object:
    """Unpickle `data` (a `data.pkl`) into plain dicts of `TensorRecord`, within the budget.

    Raises:
        PickleRefused: a global, opcode or persistent id a state dict never uses, or more than
            `MAX_OPS` opcodes.
        Exception: anything else a malformed pickle raises (the caller reports it in one line).
    """
    return _BudgetUnpickler(data).load()
