"""Real transformers models in the layouts users bring: a TRL value-head reward model (the causal LM
plus `v_head.summary.*`) merged with a MetaMath-style SFT (extra `[PAD]`), and swapped roles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification  # noqa: E402

import lazymerge  # noqa: E402
from lazymerge.recipes.roles import RoleError  # noqa: E402
from lazymerge.tiny_models import tokenizer_json  # noqa: E402

V, HIDDEN = 40, 32
WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(V - 3)]


def _config(vocab: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False, num_labels=1, pad_token_id=0,
    )  # fmt: skip


def _save(model: torch.nn.Module, folder: Path, words: list[str]) -> Path:
    import json

    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(words)))
    return folder


def _value_head_rm(folder: Path) -> Path:
    """What TRL's AutoModelForCausalLMWithValueHead.save_pretrained writes: the LM's state dict
    with `v_head.summary.weight/bias` added, next to the LM's config."""
    torch.manual_seed(1)
    _save(LlamaForCausalLM(_config(V)), folder, WORDS)
    shard = folder / "model.safetensors"
    state = load_file(shard)
    state["v_head.summary.weight"] = torch.randn(1, HIDDEN)
    state["v_head.summary.bias"] = torch.randn(1)
    save_file(state, shard, metadata={"format": "pt"})
    return folder


def _sft(folder: Path) -> Path:
    torch.manual_seed(2)
    return _save(LlamaForCausalLM(_config(V + 1)), folder, [*WORDS, "[PAD]"])


def test_value_head_rm_loads_as_the_input_rm_loads(tmp_path: Path) -> None:
    rm, sft = _value_head_rm(tmp_path / "rm"), _sft(tmp_path / "sft")
    out = tmp_path / "out"
    lazymerge.dogerm(rm, sft, 0.3, out)
    # The input RM loads as its causal LM with the value head beside it; so does the output.
    model, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and set(info["unexpected_keys"]) == {"v_head.summary.weight", "v_head.summary.bias"}
    assert model.config.vocab_size == V + 1
    assert model.get_output_embeddings().weight.shape == (V + 1, HIDDEN)
    merged = load_file(out / "model.safetensors")
    rm_state, sft_state = load_file(rm / "model.safetensors"), load_file(sft / "model.safetensors")
    assert torch.equal(merged["v_head.summary.weight"], rm_state["v_head.summary.weight"])
    assert torch.equal(merged["lm_head.weight"][V], sft_state["lm_head.weight"][V])  # the [PAD] row


def test_real_models_swapped_are_refused(tmp_path: Path) -> None:
    torch.manual_seed(3)
    rm = _save(LlamaForSequenceClassification(_config(V)), tmp_path / "rm", WORDS)
    sft = _sft(tmp_path / "sft")
    with pytest.raises(RoleError, match="look swapped"):
        lazymerge.dogerm(sft, rm, 0.3, tmp_path / "out", dry_run=True)
    with pytest.raises(RoleError, match="causal LMs"):
        lazymerge.dogerm(sft, _sft(tmp_path / "sft2"), 0.3, tmp_path / "out", dry_run=True)
