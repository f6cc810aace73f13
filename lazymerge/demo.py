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

__all__ = ["DEMO_MARKER", "prepare_demo_folder", "run_demo"]

DEMO_MARKER = ".lazymerge-demo"
DEMO_FOLDERS = ("reward-model", "domain-model", "merged")


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
    config = json.loads((output / "config.json").read_text(encoding="utf-8"))
    tok = json.loads((output / "tokenizer.json").read_text(encoding="utf-8"))
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
