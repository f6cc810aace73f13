"""`lazymerge verify OUT [--recompute N]`: passes on good outputs (sharded or single file) and fails, with exit 2, one error line and the table of checks, on a flipped
byte, a truncated shard, an index that lies (missing tensor, wrong total_size, a tensor moved to
another shard), on altered tensor bytes that only recomputation can catch, and when the manifest
(the only thing vouching for the shards' bytes) is missing, garbled or silent about a shard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import cli
from safetensors.torch import load_file, save_file

from lazymerge.io.digest import file_digest
from lazymerge.io.header import read_header
from lazymerge.manifest import MANIFEST_NAME, Manifest
from lazymerge.verify import verify

INDEX = "model.safetensors.index.json"


def merge(capsys, pair: tuple[Path, Path], out: Path, shard_size: str = "60kB") -> Path:
    rm, sft = pair
    args = ["dogerm", "--reward-model", rm, "--domain-model", sft, "--weight", "0.3", "-o", out, "-q"]
    code, _, err = cli(capsys, *args, "--device", "cpu", "--max-shard-size", shard_size)
    assert code == 0, err
    return out


@pytest.fixture
def merged(capsys, llama_pair, tmp_path: Path) -> Path:
    out = merge(capsys, llama_pair, tmp_path / "out")
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    return out


def assert_passes(capsys, out: Path, *extra: object) -> str:
    report = verify(out, recompute=int(extra[1]) if extra else 0)
    assert report.ok, [c for c in report.checks if not c.ok]
    code, stdout, err = cli(capsys, "verify", out, *extra)
    assert code == 0, err
    assert err == ""
    assert "FAIL" not in stdout
    return stdout


def assert_fails(capsys, out: Path, failing: set[str], *extra: object) -> str:
    """Exit 2; stderr is one `error:` line naming exactly the failing checks; stdout is the table."""
    code, stdout, err = cli(capsys, "verify", out, *extra)
    assert code == 2, (code, stdout, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "failed verification" in lines[0], err
    assert "Traceback" not in stdout + err
    named = {n.strip() for n in lines[0].split("failed verification: ", 1)[1].split(",")}
    assert {n.split(" ")[0] for n in named} == failing, (named, failing)
    assert "FAIL" in stdout and "check" in stdout, stdout
    report = verify(out, recompute=int(extra[1]) if extra else 0)
    assert not report.ok
    return lines[0]


def shards(out: Path) -> list[Path]:
    return sorted(out.glob("model-*.safetensors"))


def regenerate_manifest(out: Path) -> None:
    """Re-record every shard's current size and sha256, as if the manifest had been made to match."""
    manifest = Manifest.load(out)
    assert manifest is not None
    for path in shards(out):
        manifest.record(path.name, path.stat().st_size, file_digest(path))
    manifest.save(out)


# -- passing ------------------------------------------------------------------------------------------


def test_good_sharded_output_passes(capsys, merged: Path) -> None:
    stdout = assert_passes(capsys, merged)
    assert "shards match" in stdout
    assert_passes(capsys, merged, "--recompute", "3")


def test_good_single_file_output_passes(capsys, llama_pair, tmp_path: Path) -> None:
    out = merge(capsys, llama_pair, tmp_path / "single", shard_size="5GB")
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert not (out / INDEX).exists()
    assert_passes(capsys, out, "--recompute", "3")


# -- failing ------------------------------------------------------------------------------------------


def test_flipped_byte_fails_the_checksum(capsys, merged: Path) -> None:
    victim = shards(merged)[1]
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0x01  # tensor data: the header still parses, sizes are right
    victim.write_bytes(bytes(raw))
    assert_fails(capsys, merged, {"checksums"})


def test_truncated_shard_fails_header_and_checksum(capsys, merged: Path) -> None:
    victim = shards(merged)[0]
    data = victim.read_bytes()
    victim.write_bytes(data[:-10])
    line = assert_fails(capsys, merged, {"header", "index", "checksums"})
    assert victim.name in line
    report = verify(merged)
    header_check = next(c for c in report.checks if c.name == f"header {victim.name}")
    assert "truncated?" in header_check.detail


def _edit_index(out: Path, edit) -> None:
    obj = json.loads((out / INDEX).read_text())
    edit(obj)
    (out / INDEX).write_text(json.dumps(obj, indent=2))


def test_index_naming_a_missing_tensor_fails(capsys, merged: Path) -> None:
    _edit_index(merged, lambda o: o["weight_map"].__setitem__("model.ghost.weight", shards(merged)[0].name))
    assert_fails(capsys, merged, {"index"})
    assert "model.ghost.weight" in next(c.detail for c in verify(merged).checks if c.name == "index")


def test_index_with_a_wrong_total_size_fails(capsys, merged: Path) -> None:
    _edit_index(merged, lambda o: o["metadata"].__setitem__("total_size", o["metadata"]["total_size"] + 2))
    assert_fails(capsys, merged, {"index"})
    assert "total_size" in next(c.detail for c in verify(merged).checks if c.name == "index")


