"""Hub inputs that fail: no private download folder is left behind, and the error is one line.

With `low_disk`, a Hub model's files go to a private temporary folder. When opening fails (an
index that names a shard lacking a tensor, a shard missing from the repo, a bad header, a
dropped connection, an interruption), the folder is gone by the time the error reaches the
caller, along with those of the models opened before it. When a download fails mid-merge, the
folder goes with the checkpoint: when it is collected, and at the latest when the command exits,
killed by Ctrl-C included. Without `low_disk` no temporary folder is made at all.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import lazymerge.io.hub_checkpoint
from lazymerge.cli import main
from lazymerge.errors import CheckpointError, HubError
from lazymerge.io.checkpoint import open_checkpoint
from lazymerge.io.hub import open_hub_checkpoint

try:  # tests/ is on sys.path when it has no __init__.py (pytest rootdir import mode)
    from conftest import write_model
    from helpers import take_sigint
    from hub_server import HubError as ServerError
    from hub_server import HubServer
    from test_hub import upload
except ImportError:  # pragma: no cover - tests/ became a package
    from tests.conftest import write_model
    from tests.helpers import take_sigint
    from tests.hub_server import HubError as ServerError
    from tests.hub_server import HubServer
    from tests.test_hub import upload

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
WEIGHTS = (".safetensors", ".bin")


def _model(folder: Path, fmt: str, seed: int = 0) -> Path:
    """A model of three shards, with a config (a side file, downloaded when the model is opened)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"layers.{i}.weight": torch.randn(64, 64 + i, generator=gen) for i in range(6)}
    return write_model(folder, tensors, shards=3, fmt=fmt, config={"model_type": "llama"})


def _edit_index(folder: Path, edit) -> Path:
    index = next(folder.glob("*.index.json"))
    doc = json.loads(index.read_text())
    edit(doc["weight_map"])
    index.write_text(json.dumps(doc))
    return folder


def _mismatched(folder: Path, fmt: str) -> Path:
    """The index puts layers.0.weight in a shard that exists but lacks it."""
    return _edit_index(_model(folder, fmt), lambda wm: wm.update({"layers.0.weight": sorted(set(wm.values()))[-1]}))


def _left(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _one_line(err: str) -> None:
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error:"), err
    assert all(line.startswith("hint:") for line in lines[1:]) and "Traceback" not in err, err


# ---- opening fails --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("low_disk", [True, False], ids=["low-disk", "hf-cache"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_index_shard_mismatch_leaves_no_private_folder(
    hub: HubServer, tmp_path: Path, private_tmp: Path, fmt: str, low_disk: bool
) -> None:
    bad = _mismatched(tmp_path / "bad", fmt)
    upload(hub, bad, "alice/bad")
    with pytest.raises(CheckpointError) as from_folder:
        open_checkpoint(bad, label="m")
    with pytest.raises(CheckpointError) as from_hub:
        open_hub_checkpoint("alice/bad", label="m", low_disk=low_disk)
    assert str(from_hub.value) == str(from_folder.value)
    assert _left(private_tmp) == []  # right away: no garbage collection needed


def _missing_shard(hub: HubServer, tmp_path: Path) -> None:
    folder = _model(tmp_path / "bad", "safetensors")
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.unlink()
    upload(hub, folder, "alice/bad")  # the index names a shard the repo lacks


