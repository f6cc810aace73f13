"""Startup prefetch (`lazymerge.io.prefetch`): while torch imports, the merge's first input ranges
are read in the executor's own order, within a byte budget; it stays off where it would do harm
(torch already imported, remote inputs, --resume, LAZYMERGE_PREFETCH=0), and the CLI's output is
the same with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import lazymerge
import lazymerge.cli
import lazymerge.execute
from lazymerge.io import prefetch
from lazymerge.io.prefetch import StartupPrefetch, prefetch_budget
from lazymerge.io.reader import InputReader
from lazymerge.recipes.dogerm import plan_dogerm


def _dogerm_plan(pair: tuple[Path, Path], out: Path):
    checkpoints = [lazymerge.open_model(p) for p in pair]
    return plan_dogerm(checkpoints[0], checkpoints[1], 0.3, out, max_shard_size=60_000), checkpoints


def test_ranges_follow_the_executors_reads(llama_pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan, checkpoints = _dogerm_plan(llama_pair, tmp_path / "out")
    seen: list[tuple[Path, int, int]] = []
    original = InputReader.read_into

    def record(self, checkpoint, file, offset, buf, drop=True):  # type: ignore[no-untyped-def]
        seen.append((self.checkpoints[checkpoint].local_file(file), offset, len(buf)))
        original(self, checkpoint, file, offset, buf, drop)

    monkeypatch.setattr(InputReader, "read_into", record)
    # One write lane, the CPU path's default: with several the executor interleaves shards,
    # and the prefetch (which runs before the device is known) still follows the plan's order.
    lazymerge.execute.execute(plan, checkpoints, device="cpu", workers=1, write_lanes=1)
    merged = list(prefetch._ranges(plan, checkpoints))
    # The executor moves copied tensors with copy_file_range (not read_into): skip those.
    assert [r for r in merged if r in seen] == seen
    assert len(seen) >= 10


def test_reads_the_first_bytes_within_the_budget(llama_pair, tmp_path: Path, monkeypatch) -> None:
    plan, checkpoints = _dogerm_plan(llama_pair, tmp_path / "out")
    total = sum(n for _, _, n in prefetch._ranges(plan, checkpoints))
    monkeypatch.setattr(prefetch, "_PIECE", 4096)
    for budget, want in [(1 << 40, total), (3 * 4096, 3 * 4096)]:
        p = StartupPrefetch(plan, checkpoints)
        p._run(budget)
        assert p.bytes_read == want


def test_stops_when_asked(llama_pair, tmp_path: Path, monkeypatch) -> None:
    plan, checkpoints = _dogerm_plan(llama_pair, tmp_path / "out")
    monkeypatch.setattr(prefetch, "_PIECE", 64)
    p = StartupPrefetch(plan, checkpoints)
    reads = 0
    stop_after = 5
    real_preadv = prefetch.os.preadv

    def counting(fd, bufs, offset):  # type: ignore[no-untyped-def]
        nonlocal reads
        reads += 1
        if reads == stop_after:
            p._stop.set()
        return real_preadv(fd, bufs, offset)

    monkeypatch.setattr(prefetch.os, "preadv", counting)
    p._run(1 << 40)
    assert reads == stop_after
    assert p.bytes_read == stop_after * 64


def test_off_where_it_cannot_help(llama_pair, tmp_path: Path, monkeypatch) -> None:
    plan, checkpoints = _dogerm_plan(llama_pair, tmp_path / "out")
    assert "torch" in sys.modules  # as in any process that already imported it: nothing to overlap
    with StartupPrefetch(plan, checkpoints) as p:
        assert p._thread is None
    monkeypatch.delitem(sys.modules, "torch")
    assert StartupPrefetch(plan, checkpoints)._enabled
    assert not StartupPrefetch(plan, checkpoints, resume=True)._enabled
    monkeypatch.setenv("LAZYMERGE_PREFETCH", "0")
    assert not StartupPrefetch(plan, checkpoints)._enabled
    monkeypatch.delenv("LAZYMERGE_PREFETCH")
    monkeypatch.setattr(type(checkpoints[0]), "remote", True)
    assert not StartupPrefetch(plan, checkpoints)._enabled


def test_budget_is_a_quarter_of_the_free_memory_and_the_cgroup_headroom(monkeypatch) -> None:
    monkeypatch.setattr(prefetch, "memory_available", lambda: 8 << 30)
    monkeypatch.setattr(prefetch, "cgroup_memory_headroom", lambda: None)
    assert prefetch_budget() == prefetch.MAX_PREFETCH_BYTES
    monkeypatch.setattr(prefetch, "cgroup_memory_headroom", lambda: 1 << 30)
    assert prefetch_budget() == 256 << 20
    monkeypatch.setattr(prefetch, "memory_available", lambda: 0)
    assert prefetch_budget() == 256 << 20
    monkeypatch.setattr(prefetch, "cgroup_memory_headroom", lambda: None)
    assert prefetch_budget() == 0


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["cli", "api"])
def test_prefetches_before_torch_and_writes_the_same_bytes(llama_pair, tmp_path: Path, entry: str) -> None:
    # The CLI and a Python user's `lazymerge.dogerm` run the same path, prefetch included. A
    # DogeRM merge on the CPU runs on numpy and imports no torch (nothing to overlap: see the
    # next test); LAZYMERGE_CPU_KERNELS=torch makes it a run that imports torch.
    rm, sft = llama_pair
    args = ["dogerm", "--reward-model", str(rm), "--domain-model", str(sft), "--weight", "0.3", "-q"]
    args += ["--device", "cpu", "--max-shard-size", "60kB"]
    call = {
        "cli": f"main({json.dumps(args)} + ['-o', sys.argv[1]])",
        "api": f"int(lazymerge.dogerm({str(rm)!r}, {str(sft)!r}, 0.3, sys.argv[1], device='cpu', max_shard_size='60kB').push is not None)",
    }[entry]
    # A fresh interpreter, where torch is not imported yet: record what the warm-up read.
    script = f"""
