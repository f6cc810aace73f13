"""Unit tests of the header readers: safetensors headers (parse/read/build) and `.bin` tensor tables.

Headers come from strangers, so every malformed shape of them must end in a `HeaderError` that
names the file, never in a crash, a huge allocation or (for pickles) code execution.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lazymerge.constants import DTYPE_SIZES, SAFETENSORS_MAX_HEADER
from lazymerge.errors import HeaderError, LazyMergeError
from lazymerge.io.header import build_header, parse_header, read_header
from lazymerge.io.torchbin import read_bin_tensors


def encode(obj: object, *, pad: int = 0) -> bytes:
    """An 8-byte length prefix + JSON, as a safetensors header."""
    text = json.dumps(obj).encode() + b" " * pad
    return len(text).to_bytes(8, "little") + text


def write_raw(path: Path, header: object, data: bytes) -> Path:
    path.write_bytes((header if isinstance(header, bytes) else encode(header)) + data)
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# -- build_header ---------------------------------------------------------------------------------


def test_build_header_round_trips_through_safetensors(tmp_path: Path) -> None:
    tensors = {
        "b.half": torch.arange(6, dtype=torch.float16).reshape(2, 3),
        "a.byte": torch.arange(5, dtype=torch.uint8),
        "c.f32": torch.randn(3, 4),
        "a.f32": torch.randn(7),
        "d.empty": torch.zeros(0, 3, dtype=torch.bfloat16),
        "e.i64": torch.arange(3, dtype=torch.int64),
    }
    dtypes = {torch.float16: "F16", torch.uint8: "U8", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}
    entries = [(n, dtypes[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    prefix, offsets = build_header(entries, {"format": "pt", "note": "x"})
    assert (len(prefix) - 8) % 8 == 0, "header must be padded so the data buffer is 8-aligned"
    assert int.from_bytes(prefix[:8], "little") == len(prefix) - 8
    # Largest dtype first, then by name; contiguous from 0.
    order = sorted(offsets, key=lambda n: offsets[n][0])
    assert order == ["e.i64", "a.f32", "c.f32", "b.half", "d.empty", "a.byte"]
    data = bytearray(max(end for _, end in offsets.values()))
    for name, (begin, end) in offsets.items():
        data[begin:end] = tensors[name].contiguous().view(torch.uint8).numpy().tobytes()
    path = tmp_path / "built.safetensors"
    path.write_bytes(prefix + bytes(data))
    with safe_open(path, "pt") as f:  # the reference reader accepts it
        assert f.metadata() == {"format": "pt", "note": "x"}
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)
    parsed = read_header(path)
    assert parsed.metadata == {"format": "pt", "note": "x"}
    assert parsed.data_start == len(prefix)
    assert {n: (e.begin, e.end) for n, e in parsed.tensors.items()} == offsets
    assert json.loads(prefix[8:])  # valid JSON despite the space padding
    assert next(iter(json.loads(prefix[8:]))) == "__metadata__"


def test_build_header_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        build_header([("x", "F32", (2,)), ("x", "F16", (2,))])


def test_build_header_without_tensors_or_metadata() -> None:
    prefix, offsets = build_header([])
    assert offsets == {}
    header = parse_header(prefix, file_size=len(prefix))
    assert header.tensors == {} and header.metadata == {} and header.data_size == 0


# -- read_header / parse_header on valid files -----------------------------------------------------


def test_read_header_matches_safetensors_writer(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(4, 5), "b": torch.randn(5).half(), "i": torch.arange(3)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    header = read_header(path)
    assert header.file_size == path.stat().st_size
    assert header.metadata == {"format": "pt"}
    raw = path.read_bytes()
    for name, t in tensors.items():
        e = header.tensors[name]
        assert e.dtype == {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64"}[t.dtype]
        assert e.shape == tuple(t.shape) and e.numel == t.numel()
        assert e.nbytes == t.numel() * DTYPE_SIZES[e.dtype]
        got = raw[header.data_start + e.begin : header.data_start + e.end]
        assert got == t.contiguous().view(torch.uint8).numpy().tobytes()


def test_parse_header_accepts_zero_sized_tensors_and_padding() -> None:
    obj = {"a": entry("F32", [0, 4], 0, 0), "b": entry("F16", [2], 0, 4), "c": entry("BF16", [0], 4, 4)}
    data = encode(obj, pad=5) + b"\0" * 4
    header = parse_header(data, file_size=len(data))
    assert header.tensors["b"].nbytes == 4 and header.tensors["a"].numel == 0


def test_parse_header_without_file_size_skips_the_size_check() -> None:
    data = encode({"a": entry("F32", [2], 0, 8)})  # no data bytes at all
    assert parse_header(data).tensors["a"].end == 8
    with pytest.raises(HeaderError, match="truncated"):
        parse_header(data, file_size=len(data))


# -- malformed headers ---------------------------------------------------------------------------

BAD_HEADERS = {
    "not json": (lambda: _with_json(b'{"a": {"dtype": "F32",'), "not valid UTF-8 JSON"),
    "not utf-8": (lambda: _with_json(b'{"\xff\xfe": {}}'), "not valid UTF-8 JSON"),
    "json list": (lambda: _with_json(b"[1, 2, 3]"), "not an object"),
    "deep nesting": (lambda: _with_json(b"[" * 100_000 + b"]" * 100_000), "not valid UTF-8 JSON"),
    "entry not object": (lambda: encode({"a": [1, 2]}), "'a' is not an object"),
    "unknown dtype": (lambda: encode({"a": entry("F33", [1], 0, 4)}), "unknown dtype 'F33'"),
    "missing dtype": (lambda: encode({"a": {"shape": [1], "data_offsets": [0, 4]}}), "unknown dtype None"),
    "negative dim": (lambda: encode({"a": entry("F32", [-1], 0, 4)}), "invalid shape"),
    "bool dim": (lambda: encode({"a": entry("F32", [True], 0, 4)}), "invalid shape"),
    "float dim": (lambda: encode({"a": entry("F32", [1.0], 0, 4)}), "invalid shape"),
    "shape not list": (lambda: encode({"a": entry("F32", 4, 0, 16)}), "invalid shape"),  # type: ignore[arg-type]
    "offsets reversed": (lambda: encode({"a": entry("F32", [0], 4, 0)}), "invalid data_offsets"),
    "offsets too many": (
        lambda: encode({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}),
        "invalid data_offsets",
    ),
    "offset negative": (lambda: encode({"a": entry("F32", [1], -4, 0)}), "invalid data_offsets"),
    "offset huge": (lambda: encode({"a": entry("U8", [1], 2**64, 2**64 + 1)}), "invalid data_offsets"),
    "size mismatch": (lambda: encode({"a": entry("F32", [2, 2], 0, 12)}), "spans 12 bytes but F32 [2, 2] needs 16"),
    "overlap": (
        lambda: encode({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}),
        "'b' overlaps",
    ),
    "hole": (
        lambda: encode({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}),
        "hole of 4 bytes before 'b'",
    ),
    "hole at start": (lambda: encode({"a": entry("F32", [1], 4, 8)}), "hole of 4 bytes before 'a'"),
    "metadata not str": (lambda: encode({"__metadata__": {"format": 1}}), "__metadata__"),
    "metadata list": (lambda: encode({"__metadata__": ["pt"]}), "__metadata__"),
    "header length 0": (lambda: (0).to_bytes(8, "little"), "too small"),
    "header too large": (lambda: (SAFETENSORS_MAX_HEADER + 1).to_bytes(8, "little") + b"{}", "100 MB limit"),
    "header length absurd": (lambda: (2**64 - 1).to_bytes(8, "little") + b"{}", "100 MB limit"),
    "header past data": (lambda: (1000).to_bytes(8, "little") + b'{"a": 1}', "runs past the end"),
    "too short": (lambda: b"\x05\x00", "too short"),
}


def _with_json(text: bytes) -> bytes:
    return len(text).to_bytes(8, "little") + text


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_parse_header_rejects(case: str) -> None:
    make, message = BAD_HEADERS[case]
    data = make()
    with pytest.raises(HeaderError) as info:
        parse_header(data, source="shard.safetensors")
    assert message in str(info.value)
    assert str(info.value).startswith("shard.safetensors: ")
    assert info.value.hint  # every header error tells the user what to do
    assert isinstance(info.value, LazyMergeError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_read_header_rejects_the_same_files(tmp_path: Path, case: str) -> None:
    make, message = BAD_HEADERS[case]
    path = tmp_path / "bad.safetensors"
    data = make()
    path.write_bytes(data + b"\0" * 64 if case == "header length absurd" else data)
    with pytest.raises(HeaderError) as info:
        read_header(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def _good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.safetensors"
    save_file({"a": torch.randn(8, 8), "b": torch.randn(8).half()}, path, metadata={"format": "pt"})
    return path


def test_read_header_truncated_in_data_area(tmp_path: Path) -> None:
    path = _good_file(tmp_path)
    size = path.stat().st_size
    os.truncate(path, size - 10)
    with pytest.raises(HeaderError, match=r"need \d+ data bytes but the file holds \d+: truncated\?"):
        read_header(path)


def test_read_header_truncated_in_header(tmp_path: Path) -> None:
    path = _good_file(tmp_path)
    n = int.from_bytes(path.read_bytes()[:8], "little")
    os.truncate(path, 8 + n // 2)
    with pytest.raises(HeaderError, match="runs past the end of the file"):
        read_header(path)


@pytest.mark.parametrize("size", [0, 3, 7])
def test_read_header_file_too_short(tmp_path: Path, size: int) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01" * size)
    with pytest.raises(HeaderError, match=f"file is {size} bytes"):
        read_header(path)


def test_read_header_trailing_bytes(tmp_path: Path) -> None:
    path = _good_file(tmp_path)
    with open(path, "ab") as f:
        f.write(b"junk")
    with pytest.raises(HeaderError, match="4 trailing bytes"):
        read_header(path)


def test_read_header_out_of_range_offsets(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "oor.safetensors", {"a": entry("F32", [250], 0, 1000)}, b"\0" * 16)
    with pytest.raises(HeaderError, match="need 1000 data bytes but the file holds 16"):
        read_header(path)


def test_read_header_absurd_length_does_not_allocate(tmp_path: Path) -> None:
    # A header claiming 2**63 bytes must fail on the length check, before any read of that size.
    path = tmp_path / "absurd.safetensors"
    path.write_bytes((2**63).to_bytes(8, "little") + b"{}")
    with pytest.raises(HeaderError, match="100 MB limit"):
        read_header(path)


def test_read_header_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(HeaderError, match="cannot read"):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(HeaderError, match="cannot read"):
        read_header(tmp_path)


# -- .bin (PyTorch zip) tensor tables --------------------------------------------------------------

BIN_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16",
    torch.uint32: "U32",
}


def test_read_bin_tensors_locates_every_dtype(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for dtype, name in BIN_DTYPES.items():
        state[f"t.{name}"] = (torch.randn(3, 5, generator=g) * 10).to(torch.int32).to(dtype)
    base = torch.randn(10, 4, generator=g)
    state["shared.full"] = base
    state["shared.tail"] = base[6:]  # a view: same storage, non-zero storage offset
    state["param"] = torch.nn.Parameter(torch.randn(4, generator=g))
    state["scalar"] = torch.tensor(3.5)
    state["empty"] = torch.zeros(0, 7)
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    found = {t.name: t for t in read_bin_tensors(path)}
    assert list(found) == list(state)
    raw = path.read_bytes()
    for name, tensor in state.items():
        t = found[name]
        expected = tensor.detach().contiguous()
        assert t.dtype == BIN_DTYPES[expected.dtype], name
        assert t.shape == tuple(expected.shape), name
        assert t.nbytes == expected.numel() * expected.element_size(), name
        assert raw[t.offset : t.offset + t.nbytes] == expected.reshape(-1).view(torch.uint8).numpy().tobytes(), name


def test_read_bin_tensors_rejects_non_contiguous(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    torch.save({"w.t": torch.randn(3, 4).t()}, path)
    with pytest.raises(HeaderError, match=r"'w\.t' is not contiguous"):
        read_bin_tensors(path)


def _zip_with_pickle(path: Path, payload: bytes, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", b"little")
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return path


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalEvil:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "nested", "persistent"])
def test_read_bin_tensors_never_runs_pickled_code(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    if kind == "os.system":
        payload = pickle.dumps({"w": _Evil(f"touch {marker}")}, protocol=2)
    elif kind == "builtins.eval":
        payload = pickle.dumps({"w": _EvalEvil(f"open({str(marker)!r}, 'w')")}, protocol=4)
    elif kind == "nested":  # hidden inside an allowed container
        payload = pickle.dumps({"w": [1, {"x": _Evil(f"touch {marker}")}]}, protocol=2)
    else:  # a persistent id that is not a storage record

        class P(pickle.Pickler):
            def persistent_id(self, obj):
                return ("evil", str(marker)) if obj == "x" else None

        buf = io.BytesIO()
        P(buf, protocol=2).dump({"w": "x"})
        payload = buf.getvalue()
    path = _zip_with_pickle(tmp_path / "evil.bin", payload)
    with pytest.raises(HeaderError) as info:
        read_bin_tensors(path)
    assert str(path) in str(info.value)
    assert not marker.exists(), "the pickle's payload ran"
    if kind in ("os.system", "nested"):
        assert "system" in str(info.value) and "never needs" in str(info.value)


def test_read_bin_tensors_truncated(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"a": torch.randn(64, 64)}, path)
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(HeaderError, match="not a zip-format PyTorch checkpoint"):
        read_bin_tensors(path)


def test_read_bin_tensors_garbage_and_legacy(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(HeaderError, match="not a zip-format"):
        read_bin_tensors(garbage)
    legacy = tmp_path / "legacy.bin"
    torch.save({"a": torch.randn(4)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(HeaderError, match="not a zip-format"):
        read_bin_tensors(legacy)
    with pytest.raises(HeaderError, match="cannot read"):
        read_bin_tensors(tmp_path / "missing.bin")


def test_read_bin_tensors_corrupt_pickle(tmp_path: Path) -> None:
    path = _zip_with_pickle(tmp_path / "c.bin", b"\x80\x02}q\x00(X\x01\x00\x00\x00a")  # cut mid-stream
    with pytest.raises(HeaderError, match="cannot read the pickled state dict"):
        read_bin_tensors(path)


def test_read_bin_tensors_corrupt_member_crc(tmp_path: Path) -> None:
    # Flip a byte inside data.pkl: the zip CRC check fails while unpickling.
    path = tmp_path / "pytorch_model.bin"
    torch.save({"a": torch.randn(4)}, path)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("pytorch_model/data.pkl") if "pytorch_model/data.pkl" in z.namelist() else None
        info = info or next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size - 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(HeaderError):
        read_bin_tensors(path)


def test_read_bin_tensors_structural_problems(tmp_path: Path) -> None:
    no_pkl = tmp_path / "nopkl.bin"
    with zipfile.ZipFile(no_pkl, "w") as z:
        z.writestr("hello.txt", b"hi")
    with pytest.raises(HeaderError, match=r"no <root>/data\.pkl"):
        read_bin_tensors(no_pkl)

    not_dict = tmp_path / "list.bin"
    torch.save([torch.randn(2)], not_dict)
    with pytest.raises(HeaderError, match="not a state dict"):
        read_bin_tensors(not_dict)

    not_tensor = tmp_path / "int.bin"
    torch.save({"step": 3}, not_tensor)
    with pytest.raises(HeaderError, match=r"'step'.* is not a tensor"):
        read_bin_tensors(not_tensor)

    big_endian = tmp_path / "be.bin"
    _rewrite_zip(_saved(tmp_path), big_endian, replace={"byteorder": b"big"})
    with pytest.raises(HeaderError, match="big-endian"):
        read_bin_tensors(big_endian)

    compressed = tmp_path / "deflated.bin"
    _rewrite_zip(_saved(tmp_path), compressed, compress=zipfile.ZIP_DEFLATED)
    with pytest.raises(HeaderError, match="compressed"):
        read_bin_tensors(compressed)

    missing_storage = tmp_path / "nostorage.bin"
    _rewrite_zip(_saved(tmp_path), missing_storage, drop="/data/0")
    with pytest.raises(HeaderError, match="missing from the archive"):
        read_bin_tensors(missing_storage)

    short_storage = tmp_path / "short.bin"
    _rewrite_zip(_saved(tmp_path), short_storage, replace={"/data/0": b"\0" * 4})
    with pytest.raises(HeaderError, match="shorter than"):
        read_bin_tensors(short_storage)


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "src.bin"
    torch.save({"a": torch.randn(16)}, path)
    return path


def _rewrite_zip(
    src: Path,
    dst: Path,
    *,
    replace: dict[str, bytes] | None = None,
    drop: str | None = None,
    compress: int = zipfile.ZIP_STORED,
) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compress) as zout:
        for info in zin.infolist():
            if drop and info.filename.endswith(drop):
                continue
            data = zin.read(info)
            for suffix, new in (replace or {}).items():
                if info.filename.endswith(suffix):
                    data = new
            zout.writestr(info.filename, data, compress_type=compress)


@pytest.mark.parametrize(
    "text",
    [
        b'{"__metadata__":{"format":"pt"},"__metadata__":{"format":"np"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        b'{"a":{"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]}}',
        b'{"__metadata__":{"format":"pt","format":"np"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    ],
)
def test_parse_header_refuses_a_duplicate_key(text: bytes) -> None:
    # safetensors (serde) refuses these; json.loads kept the last one, so two readers saw two files.
    text += b" " * (-len(text) % 8)
    with pytest.raises(HeaderError, match="twice"):
        parse_header(len(text).to_bytes(8, "little") + text + bytes(4), file_size=8 + len(text) + 4)
