"""Property tests of the parsers that read files from strangers.

The safetensors header parser, the index loader (`open_checkpoint` on a folder with an index) and
the `.bin` tensor-table reader get random and mutated inputs. Each must either return a validated
result or raise the library's own `LazyMergeError`: never another exception, and never allocate
memory sized by a number in the input. Pickle bombs (cheap opcodes repeated) and YAML alias bombs
must stay within memory proportional to their size, and tensor names with terminal escapes must
reach the printed table escaped. `benchmarks/fuzz_parsers.py` runs the same properties for much
longer.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import shutil
import tempfile
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazymerge.constants import DTYPE_SIZES, SAFETENSORS_MAX_HEADER
from lazymerge.errors import LazyMergeError
from lazymerge.io.checkpoint import open_checkpoint
from lazymerge.io.header import SafetensorsHeader, build_header, parse_header, read_header
from lazymerge.io.torchbin import read_bin_tensors

COUNTS: collections.Counter[str] = collections.Counter()  # examples run per target (for the benchmark)

FUZZ = settings(
    max_examples=int(os.environ.get("LAZYMERGE_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    derandomize=os.environ.get("LAZYMERGE_FUZZ_RANDOM") is None,
)


# -- strategies ----------------------------------------------------------------------------------

DTYPES = sorted(DTYPE_SIZES)
WEIRD_NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, -1, -(2**63)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
)
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
JSON_ANY = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)


@st.composite
def weird_entry(draw: st.DrawFn) -> object:
    """A tensor entry that is plausible, subtly wrong, or nonsense."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(JSON_ANY)
    dtype = draw(st.one_of(st.sampled_from(DTYPES), st.sampled_from(["F12", "f32", "", "I4"]), WEIRD_NUMBERS))
    if kind == 1:  # huge shapes whose numel x itemsize overflows any fixed-width integer
        shape = draw(st.lists(st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1]), min_size=1, max_size=4))
    else:
        shape = draw(st.lists(st.one_of(st.integers(0, 6), WEIRD_NUMBERS), max_size=4))
    begin = draw(st.one_of(st.integers(0, 64), WEIRD_NUMBERS))
    end = draw(st.one_of(st.integers(0, 256), WEIRD_NUMBERS))
    entry: dict[str, object] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    if kind == 3:
        entry["data_offsets"] = draw(st.lists(WEIRD_NUMBERS, max_size=3))
    if kind == 4:
        del entry[draw(st.sampled_from(sorted(entry)))]
    if kind == 5:
        entry["extra"] = draw(JSON_ANY)
    return entry


@st.composite
def valid_header(draw: st.DrawFn) -> tuple[bytes, int]:
    """(header bytes with a data buffer appended, file size) built by the library's own writer."""
    n = draw(st.integers(0, 5))
    entries = [
        (f"t{i}", draw(st.sampled_from(DTYPES)), tuple(draw(st.lists(st.integers(0, 5), max_size=3)))) for i in range(n)
    ]
    metadata = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)) or None
    header, offsets = build_header(entries, metadata)
    data = bytes(max((e for _, e in offsets.values()), default=0))
    return header + data, len(header) + len(data)


@st.composite
def mutated_header(draw: st.DrawFn) -> tuple[bytes, int | None]:
    raw, size = draw(valid_header())
    buf = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "length", "insert", "delete"]))
        if op == "flip" and buf:
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del buf[draw(st.integers(0, len(buf))) :]
        elif op == "length":
            n = draw(
                st.one_of(
                    st.sampled_from([0, 1, 2**40, 2**63, 2**64 - 1, SAFETENSORS_MAX_HEADER + 1]),
                    st.integers(0, 2**64 - 1),
                )
            )
            buf[:8] = n.to_bytes(8, "little")
        elif op == "insert":
            i = draw(st.integers(0, len(buf)))
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and buf:
            i = draw(st.integers(0, len(buf) - 1))
            del buf[i : i + draw(st.integers(1, 8))]
    file_size = draw(st.one_of(st.none(), st.just(len(buf)), st.just(size)))
    return bytes(buf), file_size


