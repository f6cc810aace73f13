"""What a merged folder carries besides tensors: chat template, licence and notice files, special
tokens, a model card the Hub indexes (licence, base_model + relation, pipeline_tag, tags), Hub
inputs pinned to their commits, the shard size, and the user's config file as written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi

import lazymerge
from lazymerge.tiny_models import build_llama, build_llama_pair

try:
    from hub_server import HubServer
except ImportError:  # pragma: no cover
    from tests.hub_server import HubServer

TOKEN = "hf_test_token"
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
SIDE = {
    "chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}",
    "LICENSE": b"LLAMA 2 COMMUNITY LICENSE AGREEMENT\n",
    "USE_POLICY.md": b"# Llama 2 Acceptable Use Policy\n",
    "NOTICE": b"Llama 2 is licensed under the LLAMA 2 Community License\n",
    "special_tokens_map.json": b'{"bos_token": "<s>", "eos_token": "</s>"}',
}
INPUT_CARD = "---\nlicense: llama2\nlicense_link: https://ai.meta.com/llama/license\n---\n# rm\n"


def _front(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _decorate(folder: Path, name_or_path: str) -> None:
    for name, data in SIDE.items():
        (folder / name).write_bytes(data)
    (folder / "README.md").write_text(INPUT_CARD)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": name_or_path}))


def test_dogerm_output_carries_side_files_and_a_complete_card(tmp_path: Path) -> None:
    rm, sft = build_llama_pair(tmp_path / "pair", hidden=16, vocab=32, inter=24, sft_format="safetensors")
    _decorate(rm, "miulab/llama2-7b-ultrafeedback-rm")
    config = json.loads((sft / "config.json").read_text())
    (sft / "config.json").write_text(json.dumps({**config, "_name_or_path": "meta-math/MetaMath-7B-V1.0"}))
    out = tmp_path / "out"
    lazymerge.dogerm(rm, sft, 0.3, out, max_shard_size="40KB")
    for name, data in SIDE.items():
        assert (out / name).read_bytes() == data, name
    card = (out / "README.md").read_text()
    front = _front(card)
    assert front["license"] == "llama2" and front["license_link"] == "https://ai.meta.com/llama/license"
    assert front["base_model"] == ["miulab/llama2-7b-ultrafeedback-rm", "meta-math/MetaMath-7B-V1.0"]
    assert front["base_model_relation"] == "merge"
    assert front["pipeline_tag"] == "text-classification"
    assert {"merge", "lazymerge", "dogerm", "reward-model"} <= set(front["tags"])
    assert "at most 40000 bytes" in card
    assert not (out / "mergekit_config.yml").exists()  # no config file was given


def test_linear_keeps_the_config_file_as_written(tmp_path: Path) -> None:
    a, b = build_llama(tmp_path / "a", 1), build_llama(tmp_path / "b", 2)
    text = (
        f"# my merge\nmerge_method: linear   # plain average\nmodels:\n  - model: {a}\n"
        f"    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
    )
    cfg = tmp_path / "merge.yml"
    cfg.write_text(text)
    lazymerge.merge(cfg, tmp_path / "out")
    assert (tmp_path / "out" / "mergekit_config.yml").read_text() == text
    front = _front((tmp_path / "out" / "README.md").read_text())
    assert front["pipeline_tag"] == "text-generation" and "linear" in front["tags"]
    assert "license" not in front and "base_model" not in front  # nothing to say: local inputs, no cards
    as_dict = yaml.safe_load(text)
    lazymerge.merge(as_dict, tmp_path / "out2")
    assert yaml.safe_load((tmp_path / "out2" / "mergekit_config.yml").read_text()) == as_dict


def test_hub_inputs_are_pinned_to_their_commits(hub: HubServer, tmp_path: Path) -> None:
    rm, sft = build_llama_pair(tmp_path / "pair", hidden=16, vocab=32, inter=24, sft_format="safetensors")
    (rm / "README.md").write_text(INPUT_CARD)
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    for folder, repo in ((rm, "alice/rm"), (sft, "alice/sft")):
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=folder)
    shas = {repo: api.model_info(repo).sha for repo in ("alice/rm", "alice/sft")}
    plan = lazymerge.dogerm("alice/rm", "alice/sft@main", 0.3, tmp_path / "out", dry_run=True, token=TOKEN)
    assert plan.recipe["reward_model"] == f"alice/rm@{shas['alice/rm']}"
    assert plan.recipe["domain_model"] == f"alice/sft@{shas['alice/sft']}"
    front = _front(plan.side_files["README.md"].decode())
    assert front["base_model"] == ["alice/rm", "alice/sft"] and front["license"] == "llama2"
    pinned = f"alice/sft@{shas['alice/sft']}"
    models = [{"model": "alice/sft", "parameters": {"weight": 0.5}}] * 2
    linear = lazymerge.plan_merge({"merge_method": "linear", "models": models}, tmp_path / "lin", token=TOKEN)
    assert [m["model"] for m in linear.recipe["models"]] == [pinned, pinned]
    slerp = {"merge_method": "slerp", "base_model": "alice/sft", "models": [{"model": "alice/sft"},
             {"model": "alice/sft@main"}], "parameters": {"t": 0.5}}  # fmt: skip
    plan = lazymerge.plan_merge(slerp, tmp_path / "slerp", token=TOKEN)
    assert plan.recipe["base_model"] == pinned and [m["model"] for m in plan.recipe["models"]] == [pinned, pinned]