import json, sys
import lazymerge
from lazymerge.io import prefetch
from lazymerge.cli import main
assert "torch" not in sys.modules
seen = []
exit_ = prefetch.StartupPrefetch.__exit__
def record(self, *exc):
    at_exit = self.bytes_read
    if self._thread is not None:
        self._thread.join()  # how far it got by now depends on the machine's load: let it finish
    exit_(self, *exc)
    seen.append((self._thread is not None, at_exit, self.bytes_read))
prefetch.StartupPrefetch.__exit__ = record
code = {call}
print(json.dumps([code, seen]))
"""
    with_prefetch = tmp_path / "with"
    env = {**os.environ, "LAZYMERGE_CPU_KERNELS": "torch"}
    done = subprocess.run([sys.executable, "-c", script, str(with_prefetch)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    code, seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert code == 0
    plan, checkpoints = _dogerm_plan(llama_pair, tmp_path / "unused")
    total = sum(n for _, _, n in prefetch._ranges(plan, checkpoints))
    # A warm-up thread ran while torch imported, and it reads exactly the merge's input ranges.
    [(started, at_exit, read)] = seen
    assert started and 0 < at_exit <= total and read == total, (seen, total)
    reference = tmp_path / "reference"
    assert lazymerge.cli.main([*args, "-o", str(reference)]) == 0
    for f in sorted(reference.iterdir()):
        assert (with_prefetch / f.name).read_bytes() == f.read_bytes(), f.name


def test_numpy_path_prefetches_while_numpy_imports_and_never_imports_torch(llama_pair, tmp_path: Path) -> None:
    # A DogeRM merge on the CPU imports numpy, not torch: the warm-up fills that (shorter) window.
    rm, sft = llama_pair
    script = f"""
import sys
import lazymerge
from lazymerge.io import prefetch
assert "numpy" not in sys.modules and "torch" not in sys.modules
windows = []
enter = prefetch.StartupPrefetch.__enter__
def record(self):
    windows.append(self._enabled)
    assert "numpy" not in sys.modules
    return enter(self)
prefetch.StartupPrefetch.__enter__ = record
lazymerge.dogerm({str(rm)!r}, {str(sft)!r}, 0.3, sys.argv[1], device="cpu", max_shard_size="60kB")
assert "torch" not in sys.modules, "torch was imported"
assert windows == [True], windows
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert list((tmp_path / "out").glob("model-*.safetensors"))


def test_thread_is_joined_on_exit(llama_pair, tmp_path: Path, monkeypatch) -> None:
    plan, checkpoints = _dogerm_plan(llama_pair, tmp_path / "out")
    monkeypatch.delitem(sys.modules, "torch")
    with StartupPrefetch(plan, checkpoints) as p:
        thread = p._thread
        assert thread is not None
    assert not thread.is_alive()
    assert "lazymerge-prefetch" not in {t.name for t in threading.enumerate()}
