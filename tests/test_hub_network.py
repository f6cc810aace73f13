"""A Hub that stops answering, a run killed or interrupted mid-download, a file changed on the Hub.

Every request has a timeout (LAZYMERGE_HUB_TIMEOUT): a server that accepts connections and never
answers gives one line and exit code 2, in seconds. Ctrl-C during a stalled download ends the
command at once. A `--low-disk` run killed with kill -9 leaves its private folder; the next run
that makes one removes it. A weight file whose header is not the one planned is refused.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lazymerge.cli import main
from lazymerge.config import plan_recipe
from lazymerge.errors import HubError
from lazymerge.execute import execute
from lazymerge.io.hub import open_hub_checkpoint
from lazymerge.io.reader import InputReader
from lazymerge.pipeline import MergeRun

try:  # tests/ is on sys.path when it has no __init__.py (pytest rootdir import mode)
    from conftest import write_model
    from helpers import take_sigint, taking_sigint
    from hub_server import FileEntry, HubServer
    from test_hub import upload
except ImportError:  # pragma: no cover - tests/ became a package
    from tests.conftest import write_model
    from tests.helpers import take_sigint, taking_sigint
    from tests.hub_server import FileEntry, HubServer
    from tests.test_hub import upload

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
WEIGHTS = (".safetensors", ".bin")
PREFIX = "lazymerge-download-"  # the private folders (--low-disk)


def _model(folder: Path, fmt: str = "safetensors", seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"layers.{i}.weight": torch.randn(64, 64 + i, generator=gen) for i in range(6)}
    return write_model(folder, tensors, shards=3, fmt=fmt, config={"model_type": "llama"})


def _two_models(hub: HubServer, tmp_path: Path) -> Path:
    upload(hub, _model(tmp_path / "a", "safetensors", seed=1), "alice/a")
    upload(hub, _model(tmp_path / "b", "bin", seed=2), "alice/b")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: alice/a\n  - model: alice/b\n")
    return recipe


def _whole_weight_get(h) -> bool:
    """A weight file's download, or (low-disk) a streamed tensor range: planning reads these small
    files whole with one Range request from byte 0."""
    rng = h.headers.get("Range")
    return h.command == "GET" and h.rec.path.endswith(WEIGHTS) and (rng is None or not rng.startswith("bytes=0-"))


def _one_line(err: str) -> None:
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error:"), err
    assert all(line.startswith("hint:") for line in lines[1:]) and "Traceback" not in err, err


def _private(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob(f"{PREFIX}*") if p.is_dir())


# ---- a server that stops answering ----------------------------------------------------------------------------

STALLS = {  # which request gets no answer
    "model-info": lambda h: h.rec.path.startswith("/api/models/"),
    "header": lambda h: h.headers.get("Range") is not None,
}


@pytest.mark.slow
@pytest.mark.parametrize("what", list(STALLS))
def test_stalled_server_is_a_one_line_error_in_seconds(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], what: str
) -> None:
    upload(hub, _model(tmp_path / "m"), "alice/m")
    monkeypatch.setenv("LAZYMERGE_HUB_TIMEOUT", "1")
    hub.stall(STALLS[what], seconds=30)  # hangs up after 30 s: without a timeout, the test still ends
    began = time.monotonic()
    assert main(["inspect", "alice/m"]) == 2
    elapsed = time.monotonic() - began
    err = capsys.readouterr().err
    _one_line(err)
    assert hub.stalled.is_set()
    assert "did not answer within 1 s" in err and "LAZYMERGE_HUB_TIMEOUT" in err, err
    assert elapsed < 15, elapsed


@pytest.mark.slow  # it waits out huggingface_hub's retries of a stalled download (10-20 s)
@pytest.mark.parametrize("low_disk", [True, False], ids=["low-disk", "hf-cache"])
def test_stalled_download_is_a_one_line_error(
    hub: HubServer,
    tmp_path: Path,
    private_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    low_disk: bool,
) -> None:
    """huggingface_hub resumes a stalled download 5 times: with a 1 s timeout, an error in seconds."""
    recipe = _two_models(hub, tmp_path)
    monkeypatch.setenv("LAZYMERGE_HUB_TIMEOUT", "1")
    monkeypatch.delenv("HF_HUB_DOWNLOAD_TIMEOUT", raising=False)
    hub.stall(_whole_weight_get, seconds=60)
    argv = ["merge", str(recipe), "-o", str(tmp_path / "out"), "--device", "cpu", "-q"]
    began = time.monotonic()
    assert main([*argv, "--low-disk"] if low_disk else argv) == 2
    elapsed = time.monotonic() - began
    err = capsys.readouterr().err
    _one_line(err)
    assert "did not answer within 1 s" in err, err
    assert elapsed < 40, elapsed
    gc.collect()  # the executor's error holds the checkpoints in a cycle until collected
    assert _private(private_tmp) == []


def test_hub_timeout_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from lazymerge.settings import hub_timeout

    for text, seconds in [("", 10.0), ("2.5", 2.5), ("0", 10.0), ("-1", 10.0), ("nan", 10.0), ("soon", 10.0)]:
        monkeypatch.setenv("LAZYMERGE_HUB_TIMEOUT", text)
        assert hub_timeout() == seconds, text


# ---- Ctrl-C and kill -9 while a download is stalled -----------------------------------------------------------


def _start_stalled_merge(hub: HubServer, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """The real command with --low-disk, in a process of its own, once its first download is stalled."""
    recipe = _two_models(hub, tmp_path)
    hub.stall(_whole_weight_get, seconds=120)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "lazymerge", "merge", str(recipe), "-o", str(out), "--low-disk", "-q"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(
        [*argv, "--device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=take_sigint,
    )  # fmt: skip
    if not hub.stalled.wait(120):
        child.kill()
        pytest.fail(f"no download started: {child.communicate()}")
    return child, out


def test_ctrl_c_during_stalled_download_stops_at_once(hub: HubServer, tmp_path: Path, private_tmp: Path) -> None:
    """The download stays stalled (the server never answers while the command runs): Ctrl-C must
    not wait for it. Exit code 130 within seconds, no private folder, no output that looks done."""
    child, out = _start_stalled_merge(hub, tmp_path)
    try:
        assert _private(private_tmp)  # the private folders exist while the merge runs
        child.send_signal(signal.SIGINT)
        began = time.monotonic()
        _, err = child.communicate(timeout=60)
        elapsed = time.monotonic() - began
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert elapsed < 3, f"took {elapsed:.1f} s to stop"
    assert not list(private_tmp.glob(f"{PREFIX}*"))
    assert not [p for p in out.glob("*") if p.suffix in (".safetensors", ".partial")] if out.exists() else True


def test_kill_9_leftovers_are_removed_by_the_next_run(hub: HubServer, tmp_path: Path, private_tmp: Path) -> None:
    child, _ = _start_stalled_merge(hub, tmp_path)
    try:
        stale = _private(private_tmp)
        assert stale
    finally:
        child.kill()  # SIGKILL: no clean-up code runs
        child.communicate()
    assert _private(private_tmp) == stale  # left behind by the killed run
    hub.unstall()
    live = open_hub_checkpoint("alice/a", low_disk=True)  # this run's folder: removed only by its close
    try:
        assert _private(private_tmp) == [live.root]
        second = open_hub_checkpoint("alice/b", low_disk=True)  # a live owner's folder is kept
        assert sorted(_private(private_tmp)) == sorted([live.root, second.root])
        second.close()
    finally:
        live.close()
    assert list(private_tmp.iterdir()) == []  # folders and their lock files


# ---- a weight file changed on the Hub between planning and download -------------------------------------------


def _change_on_first_fetch(hub: HubServer, repo_id: str, target: str, data: bytes) -> None:
    """The first request of `target` after planning (a whole-file HEAD or GET, or a streamed tensor
    range) finds it replaced by `data`, under the same commit."""
    original, done = hub._h_resolve, threading.Event()

    def resolve(h, repo: str, rev: str, path: str) -> None:
        rng = h.headers.get("Range")
        after_planning = rng is None or not rng.startswith("bytes=0-")
        if repo == repo_id and path == target and after_planning and not done.is_set():
            done.set()
            r = hub.repos[repo]
            table = r.commits[hub._commit_of(r, rev)]
            old = table[path]
            table[path] = FileEntry(len(data), hub._store(data), old.git_oid, old.lfs)
        original(h, repo, rev, path)

    hub._h_resolve = resolve  # type: ignore[method-assign]


@pytest.mark.parametrize("low_disk", [True, False], ids=["low-disk", "hf-cache"])
def test_weight_file_changed_since_planning_is_refused(
    hub: HubServer, tmp_path: Path, private_tmp: Path, capsys: pytest.CaptureFixture[str], low_disk: bool
) -> None:
    recipe = _two_models(hub, tmp_path)
    shard = sorted(p for p in hub.files("alice/a") if p.endswith(".safetensors"))[0]
    data = bytearray(hub.read("alice/a", shard))
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    first = sorted(k for k in header if k != "__metadata__")[0]
    header[first]["dtype"] = "I32"  # same size, same offsets: only the header says otherwise
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    _change_on_first_fetch(hub, "alice/a", shard, bytes(data[:8]) + text + bytes(data[8 + n :]))
    out = tmp_path / "out"
    argv = ["merge", str(recipe), "-o", str(out), "--device", "cpu", "-q"]
    assert main([*argv, "--low-disk"] if low_disk else argv) == 2
    err = capsys.readouterr().err
    _one_line(err)
    assert f"alice/a/{shard} changed on the Hub since planning" in err and "rerun" in err, err
    assert not (out / "model.safetensors.index.json").exists()


# ---- errors recorded by worker threads, and an interruption ---------------------------------------------------


def test_interrupt_wins_over_errors_of_worker_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker thread records an error (a failed download, say), then Ctrl-C arrives while the
    run winds down: the command reports the interruption (exit 130), not the error."""
    a, b = _model(tmp_path / "a", seed=1), _model(tmp_path / "b", seed=2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\n")
    original, sent = MergeRun._fail, threading.Event()

    def fail(self: MergeRun, exc: BaseException) -> None:
        original(self, exc)
        if threading.current_thread() is not threading.main_thread() and not sent.is_set():
            sent.set()
            os.kill(os.getpid(), signal.SIGINT)  # handled by the main thread, after this error is recorded
            time.sleep(0.5)  # this thread lives on: the main thread is still waiting on it

    def read_fails(self, *args: object) -> None:
        raise HubError("alice/a: Hub request failed (download dropped)")

    monkeypatch.setattr(MergeRun, "_fail", fail)
    monkeypatch.setattr(InputReader, "read_all", read_fails)
    with taking_sigint():
        assert main(["merge", str(recipe), "-o", str(tmp_path / "out"), "--device", "cpu", "-q"]) == 130
    assert sent.is_set()
    assert "interrupted" in capsys.readouterr().err


def test_negative_worker_count_does_not_hang(tmp_path: Path) -> None:
    a, b = _model(tmp_path / "a", seed=1), _model(tmp_path / "b", seed=2)
    result: list[object] = []

    def run() -> None:
        try:
            spec = {"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}]}
            plan, checkpoints = plan_recipe(spec, tmp_path / "out")
            result.append(execute(plan, checkpoints, device="cpu", workers=-1))
        except BaseException as exc:  # pragma: no cover - reported below
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(120)
    assert result, "the merge hung"
    assert not isinstance(result[0], BaseException), result[0]
    assert result[0].files and all(f.exists() for f in result[0].files)


def test_two_hub_repos_are_opened_side_by_side(hub: HubServer, tmp_path: Path) -> None:
    from lazymerge.job import open_inputs
    from lazymerge.options import HubOptions

    upload(hub, _model(tmp_path / "a", seed=1), "alice/a")
    upload(hub, _model(tmp_path / "b", seed=2), "alice/b")
    hub.shape(latency=0.1)  # each open is several round trips: about a second here
    hub.reset_log()
    a, b = open_inputs(["alice/a", "alice/b"], HubOptions())
    assert a.label == "alice/a" and b.label == "alice/b" and a.tensors.keys() == b.tensors.keys()
    spans = {
        repo: (min(r.started for r in log), max(r.ended for r in log))
        for repo in ("alice/a", "alice/b")
        if (log := [r for r in hub.requests if r.repo_id == repo])
    }
    assert spans.keys() == {"alice/a", "alice/b"}
    assert spans["alice/b"][0] < spans["alice/a"][1]  # b's first request before a's last answer


def test_a_failure_to_open_the_second_repo_is_raised(hub: HubServer, tmp_path: Path) -> None:
    from lazymerge.job import open_inputs
    from lazymerge.options import HubOptions

    upload(hub, _model(tmp_path / "a", seed=1), "alice/a")
    with pytest.raises(HubError, match="alice/missing"):
        open_inputs(["alice/a", "alice/missing"], HubOptions())