@st.composite
def random_json_header(draw: st.DrawFn) -> bytes:
    """A length prefix and JSON of random structure, with weird entries and metadata."""
    body: dict[str, object] = {}
    for i in range(draw(st.integers(0, 4))):
        body[draw(st.one_of(st.just(f"t{i}"), st.text(max_size=6)))] = draw(weird_entry())
    if draw(st.booleans()):
        body["__metadata__"] = draw(st.one_of(JSON_ANY, st.dictionaries(st.text(max_size=4), JSON_LEAF, max_size=3)))
    text = json.dumps(body).encode()
    if draw(st.booleans()):
        text = draw(st.sampled_from([b"[1, 2]", b"null", b"1" * 5000, b"[" * 5000, b'{"a": ' + b"9" * 5000 + b"}"]))
    text += b" " * draw(st.integers(0, 8))
    tail = draw(st.binary(max_size=64))
    return len(text).to_bytes(8, "little") + text + tail


def parse_or_own_error(data: bytes, file_size: int | None = None) -> SafetensorsHeader | None:
    COUNTS["parse_header"] += 1
    try:
        header = parse_header(data, file_size=file_size)
    except LazyMergeError:
        return None
    # What it returned is validated: spans tile the buffer and match numel x itemsize.
    position = 0
    for entry in sorted(header.tensors.values(), key=lambda t: (t.begin, t.end)):
        assert entry.begin == position
        assert entry.nbytes == entry.numel * DTYPE_SIZES[entry.dtype]
        position = entry.end
    if file_size is not None:
        assert header.data_start + position == file_size
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in header.metadata.items())
    return header


# -- the safetensors header parser ---------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=256), st.one_of(st.none(), st.integers(0, 2**40)))
def test_parse_header_random_bytes(data: bytes, file_size: int | None) -> None:
    parse_or_own_error(data, file_size)


