"""Small LLaMA-shaped models written offline, in the Hugging Face layout.

One builder for the three places that need fake checkpoints: `lazymerge demo` (at run time, so it
lives in the package), the tests' fixtures (`tests/conftest.py`) and the benchmarks' synthetic
pairs (`benchmarks/synthetic.py`, which streams the bytes itself but takes the tensor list, the
`config.json` and the `tokenizer.json` from here).

Importing this module does not import torch: the benchmark harness imports `synthetic.py` to read
paths and sizes, and a child it forks keeps its parent's RSS high-water mark, so it must stay
small. Only the functions that make tensors import torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "build_llama",
    "build_llama_pair",
    "llama_config",
    "llama_layer_tensors",
    "llama_tensors",
    "save_model",
    "tokenizer_json",
]

TensorList = list[tuple[str, tuple[int, ...]]]


def tokenizer_json(words: list[str], special: set[str] | None = None) -> dict[str, object]:
    """A WordLevel `tokenizer.json` whose ids are the positions in `words`.

    Args:
        words: the vocabulary, in id order; must contain `<unk>`.
        special: the tokens listed as special `added_tokens`; by default every word that starts
            with `<` or `[` (`<s>`, `[PAD]`...).
    """
    if special is None:
        special = {w for w in words if w.startswith(("<", "["))}
    added = [
        {
            "id": i,
            "content": w,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, w in enumerate(words)
        if w in special
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words)}, "unk_token": "<unk>"},
    }


def llama_layer_tensors(layer: int, hidden: int, intermediate: int, kv_hidden: int) -> TensorList:
    """(name, shape) of one decoder layer, in the order transformers' state dict lists them."""
    p = f"model.layers.{layer}."
    return [
        (p + "self_attn.q_proj.weight", (hidden, hidden)),
        (p + "self_attn.k_proj.weight", (kv_hidden, hidden)),
        (p + "self_attn.v_proj.weight", (kv_hidden, hidden)),
        (p + "self_attn.o_proj.weight", (hidden, hidden)),
        (p + "mlp.gate_proj.weight", (intermediate, hidden)),
        (p + "mlp.up_proj.weight", (intermediate, hidden)),
        (p + "mlp.down_proj.weight", (hidden, intermediate)),
        (p + "input_layernorm.weight", (hidden,)),
        (p + "post_attention_layernorm.weight", (hidden,)),
    ]


def llama_tensors(
    hidden: int, intermediate: int, layers: int, vocab: int, *, kv_hidden: int | None = None, head: str = "lm_head"
) -> TensorList:
    """(name, shape) of a whole LlamaFor* model in state-dict order; `head` is "lm_head" or "score"."""
    kv = hidden if kv_hidden is None else kv_hidden
    out: TensorList = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(layers):
        out += llama_layer_tensors(layer, hidden, intermediate, kv)
    out.append(("model.norm.weight", (hidden,)))
    out.append(("lm_head.weight", (vocab, hidden)) if head == "lm_head" else ("score.weight", (1, hidden)))
    return out


def llama_config(
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    torch_dtype: str,
    classifier: bool,
    max_positions: int = 2048,
    rms_norm_eps: float = 1e-5,
) -> dict[str, object]:
    """`config.json` as transformers writes it for LlamaForCausalLM / LlamaForSequenceClassification."""
    cfg: dict[str, object] = {
        "architectures": ["LlamaForSequenceClassification" if classifier else "LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_positions,
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "vocab_size": vocab,
    }
    if classifier:  # a reward model: one label, and a pad token so batches can be scored
        cfg["id2label"] = {"0": "LABEL_0"}
        cfg["label2id"] = {"LABEL_0": 0}
        cfg["pad_token_id"] = 0
    return cfg


def save_model(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    *,
    shards: int = 1,
    fmt: str = "safetensors",
    config: dict | None = None,
    vocab: list[str] | None = None,
) -> Path:
    """Write `tensors` as a Hugging Face model folder and return it.

    Args:
        folder: created if missing.
        tensors: written in this order, cut into `shards` groups of (nearly) equal tensor count.
        shards: more than 1 writes `model-0000k-of-0000N.*` files and an index.
        fmt: "safetensors" (`model*.safetensors`, `{"format": "pt"}`) or "bin" (`pytorch_model*.bin`).
        config: written as `config.json` when given.
        vocab: written as a WordLevel `tokenizer.json` when given.
    """
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per = max(1, math.ceil(len(names) / shards))
    groups = [names[i : i + per] for i in range(0, len(names), per)]
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for k, group in enumerate(groups):
        file = f"{stem}.{ext}" if len(groups) == 1 else f"{stem}-{k + 1:05d}-of-{len(groups):05d}.{ext}"
        part = {n: tensors[n].contiguous() for n in group}
        if fmt == "safetensors":
            save_file(part, folder / file, metadata={"format": "pt"})
        else:
            torch.save(part, folder / file)
        weight_map.update({n: file for n in group})
    if len(groups) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if vocab is not None:
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(vocab)))
    return folder


