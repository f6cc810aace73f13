"""Hostile `.bin` files: every parser works within a budget set by what a real checkpoint needs,
and a record the pickle could only fake is refused with one line, never an internal error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hostile_inputs import (
    EMPTY_DICT,
    MARK,
    PICKLE_BOMBS,
    PROTO2,
    SETITEM,
    STOP,
    integer,
    state_dict_pickle,
    tensor_entry,
    text,
    write_bin,
)

from lazymerge.errors import HeaderError
from lazymerge.io.torchbin import read_bin_tensors

REPO = Path(__file__).resolve().parents[1]

# The goal for a whole merge is ~400 MB RSS; refusing a hostile file must take a fraction of it.
BOMB_RSS_LIMIT = 200 * 2**20

_MEASURE = """
import json, sys, time
from lazymerge.errors import LazyMergeError
from lazymerge.io.torchbin import read_bin_tensors
start = time.perf_counter()
try:
    read_bin_tensors(sys.argv[1])
    outcome = "accepted"
except LazyMergeError as exc:
    outcome = str(exc)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking (pytest) process.
status = open("/proc/self/status").read()
rss = int(status.split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"outcome": outcome, "rss": rss, "seconds": time.perf_counter() - start}))
"""


def _measure(path: Path, timeout: float = 60) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("bomb", sorted(PICKLE_BOMBS))
def test_pickle_bomb_is_refused_within_the_budget(tmp_path: Path, bomb: str) -> None:
    pickled, deflate = PICKLE_BOMBS[bomb]
    path = write_bin(tmp_path / "bomb.bin", pickled, deflate=deflate)
    result = _measure(path)
    assert result["outcome"] != "accepted"
    assert str(path) in result["outcome"] and "\n" not in result["outcome"]
    assert result["rss"] < BOMB_RSS_LIMIT, (
        f"{bomb}: {result['rss'] / 2**20:.0f} MB to refuse a {path.stat().st_size}-byte file"
    )


def test_deflated_pickle_is_refused_by_its_ratio_before_inflating(tmp_path: Path) -> None:
    pickled, _ = PICKLE_BOMBS["stored-empty-dicts"]
    path = write_bin(tmp_path / "bomb.bin", pickled[: 4 << 20] + b".", deflate=True)  # under the size cap
    start = time.perf_counter()
    with pytest.raises(HeaderError, match=r"data\.pkl inflates [\d,]+ bytes to [\d,]+"):
        read_bin_tensors(path)
    assert time.perf_counter() - start < 1.0


def test_oversized_pickle_is_refused_before_reading(tmp_path: Path) -> None:
    path = write_bin(tmp_path / "big.bin", b"\x80\x02}" + b"N0" * (9 << 20) + b".")
    with pytest.raises(HeaderError, match=r"data\.pkl is [\d,]+ bytes, more than a state dict of [\d,]+ tensors"):
        read_bin_tensors(path)


def test_real_state_dicts_are_within_the_budget(tmp_path: Path) -> None:
    # 3,000 tensors with long names, their `_metadata`, a tied weight, a parameter, float8.
    layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(1500))
    state = torch.nn.Module()
    state.very_long_module_name_of_the_decoder_layers_of_a_large_model = layers
    sd = state.state_dict()
    sd["tied"] = sd[next(iter(sd))]
    sd["f8"] = torch.zeros(3, dtype=torch.float8_e4m3fn)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    tensors = read_bin_tensors(tmp_path / "pytorch_model.bin")
    assert [t.name for t in tensors] == list(sd)


def test_build_setting_an_unknown_storage_dtype_is_refused(tmp_path: Path) -> None:
    pickled = state_dict_pickle(tensor_entry("w", storage_state={"dtype": "Q"}))
    path = write_bin(tmp_path / "b.bin", pickled, {"0": bytes(8)})
    with pytest.raises(HeaderError, match=r"BUILD"):
        read_bin_tensors(path)


@pytest.mark.parametrize("shape", [(True, 2), (2, False), (2**63, 1)])
def test_bin_shape_dimension_must_be_a_count(tmp_path: Path, shape: tuple) -> None:
    # A `True` dimension passed as 1 and was written as `true` in the output header.
    pickled = state_dict_pickle(tensor_entry("w", shape, numel=4))
    path = write_bin(tmp_path / "s.bin", pickled, {"0": bytes(16)})
    with pytest.raises(HeaderError, match=r"'w' has an invalid shape"):
        read_bin_tensors(path)


def test_hand_assembled_state_dict_is_read(tmp_path: Path) -> None:
    # The builder the hostile cases use makes a file the reader accepts when nothing is wrong.
    pickled = state_dict_pickle(tensor_entry("w", (2, 1), numel=2))
    path = write_bin(tmp_path / "ok.bin", pickled, {"0": bytes(8)})
    (tensor,) = read_bin_tensors(path)
    assert (tensor.name, tensor.dtype, tensor.shape, tensor.nbytes) == ("w", "F32", (2, 1), 8)


def test_error_about_a_hostile_name_is_one_short_printable_line(tmp_path: Path) -> None:
    torch.save({"\x1b[2J" + "x" * 3000: 3}, tmp_path / "n.bin")
    with pytest.raises(HeaderError) as info:
        read_bin_tensors(tmp_path / "n.bin")
    message = str(info.value)
    assert "\x1b" not in message and "\\x1b[2J" in message and len(message) < 1000


def test_long_or_non_string_keys_are_refused(tmp_path: Path) -> None:
    # Two equal long keys are compared in full on every insert, an int key is hashed in full.
    long_key = state_dict_pickle(tensor_entry("x" * 5000))
    path = write_bin(tmp_path / "k.bin", long_key, {"0": bytes(8)})
    with pytest.raises(HeaderError, match=r"dict key of 5,000 characters"):
        read_bin_tensors(path)
    int_key = PROTO2 + EMPTY_DICT + integer(2**1000 - 1) + b"N" + SETITEM + STOP
    with pytest.raises(HeaderError, match="dict key of type int"):
        read_bin_tensors(write_bin(tmp_path / "i.bin", int_key))


def test_more_entries_than_a_state_dict_has_are_refused(tmp_path: Path) -> None:
    from lazymerge.io.bin_pickle import MAX_TENSORS

    entries = b"".join(text(f"t{i}") + b"N" for i in range(MAX_TENSORS + 1))
    pickled = PROTO2 + EMPTY_DICT + MARK + entries + b"u" + STOP  # SETITEMS
    with pytest.raises(HeaderError, match=rf"{MAX_TENSORS + 1:,} entries; at most {MAX_TENSORS:,}"):
        read_bin_tensors(write_bin(tmp_path / "many.bin", pickled))