@FUZZ
@given(st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_parse_header_random_length_prefix(n: int, rest: bytes) -> None:
    parse_or_own_error(n.to_bytes(8, "little") + rest)


@FUZZ
@given(valid_header())
def test_parse_header_accepts_what_the_writer_builds(case: tuple[bytes, int]) -> None:
    raw, size = case
    assert parse_or_own_error(raw, size) is not None


@FUZZ
@given(mutated_header())
def test_parse_header_mutated(case: tuple[bytes, int | None]) -> None:
    parse_or_own_error(*case)


@FUZZ
@given(random_json_header(), st.booleans())
def test_parse_header_random_json(data: bytes, with_size: bool) -> None:
    parse_or_own_error(data, len(data) if with_size else None)


@FUZZ
@given(st.one_of(mutated_header(), random_json_header().map(lambda d: (d, None))))
def test_parse_header_allocation_is_bounded_by_the_input(case: tuple[bytes, int | None]) -> None:
    data, file_size = case
    tracemalloc.start()
    try:
        parse_or_own_error(data, file_size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * len(data) + (1 << 20), f"{peak} bytes allocated for a {len(data)}-byte input"


@pytest.mark.parametrize("claimed", [2**40, 2**63, SAFETENSORS_MAX_HEADER + 1, 4096])
def test_read_header_refuses_a_huge_length_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, claimed: int
) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(claimed.to_bytes(8, "little") + b"{}" + bytes(64))
    reads: list[int] = []
    real_open = open

    class Spy(io.BufferedReader):
        def read(self, n: int | None = -1) -> bytes:
            reads.append(-1 if n is None else n)
            return super().read(n)

    def spy_open(file, mode="r", *args, **kw):
        f = real_open(file, mode, *args, **kw)
        if "b" in mode and Path(file) == path:
            f.close()
            return Spy(io.FileIO(file, "rb"))
        return f

    monkeypatch.setattr("builtins.open", spy_open)
    with pytest.raises(LazyMergeError, match=r"exceeds the 100 MB limit|runs past the end of the file"):
        read_header(path)
    assert reads == [8], f"read sizes after the length prefix: {reads}"


# -- the index loader ----------------------------------------------------------------------------

_MODEL_CACHE: dict[str, Path] = {}


def _template() -> Path:
    """A 2-shard safetensors model written once per session (hypothesis reuses it)."""
    if "root" not in _MODEL_CACHE:
        from conftest import write_model

        root = Path(tempfile.mkdtemp(prefix="lazymerge-fuzz-"))
        tensors = {"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.float16), "c": torch.arange(3.0)}
        write_model(root / "model", tensors, shards=2)
        _MODEL_CACHE["root"] = root
    return _MODEL_CACHE["root"] / "model"


@pytest.fixture(scope="module", autouse=True)
def _cleanup_template():
    yield
    root = _MODEL_CACHE.pop("root", None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
FILE_NAMES = st.one_of(
    st.sampled_from(SHARDS),
    st.sampled_from(
        [
            "../model-00001-of-00002.safetensors",
            "sub/../../x.safetensors",
            "/etc/passwd",
            "~/x.safetensors",
            "C:\\x.safetensors",
            "..\\x.safetensors",
            ".",
            "",
            "model.safetensors.index.json",
            "missing.safetensors",
            "x.bin",
            "a" * 300 + ".safetensors",
            "a/" * 2000 + "x.safetensors",
            "nul\x00.safetensors",
        ]
    ),
    st.text(max_size=20),
)


@st.composite
def index_document(draw: st.DrawFn) -> bytes:
    good = {"a": SHARDS[0], "b": SHARDS[0], "c": SHARDS[1]}
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.binary(max_size=128))
    if kind == 1:
        return json.dumps(draw(JSON_ANY)).encode()
    if kind == 2:  # the real index, then bytes flipped or cut
        raw = bytearray(json.dumps({"metadata": {"total_size": 26}, "weight_map": good}).encode())
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] = draw(st.integers(0, 255))
        return bytes(raw[: draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw)
    weight_map: dict[object, object] = dict(good)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.one_of(st.sampled_from(["a", "b", "c", "d"]), st.text(max_size=5)))
        weight_map[key] = draw(st.one_of(FILE_NAMES, WEIRD_NUMBERS, JSON_ANY)) if kind == 3 else draw(FILE_NAMES)
    doc: object = {"metadata": draw(JSON_ANY), "weight_map": weight_map}
    if draw(st.integers(0, 5)) == 0:
        doc = {"weight_map": draw(JSON_ANY)}
    return json.dumps(doc).encode()


@FUZZ
@given(index_document())
def test_index_loader_fuzzed(document: bytes) -> None:
    COUNTS["index loader"] += 1
    folder = Path(tempfile.mkdtemp(prefix="idx-", dir=_template().parent))
    try:
        for shard in SHARDS:
            os.link(_template() / shard, folder / shard)  # hard links: no copy, and never written
        (folder / "model.safetensors.index.json").write_bytes(document)
        try:
            ckpt = open_checkpoint(folder)
        except LazyMergeError:
            return
        # Accepted: every tensor lies in a file inside the folder, within that file.
        for ref in ckpt.tensors.values():
            path = (folder / ref.file).resolve()
            assert path.parent == folder.resolve(), ref.file
            assert ref.offset + ref.nbytes <= ckpt.file_sizes[ref.file]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize(
    "name",
    ["a" * 300 + ".safetensors", "a/" * 3000 + "x.safetensors", "x\x00.safetensors", "9" * 5000, "../" * 2],
)
def test_index_loader_odd_file_names(tmp_path: Path, name: str) -> None:
    # Found by the fuzzer: a name longer than the file system allows raised a bare OSError.
    from conftest import write_model

    model = write_model(tmp_path / "m", {"a": torch.ones(2), "b": torch.ones(3)}, shards=2)
    index = model / "model.safetensors.index.json"
    obj = json.loads(index.read_text())
    obj["weight_map"]["a"] = name
    index.write_text(json.dumps(obj))
    with pytest.raises(LazyMergeError):
        open_checkpoint(model)


def test_index_with_a_huge_number_or_deep_nesting(tmp_path: Path) -> None:
    # Found by the fuzzer: a JSON number of more than 4300 digits raised a bare ValueError.
    from conftest import write_model

    model = write_model(tmp_path / "m", {"a": torch.ones(2), "b": torch.ones(3)}, shards=2)
    index = model / "model.safetensors.index.json"
    for text in ['{"metadata": {"total_size": ' + "9" * 5000 + "}}", "[" * 100_000]:
        index.write_text(text)
        with pytest.raises(LazyMergeError, match="not valid JSON"):
            open_checkpoint(model)
    for text in [b'{"a": ' + b"9" * 5000 + b"}", b"[" * 100_000]:
        with pytest.raises(LazyMergeError, match="not valid UTF-8 JSON"):
            parse_header(len(text).to_bytes(8, "little") + text)


# -- the .bin (PyTorch zip) tensor table -------------------------------------------------------------


def _bin_template() -> bytes:
    if "bin" not in _MODEL_CACHE:
        buf = io.BytesIO()
        torch.save({"w": torch.arange(6.0).reshape(2, 3), "h": torch.ones(3, dtype=torch.float16)}, buf)
        _MODEL_CACHE["bin"] = buf.getvalue()  # type: ignore[assignment]
    return _MODEL_CACHE["bin"]  # type: ignore[return-value]


@st.composite
def mutated_bin(draw: st.DrawFn) -> bytes:
    raw = bytearray(_bin_template())
    kind = draw(st.integers(0, 3))
    if kind == 0:  # flip bytes anywhere (the pickle, local headers, central directory)
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] ^= draw(st.integers(1, 255))
    elif kind == 1:  # flip bytes inside data.pkl, whose position is known
        with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z:
            info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(start, start + info.file_size - 1))
            raw[i] = draw(st.integers(0, 255))
    elif kind == 2:
        del raw[draw(st.integers(0, len(raw))) :]
    else:  # a new archive whose members are random
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", draw(st.binary(max_size=64)))
            if draw(st.booleans()):
                z.writestr("archive/byteorder", draw(st.sampled_from([b"little", b"big", b""])))
            for key in draw(st.lists(st.sampled_from(["0", "1", "x"]), max_size=2, unique=True)):
                z.writestr(f"archive/data/{key}", draw(st.binary(max_size=16)))
        raw = bytearray(buf.getvalue())
    return bytes(raw)


