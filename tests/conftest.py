"""Shared fixtures: tiny checkpoints written into tmp_path (never the network)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lazymerge.demo import _tokenizer_json, build_llama_pair


def write_model(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    *,
    shards: int = 1,
    fmt: str = "safetensors",
    config: dict | None = None,
    vocab: list[str] | None = None,
) -> Path:
    """Write `tensors` as a Hugging Face model folder: sharded with an index when shards > 1."""
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
        index = f"{stem}.{ext}.index.json"
        (folder / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if vocab is not None:
        (folder / "tokenizer.json").write_text(json.dumps(_tokenizer_json(vocab)))
    return folder


@pytest.fixture
def model_factory(tmp_path: Path) -> Callable[..., Path]:
    """model_factory(name, tensors, **kw) -> folder under tmp_path."""

    def make(name: str, tensors: dict[str, torch.Tensor], **kw: object) -> Path:
        return write_model(tmp_path / name, tensors, **kw)

    return make


@pytest.fixture
def llama_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny LLaMA RM (fp16 safetensors, 2 shards) + SFT (fp32 .bin, 2 shards, extra [PAD])."""
    return build_llama_pair(tmp_path / "pair")


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model folder, read with safetensors' own reader."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out