def build_llama(
    folder: Path, seed: int, *, layers: int = 3, hidden: int = 16, inter: int = 24, vocab: int = 32
) -> Path:
    """Write a tiny fp32 LlamaForCausalLM that mergekit and transformers recognise, in 2 shards.

    Standard-normal weights drawn from `seed`; `config.json` and a WordLevel `tokenizer.json`
    included. Returns `folder`.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    shapes = [("model.embed_tokens.weight", (vocab, hidden)), ("model.norm.weight", (hidden,))]
    shapes.append(("lm_head.weight", (vocab, hidden)))
    for i in range(layers):
        shapes += llama_layer_tensors(i, hidden, inter, hidden)
    tensors = {name: torch.randn(*shape, generator=gen) for name, shape in shapes}
    config = llama_config(
        hidden=hidden,
        intermediate=inter,
        layers=layers,
        heads=2,
        kv_heads=2,
        vocab=vocab,
        torch_dtype="float32",
        classifier=False,
        max_positions=64,
        rms_norm_eps=1e-6,
    )
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 3)]
    return save_model(folder, tensors, shards=2, config=config, vocab=words)


def _base_state(hidden: int, layers: int, vocab: int, inter: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    import torch

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        return 1 + 0.1 * w(*shape) if len(shape) == 1 else w(*shape)  # RMSNorm weights sit around 1

    # Drawn in this order (embedding, final norm, layers) so the seeded values, and with them every
    # test's data, stay what they have always been.
    state = {"model.embed_tokens.weight": draw((vocab, hidden)), "model.norm.weight": draw((hidden,))}
    for i in range(layers):
        state.update({name: draw(shape) for name, shape in llama_layer_tensors(i, hidden, inter, hidden)})
    return state


def build_llama_pair(
    root: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 512,
    inter: int = 172,
    rm_dtype: torch.dtype | None = None,
    sft_dtype: torch.dtype | None = None,
    sft_format: str = "bin",
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write a reward model and a domain SFT model, both fine-tunes of one base, under `root`.

    The pair mirrors DogeRM's math setting: `root/reward-model` is a LlamaForSequenceClassification
    (`score.weight`, 2 safetensors shards, fp16 by default), `root/domain-model` a LlamaForCausalLM
    (`lm_head.weight`, 2 shards of `.bin` fp32 by default) with one extra token `[PAD]`, like
    MetaMath-7B. The values depend on `seed` only.

    Returns:
        (reward model folder, domain model folder).
    """
    import torch

    rm_dtype = torch.float16 if rm_dtype is None else rm_dtype
    sft_dtype = torch.float32 if sft_dtype is None else sft_dtype
    gen = torch.Generator().manual_seed(seed)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 3)]
    base = _base_state(hidden, layers, vocab, inter, gen)
    # Both models are fine-tunes of `base`: small different deltas.
    rm = {k: (v + 0.05 * torch.randn(v.shape, generator=gen)).to(rm_dtype) for k, v in base.items()}
    rm["score.weight"] = (torch.randn(1, hidden, generator=gen) / math.sqrt(hidden)).to(rm_dtype)
    sft = {k: (v + 0.05 * torch.randn(v.shape, generator=gen)).to(sft_dtype) for k, v in base.items()}
    pad_row = torch.randn(1, hidden, generator=gen).to(sft_dtype)
    sft["model.embed_tokens.weight"] = torch.cat([sft["model.embed_tokens.weight"], pad_row])
    sft["lm_head.weight"] = (torch.randn(vocab + 1, hidden, generator=gen) / math.sqrt(hidden)).to(sft_dtype)

    shape = {"hidden": hidden, "intermediate": inter, "layers": layers, "heads": 4, "kv_heads": 4}
    rm_config = llama_config(
        **shape, vocab=vocab, torch_dtype=_dtype_name(rm_dtype), classifier=True, max_positions=128
    )
    sft_config = llama_config(
        **shape, vocab=vocab + 1, torch_dtype=_dtype_name(sft_dtype), classifier=False, max_positions=128
    )
    rm_dir = save_model(root / "reward-model", rm, shards=2, config=rm_config, vocab=words)
    sft_dir = save_model(
        root / "domain-model", sft, shards=2, fmt=sft_format, config=sft_config, vocab=[*words, "[PAD]"]
    )
    return rm_dir, sft_dir


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
