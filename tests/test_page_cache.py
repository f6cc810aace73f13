"""A merge leaves no input in the page cache: each consumed chunk's pages are dropped, whole folios
included (`lazymerge.io.range_source`). Linux reads ahead into large folios (up to 2 MiB) and
drops only whole folios inside an advised range; a chunk's exact range left nearly every folio
cached, so a 7B merge filled the page cache with its 27 GB of inputs and spent its time in
reclaim. Measured with mincore(2) on the input files after a merge."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from pathlib import Path

import pytest
import torch

import lazymerge
from lazymerge.tiny_models import save_model

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="mincore and page-cache advice: Linux")


def _resident_bytes(path: Path) -> int:
    """Bytes of `path` in the page cache (mincore on a shared read-only map)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer((size + page - 1) // page)
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw) * page
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def _model(folder: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    # 24 MiB of fp16 in 3 tensors, odd sizes so that no chunk starts on a folio boundary
    tensors = {f"layers.{i}.weight": torch.randn(4_194_300 + i, generator=g).half() for i in range(3)}
    return save_model(folder, tensors)


def test_a_merge_leaves_its_inputs_out_of_the_page_cache(tmp_path: Path) -> None:
    a, b = _model(tmp_path / "a", 0), _model(tmp_path / "b", 1)
    files = [a / "model.safetensors", b / "model.safetensors"]
    for f in files:  # written just now: cached; start from a cold cache
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    if any(_resident_bytes(f) > 1 << 20 for f in files):
        pytest.skip("this file system keeps pages cached against POSIX_FADV_DONTNEED (tmpfs?)")
    lazymerge.merge(
        {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.3}},
                                                {"model": str(b), "parameters": {"weight": 0.7}}]},
        tmp_path / "out", device="cpu",
    )  # fmt: skip
    for f in files:
        left = _resident_bytes(f)
        # at most the folio at the end of the file and the last chunk's edges: not the 24 MiB read
        assert left <= 4 << 20, f"{f.parent.name}: {left / 2**20:.1f} MiB of the input still cached"
