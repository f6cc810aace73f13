"""Builders of hostile inputs shared by the parser tests and the fuzz targets: pickle bombs,
hand-assembled `.bin` state dicts, YAML alias bombs, tensor names with terminal escapes.

Each builder writes only into the folder it is given and returns small bytes or a path.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

# -- pickle opcodes (protocol 2), assembled by hand so a test can say exactly what the file does --

PROTO2 = b"\x80\x02"
MARK, TUPLE, EMPTY_TUPLE, EMPTY_DICT = b"(", b"t", b")", b"}"
SETITEM, REDUCE, BUILD, BINPERSID, STOP = b"s", b"R", b"b", b"Q", b"."
NEWFALSE, NEWTRUE, DUP = b"\x89", b"\x88", b"2"


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(value: str) -> bytes:
    raw = value.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def integer(value: int) -> bytes:
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = pickle.encode_long(value)  # type: ignore[attr-defined]
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def tup(*items: bytes) -> bytes:
    return MARK + b"".join(items) + TUPLE


def tensor_entry(
    name: str,
    shape: tuple[object, ...] = (2,),
    *,
    storage: str = "FloatStorage",
    key: str = "0",
    numel: int = 2,
    storage_state: dict[str, str] | None = None,
) -> bytes:
    """`SETITEM name -> _rebuild_tensor_v2(storage, 0, shape, strides, False, OrderedDict())`.

    `shape` items may be ints or True/False (pickled as booleans); `storage_state` adds a BUILD
    that sets attributes on the storage type (what a hostile file can do)."""

    def item(v: object) -> bytes:
        return (NEWTRUE if v else NEWFALSE) if isinstance(v, bool) else integer(int(v))  # type: ignore[arg-type]

    storage_type = glob("torch", storage)
    if storage_state:
        state = EMPTY_DICT + b"".join(text(k) + text(v) + SETITEM for k, v in storage_state.items())
        storage_type += state + BUILD
    pid = tup(text("storage"), storage_type, text(key), text("cpu"), integer(numel)) + BINPERSID
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(int(d), 1)  # type: ignore[call-overload]
    args = tup(
        pid,
        integer(0),
        tup(*(item(d) for d in shape)),
        tup(*(integer(s) for s in reversed(strides))),
        NEWFALSE,
        glob("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE,
    )
    return text(name) + glob("torch._utils", "_rebuild_tensor_v2") + args + REDUCE + SETITEM


def state_dict_pickle(*entries: bytes) -> bytes:
    return PROTO2 + EMPTY_DICT + b"".join(entries) + STOP


def write_bin(path: Path, pickled: bytes, storages: dict[str, bytes] | None = None, *, deflate: bool = False) -> Path:
    """A zip-format `.bin`: `archive/data.pkl` (deflated when asked) and STORED storages."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(
            zipfile.ZipInfo("archive/data.pkl"),
            pickled,
            compress_type=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED,
        )
        z.writestr("archive/byteorder", b"little")
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)
    return path


def nested_tuple(levels: int) -> bytes:
    """A tuple of two references to a tuple of two references...: `levels` deep, 2**levels leaves
    when expanded (hashing, comparing or printing it walks them all), 4 bytes a level."""
    return integer(1) + b"".join(DUP + b"\x86" for _ in range(levels))  # TUPLE2 of the top twice


# Pickle bombs: (pickle bytes, deflated?). Each is small on disk or cheap per byte and, read
# naively, takes more than a gigabyte or hangs.
PICKLE_BOMBS: dict[str, tuple[bytes, bool]] = {
    # the file: 16 KB on disk, 16 MB of EMPTY_LIST (1.15 GB, 10.5 s before the budget)
    "deflated-empty-lists": (PROTO2 + b"]" * (16 << 20) + STOP, True),
    # 12 MB of EMPTY_DICT, stored: under the size cap, refused by the opcode budget
    "stored-empty-dicts": (PROTO2 + b"}" * (12 << 20) + STOP, False),
    # one LONG_BINPUT of index 80M: the C unpickler sizes (and zeroes) its memo by it: 1.3 GB
    "memo-index": (PROTO2 + b"]" + b"r" + struct.pack("<I", 80_000_000) + STOP, False),
    # a dict key of 2**40 leaves: hashing it never ends
    "hash-key": (PROTO2 + EMPTY_DICT + nested_tuple(40) + integer(0) + SETITEM + STOP, False),
}


# -- YAML ------------------------------------------------------------------------------------------


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """Billion laughs: `levels` anchored lists of `width` aliases of the previous one."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    lines.append(f"merge_method: *a{levels - 1}")
    lines.append(f"models: *a{levels - 1}")
    return "\n".join(lines) + "\n"


# -- names that are terminal commands ------------------------------------------------------------

ESCAPE_NAMES = [
    "model.\x1b[2J\x1b[31mred.weight",  # clear the screen, then colour
    "model.\x1b]8;;http://evil/\x07link\x1b]8;;\x07.weight",  # OSC 8 hyperlink
    "model.\x9b31mcsi.weight",  # one-byte CSI
    "model.\u202eevil.weight",  # right-to-left override
    "model.line\nbreak.weight",
]
