"""Shared fixtures: tiny checkpoints written into tmp_path (never the network).

Plain functions live in helpers.py; `write_model` and `load_folder` are importable from here too,
where test files have always imported them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers import load_folder, write_model
from hub_server import HubServer, serving_hub

from lazymerge.tiny_models import build_llama_pair

__all__ = ["load_folder", "write_model"]  # re-exported: test files import them from here


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A local Hub-protocol server (tests/hub_server.py) under tmp_path, the client pointed at it
    with its token ("hf_test_token") as HF_TOKEN. A module that needs another server defines its own."""
    yield from serving_hub(tmp_path, monkeypatch, "hf_test_token")


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's LAZYMERGE_DEBUG=1 must not change what the tests see (tracebacks instead of
    one-line errors)."""
    monkeypatch.delenv("LAZYMERGE_DEBUG", raising=False)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the --low-disk private download folders go during the test, in this process
    (`tempfile`) and in its children (TMPDIR)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
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
