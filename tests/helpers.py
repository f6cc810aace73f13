"""Helpers shared by the test files: the CLI run in this process or in a child, and the
kill-and-resume harness (a real `python -m lazymerge` child stopped or SIGKILLed mid-merge).

A plain module, imported as `from helpers import ...` (pytest's default import mode puts `tests/`,
which has no `__init__.py`, on sys.path); fixtures stay in conftest.py. The tiny checkpoints come
from `lazymerge.tiny_models`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lazymerge.manifest import MANIFEST_NAME
from lazymerge.tiny_models import save_model as write_model

__all__ = [
    "ANSI",
    "REPO",
    "child_env",
    "cli",
    "dogerm_args",
    "kill",
    "kill_during_second_upload",
    "load_folder",
    "manifest_shards",
    "run_cli",
    "snapshot",
    "start_cli",
    "stat_ids",
    "ties_recipe",
    "wait_for",
    "wait_stopped",
    "write_model",
]

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model folder, read with safetensors' own reader."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def ties_recipe(base: object, a: object, b: object, parameters: dict) -> dict:
    """TIES of two models over a base (weights 0.6 and 0.4, densities 0.3 and 0.5, bfloat16 out) with
    `parameters` as the method's own: the recipe the split-merge tests run whole and in parts."""
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(a), "parameters": {"weight": 0.6, "density": 0.3}},
            {"model": str(b), "parameters": {"weight": 0.4, "density": 0.5}},
        ],
        "parameters": parameters,
        "dtype": "bfloat16",
    }


# -- the CLI ---------------------------------------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """`lazymerge ARGS` in this process: (exit code, stdout, stderr), colour codes removed."""
    from lazymerge.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, ANSI.sub("", captured.out), ANSI.sub("", captured.err)


def dogerm_args(rm: object, sft: object, weight: object, *extra: object) -> list[str]:
    """`dogerm --reward-model RM --domain-model SFT --weight WEIGHT EXTRA...` as strings, for `main`
    or `cli` (`-o OUT`, `-q`, `--device cpu`... go in `extra`)."""
    return [str(a) for a in ("dogerm", "--reward-model", rm, "--domain-model", sft, "--weight", weight, *extra)]


def child_env(*, debug: bool = False, **extra: str) -> dict[str, str]:
    """This process's environment for a child: this checkout first on PYTHONPATH, no LAZYMERGE_DEBUG
    unless `debug` (a developer's shell setting must not change what the tests see)."""
    env = {k: v for k, v in os.environ.items() if k != "LAZYMERGE_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if debug:
        env["LAZYMERGE_DEBUG"] = "1"
    env.update(extra)
    return env


def run_cli(*args: object, debug: bool = False, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m lazymerge ARGS` in a child, to the end; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "lazymerge", *map(str, args)],
        capture_output=True,
        text=True,
        env=child_env(debug=debug, **env),
        cwd=REPO,
        timeout=timeout,
        check=False,
    )


def start_cli(
    *args: object, stdout: int | None = subprocess.DEVNULL, text: bool = False, **env: str
) -> subprocess.Popen:
    """`python -m lazymerge ARGS` started in a child (stderr piped); the caller waits or kills it."""
    return subprocess.Popen(
        [sys.executable, "-m", "lazymerge", *map(str, args)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=text,
        env=child_env(**env),
        cwd=REPO,
    )


def take_sigint() -> None:
    """`preexec_fn` of a child that a test interrupts with SIGINT: Ctrl-C's default action, even when
    this test run was started in the background of a non-interactive shell, which starts it with
    SIGINT ignored. An ignored SIGINT is inherited, and Python then installs no KeyboardInterrupt
    handler: the child would ignore the test's Ctrl-C (as it should under `nohup ... &`)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def taking_sigint() -> Iterator[None]:
    """This process raises KeyboardInterrupt on SIGINT for the block, whatever it inherited (see
    `take_sigint`), as an interactive Python does."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# -- kill and resume -------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Poll until `predicate()` or the child exits; True when the predicate held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(0.002)
    raise AssertionError("the child neither progressed nor exited")


def kill(proc: subprocess.Popen) -> int | None:
    """SIGKILL the child (if still running); returns its exit code if it had already finished."""
    finished = proc.poll()
    if finished is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    if proc.stderr is not None:
        proc.stderr.close()
    return finished


def wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP is asynchronous: wait until every thread of `pid` is in state T (stopped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):
                continue  # a thread that just ended
        if states and all(s in "Tt" for s in states):
            return
        time.sleep(0.001)
    raise AssertionError("the child did not stop")


def manifest_shards(out: Path) -> dict[str, dict]:
    """The shards the output folder's manifest records as finished ({} while there is none)."""
    try:
        return json.loads((out / MANIFEST_NAME).read_text())["shards"]
    except (OSError, ValueError, KeyError):
        return {}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of `folder` by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def stat_ids(out: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of each file: unchanged means the file was not rewritten."""
    stats = {n: (out / n).stat() for n in names}
    return {n: (s.st_ino, s.st_mtime_ns) for n, s in stats.items()}


# -- a push killed mid-upload (the Hub tests) ------------------------------------------------------


def kill_during_second_upload(
    hub: Any, *args: object, settled: Callable[[], bool] | None = None, **env: str
) -> list[tuple[str, int]]:
    """Run `python -m lazymerge ARGS` in a child against the local Hub server `hub`
    (tests/hub_server.py): the server accepts the first LFS upload, holds the next one until the
    child has been SIGKILLed, then answers it 503. Returns the uploads the server accepted (one).
    `settled`: the kill waits (up to 30 s) until it is true, e.g. until the child has deleted the
    first shard (the second body starts while the first is still being verified)."""
    import threading

    from hub_server import HubError as ServerError

    gate, held = threading.Event(), threading.Event()
    original = hub._h_lfs_put
    arrived = itertools.count()  # PUTs may arrive together: the child sends the next body at once

    def gated_put(h: Any, ticket: str) -> None:
        if next(arrived):
            deadline = time.monotonic() + 30  # the first body may still be in the socket
            while not (hub.lfs_uploads and (settled is None or settled())) and time.monotonic() < deadline:
                time.sleep(0.01)
            held.set()
            gate.wait(30)
            raise ServerError(503, "server going away")
        original(h, ticket)

    hub._h_lfs_put = gated_put
    hub.reset_log()
    child = start_cli(*args, **env)
    try:
        assert held.wait(120), child.stderr.read().decode() if child.poll() is not None else "no second upload"
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        gate.set()
        kill(child)
        hub._h_lfs_put = original
    return list(hub.lfs_uploads)
