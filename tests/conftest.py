"""Shared fixtures: tiny checkpoints written into tmp_path (never the network)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lazymerge.tiny_models import build_llama_pair
from lazymerge.tiny_models import save_model as write_model


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
