"""A repo lazymerge fetched opens again with HF_HUB_OFFLINE=1, by branch and by sha; planning
offline asks only for the files the plan reads (a dropped lm_head shard is never needed), and
`--resume` works offline (io/hub_offline.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_folder
from huggingface_hub import HfApi, constants
from safetensors.torch import save_file

import lazymerge
from lazymerge.errors import HubError
from lazymerge.tiny_models import build_llama_pair

try:
    from hub_server import HubServer
except ImportError:  # pragma: no cover
    from tests.hub_server import HubServer

TOKEN = "hf_test_token"
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def _lm_head_apart(folder: Path) -> None:
    """Rewrite the SFT as two shards, lm_head alone in the second (DogeRM never reads it)."""
    tensors = load_folder(folder)
    for p in folder.glob("model*.safetensors*"):
        p.unlink()
    head = {"lm_head.weight": tensors.pop("lm_head.weight")}
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    save_file(tensors, folder / names[0], metadata={"format": "pt"})
    save_file(head, folder / names[1], metadata={"format": "pt"})
    weight_map = {**dict.fromkeys(tensors, names[0]), "lm_head.weight": names[1]}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture
def remote(hub: HubServer, tmp_path: Path) -> dict[str, str]:
    rm, sft = build_llama_pair(tmp_path / "pair", hidden=16, vocab=32, inter=24, sft_format="safetensors")
    _lm_head_apart(sft)
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    for folder, repo in ((rm, "alice/rm"), (sft, "alice/sft")):
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=folder)
    return {repo: api.model_info(repo).sha for repo in ("alice/rm", "alice/sft")}


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".safetensors"}


def test_fetched_repo_opens_offline_by_branch_and_sha(
    hub: HubServer, remote: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    online = tmp_path / "online"
    lazymerge.dogerm("alice/rm", "alice/sft", 0.3, online, max_shard_size="4KB", device="cpu")
    cache = Path(constants.HF_HUB_CACHE)
    assert (cache / "models--alice--sft" / "refs" / "main").read_text() == remote["alice/sft"]
    # The lm_head shard was never needed, so never downloaded.
    snapshot = cache / "models--alice--sft" / "snapshots" / remote["alice/sft"]
    assert not (snapshot / "model-00002-of-00002.safetensors").exists()

    _offline(monkeypatch)
    hub.reset_log()
    for sft in ("alice/sft", f"alice/sft@{remote['alice/sft']}"):
        out = tmp_path / f"offline-{len(sft)}"
        plan = lazymerge.dogerm("alice/rm@main", sft, 0.3, out, dry_run=True)
        assert plan.recipe["domain_model"] == f"alice/sft@{remote['alice/sft']}"
        assert "lm_head.weight" in plan.dropped
        lazymerge.dogerm("alice/rm@main", sft, 0.3, out, max_shard_size="4KB", device="cpu")
        assert _files(out) == _files(online)
    assert not hub.requests  # nothing asked of the server
    with pytest.raises(HubError, match="not in the local Hugging Face cache"):
        lazymerge.open_model("alice/sft@v2")


def test_resume_works_offline(
    hub: HubServer, remote: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    lazymerge.dogerm("alice/rm", "alice/sft", 0.3, out, max_shard_size="4KB", device="cpu")
    want = _files(out)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3
    shards[-1].unlink()  # as if the run had been killed before its last shard
    kept = shards[0].stat().st_mtime_ns
    _offline(monkeypatch)
    lazymerge.dogerm("alice/rm", "alice/sft", 0.3, out, max_shard_size="4KB", device="cpu", resume=True)
    assert _files(out) == want
    assert shards[0].stat().st_mtime_ns == kept  # kept, not rewritten
