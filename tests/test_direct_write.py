"""O_DIRECT shard writing (`lazymerge.io.direct`): the same files and checksums as the buffered
writer, with small blocks so that the buffer ring wraps many times; used on the CPU path for a
single output only; falls back to the page cache where O_DIRECT is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import dogerm_args, snapshot

import lazymerge.io.digest
import lazymerge.io.direct
from lazymerge.cli import main
from lazymerge.io.direct import DirectShardWriter, _Unaligned
from lazymerge.manifest import MANIFEST_NAME


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # 8 KiB hash blocks (a multiple of the O_DIRECT alignment) in both writers: the ~200 kB
    # shards of the test pair then span dozens of blocks, and the 3-buffer ring wraps.
    monkeypatch.setattr(lazymerge.io.digest, "BLOCK_BYTES", 8192)
    monkeypatch.setattr(lazymerge.io.direct, "BLOCK_BYTES", 8192)
    monkeypatch.delenv("LAZYMERGE_DEBUG", raising=False)


def dogerm(capsys, pair: tuple[Path, Path], out: Path, *extra: str) -> dict[str, bytes]:
    code = main(dogerm_args(*pair, "0.35", "-o", out, "-q", "--device", "cpu", "--max-shard-size", "150kB", *extra))
    assert code == 0, capsys.readouterr().err
    return snapshot(out)


def spy_writers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    made: list[str] = []
    original = DirectShardWriter.__init__

    def init(self, directory, shard, pool, *args):  # type: ignore[no-untyped-def]
        made.append(shard.name)
        original(self, directory, shard, pool, *args)

    monkeypatch.setattr(DirectShardWriter, "__init__", init)
    return made


def test_direct_and_buffered_writers_give_the_same_files_and_checksums(
    capsys, llama_pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = spy_writers(monkeypatch)
    direct = dogerm(capsys, llama_pair, tmp_path / "direct")
    shards = [n for n in direct if n.endswith(".safetensors")]
    assert sorted(made) == sorted(shards) and len(shards) >= 2
    assert max(len(direct[n]) for n in shards) > 10 * 8192, "shards must span many blocks"
    monkeypatch.setenv("LAZYMERGE_DIRECT_WRITE", "0")
    buffered = dogerm(capsys, llama_pair, tmp_path / "buffered")
    assert len(made) == len(shards), "LAZYMERGE_DIRECT_WRITE=0 must use the buffered writer"
    assert direct == buffered  # shard bytes, index, and the manifest's per-shard sha256
    manifest = json.loads(direct[MANIFEST_NAME])
    assert manifest["shards"], manifest


def test_a_shard_file_is_never_longer_than_the_shard(
    capsys, llama_pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last block's unaligned tail is not padded on disk: a watcher of the output folder (a
    low-disk budget, `--delete-after-upload`'s accounting) never sees more than the shard's size."""
    over: list[tuple[str, int, int]] = []
    tails: list[int] = []
    write_all = DirectShardWriter._write_all

    def watched(self, fd, view, offset):  # type: ignore[no-untyped-def]
        write_all(self, fd, view, offset)
        size = os.fstat(self.fd).st_size
        if size > self.shard.size:
            over.append((self.shard.name, size, self.shard.size))
        if fd != self.dfd:
            tails.append(len(view))

    monkeypatch.setattr(DirectShardWriter, "_write_all", watched)
    dogerm(capsys, llama_pair, tmp_path / "out")
    assert over == []
    assert tails and max(tails) < 4096, tails  # only the tails went through the page cache


def test_refused_alignment_falls_back_to_the_page_cache(
    capsys, llama_pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = dogerm(capsys, llama_pair, tmp_path / "reference")
    refused: list[int] = []
    write_all = DirectShardWriter._write_all

    def refuse_direct(self, fd, view, offset):  # type: ignore[no-untyped-def]
        if fd == self.dfd:
            refused.append(offset)
            raise _Unaligned
        write_all(self, fd, view, offset)

    monkeypatch.setattr(DirectShardWriter, "_write_all", refuse_direct)
    assert dogerm(capsys, llama_pair, tmp_path / "fallback") == reference
    assert len(refused) > 10


def test_no_o_direct_at_all_uses_the_page_cache(capsys, llama_pair, tmp_path: Path, monkeypatch) -> None:
    reference = dogerm(capsys, llama_pair, tmp_path / "reference")
    monkeypatch.setattr(lazymerge.io.direct, "direct_io_supported", lambda _d: False)
    made = spy_writers(monkeypatch)
    assert dogerm(capsys, llama_pair, tmp_path / "buffered") == reference
    assert made == []


def test_sweeps_and_the_gpu_path_keep_the_buffered_writer(tmp_path: Path, monkeypatch) -> None:
    class Backend:
        name = "cpu"

    out = tmp_path / "o"
    out.mkdir()

    class Plan:
        output_dir = out

    monkeypatch.delenv("LAZYMERGE_DIRECT_WRITE", raising=False)
    assert lazymerge.io.direct.use_direct_writes(Backend(), [Plan()])
    assert not lazymerge.io.direct.use_direct_writes(Backend(), [Plan(), Plan()])
    Backend.name = "cuda"
    assert not lazymerge.io.direct.use_direct_writes(Backend(), [Plan()])
    monkeypatch.setenv("LAZYMERGE_DIRECT_WRITE", "1")
    assert lazymerge.io.direct.use_direct_writes(Backend(), [Plan()])
    assert list(out.iterdir()) == [], "the O_DIRECT probe must not leave a file behind"
