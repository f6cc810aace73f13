"""DogeRM on real reward-model layouts: roles checked from headers, value-head reward models,
vocabulary-shaped output heads and the token-keyed union (recipes/roles.py, recipes/vocab.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_folder, write_model
from test_merge_exact import reference_linear

import lazymerge
from lazymerge.recipes.roles import RoleError
from lazymerge.recipes.vocab import union_rows

H = 8
WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(9)]  # 12 tokens


def _body(seed: int, rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(rows, H, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(2 * H, H, generator=g),
        "model.norm.weight": torch.randn(H, generator=g),
    }


def _classifier(seed: int, rows: int = 12) -> dict[str, torch.Tensor]:
    t = _body(seed, rows)
    t["score.weight"] = torch.randn(1, H, generator=torch.Generator().manual_seed(seed + 100))
    return t


def _causal(seed: int, rows: int = 12) -> dict[str, torch.Tensor]:
    t = _body(seed, rows)
    t["lm_head.weight"] = torch.randn(rows, H, generator=torch.Generator().manual_seed(seed + 200))
    return t


def _value_head(seed: int, rows: int = 12) -> dict[str, torch.Tensor]:
    """TRL's AutoModelForCausalLMWithValueHead layout: the causal LM plus `v_head.summary.*`."""
    t = _causal(seed, rows)
    g = torch.Generator().manual_seed(seed + 300)
    t["v_head.summary.weight"] = torch.randn(1, H, generator=g)
    t["v_head.summary.bias"] = torch.randn(1, generator=g)
    return t


def _arch(name: str) -> dict:
    return {"architectures": [name], "vocab_size": 12}


# ---------------------------------------------------------------- roles


def test_swapped_models_are_refused_naming_the_swap(tmp_path: Path) -> None:
    rm = write_model(tmp_path / "rm", _classifier(1), config=_arch("LlamaForSequenceClassification"))
    sft = write_model(tmp_path / "sft", _causal(2), config=_arch("LlamaForCausalLM"))
    with pytest.raises(RoleError, match=r"look swapped.*score\.weight") as err:
        lazymerge.dogerm(sft, rm, 0.3, tmp_path / "out", dry_run=True)
    assert "swap --reward-model and --domain-model" in err.value.hint
    assert not (tmp_path / "out").exists()


def test_two_causal_lms_are_refused(tmp_path: Path) -> None:
    a = write_model(tmp_path / "a", _causal(1), config=_arch("LlamaForCausalLM"))
    b = write_model(tmp_path / "b", _causal(2), config=_arch("LlamaForCausalLM"))
    with pytest.raises(RoleError, match=r"no reward head.*LlamaForCausalLM.*causal LMs"):
        lazymerge.dogerm(a, b, 0.3, tmp_path / "out", dry_run=True)


def test_two_reward_models_are_refused(tmp_path: Path) -> None:
    a = write_model(tmp_path / "a", _classifier(1))
    b = write_model(tmp_path / "b", _classifier(2))
    with pytest.raises(RoleError, match=r"domain model .* is a reward model"):
        lazymerge.dogerm(a, b, 0.3, tmp_path / "out", dry_run=True)


def test_classifier_architecture_without_known_head_is_a_reward_model(tmp_path: Path) -> None:
    t = _body(1, 12)
    t["reward.linear.weight"] = torch.ones(1, H)
    rm = write_model(tmp_path / "rm", t, config=_arch("MistralForSequenceClassification"))
    sft = write_model(tmp_path / "sft", _causal(2))
    with pytest.warns(
        lazymerge.PlanWarning, match=r"reward\.linear\.weight is not in the domain model: copied from the reward model"
    ):
        plan = lazymerge.dogerm(rm, sft, 0.3, tmp_path / "out", dry_run=True)
    assert any(t.name == "reward.linear.weight" for t in plan.tensors)


def test_unknown_head_name_is_accepted_and_named(tmp_path: Path) -> None:
    t = _body(1, 12)
    t["rank_head.weight"] = torch.ones(1, H)
    rm = write_model(tmp_path / "rm", t)  # no config: the head tensor is the only evidence
    sft = write_model(tmp_path / "sft", _causal(2))
    with pytest.warns(lazymerge.PlanWarning, match=r"rank_head\.weight"):
        plan = lazymerge.dogerm(rm, sft, 0.3, tmp_path / "out", dry_run=True)
    assert "rank_head.weight" in {t.name for t in plan.tensors}


def test_cli_swapped_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import cli

    rm = write_model(tmp_path / "rm", _classifier(1))
    sft = write_model(tmp_path / "sft", _causal(2))
    code, _out, err = cli(capsys, "dogerm", "--reward-model", sft, "--domain-model", rm, "--weight", "0.3",
                         "--output", tmp_path / "out")  # fmt: skip
    assert code == 2 and "look swapped" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) <= 2


