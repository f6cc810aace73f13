"""Write lanes: several output shards written at once (lazymerge.lanes, lazymerge.pipeline).

The schedule is checked as data (every task once, each shard in file order, one shard at a time
per lane, lanes balanced by bytes); a merge with 3 lanes must give the bytes and manifest of a
merge with 1, with shards really open at the same time, and every input file opened and released
exactly once however the lanes order its uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import dogerm_args, snapshot

from lazymerge.cli import main
from lazymerge.lanes import LANES_ENV, interleave_shards, write_lanes
from lazymerge.manifest import MANIFEST_NAME
from lazymerge.plan import ChunkTask, Source


def shard_tasks(sizes: list[list[int]]) -> list:
    """iter_chunks-shaped tasks: sizes[k] lists the element counts of shard k's chunks (fp16)."""
    tasks: list = []
    for k, counts in enumerate(sizes):
        tasks.append(("start", k))
        offset = 0
        for n in counts:
            tasks.append(ChunkTask(k, offset, n, "F16", (Source(0, "a", offset, "F16", 1.0),), None, False))
            offset += 2 * n
        tasks.append(("end", k))
    return tasks


def shard_of(task: object) -> int:
    return task[1] if isinstance(task, tuple) else task.shard  # type: ignore[index,attr-defined]


@pytest.mark.parametrize("lanes", [1, 2, 3, 5])
def test_schedule_runs_every_task_once_each_shard_in_order_one_shard_per_lane(lanes: int) -> None:
    tasks = shard_tasks([[100] * 7, [50] * 3, [400, 1, 1], [10] * 9, [300]])
    schedule = interleave_shards(tasks, lanes)
    assert sorted(schedule.order) == list(range(len(tasks)))
    assert schedule.lanes == min(lanes, 5)
    for k in range(5):
        mine = [i for i in schedule.order if shard_of(tasks[i]) == k]
        assert mine == sorted(mine), f"shard {k} out of file order"
    for lane in range(schedule.lanes):
        shards = [shard_of(tasks[i]) for i, owner in zip(schedule.order, schedule.lane, strict=True) if owner == lane]
        runs = [s for j, s in enumerate(shards) if j == 0 or shards[j - 1] != s]
        assert len(runs) == len(set(runs)), f"lane {lane} went back to a shard: {runs}"
    open_now: set[int] = set()
    for i in schedule.order:
        task = tasks[i]
        if isinstance(task, tuple):
            (open_now.add if task[0] == "start" else open_now.discard)(task[1])
        assert len(open_now) <= schedule.lanes


def test_lanes_advance_at_the_same_pace_in_bytes() -> None:
    tasks = shard_tasks([[1000] * 20, [1000] * 20, [500] * 40])  # same bytes, different chunks
    schedule = interleave_shards(tasks, 3)
    done = [0, 0, 0]
    for i, lane in zip(schedule.order, schedule.lane, strict=True):
        if isinstance(tasks[i], ChunkTask):
            done[lane] += tasks[i].out_nbytes
        assert max(done) - min(done) <= 2000, done  # never more than one chunk apart
    # The three shards finish together, not one after the other as in plan order.
    ends = [p for p, i in enumerate(schedule.order) if tasks[i] == ("end", 0)]
    assert ends[0] > len(tasks) * 0.9


def test_one_lane_or_one_shard_keeps_the_plan_order() -> None:
    tasks = shard_tasks([[10] * 3, [10] * 4])
    assert interleave_shards(tasks, 1).order == list(range(len(tasks)))
    single = shard_tasks([[10] * 5])
    assert interleave_shards(single, 4).order == list(range(len(single)))
    assert interleave_shards([], 3).order == []


def test_default_lanes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LANES_ENV, raising=False)
    assert write_lanes("cpu", 10) == 1
    assert write_lanes("cuda", 10) == 3
    assert write_lanes("cuda", 2) == 2  # never more lanes than shards
    assert write_lanes("cuda", 0) == 1
    monkeypatch.setenv(LANES_ENV, "4")
    assert write_lanes("cpu", 10) == 4
    assert write_lanes("cuda", 10, asked=2) == 2  # execute(..., write_lanes=2) wins over the variable
    # Low-disk inputs or shards deleted after upload: one shard at a time, whatever was asked.
    assert write_lanes("cuda", 10, asked=3, save_disk=True) == 1
    assert write_lanes("cuda", 10, save_disk=True) == 1


def merge(capsys: pytest.CaptureFixture[str], pair: tuple[Path, Path], out: Path) -> dict[str, bytes]:
    extra = ["-q", "--device", "cpu", "--max-shard-size", "60kB", "--chunk-elements", "1000", "--workers", "2"]
    code = main(dogerm_args(*pair, "0.35", "-o", out, *extra))
    assert code == 0, capsys.readouterr().err
    return snapshot(out)


def test_three_lanes_write_the_same_bytes_with_shards_open_at_once(
    capsys: pytest.CaptureFixture[str], llama_pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lazymerge.io.checkpoint
    import lazymerge.io.reader
    import lazymerge.io.writer

    monkeypatch.setenv("LAZYMERGE_DIRECT_WRITE", "0")  # the lanes' writer: buffered, as on the GPU path
    monkeypatch.setenv(LANES_ENV, "1")
    reference = merge(capsys, llama_pair, tmp_path / "one-lane")
    shards = [n for n in reference if n.endswith(".safetensors")]
    assert len(shards) >= 4, "the test needs several output shards"

    open_writers: set[int] = set()
    most_open = [0]
    opened: list[tuple[int, str]] = []
    released: list[tuple[int, str]] = []
    writer_init = lazymerge.io.writer.HashingWriter.__init__
    writer_finish = lazymerge.io.writer.ShardWriter.finish
    reader_source = lazymerge.io.reader.InputReader.source
    release = lazymerge.io.checkpoint.Checkpoint.release_file

    def init(self, *args, **kw):  # type: ignore[no-untyped-def]
        writer_init(self, *args, **kw)
        open_writers.add(id(self))
        most_open[0] = max(most_open[0], len(open_writers))

    def finish(self):  # type: ignore[no-untyped-def]
        open_writers.discard(id(self))
        return writer_finish(self)

    def source(self, checkpoint, file):  # type: ignore[no-untyped-def]
        if (checkpoint, file) not in self.sources:
            opened.append((checkpoint, file))
        return reader_source(self, checkpoint, file)

    def release_file(self, file):  # type: ignore[no-untyped-def]
        released.append((id(self), file))
        return release(self, file)

    monkeypatch.setattr(lazymerge.io.writer.HashingWriter, "__init__", init)
    monkeypatch.setattr(lazymerge.io.writer.ShardWriter, "finish", finish)
    monkeypatch.setattr(lazymerge.io.reader.InputReader, "source", source)
    monkeypatch.setattr(lazymerge.io.checkpoint.Checkpoint, "release_file", release_file)
    monkeypatch.setenv(LANES_ENV, "3")
    got = merge(capsys, llama_pair, tmp_path / "three-lanes")

    assert got == reference  # shards, index and manifest (checksums) alike
    assert most_open[0] == 3, f"at most {most_open[0]} shards were open at once"
    assert len(opened) == len(set(opened)), "an input file was opened again after its release"
    assert len(released) == len(set(released)) == len(set(opened))
    manifest = json.loads(got[MANIFEST_NAME])
    assert sorted(manifest["shards"]) == sorted(shards), manifest
