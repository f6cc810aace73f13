"""`lazymerge demo`: build a small LLaMA-shaped RM + SFT pair offline, DogeRM-merge it, check it.

The pair mirrors the paper's math setting: the reward model is a LlamaForSequenceClassification
in fp16 safetensors shards (vocab 512), the domain model a LlamaForCausalLM in fp32 PyTorch
`.bin` shards with one extra token `[PAD]` (like MetaMath-7B).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from rich.console import Console

__all__ = ["DEMO_MARKER", "build_llama_pair", "prepare_demo_folder", "run_demo"]

DEMO_MARKER = ".lazymerge-demo"
DEMO_FOLDERS = ("reward-model", "domain-model", "merged")


def _tokenizer_json(vocab: list[str]) -> dict:
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, t in enumerate(vocab)
        if t.startswith(("<", "["))
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
        "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(vocab)}, "unk_token": "<unk>"},
    }


def _llama_state(hidden: int, layers: int, vocab: int, inter: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])

    state = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": 1 + 0.1 * w(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[p + f"self_attn.{name}.weight"] = w(hidden, hidden)
        state[p + "mlp.gate_proj.weight"] = w(inter, hidden)
        state[p + "mlp.up_proj.weight"] = w(inter, hidden)
        state[p + "mlp.down_proj.weight"] = w(hidden, inter)
        state[p + "input_layernorm.weight"] = 1 + 0.1 * w(hidden)
        state[p + "post_attention_layernorm.weight"] = 1 + 0.1 * w(hidden)
    return state


def _save_sharded(state: dict[str, torch.Tensor], folder: Path, shards: int, fmt: str) -> None:
    from safetensors.torch import save_file

    names = list(state)
    per = math.ceil(len(names) / shards)
    groups = [names[i : i + per] for i in range(0, len(names), per)]
    weight_map = {}
    for k, group in enumerate(groups):
        stem = "model" if fmt == "safetensors" else "pytorch_model"
        ext = "safetensors" if fmt == "safetensors" else "bin"
        file = f"{stem}-{k + 1:05d}-of-{len(groups):05d}.{ext}"
        part = {n: state[n].contiguous() for n in group}
        if fmt == "safetensors":
            save_file(part, folder / file, metadata={"format": "pt"})
        else:
            torch.save(part, folder / file)
        weight_map.update({n: file for n in group})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def build_llama_pair(
    root: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 512,
    inter: int = 172,
    rm_dtype: torch.dtype = torch.float16,
    sft_dtype: torch.dtype = torch.float32,
    sft_format: str = "bin",
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write a reward model and a domain SFT model (one extra `[PAD]` token) under `root`."""
    gen = torch.Generator().manual_seed(seed)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 3)]
    base = _llama_state(hidden, layers, vocab, inter, gen)
    config = {
        "architectures": ["LlamaForSequenceClassification"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": vocab,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "num_labels": 1,
        "tie_word_embeddings": False,
    }
    rm_dir, sft_dir = root / "reward-model", root / "domain-model"
    for folder in (rm_dir, sft_dir):
        folder.mkdir(parents=True, exist_ok=True)
    # Both models are fine-tunes of `base`: small different deltas.
    rm = {k: (v + 0.05 * torch.randn(v.shape, generator=gen)).to(rm_dtype) for k, v in base.items()}
    rm["score.weight"] = (torch.randn(1, hidden, generator=gen) / math.sqrt(hidden)).to(rm_dtype)
    sft = {k: (v + 0.05 * torch.randn(v.shape, generator=gen)).to(sft_dtype) for k, v in base.items()}
    pad_row = torch.randn(1, hidden, generator=gen).to(sft_dtype)
    sft["model.embed_tokens.weight"] = torch.cat([sft["model.embed_tokens.weight"], pad_row])
    sft["lm_head.weight"] = (torch.randn(vocab + 1, hidden, generator=gen) / math.sqrt(hidden)).to(sft_dtype)
    _save_sharded(rm, rm_dir, 2, "safetensors")
    _save_sharded(sft, sft_dir, 2, sft_format)
    rm_dtype_name = str(rm_dtype).removeprefix("torch.")
    sft_dtype_name = str(sft_dtype).removeprefix("torch.")
    (rm_dir / "config.json").write_text(json.dumps({**config, "torch_dtype": rm_dtype_name}, indent=2))
    sft_config = {
        **config,
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab + 1,
        "torch_dtype": sft_dtype_name,
    }
    del sft_config["num_labels"]
    (sft_dir / "config.json").write_text(json.dumps(sft_config, indent=2))
    (rm_dir / "tokenizer.json").write_text(json.dumps(_tokenizer_json(words)))
    (sft_dir / "tokenizer.json").write_text(json.dumps(_tokenizer_json([*words, "[PAD]"])))
    return rm_dir, sft_dir


def run_demo(work: Path, out: Console, err: Console) -> None:
    """Build the pair in `work`, merge with lambda = 0.3, verify one tensor and the embedding.

    `work` must be missing, empty or an earlier demo's folder (`prepare_demo_folder`)."""
    from lazymerge.api import open_model
    from lazymerge.execute import execute
    from lazymerge.recipes.dogerm import plan_dogerm
    from lazymerge.report import print_stats

    prepare_demo_folder(work)
    out.print(f"[bold]lazymerge demo[/] in {work}/ (offline: the models are generated here)")
    rm_dir, sft_dir = build_llama_pair(work)
    out.print(f"reward model: {rm_dir} (LlamaForSequenceClassification, fp16 safetensors, vocab 512)")
    out.print(f"domain model: {sft_dir} (LlamaForCausalLM, fp32 .bin, vocab 513 with [PAD])")
    output = work / "merged"
    lam = 0.3
    out.print(
        f"running: lazymerge dogerm --reward-model {rm_dir} --domain-model {sft_dir} "
        f"--weight {lam} --output {output} --max-shard-size 200kB"
    )
    rm, sft = open_model(rm_dir), open_model(sft_dir)
    plan = plan_dogerm(rm, sft, lam, output, max_shard_size=200_000, overwrite=True)  # the demo's own folder
    out.print(
        f"plan (from headers only): {len(plan.tensors)} tensors in {len(plan.shards)} shards, "
        f"{plan.total_size} bytes; dropped from the SFT model: {', '.join(plan.dropped)}"
    )
    stats = execute(plan, [rm, sft])
    print_stats(out, stats)
    # Check against an in-memory computation of the same formula.
    rm_q = _load(rm_dir, "model.layers.0.self_attn.q_proj.weight")
    sft_q = torch.load(next(sft_dir.glob("pytorch_model-00001-*.bin")), weights_only=True)[
        "model.layers.0.self_attn.q_proj.weight"
    ]
    expected = ((1 - lam) * rm_q.float() + lam * sft_q.float()).half()
    got = _load(output, "model.layers.0.self_attn.q_proj.weight")
    emb = _load(output, "model.embed_tokens.weight")
    config = json.loads((output / "config.json").read_text())
    tok = json.loads((output / "tokenizer.json").read_text())
    assert "score.weight" in _names(output) and "lm_head.weight" not in _names(output)
    max_diff = (got.float() - expected.float()).abs().max().item()
    out.print(f"q_proj of layer 0 vs in-memory (1-{lam})*RM + {lam}*SFT: max |diff| = {max_diff:g} (fp16)")
    out.print(
        f"embedding rows: {emb.shape[0]} (RM 512 + [PAD] from the SFT model); config vocab_size = "
        f"{config['vocab_size']}; tokenizer has [PAD] = "
        f"{next(t['id'] for t in tok['added_tokens'] if t['content'] == '[PAD]')}"
    )
    out.print(f"files: {', '.join(sorted(p.name for p in output.iterdir()))}")


def prepare_demo_folder(work: Path) -> None:
    """Make `work` ready for the demo without deleting anything the demo did not make.

    A missing or empty folder gets a marker file; a folder holding the marker (an earlier demo)
    loses only the demo's three subfolders. Any other folder is refused: `--output .` must not
    wipe the current folder.

    Raises:
        OutputError: `work` is a file, or a folder the demo did not create.
    """
    import shutil

    from lazymerge.errors import OutputError

    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise OutputError(f"{work} is not a folder the demo can use", hint="choose a new --output folder")
    if work.is_dir() and (work / DEMO_MARKER).is_file() and not (work / DEMO_MARKER).is_symlink():
        for sub in DEMO_FOLDERS:
            path = work / sub
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
        return
    if work.is_dir() and any(work.iterdir()):
        raise OutputError(
            f"{work} is not empty and was not made by lazymerge demo: nothing in it is deleted",
            hint="choose a new or empty --output folder for the demo",
        )
    try:
        work.mkdir(parents=True, exist_ok=True)
        (work / DEMO_MARKER).write_text("made by `lazymerge demo`; the demo may delete this folder's models\n")
    except OSError as exc:
        raise OutputError(f"cannot create {work}: {exc.strerror}") from exc


def _names(folder: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            names |= set(h.keys())
    return names


def _load(folder: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            if name in h.keys():
                return h.get_tensor(name)
    raise KeyError(name)
