"""A model folder from a stranger: its links stay inside it, and its index accounts for every
tensor of its shards (lazymerge/io/checkpoint.py)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import write_model

from lazymerge.errors import CheckpointError
from lazymerge.io.checkpoint import open_checkpoint

TENSORS = {"a": torch.ones(2, 3), "b": torch.zeros(4), "c": torch.arange(3.0)}
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


def _move_out(folder: Path, name: str, elsewhere: Path) -> Path:
    """Move `folder/name` to `elsewhere` and leave a symlink to it."""
    elsewhere.parent.mkdir(parents=True, exist_ok=True)
    (folder / name).rename(elsewhere)
    (folder / name).symlink_to(os.path.relpath(elsewhere, folder))
    return elsewhere


def test_shard_linking_outside_the_folder_is_refused(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", TENSORS, shards=2)
    target = _move_out(model, SHARD2, tmp_path / "private" / "other.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(f"{SHARD2} links to {target}, outside the model folder")):
        open_checkpoint(model)


def test_single_weight_file_linking_outside_is_refused(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", {"a": torch.ones(2)})
    _move_out(model, "model.safetensors", tmp_path / "private.safetensors")
    with pytest.raises(CheckpointError, match="outside the model folder"):
        open_checkpoint(model)
    # The same file named by the user is followed: the user chose it.
    assert list(open_checkpoint(model / "model.safetensors").tensors) == ["a"]


def test_index_and_side_files_linking_outside_are_refused(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", TENSORS, shards=2)
    (model / "config.json").write_text("{}")
    _move_out(model, "config.json", tmp_path / "secret.json")
    ckpt = open_checkpoint(model)
    with pytest.raises(CheckpointError, match=r"config\.json links to"):
        ckpt.side_file("config.json")
    _move_out(model, INDEX, tmp_path / "index.json")
    with pytest.raises(CheckpointError, match=re.escape(f"{INDEX} links to")):
        open_checkpoint(model)


def test_links_inside_the_folder_and_a_linked_folder_are_fine(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", TENSORS, shards=2)
    _move_out(model, SHARD1, model / "blobs" / "x")
    (model / "config.json").write_text("{}")
    _move_out(model, "config.json", model / "blobs" / "c")
    link = tmp_path / "link-to-m"
    link.symlink_to(model, target_is_directory=True)
    for folder in (model, link):
        ckpt = open_checkpoint(folder)
        assert sorted(ckpt.tensors) == ["a", "b", "c"]
        assert ckpt.side_file("config.json") is not None


def _hf_cache(tmp_path: Path, repo: str = "models--org--name") -> Path:
    """The huggingface_hub cache layout: snapshots/REV/FILE -> ../../blobs/SHA."""
    source = write_model(tmp_path / "src", TENSORS, shards=2)
    (source / "config.json").write_text("{}")
    snapshot = tmp_path / "hub" / repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    blobs = tmp_path / "hub" / repo / "blobs"
    blobs.mkdir()
    for i, file in enumerate(sorted(p.name for p in source.iterdir())):
        (source / file).rename(blobs / f"sha{i}")
        (snapshot / file).symlink_to(Path("..") / ".." / "blobs" / f"sha{i}")
    return snapshot


def test_huggingface_cache_snapshot_opens(tmp_path: Path) -> None:
    snapshot = _hf_cache(tmp_path)
    ckpt = open_checkpoint(snapshot)
    assert sorted(ckpt.tensors) == ["a", "b", "c"]
    assert ckpt.side_file("config.json") is not None


def test_cache_snapshot_linking_into_another_repo_is_refused(tmp_path: Path) -> None:
    snapshot = _hf_cache(tmp_path)
    other = tmp_path / "hub" / "models--someone--private" / "blobs" / "secret"
    other.parent.mkdir(parents=True)
    (snapshot / SHARD2).resolve().rename(other)
    (snapshot / SHARD2).unlink()
    (snapshot / SHARD2).symlink_to(os.path.relpath(other, snapshot))
    with pytest.raises(CheckpointError, match="outside the model folder"):
        open_checkpoint(snapshot)


def test_tensor_missing_from_the_index_is_an_error(tmp_path: Path) -> None:
    # Before: silently dropped from the checkpoint, hence from the merged output.
    model = write_model(tmp_path / "m", TENSORS, shards=2)
    index = json.loads((model / INDEX).read_text())
    shard = index["weight_map"].pop("b")
    (model / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(f"shard {shard} holds 'b', which the index does not list")):
        open_checkpoint(model)


def test_shard_missing_from_the_index_is_an_error(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", TENSORS, shards=2)
    index = json.loads((model / INDEX).read_text())
    assert index["weight_map"].pop("c") == SHARD2
    (model / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(f"{SHARD2} is in the folder but not in the index")):
        open_checkpoint(model)
    (model / SHARD2).rename(model / "unrelated.safetensors")  # other weight files are not shards
    assert sorted(open_checkpoint(model).tensors) == ["a", "b"]


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_real_huggingface_cache_opens_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The layout huggingface_hub itself writes (snapshots/REV/FILE -> ../../blobs/SHA), read back
    # the way lazymerge reads a cached repo with HF_HUB_OFFLINE=1.
    from hub_server import serving_hub
    from huggingface_hub import HfApi, constants, snapshot_download

    import lazymerge

    for server in serving_hub(tmp_path, monkeypatch, "hf_test_token"):
        model = write_model(tmp_path / "m", TENSORS, shards=2)
        (model / "config.json").write_text("{}")
        api = HfApi(endpoint=server.endpoint, token="hf_test_token")
        api.create_repo("alice/linked")
        api.upload_folder(repo_id="alice/linked", folder_path=model)
        snapshot = Path(snapshot_download("alice/linked"))
        assert (snapshot / SHARD1).is_symlink(), "the cache did not use links: this test proves nothing"
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        ckpt = lazymerge.open_model("alice/linked")
        assert sorted(ckpt.tensors) == ["a", "b", "c"]
        assert ckpt.side_file("config.json") is not None