def _bad_header(hub: HubServer, tmp_path: Path) -> None:
    folder = _model(tmp_path / "bad", "safetensors")
    shard = sorted(folder.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[8:16] = b"not json"
    shard.write_bytes(bytes(data))
    upload(hub, folder, "alice/bad")


def _side_file_dropped(hub: HubServer, tmp_path: Path) -> None:
    upload(hub, _model(tmp_path / "bad", "bin"), "alice/bad")
    original = hub._h_resolve

    def resolve(h, repo: str, rev: str, path: str) -> None:
        if repo == "alice/bad" and path == "config.json" and h.command == "GET":
            h.rec.filename = path
            raise ConnectionResetError("dropped")  # the server hangs up without an answer
        original(h, repo, rev, path)

    hub._h_resolve = resolve  # type: ignore[method-assign]


OPEN_ERRORS = {  # what goes wrong, and what the error line says
    "mismatch": (lambda hub, tmp_path: upload(hub, _mismatched(tmp_path / "bad", "bin"), "alice/bad"), "lacks it"),
    "missing-shard": (_missing_shard, "listed in the index but missing from the repo"),
    "bad-header": (_bad_header, "header is not valid UTF-8 JSON"),
    "network": (_side_file_dropped, "cannot reach the Hub"),
}


@pytest.mark.parametrize("low_disk", [True, False], ids=["low-disk", "hf-cache"])
@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c == "network" else c for c in OPEN_ERRORS]
)
def test_cli_open_error_is_one_line_and_leaves_no_private_folder(
    hub: HubServer, tmp_path: Path, private_tmp: Path, capsys: pytest.CaptureFixture[str], case: str, low_disk: bool
) -> None:
    """The first model opens (and makes its private folder), the second fails: both folders go."""
    upload(hub, _model(tmp_path / "good", "safetensors", seed=1), "alice/good")
    make_bad, says = OPEN_ERRORS[case]
    make_bad(hub, tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: alice/good\n  - model: alice/bad\n")
    argv = ["merge", str(recipe), "-o", str(tmp_path / "out"), "--device", "cpu", "-q"]
    assert main([*argv, "--low-disk"] if low_disk else argv) == 2
    err = capsys.readouterr().err
    _one_line(err)
    assert err.startswith("error: alice/bad") and says in err.splitlines()[0], err
    assert _left(private_tmp) == []  # right away: no garbage collection needed


def test_interrupted_open_leaves_no_private_folder(
    hub: HubServer, tmp_path: Path, private_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the index is checked against the headers (hub_checkpoint.py looks build_checkpoint up at call time)."""
    upload(hub, _model(tmp_path / "m", "safetensors"), "alice/m")

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(lazymerge.io.hub_checkpoint, "build_checkpoint", interrupt)
    with pytest.raises(KeyboardInterrupt) as info:
        open_hub_checkpoint("alice/m", low_disk=True)
    assert info.traceback and _left(private_tmp) == []  # while the caller still holds the error


@pytest.mark.parametrize("error", [KeyboardInterrupt, ConnectionError])
def test_side_file_failure_leaves_no_private_folder(
    hub: HubServer, tmp_path: Path, private_tmp: Path, monkeypatch: pytest.MonkeyPatch, error: type[BaseException]
) -> None:
    """Ctrl-C or a dropped connection while config.json downloads into the private folder
    (hub.py imports hf_hub_download from huggingface_hub at call time)."""
    import huggingface_hub

    upload(hub, _model(tmp_path / "m", "safetensors"), "alice/m")
    download, started = huggingface_hub.hf_hub_download, threading.Event()

    def side_file(repo_id: str, filename: str, **kwargs: object) -> str:
        if filename == "config.json" and kwargs.get("local_dir"):
            started.set()
            assert _left(private_tmp)  # the private folder exists
            raise error("connection reset")
        return download(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", side_file)
    with pytest.raises(KeyboardInterrupt if error is KeyboardInterrupt else HubError) as info:
        open_hub_checkpoint("alice/m", low_disk=True)
    assert started.is_set() and (error is KeyboardInterrupt or "cannot reach the Hub" in str(info.value))
    assert info.traceback and _left(private_tmp) == []  # while the caller still holds the error


# ---- a shard fails to download mid-merge -----------------------------------------------------------------------


def _fail_downloads(hub: HubServer, how: str) -> None:
    """Ranged reads (planning) are answered as usual; every whole-file GET of a shard fails, or,
    for "stalled", gets no answer while the test runs (`hub.stalled` is set when one arrives)."""
    original = hub._h_resolve

    def whole_weight_get(h) -> bool:
        # Planning reads these small files whole from byte 0 (one ranged read); the merge then
        # downloads them without a Range (hf-cache) or streams tensor ranges after the header (low-disk).
        rng = h.headers.get("Range")
        return h.command == "GET" and h.rec.path.endswith(WEIGHTS) and (rng is None or not rng.startswith("bytes=0-"))

    if how == "stalled":
        hub.stall(whole_weight_get, seconds=120)
        return

    def resolve(h, repo: str, rev: str, path: str) -> None:
        if whole_weight_get(h):
            h.rec.filename = path
            if how == "missing":
                raise ServerError(404, f"Entry not found: {path}", code="EntryNotFound")
            raise ConnectionResetError("dropped")  # the server hangs up without an answer
        original(h, repo, rev, path)

    hub._h_resolve = resolve  # type: ignore[method-assign]


def _two_models(hub: HubServer, tmp_path: Path) -> Path:
    """Two sharded models on the Hub (one safetensors, one .bin) and a linear recipe of them."""
    upload(hub, _model(tmp_path / "a", "safetensors", seed=1), "alice/a")
    upload(hub, _model(tmp_path / "b", "bin", seed=2), "alice/b")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: alice/a\n  - model: alice/b\n")
    return recipe


@pytest.mark.parametrize("how", ["missing", pytest.param("dropped", marks=pytest.mark.slow)])  # slow: retries
@pytest.mark.parametrize("low_disk", [True, False], ids=["low-disk", "hf-cache"])
def test_failed_download_mid_merge(
    hub: HubServer,
    tmp_path: Path,
    private_tmp: Path,
    capsys: pytest.CaptureFixture[str],
    how: str,
    low_disk: bool,
) -> None:
    recipe = _two_models(hub, tmp_path)
    _fail_downloads(hub, how)
    argv = ["merge", str(recipe), "-o", str(tmp_path / "out"), "--device", "cpu", "-q"]
    assert main([*argv, "--low-disk"] if low_disk else argv) == 2
    _one_line(capsys.readouterr().err)
    # The executor's error keeps the checkpoints in a reference cycle until the collector runs
    # (a command exits: its folders go then, see the next test); then their folders go.
    gc.collect()
    assert _left(private_tmp) == []


@pytest.mark.slow
@pytest.mark.parametrize("how", ["missing", "dropped", "interrupted"])
def test_cli_process_leaves_no_private_folder(hub: HubServer, tmp_path: Path, how: str) -> None:
    """The real command, in a process of its own: a shard that cannot be downloaded (missing, or
    the connection dropped on every retry) gives one line and exit code 2, without
    huggingface_hub's retry warnings; Ctrl-C while a shard downloads gives exit code 130. No
    folder is left either way.

    The interrupted download stays unanswered until the command has ended: only the interruption
    can end it, whatever the machine's load (the download once failed first, and won)."""
    recipe = _two_models(hub, tmp_path)
    _fail_downloads(hub, "stalled" if how == "interrupted" else how)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "lazymerge", "merge", str(recipe), "-o", str(tmp_path / "out"), "--low-disk", "-q"]
    child = subprocess.Popen(
        [*argv, "--device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=take_sigint,
    )  # fmt: skip
    try:
        if how == "interrupted":
            assert hub.stalled.wait(120), "no shard download started"
            assert list(tmp.glob("lazymerge-download-*"))  # the private folders exist while the merge runs
            child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    if how != "interrupted":
        assert child.returncode == 2, err
        _one_line(err)
    else:
        assert child.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err, err
    assert not list(tmp.glob("lazymerge-download-*"))
