"""Shard checksums (`lazymerge.io.digest`): the documented scheme, its sensitivity, and manifests
written by the previous scheme (sha256 blocks) still verifying and resuming."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import xxhash

import lazymerge.io.digest as digest
from lazymerge.manifest import MANIFEST_NAME, Manifest

BLOCK = 4096


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digest, "BLOCK_BYTES", BLOCK)


def _by_hand(data: bytes, block_hash) -> str:
    blocks = [data[i : i + BLOCK] for i in range(0, len(data), BLOCK)] or []
    return hashlib.sha256(b"".join(block_hash(b) for b in blocks)).hexdigest()


@pytest.mark.parametrize("size", [0, 1, BLOCK - 1, BLOCK, 3 * BLOCK, 3 * BLOCK + 17])
def test_file_digest_is_sha256_over_xxh3_128_block_digests(tmp_path, small_blocks, size) -> None:
    data = os.urandom(size)
    path = tmp_path / "shard.safetensors"
    path.write_bytes(data)
    assert digest.file_digest(path) == _by_hand(data, xxhash.xxh3_128_digest)
    old = digest.file_digest(path, algorithm="sha256-of-16MiB-block-sha256")
    assert old == _by_hand(data, lambda b: hashlib.sha256(b).digest())


def test_one_flipped_byte_anywhere_changes_the_digest(tmp_path, small_blocks) -> None:
    data = bytearray(os.urandom(3 * BLOCK + 100))
    path = tmp_path / "shard.safetensors"
    path.write_bytes(data)
    original = digest.file_digest(path)
    for where in (0, BLOCK - 1, BLOCK, 2 * BLOCK + 5, len(data) - 1):
        data[where] ^= 0x01
        path.write_bytes(data)
        assert digest.file_digest(path) != original, where
        data[where] ^= 0x01
    path.write_bytes(data)
    assert digest.file_digest(path) == original


def test_a_manifest_of_the_previous_scheme_still_matches(tmp_path, small_blocks) -> None:
    data = os.urandom(2 * BLOCK + 3)
    (tmp_path / "model.safetensors").write_bytes(data)
    entry = {
        "size": len(data),
        "digest": _by_hand(data, lambda b: hashlib.sha256(b).digest()),
        "algorithm": "sha256-of-16MiB-block-sha256",
    }
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"fingerprint": "f", "shards": {"model.safetensors": entry}}))
    manifest = Manifest.load(tmp_path)
    assert manifest is not None
    assert manifest.finished(tmp_path, "model.safetensors", len(data))
    entry["digest"] = "0" * 64
    assert not manifest.matches(tmp_path / "model.safetensors", entry)
    entry["algorithm"] = "md5-of-everything"
    assert not manifest.matches(tmp_path / "model.safetensors", entry)