# ---------------------------------------------------------------- value-head reward models


def test_value_head_rm_with_extra_sft_token_unions_lm_head(tmp_path: Path) -> None:
    """TRL layout (lm_head in both models) with MetaMath's `[PAD]` in the SFT: lm_head follows
    the union like the embedding (it used to fail: shape [12, 8] vs [13, 8]); the value head is kept."""
    rm_t, sft_t = _value_head(1), _causal(2, rows=13)
    rm = write_model(tmp_path / "rm", rm_t, vocab=WORDS, config=_arch("LlamaForCausalLM"))
    sft = write_model(
        tmp_path / "sft", sft_t, vocab=[*WORDS, "[PAD]"], config={**_arch("LlamaForCausalLM"), "vocab_size": 13}
    )
    lazymerge.dogerm(rm, sft, 0.3, tmp_path / "out", chunk_elements=5)
    got = load_folder(tmp_path / "out")
    assert set(got) == set(rm_t)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        want = torch.cat(
            [reference_linear([rm_t[name], sft_t[name][:12]], [0.7, 0.3], torch.float32), sft_t[name][12:]]
        )
        assert torch.equal(got[name], want), name
    assert torch.equal(got["v_head.summary.weight"], rm_t["v_head.summary.weight"])
    assert torch.equal(got["v_head.summary.bias"], rm_t["v_head.summary.bias"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 13


def test_untied_rm_head_merges_with_a_tied_sft_embedding(tmp_path: Path) -> None:
    rm_t = _value_head(1)
    sft_t = _body(2, 13)  # tied: no lm_head stored
    rm = write_model(tmp_path / "rm", rm_t, vocab=WORDS)
    sft = write_model(tmp_path / "sft", sft_t, vocab=[*WORDS, "[PAD]"])
    plan = lazymerge.dogerm(rm, sft, 0.5, tmp_path / "out", dry_run=True)
    lazymerge.dogerm(rm, sft, 0.5, tmp_path / "out")
    got = load_folder(tmp_path / "out")
    emb = sft_t["model.embed_tokens.weight"]
    want = torch.cat([reference_linear([rm_t["lm_head.weight"], emb[:12]], [0.5, 0.5], torch.float32), emb[12:]])
    assert torch.equal(got["lm_head.weight"], want)
    assert "tied" in next(t.how for t in plan.tensors if t.name == "lm_head.weight")


# ---------------------------------------------------------------- the union, keyed by token string


def test_union_appends_sft_token_whose_id_the_rm_uses() -> None:
    rm = {"a": 0, "b": 1, "<rm_x>": 2}
    sft = {"a": 0, "b": 1, "[PAD]": 2}
    runs, added = union_rows(rm, sft, 3, 3)
    assert added == [(3, "[PAD]")]
    assert [(r.start, r.count, r.sources, r.sft_row) for r in runs] == [
        (0, 2, ("rm", "sft"), 0),
        (2, 1, ("rm",), 2),
        (3, 1, ("sft",), 2),
    ]


def test_union_keeps_a_free_sft_id_and_refuses_one_token_two_ids() -> None:
    runs, added = union_rows({"a": 0}, {"a": 0, "[PAD]": 1}, 1, 2)
    assert added == [(1, "[PAD]")] and runs[-1].sft_start is None
    with pytest.raises(lazymerge.LazyMergeError, match=r"'b' has id 1 in the reward model but 2"):
        union_rows({"a": 0, "b": 1}, {"a": 0, "c": 1, "b": 2}, 2, 3)


def test_different_extra_tokens_at_the_same_id_merge(tmp_path: Path) -> None:
    rm_t, sft_t = _classifier(1, rows=13), _causal(2, rows=13)
    rm = write_model(tmp_path / "rm", rm_t, vocab=[*WORDS, "<rm_x>"], config={"vocab_size": 13})
    sft = write_model(tmp_path / "sft", sft_t, vocab=[*WORDS, "[PAD]"])
    (sft / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"12": {
        "content": "[PAD]", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
        "special": True}}}))  # fmt: skip
    (rm / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {}}))
    lazymerge.dogerm(rm, sft, 0.3, tmp_path / "out")
    out = tmp_path / "out"
    got = load_folder(out)["model.embed_tokens.weight"]
    e_rm, e_sft = rm_t["model.embed_tokens.weight"], sft_t["model.embed_tokens.weight"]
    assert got.shape == (14, H)
    assert torch.equal(got[:12], reference_linear([e_rm[:12], e_sft[:12]], [0.7, 0.3], torch.float32))
    assert torch.equal(got[12], e_rm[12]) and torch.equal(got[13], e_sft[12])
    tok = json.loads((out / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert added["<rm_x>"] == 12 and added["[PAD]"] == 13
    assert json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]["13"]["content"] == "[PAD]"
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 14