@FUZZ
@given(mutated_bin())
def test_bin_reader_fuzzed(data: bytes) -> None:
    COUNTS["bin reader"] += 1
    folder = _template().parent
    path = Path(tempfile.mkstemp(suffix=".bin", dir=folder)[1])
    try:
        path.write_bytes(data)
        try:
            tensors = read_bin_tensors(path)
        except LazyMergeError:
            return
        for t in tensors:
            assert 0 <= t.offset and t.offset + t.nbytes <= len(data)
            assert t.nbytes == math.prod(t.shape) * DTYPE_SIZES[t.dtype]
    finally:
        path.unlink(missing_ok=True)


# -- pickle bombs: cheap opcodes repeated, in a zip member stored or deflated --------------------

# Opcodes that each build or reference something for one or a few bytes (protocol 2-5).
BOMB_OPCODES = [
    b"]",  # EMPTY_LIST
    b"}",  # EMPTY_DICT
    b")",  # EMPTY_TUPLE
    b"(",  # MARK
    b"2",  # DUP
    b"\x94",  # MEMOIZE
    b"\x8f",  # EMPTY_SET (refused)
    b"N",  # NONE
    b"\x88",  # NEWTRUE
    b"t",  # TUPLE
    b"\x86",  # TUPLE2
    b"e",  # APPENDS
    b"u",  # SETITEMS
    b"b",  # BUILD
    b"R",  # REDUCE
    b"0",  # POP
    b"1",  # POP_MARK
    b"h\x00",  # BINGET 0
    b"q\x00",  # BINPUT 0
    b"r\xff\xff\xff\x0f",  # LONG_BINPUT of a huge index (the C unpickler fails to size its memo)
    b"r\x00\x00\x40\x00",  # LONG_BINPUT 4M (the C unpickler sizes and zeroes a 64 MB memo)
    b"ccollections\nOrderedDict\n",
    b"ctorch._utils\n_rebuild_tensor_v2\n",
    b"ctorch\nFloatStorage\n",
]