def test_index_naming_a_missing_shard_file_fails(capsys, merged: Path) -> None:
    last = shards(merged)[-1]
    last.unlink()
    assert_fails(capsys, merged, {"index", "checksums"})
    assert last.name in next(c.detail for c in verify(merged).checks if c.name == "index")


def test_tensor_moved_to_another_shard_fails(capsys, merged: Path) -> None:
    # The shards are rewritten (valid files) with one tensor moved from the first to the second,
    # the index is left as it was, and the manifest is made to match the new files: only the
    # index-vs-shards check can tell.
    first, second = shards(merged)[:2]
    a, b = load_file(first), load_file(second)
    name = sorted(a)[0]
    b[name] = a.pop(name)
    meta = read_header(first).metadata
    save_file(a, first, metadata=meta)
    save_file(b, second, metadata=meta)
    regenerate_manifest(merged)
    line = assert_fails(capsys, merged, {"index"})
    assert "index" in line
    detail = next(c.detail for c in verify(merged).checks if c.name == "index")
    assert name in detail and second.name in detail


def test_altered_tensor_with_a_matching_manifest_fails_only_recompute(capsys, merged: Path) -> None:
    # Every tensor gets one byte changed (so whichever 3 are sampled, one is altered), and the
    # manifest is regenerated to match: headers, index, sizes and checksums all pass.
    for path in shards(merged):
        header = read_header(path)
        raw = bytearray(path.read_bytes())
        for entry in header.tensors.values():
            if entry.nbytes:
                raw[header.data_start + entry.begin] ^= 0x01
        path.write_bytes(bytes(raw))
    regenerate_manifest(merged)
    assert_passes(capsys, merged)
    line = assert_fails(capsys, merged, {"recompute"}, "--recompute", "3")
    assert "recompute" in line
    detail = next(c.detail for c in verify(merged, recompute=3).checks if c.name == "recompute")
    assert detail.startswith("differ: ")


def test_recompute_of_a_large_slerp_tensor_matches_whatever_the_thread_count(tmp_path: Path) -> None:
    # slerp's norms and dot product are sums over 2**20-element rows, and torch picks the order
    # of such a sum by its thread count: verify must recompute with the merge's own (1 thread
    # per worker), or it reports a good output as different.
    import torch
    from conftest import write_model

    import lazymerge

    gen = torch.Generator().manual_seed(7)
    models = [
        write_model(
            tmp_path / name, {"w": torch.randn((1 << 20) + 5, generator=gen), "b": torch.randn(8, generator=gen)}
        )
        for name in ("base", "other")
    ]
    config = {
        "merge_method": "slerp",
        "base_model": str(models[0]),
        "models": [{"model": str(models[1])}],
        "parameters": {"t": 0.4},
    }
    out = tmp_path / "out"
    lazymerge.merge(config, out, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        report = verify(out, recompute=2)
    finally:
        torch.set_num_threads(threads)
    assert report.ok, [c for c in report.checks if not c.ok]
    assert next(c for c in report.checks if c.name == "recompute").ok


def test_manifest_of_an_unknown_checksum_scheme_says_so(capsys, merged: Path) -> None:
    manifest = json.loads((merged / MANIFEST_NAME).read_text())
    first = sorted(manifest["shards"])[0]
    manifest["shards"][first]["algorithm"] = "blake9-of-everything"
    (merged / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert_fails(capsys, merged, {"checksums"})
    _, stdout, _ = cli(capsys, "verify", merged)
    assert "does not know" in stdout and "blake9-of-everything" in stdout and "mismatch" not in stdout


# -- the manifest itself ------------------------------------------------------------------------------


def test_deleted_manifest_fails_and_says_so(capsys, merged: Path) -> None:
    (merged / MANIFEST_NAME).unlink()
    assert_fails(capsys, merged, {"checksums"})
    assert f"no {MANIFEST_NAME}" in checksums_detail(merged)


@pytest.mark.parametrize(
    "garbage",
    [b"", b"{not json", b"[]", b'{"fingerprint": 3, "shards": {}}', b'{"fingerprint": "x", "shards": [1]}'],
)
def test_garbled_manifest_fails_and_says_so(capsys, merged: Path, garbage: bytes) -> None:
    (merged / MANIFEST_NAME).write_bytes(garbage)
    assert_fails(capsys, merged, {"checksums"})
    assert "is damaged" in checksums_detail(merged)


def test_manifest_silent_about_a_shard_fails(capsys, merged: Path) -> None:
    manifest = json.loads((merged / MANIFEST_NAME).read_text())
    dropped = sorted(manifest["shards"])[-1]
    del manifest["shards"][dropped]
    (merged / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert_fails(capsys, merged, {"checksums"})
    detail = checksums_detail(merged)
    assert "not in the manifest" in detail and dropped in detail, detail


def checksums_detail(out: Path) -> str:
    return next(c.detail for c in verify(out).checks if c.name == "checksums")
