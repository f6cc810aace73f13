"""The shared tiny-model builder (`lazymerge.tiny_models`): what it writes is a model transformers
and tokenizers accept as described, and importing it stays free of torch (the benchmark harness
imports it through `benchmarks/synthetic.py` and must stay small)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import child_env, load_folder

from lazymerge.tiny_models import build_llama, build_llama_pair, llama_tensors


def test_import_does_not_import_torch() -> None:
    code = "import sys, lazymerge.tiny_models; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env())
    assert done.returncode == 0, done.stderr


def test_pair_matches_its_configs_and_tokenizers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    rm_dir, sft_dir = build_llama_pair(tmp_path, sft_format="safetensors")
    for folder, head, extra in [(rm_dir, "score", 0), (sft_dir, "lm_head", 1)]:
        config = transformers.AutoConfig.from_pretrained(folder)
        tensors = load_folder(folder)
        vocab = config.vocab_size
        want = dict(
            llama_tensors(config.hidden_size, config.intermediate_size, config.num_hidden_layers, vocab, head=head)
        )
        assert {k: tuple(v.shape) for k, v in tensors.items()} == want
        assert vocab == 512 + extra
        tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        assert tok.get_vocab_size() == vocab
        assert (tok.token_to_id("[PAD]") == 512) == bool(extra)
    rm_config = json.loads((rm_dir / "config.json").read_text())
    assert rm_config["architectures"] == ["LlamaForSequenceClassification"] and rm_config["torch_dtype"] == "float16"
    assert transformers.AutoConfig.from_pretrained(rm_dir).num_labels == 1


def test_same_seed_same_bytes_other_seed_other_values(tmp_path: Path) -> None:
    a, b, c = (build_llama(tmp_path / name, seed) for name, seed in [("a", 0), ("b", 0), ("c", 1)])
    assert {p.name: p.read_bytes() for p in a.iterdir()} == {p.name: p.read_bytes() for p in b.iterdir()}
    ta, tc = load_folder(a), load_folder(c)
    assert ta.keys() == tc.keys() and not torch.equal(ta["lm_head.weight"], tc["lm_head.weight"])
