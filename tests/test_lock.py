"""One writer per output folder: a second merge into a folder another run is writing fails at once
(exit 2, one line naming the other run's pid) and damages nothing; a lock file left by a dead
process does not block."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import cli, start_cli, wait_stopped

from lazymerge.lock import LOCK_NAME, LOCK_NAMES, OutputLock, lock_holder
from lazymerge.manifest import MANIFEST_NAME
from lazymerge.verify import verify


def dogerm_args(pair: tuple[Path, Path], out: Path, *extra: object) -> list[str]:
    rm, sft = pair
    args = ["dogerm", "--reward-model", rm, "--domain-model", sft, "--weight", "0.3", "-o", out, "-q"]
    return [str(a) for a in [*args, "--device", "cpu", "--max-shard-size", "60kB", *extra]]


def assert_busy(result: tuple[int, str, str], out: Path, pid: int) -> None:
    code, stdout, err = result
    assert code == 2, (code, err)
    assert stdout == ""
    lines = err.splitlines()
    assert 1 <= len(lines) <= 2, err
    assert lines[0].startswith("error: ") and "another lazymerge run" in lines[0], err
    assert f"pid {pid}" in lines[0] and str(out) in lines[0], err
    assert "Traceback" not in err


def folder_state(out: Path) -> dict[str, tuple[int, int, bytes]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.iterdir())}


@pytest.mark.parametrize("extra", [(), ("--overwrite",), ("--resume",)])
def test_second_merge_fails_while_the_lock_is_held(capsys, llama_pair, tmp_path: Path, extra: tuple) -> None:
    out = tmp_path / "out"
    assert cli(capsys, *dogerm_args(llama_pair, out))[0] == 0  # a finished model is there
    before = folder_state(out)
    with OutputLock(out):
        assert lock_holder(out) == str(os.getpid())
        start = time.monotonic()
        assert_busy(cli(capsys, *dogerm_args(llama_pair, out, *extra)), out, os.getpid())
        assert time.monotonic() - start < 10, "the second run did not fail at once"
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid()), "the lock file was taken over"
        during = folder_state(out)
    assert {k: v for k, v in during.items() if k not in LOCK_NAMES} == before
    assert not (out / LOCK_NAME).exists(), "the lock file outlived its holder"


def _child(args: list[str]) -> subprocess.Popen:
    return start_cli(*args, stdout=subprocess.PIPE, text=True)


def test_second_merge_fails_while_another_process_is_mid_run(capsys, llama_pair, tmp_path: Path) -> None:
    out = tmp_path / "out"
    reference = tmp_path / "reference"
    assert cli(capsys, *dogerm_args(llama_pair, reference, "--chunk-elements", "64"))[0] == 0
    # Small chunks make the child's merge last a second or two; stop it once a shard has closed,
    # so the folder already holds model-0000k files (the second run must still blame the lock).
    proc = _child(dogerm_args(llama_pair, out, "--chunk-elements", "64"))
    try:
        deadline = time.monotonic() + 60
        while not _recorded_shards(out):
            assert proc.poll() is None, f"the first run ended before it could be stopped: {proc.stderr.read()}"
            assert time.monotonic() < deadline
            time.sleep(0.001)
        proc.send_signal(signal.SIGSTOP)
        wait_stopped(proc.pid)
        assert proc.poll() is None, "the first run finished before it was stopped: make its merge slower"
        assert lock_holder(out) == str(proc.pid)
        snapshot = folder_state(out)
        for extra in [(), ("--overwrite",), ("--resume",)]:
            assert_busy(cli(capsys, *dogerm_args(llama_pair, out, "--chunk-elements", "64", *extra)), out, proc.pid)
        assert folder_state(out) == snapshot, "the refused run touched the folder of the running one"
    finally:
        proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    # The first run finished intact: same bytes as an undisturbed run, and it verifies.
    got = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    want = {p.name: p.read_bytes() for p in sorted(reference.iterdir())}
    assert got == want
    assert verify(out).ok


def _recorded_shards(out: Path) -> dict:
    """The shards the manifest records as finished (the manifest exists from the start of a run)."""
    try:
        return json.loads((out / MANIFEST_NAME).read_text())["shards"]
    except (OSError, ValueError, KeyError):
        return {}


def test_sigterm_cleans_up_as_ctrl_c_does(llama_pair, tmp_path: Path) -> None:
    # `kill PID` (SIGTERM, what a job scheduler or `timeout` sends) mid-shard: the run stops as on
    # Ctrl-C, releasing the lock and deleting its .partial file, instead of dying on the spot.
    out = tmp_path / "out"
    proc = _child(dogerm_args(llama_pair, out, "--chunk-elements", "64"))
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".partial") for p in out.glob("model*")):
        assert proc.poll() is None, f"the run ended before it could be stopped: {proc.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr
    left = sorted(p.name for p in out.iterdir())
    assert not set(LOCK_NAMES) & set(left), left
    assert not [n for n in left if n.endswith(".partial")], left
    assert "model.safetensors.index.json" not in left


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_of_a_dead_process_does_not_block(capsys, llama_pair, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dead = _dead_pid()
    (out / LOCK_NAME).write_text(f"{dead}\n")  # present, but no process holds its flock
    assert lock_holder(out) is None
    code, _, err = cli(capsys, *dogerm_args(llama_pair, out))
    assert code == 0, err
    assert not (out / LOCK_NAME).exists()
    assert verify(out).ok


def test_stale_lock_of_a_killed_run_does_not_block_resume(capsys, llama_pair, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _child(dogerm_args(llama_pair, out, "--chunk-elements", "64"))
    deadline = time.monotonic() + 60
    while not (out / LOCK_NAME).exists() or not (out / LOCK_NAME).read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    proc.kill()
    proc.communicate(timeout=30)
    assert (out / LOCK_NAME).exists(), "SIGKILL leaves the lock file behind"
    assert lock_holder(out) is None, "but the kernel released the flock"
    code, _, err = cli(capsys, *dogerm_args(llama_pair, out, "--resume"))
    assert code == 0, err
    assert verify(out).ok
    assert not (out / LOCK_NAME).exists()


def test_lock_retries_when_the_file_it_opened_was_unlinked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A finishing run unlinks the lock file, then lets go of it. A run that opened the old file just
    # before must not keep a lock on the unlinked inode (a third run would then lock a new file).
    from filelock import FileLock

    out = tmp_path / "out"
    out.mkdir()
    real_acquire = FileLock.acquire
    calls = []

    def acquire_after_unlink(self, *args, **kwargs):
        result = real_acquire(self, *args, **kwargs)
        if not calls:  # the first attempt won the old file, which the previous holder unlinks now
            Path(self.lock_file).unlink()
        calls.append(self.lock_file)
        return result

    monkeypatch.setattr(FileLock, "acquire", acquire_after_unlink)
    with OutputLock(out) as lock:
        assert len(calls) == 2, "the lock on the unlinked file was not retried"
        fd = lock._lock._context.lock_file_fd
        assert os.path.samestat(os.fstat(fd), os.stat(calls[-1]))
        assert lock_holder(out) == str(os.getpid())
    assert not any(p.name.startswith(LOCK_NAME) for p in out.iterdir()), list(out.iterdir())


def test_lock_holder_takes_no_lock_and_creates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert lock_holder(out) is None
    assert list(out.iterdir()) == []
    with OutputLock(out):
        assert lock_holder(out) == str(os.getpid())
    assert lock_holder(out) is None
    assert list(out.iterdir()) == [], "a finished run leaves no lock file"
