"""`lazymerge demo`: build a small LLaMA-shaped RM + SFT pair offline, DogeRM-merge it, check it.

The pair mirrors the paper's math setting: the reward model is a LlamaForSequenceClassification
in fp16 safetensors shards (vocab 512), the domain model a LlamaForCausalLM in fp32 PyTorch
`.bin` shards with one extra token `[PAD]` (like MetaMath-7B).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console

from lazymerge.tiny_models import build_llama_pair

__all__ = ["run_demo"]


def run_demo(work: Path, out: Console, err: Console) -> None:
    """Build the pair in `work`, merge with lambda = 0.3, verify one tensor and the embedding."""
    import shutil

    import lazymerge
    from lazymerge.execute import execute
    from lazymerge.recipes.dogerm import plan_dogerm
    from lazymerge.report import print_stats

    out.print(f"[bold]lazymerge demo[/] in {work}/ (offline: the models are generated here)")
    if work.exists():
        shutil.rmtree(work)
    rm_dir, sft_dir = build_llama_pair(work)
    out.print(f"reward model: {rm_dir} (LlamaForSequenceClassification, fp16 safetensors, vocab 512)")
    out.print(f"domain model: {sft_dir} (LlamaForCausalLM, fp32 .bin, vocab 513 with [PAD])")
    output = work / "merged"
    lam = 0.3
    out.print(
        f"running: lazymerge dogerm --reward-model {rm_dir} --domain-model {sft_dir} "
        f"--weight {lam} --output {output} --max-shard-size 200kB"
    )
    rm, sft = lazymerge.open_model(rm_dir), lazymerge.open_model(sft_dir)
    plan = plan_dogerm(rm, sft, lam, output, max_shard_size=200_000)
    out.print(
        f"plan (from headers only): {len(plan.tensors)} tensors in {len(plan.shards)} shards, "
        f"{plan.total_size} bytes; dropped from the SFT model: {', '.join(plan.dropped)}"
    )
    stats = execute(plan, [rm, sft])
    print_stats(out, plan, stats)
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
