"""Sweep `--push-to-hub 'owner/name-{weight}'`, offline against tests/hub_server.py: one repo and
one commit per output, shards uploaded as they close, a template giving one repo twice refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_hub import TOKEN, download_repo

from lazymerge.cli import main
from lazymerge.manifest import MANIFEST_NAME

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


try:  # tests/ is on sys.path when it has no __init__.py (pytest rootdir import mode)
    from hub_server import HubServer, serving_hub
except ImportError:  # pragma: no cover - tests/ became a package
    from tests.hub_server import HubServer, serving_hub


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    monkeypatch.delenv("LAZYMERGE_DEBUG", raising=False)  # errors are checked as users see them
    yield from serving_hub(tmp_path, monkeypatch, TOKEN)


def sweep_args(pair: tuple[Path, Path], template: Path, *extra: str) -> list[str]:
    rm, sft = pair
    return [
        "dogerm", "--reward-model", str(rm), "--domain-model", str(sft), "--weight", "0.2,0.6",
        "-o", str(template), "--max-shard-size", "100kB", "--device", "cpu", *extra,
    ]  # fmt: skip


def assert_pushed(hub: HubServer, repo_id: str, out: Path, dest: Path) -> None:
    assert len(hub.repos[repo_id].commits) == 2  # the initial commit, then the whole model at once
    local = {p.name for p in out.iterdir() if p.is_file() and p.name != MANIFEST_NAME}
    assert set(hub.files(repo_id)) == local | {".gitattributes"}
    assert download_repo(hub, repo_id, dest) == {n: (out / n).read_bytes() for n in local}


def test_sweep_pushes_each_output_to_its_own_repo(
    hub: HubServer, llama_pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(sweep_args(llama_pair, tmp_path / "out-{weight}", "--push-to-hub", "alice/merged-{weight}"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "uploaded" in captured.err  # the progress bar's upload line (no --quiet)
    shards = 0
    for w in ("0.2", "0.6"):
        out = tmp_path / f"out-{w}"
        assert_pushed(hub, f"alice/merged-{w}", out, tmp_path / f"back-{w}")
        assert f"pushed to alice/merged-{w}@main" in captured.out
        shards += len(list(out.glob("*.safetensors")))
    assert len(hub.lfs_uploads) == shards  # every shard of every output uploaded once
    assert TOKEN not in captured.out + captured.err


def test_resumed_sweep_pushes_the_kept_shards(
    hub: HubServer, llama_pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A finished local sweep, then the same command with --resume --push-to-hub: nothing is
    # merged again, every kept shard goes to its own output's repo.
    template = tmp_path / "out-{weight}"
    assert main(sweep_args(llama_pair, template, "-q")) == 0
    code = main(sweep_args(llama_pair, template, "-q", "--resume", "--push-to-hub", "sweep-{i}"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "kept from the earlier run" in captured.out
    for i, w in enumerate(("0.2", "0.6")):
        assert_pushed(hub, f"testuser/sweep-{i}", tmp_path / f"out-{w}", tmp_path / f"back-{i}")


def test_push_template_with_one_repo_for_two_values_is_refused(
    hub: HubServer, llama_pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for template, message in (("alice/merged", "gives the same repo"), ("alice/m-{lambda}", "bad --push-to-hub")):
        code = main(sweep_args(llama_pair, tmp_path / "out-{weight}", "-q", "--push-to-hub", template))
        captured = capsys.readouterr()
        assert code == 2 and captured.out == ""
        lines = captured.err.splitlines()
        assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), captured.err
        assert message in lines[0] and "Traceback" not in captured.err
    assert not hub.repos and not list(tmp_path.glob("out-*"))  # refused before planning or pushing
