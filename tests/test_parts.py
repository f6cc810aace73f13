"""Split merges: `--part I/N` x N + `finalize` is byte for byte a single-process run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import cli, snapshot, stat_ids, ties_recipe

import lazymerge
from lazymerge.errors import LazyMergeError, OutputError, RecipeError
from lazymerge.parts import Part, part_costs, split_shards
from lazymerge.tiny_models import build_llama as tiny_llama
from lazymerge.verify import verify

SHARD = "60kB"


def _dogerm_parts(rm: Path, sft: Path, out: Path, n: int, **kw: object) -> None:
    for i in range(n):
        lazymerge.dogerm(rm, sft, 0.3, out, max_shard_size=SHARD, device="cpu", part=f"{i}/{n}", **kw)


@pytest.mark.parametrize("n", [1, 2, 3, 9])  # 9 parts > 5 shards: some parts write nothing
def test_dogerm_parts_and_finalize_equal_one_run(tmp_path: Path, llama_pair: tuple[Path, Path], n: int) -> None:
    rm, sft = llama_pair
    lazymerge.dogerm(rm, sft, 0.3, tmp_path / "single", max_shard_size=SHARD, device="cpu")
    _dogerm_parts(rm, sft, tmp_path / "parts", n, chunk_elements=97)
    assert not (tmp_path / "parts" / "config.json").exists()  # not a model until finalize
    result = lazymerge.finalize(tmp_path / "parts")
    assert (result.parts, result.shards) == (n, len([p for p in (tmp_path / "single").glob("*.safetensors")]))
    assert snapshot(tmp_path / "parts") == snapshot(tmp_path / "single")
    assert verify(tmp_path / "parts").ok


@pytest.fixture
def three(tmp_path: Path) -> list[Path]:
    return [tiny_llama(tmp_path / f"m{i}", i) for i in range(3)]


@pytest.mark.parametrize("extra", [{"global_magnitude": True}, {}])  # model-wide and per-tensor statistics
def test_ties_parts_equal_one_run(tmp_path: Path, three: list[Path], extra: dict) -> None:
    config = ties_recipe(*three, extra)
    lazymerge.merge(config, tmp_path / "single", device="cpu", max_shard_size="3kB")
    for i in range(3):
        lazymerge.merge(config, tmp_path / "parts", device="cpu", max_shard_size="3kB", part=Part(i, 3))
    lazymerge.finalize(tmp_path / "parts")
    assert snapshot(tmp_path / "parts") == snapshot(tmp_path / "single")


def test_sweep_parts_equal_one_sweep(tmp_path: Path, llama_pair: tuple[Path, Path]) -> None:
    rm, sft = llama_pair
    weights = [0.1, 0.5]
    lazymerge.dogerm(rm, sft, weights, tmp_path / "one-{weight}", max_shard_size=SHARD, device="cpu")
    for i in range(2):
        lazymerge.dogerm(
            rm, sft, weights, tmp_path / "split-{weight}", max_shard_size=SHARD, device="cpu", part=f"{i}/2"
        )
    for w in ("0.1", "0.5"):
        lazymerge.finalize(tmp_path / f"split-{w}")
        assert snapshot(tmp_path / f"split-{w}") == snapshot(tmp_path / f"one-{w}")


def test_split_is_balanced_deterministic_and_covers_every_shard(tmp_path: Path, llama_pair: tuple[Path, Path]) -> None:
    rm, sft = llama_pair
    plan = lazymerge.dogerm(rm, sft, 0.3, tmp_path / "o", max_shard_size="20kB", dry_run=True)
    for n in (1, 2, 4, 7, 40):
        parts = split_shards([plan], n)
        assert parts == split_shards([plan], n)
        assert sorted(k for p in parts for k in p) == list(range(len(plan.shards)))
    costs = part_costs([plan], 4)
    loads = [max(c.read_bytes, c.write_bytes) for c in costs]
    biggest = max(max(plan.shards[k].size for k in range(len(plan.shards))), max(loads) - min(loads))
    assert max(loads) - min(loads) <= biggest  # greedy LPT: within one shard of each other
    assert sum(c.write_bytes for c in costs) == sum(s.size for s in plan.shards)


def test_resume_keeps_a_parts_finished_shards(tmp_path: Path, llama_pair: tuple[Path, Path]) -> None:
    rm, sft = llama_pair
    out = tmp_path / "parts"
    _dogerm_parts(rm, sft, out, 2)
    with pytest.raises(OutputError, match=r"already holds part 1/2"):
        lazymerge.dogerm(rm, sft, 0.3, out, max_shard_size=SHARD, device="cpu", part="1/2")
    names = [f.name for f in lazymerge.dogerm(rm, sft, 0.3, tmp_path / "x", max_shard_size=SHARD, part="1/2").files]
    before = stat_ids(out, names)
    stats = lazymerge.dogerm(rm, sft, 0.3, out, max_shard_size=SHARD, device="cpu", part="1/2", resume=True)
    assert stats.resumed_shards == len(names) and stat_ids(out, names) == before
    # A part killed mid-shard: its shard unrecorded, a `.partial` left; --resume redoes just that one.
    manifest = out / "lazymerge_manifest.part-1-of-2.json"
    data = json.loads(manifest.read_text())
    del data["shards"][names[0]]
    manifest.write_text(json.dumps(data))
    (out / names[0]).rename(out / f"{names[0]}.partial")
    stats = lazymerge.dogerm(rm, sft, 0.3, out, max_shard_size=SHARD, device="cpu", part="1/2", resume=True)
    assert stats.resumed_shards == len(names) - 1 and not (out / f"{names[0]}.partial").exists()
    lazymerge.finalize(out)
    assert verify(out).ok


def test_finalize_refuses_missing_incomplete_and_mixed_parts(tmp_path: Path, llama_pair: tuple[Path, Path]) -> None:
    rm, sft = llama_pair
    out = tmp_path / "parts"
    lazymerge.dogerm(rm, sft, 0.3, out, max_shard_size=SHARD, device="cpu", part="0/3")
    with pytest.raises(OutputError, match=r"part 1/3, 2/3 missing"):
        lazymerge.finalize(out)
    with pytest.raises(OutputError, match=r"split into 3 parts"):  # the same merge split another way
        lazymerge.dogerm(rm, sft, 0.3, out, max_shard_size=SHARD, device="cpu", part="1/2")
    with pytest.raises(OutputError, match=r"part 0/3 of a different merge"):
        lazymerge.dogerm(rm, sft, 0.7, out, max_shard_size=SHARD, device="cpu", part="1/3")
    for i in (1, 2):
        lazymerge.dogerm(rm, sft, 0.3, out, max_shard_size=SHARD, device="cpu", part=f"{i}/3")
    shard = sorted(out.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(OutputError, match=r"is not complete") as info:
        lazymerge.finalize(out)
    assert "--resume" in info.value.hint
    assert not (out / "model.safetensors.index.json").exists()
    lazymerge.finalize(out, checksums=False)  # sizes only: the flipped bit is not seen
    with pytest.raises(OutputError, match="already finalized"):
        lazymerge.finalize(out)


def test_a_single_run_does_not_take_a_folder_of_parts(tmp_path: Path, llama_pair: tuple[Path, Path]) -> None:
    rm, sft = llama_pair
    out = tmp_path / "parts"
    lazymerge.dogerm(rm, sft, 0.3, out, max_shard_size=SHARD, device="cpu", part="0/2")
    with pytest.raises(OutputError, match="holds the parts of a split merge") as info:
        lazymerge.dogerm(rm, sft, 0.3, out, max_shard_size=SHARD, device="cpu")
    assert "lazymerge finalize" in info.value.hint
    lazymerge.dogerm(rm, sft, 0.3, out, max_shard_size=SHARD, device="cpu", overwrite=True)  # replaces them
    assert verify(out).ok and not list(out.glob("lazymerge_manifest.part-*"))


def test_a_part_refuses_a_users_folder_and_a_finished_model(tmp_path: Path, llama_pair: tuple[Path, Path]) -> None:
    rm, sft = llama_pair
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds no part of a split merge"):
        lazymerge.dogerm(rm, sft, 0.3, mine, device="cpu", part="0/2")
    lazymerge.dogerm(rm, sft, 0.3, tmp_path / "done", device="cpu")
    with pytest.raises(OutputError, match="already holds a finished merge"):
        lazymerge.dogerm(rm, sft, 0.3, tmp_path / "done", device="cpu", part="0/2", resume=True)


@pytest.mark.parametrize("text", ["2/2", "-1/2", "a/b", "1", "0/0"])
def test_bad_part_is_one_line(text: str) -> None:
    with pytest.raises(RecipeError):
        Part.parse(text)


def test_cli_part_flags_and_dry_run(
    tmp_path: Path, llama_pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rm, sft = llama_pair
    base = ["dogerm", "--reward-model", rm, "--domain-model", sft, "--weight", "0.3", "--max-shard-size", SHARD]
    code, out, _ = cli(capsys, *base, "-o", tmp_path / "o", "--dry-run", "--part", "1/3")
    assert code == 0 and "Split into 3 parts" in out and "1/3 (this one)" in out
    assert not (tmp_path / "o").exists()
    code, _, err = cli(capsys, *base, "-o", tmp_path / "o", "--part", "3/3")
    assert code == 2 and "part 3 of 3 does not exist" in err and "Traceback" not in err
    code, _, err = cli(capsys, *base, "-o", tmp_path / "o", "--part", "0/2", "--overwrite")
    assert code == 2 and "--overwrite does not combine with --part" in err
    code, _, err = cli(capsys, *base, "-o", tmp_path / "o", "--parts", "2", "-q")
    assert code == 2 and "--parts N splits a merge for --ray" in err
    for i in range(2):
        assert cli(capsys, *base, "-o", tmp_path / "o", "--part", f"{i}/2", "-q")[0] == 0
    code, out, _ = cli(capsys, "finalize", tmp_path / "o")
    assert code == 0 and "2 parts" in out
    code, _, err = cli(capsys, "finalize", tmp_path / "nowhere")
    assert code == 2 and "is not a folder" in err


def test_part_and_push_to_hub_refused(tmp_path: Path, llama_pair: tuple[Path, Path]) -> None:
    rm, sft = llama_pair
    with pytest.raises(LazyMergeError, match="--push-to-hub does not combine with --part"):
        lazymerge.dogerm(rm, sft, 0.3, tmp_path / "o", part="0/2", push_to_hub="me/x")


def test_ray_plan_checks_every_parts_folder_without_ray(tmp_path: Path, llama_pair: tuple[Path, Path]) -> None:
    rm, sft = llama_pair  # planning (--dry-run) needs no Ray: the same refusals as the run
    out = tmp_path / "parts"
    lazymerge.dogerm(rm, sft, 0.3, out, max_shard_size=SHARD, device="cpu", part="0/3")
    with pytest.raises(OutputError, match="split into 3 parts"):
        lazymerge.dogerm(rm, sft, 0.3, out, max_shard_size=SHARD, dry_run=True, ray=True, parts=2)
    plan = lazymerge.dogerm(rm, sft, 0.3, out, max_shard_size=SHARD, dry_run=True, ray=True, parts=3, resume=True)
    assert plan.output_dir == out
