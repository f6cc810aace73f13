"""Deterministic output: the same inputs and recipe give byte-identical folders on every run, for
every chunk size and number of merge workers; shard metadata has sorted keys and no timestamps;
the model card, config and index are stable."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from helpers import dogerm_args, snapshot

from lazymerge.cli import main
from lazymerge.constants import DEFAULT_CHUNK_ELEMENTS
from lazymerge.io.header import read_header

TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}|\d{2}:\d{2}:\d{2}|\b1[5-9]\d{8}\b")  # dates, times, epoch seconds


def run(capsys, *args: object) -> None:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 0, err


def dogerm(capsys, pair: tuple[Path, Path], out: Path, chunk: int, workers: int) -> dict[str, bytes]:
    extra = ["-q", "--device", "cpu", "--max-shard-size", "60kB", "--chunk-elements", chunk, "--workers", workers]
    run(capsys, *dogerm_args(*pair, "0.35", "-o", out, *extra))
    return snapshot(out)


@pytest.mark.slow
def test_dogerm_is_byte_identical_across_runs_chunks_and_workers(capsys, llama_pair, tmp_path: Path) -> None:
    # The pair mixes fp16 safetensors (RM) and fp32 .bin (SFT, one extra token), so the embedding
    # union, the reward head copy and fp32 -> fp16 rounding are all covered.
    reference = dogerm(capsys, llama_pair, tmp_path / "ref", DEFAULT_CHUNK_ELEMENTS, 1)
    shards = [n for n in reference if n.endswith(".safetensors")]
    assert len(shards) >= 3, sorted(reference)
    time.sleep(1.1)  # a clock that leaked into the output would now differ
    cases = [(DEFAULT_CHUNK_ELEMENTS, 1), (61, 2), (1000, 1), (1000, 2), (DEFAULT_CHUNK_ELEMENTS, 2)]
    for chunk, workers in cases:
        got = dogerm(capsys, llama_pair, tmp_path / f"out-{chunk}-{workers}", chunk, workers)
        assert sorted(got) == sorted(reference), (chunk, workers)
        for name, data in reference.items():
            assert got[name] == data, f"{name} differs with chunk {chunk}, {workers} worker(s)"


@pytest.mark.parametrize("threads", ["3", "2"])
def test_reads_split_over_threads_give_the_same_bytes(
    capsys, llama_pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: str
) -> None:
    # The read pool (on with 4+ cores, and on the GPU host) cuts each chunk's input reads into
    # pieces read at once: tiny pieces here, so that every chunk of the small test model is
    # split and its pieces finish in whatever order the threads are scheduled.
    import lazymerge.io.reader

    reference = dogerm(capsys, llama_pair, tmp_path / "ref", 1000, 2)
    monkeypatch.setenv("LAZYMERGE_READ_THREADS", threads)
    monkeypatch.setattr(lazymerge.io.reader, "_READ_PIECE", 64)
    reads: list[int] = []
    original = lazymerge.io.reader.InputReader.read_into

    def counting(self, checkpoint, file, offset, buf, drop=True):  # type: ignore[no-untyped-def]
        reads.append(len(buf))
        original(self, checkpoint, file, offset, buf, drop)

    monkeypatch.setattr(lazymerge.io.reader.InputReader, "read_into", counting)
    got = dogerm(capsys, llama_pair, tmp_path / "split", 1000, 2)
    assert got == reference
    assert reads and max(reads) <= max(64, -(-4000 // int(threads))), "chunk reads were not split"


def test_linear_merge_is_byte_identical(capsys, llama_pair, tmp_path: Path) -> None:
    rm, _ = llama_pair
    other = rm.parent / "reward-model-copy"
    other.mkdir()
    for p in rm.iterdir():
        (other / p.name).write_bytes(p.read_bytes())
    recipe = tmp_path / "linear.yml"
    recipe.write_text(
        json.dumps(
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(rm), "parameters": {"weight": 0.3}},
                    {"model": str(other), "parameters": {"weight": 0.7}},
                ],
                "dtype": "bfloat16",
            }
        )
    )
    outs = []
    for k, (chunk, workers) in enumerate([(DEFAULT_CHUNK_ELEMENTS, 2), (101, 1)]):
        out = tmp_path / f"linear{k}"
        run(
            capsys, "merge", recipe, "-o", out, "-q", "--device", "cpu", "--chunk-elements", chunk, "--workers", workers
        )
        outs.append(snapshot(out))
    assert outs[0] == outs[1]


def test_metadata_sorted_and_free_of_timestamps(capsys, llama_pair, tmp_path: Path) -> None:
    files = dogerm(capsys, llama_pair, tmp_path / "out", DEFAULT_CHUNK_ELEMENTS, 2)
    out = tmp_path / "out"
    for name, data in files.items():
        text = data.decode("utf-8") if not name.endswith(".safetensors") else ""
        if name.endswith(".safetensors"):
            header = read_header(out / name)
            n = int.from_bytes(data[:8], "little")
            raw = json.loads(data[8 : 8 + n])
            meta_keys = list(raw["__metadata__"])
            assert meta_keys == sorted(meta_keys), (name, meta_keys)
            assert next(iter(raw)) == "__metadata__", "metadata first, as the reference writer does"
            assert header.metadata["format"] == "pt"
            recipe = header.metadata["lazymerge_recipe"]
            assert recipe == json.dumps(json.loads(recipe), sort_keys=True), "recipe JSON keys are sorted"
            text = json.dumps(header.metadata)
        elif name.endswith(".json"):
            obj = json.loads(text)
            if name in ("model.safetensors.index.json", "lazymerge_manifest.json"):
                assert text == json.dumps(obj, indent=2, sort_keys=True) + "\n" or _keys_sorted(obj), name
        assert not TIMESTAMP.search(text), f"{name} holds something like a timestamp: {TIMESTAMP.search(text)}"
    # The output folder's own path is not in any file (the same merge into another folder is identical).
    for name, data in files.items():
        assert str(out).encode() not in data, name


def _keys_sorted(obj: object) -> bool:
    if isinstance(obj, dict):
        keys = list(obj)
        return keys == sorted(keys) and all(_keys_sorted(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_keys_sorted(v) for v in obj)
    return True