@st.composite
def pickle_bomb(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A protocol-2 pickle of a few opcode runs, each repeated up to 20,000 times."""
    body = b"".join(
        draw(st.sampled_from(BOMB_OPCODES)) * draw(st.integers(1, 20_000)) for _ in range(draw(st.integers(1, 4)))
    )
    return b"\x80\x02}" + body + b".", draw(st.booleans())  # `}`: the first opcodes have a value to work on


@FUZZ
@given(pickle_bomb())
def test_bin_reader_pickle_bombs(case: tuple[bytes, bool]) -> None:
    from hostile_inputs import write_bin

    COUNTS["pickle bomb"] += 1
    pickled, deflate = case
    folder = _template().parent
    path = write_bin(Path(tempfile.mkstemp(suffix=".bin", dir=folder)[1]), pickled, deflate=deflate)
    tracemalloc.start()
    try:
        try:
            read_bin_tensors(path)
        except LazyMergeError as exc:
            assert "\n" not in str(exc) and len(str(exc)) <= 1000
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        path.unlink(missing_ok=True)
    # The budget makes memory proportional to the pickle: at most ~100 bytes an opcode byte.
    assert peak < 100 * len(pickled) + (2 << 20), f"{peak} bytes for a {len(pickled)}-byte pickle"


# -- YAML recipes: nested anchors and aliases ---------------------------------------------------


@st.composite
def alias_document(draw: st.DrawFn) -> str:
    """Anchored lists and maps of aliases of earlier anchors, some recursive, some merge keys."""
    lines = [f"a0: &a0 {draw(st.sampled_from(['lol', '[1, 2]', '{k: v}', repr('x' * 500)]))}"]
    for i in range(1, draw(st.integers(1, 12))):
        refs = [f"*a{draw(st.integers(0, i if draw(st.integers(0, 20)) == 0 else i - 1))}" for _ in range(9)]
        if draw(st.booleans()):
            lines.append(f"a{i}: &a{i} [{', '.join(refs[: draw(st.integers(1, 9))])}]")
        else:
            lines.append(f"a{i}: &a{i} {{{', '.join(f'k{j}: {r}' for j, r in enumerate(refs))}}}")
    lines.append(f"merge_method: {draw(st.sampled_from(['linear', '*a0', f'*a{len(lines) - 1}']))}")
    return "\n".join(lines) + "\n"


@FUZZ
@given(alias_document())
def test_yaml_recipe_alias_bombs(document: str) -> None:
    from lazymerge.io.yaml_recipe import MAX_EXPANDED, read_recipe_file

    COUNTS["yaml recipe"] += 1
    folder = _template().parent
    path = Path(tempfile.mkstemp(suffix=".yml", dir=folder)[1])
    path.write_text(document)
    tracemalloc.start()
    try:
        try:
            obj = read_recipe_file(path)
        except LazyMergeError as exc:
            assert "\n" not in str(exc) and len(str(exc)) <= 1000
        else:  # accepted: small enough to walk, print and serialise
            assert len(json.dumps(obj)) < 4 * MAX_EXPANDED
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        path.unlink(missing_ok=True)
    assert peak < 32 << 20, f"{peak} bytes for a {len(document)}-byte recipe"


# -- names with terminal escape sequences ---------------------------------------------------------

HIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
NAMES = st.lists(
    st.one_of(
        st.sampled_from(["\x1b[2J", "\x9b31m", "\x1b]8;;x\x07", "\u202e", "\u200b", "\n", "\r", "\x00", "\x7f"]),
        st.characters(codec="utf-8"),
    ),
    min_size=1,
    max_size=12,
).map("".join)


@FUZZ
@given(st.lists(NAMES, min_size=1, max_size=4, unique=True))
def test_printed_names_are_escaped(names: list[str]) -> None:
    import unicodedata

    from rich.console import Console

    from lazymerge.report import print_checkpoint
    from lazymerge.text import printable

    COUNTS["escaped names"] += 1
    for name in names:
        shown = printable(name)
        assert not any(unicodedata.category(c) in HIDDEN_CATEGORIES for c in shown), repr(shown)
    header, _ = build_header([(n, "F32", (1,)) for n in names])
    folder = Path(tempfile.mkdtemp(prefix="names-", dir=_template().parent))
    try:
        (folder / "model.safetensors").write_bytes(header + bytes(4 * len(names)))
        ckpt = open_checkpoint(folder)
        out = io.StringIO()
        print_checkpoint(Console(file=out, width=200, color_system=None), ckpt, list_tensors=True)
        text = out.getvalue()
        bad = {c for c in text if c != "\n" and unicodedata.category(c) in HIDDEN_CATEGORIES}
        assert not bad, f"raw {sorted(bad)!r} printed"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
