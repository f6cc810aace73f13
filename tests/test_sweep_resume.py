"""Sweep `--resume`: each of the K outputs resumes from its own manifest.

A real `python -m lazymerge dogerm --weight a,b` child is SIGKILLed (as in test_resume.py), then the
same command plus `--resume` finishes every output: each folder ends byte-identical to an
uninterrupted sweep, and the shards each output had finished are kept, not rewritten. Outputs that
kept different shards are completed with each input range still read once.
"""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

import pytest
import torch
from helpers import ANSI, kill, manifest_shards, snapshot, start_cli, stat_ids, wait_for

import lazymerge
from lazymerge.cli import main
from lazymerge.constants import DTYPE_SIZES
from lazymerge.lock import LOCK_NAME
from lazymerge.plan import MergePlan
from lazymerge.tiny_models import build_llama_pair

SHARD_SIZE = "1MB"  # about 7.5 MB per output: 8 shards
CHUNK = 2048
WEIGHTS = ["0.2", "0.7"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sweep-resume-pair")
    return build_llama_pair(
        root, hidden=256, layers=4, inter=688, vocab=1024, sft_dtype=torch.float16, sft_format="safetensors"
    )


def argv(pair: tuple[Path, Path], template: Path, *extra: object) -> list[str]:
    rm, sft = pair
    return [
        "dogerm", "--reward-model", str(rm), "--domain-model", str(sft), "--weight", ",".join(WEIGHTS),
        "--output", str(template), "--max-shard-size", SHARD_SIZE, "--chunk-elements", str(CHUNK),
        "--device", "cpu", "-q", *map(str, extra),
    ]  # fmt: skip


def outputs(template: Path) -> list[Path]:
    return [Path(str(template).format(weight=w)) for w in WEIGHTS]


@pytest.fixture(scope="module")
def reference(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], float]:
    """The uninterrupted sweep, and how long it took (to place the kills)."""
    template = tmp_path_factory.mktemp("sweep-reference") / "ref-{weight}"
    start = time.perf_counter()
    assert main(argv(pair, template)) == 0
    return outputs(template), time.perf_counter() - start


def kept_per_output(stdout: str) -> dict[str, int]:
    """`OUT: 7.50 MB written (3 shard(s) kept from the earlier run)` -> {OUT: 3}."""
    kept = {}
    for line in stdout.splitlines():
        m = re.match(r"(.+): .* written(?: \((\d+) shard\(s\) kept)?", line)
        if m:
            kept[m.group(1)] = int(m.group(2) or 0)
    return kept


def resume_and_check(capsys, pair, template: Path, refs: list[Path], context: str) -> list[int]:
    """Run the same sweep plus --resume; each output must equal its reference, and the shards
    reported kept must be exactly those not rewritten. Returns the kept count of each output."""
    outs = outputs(template)
    before = [stat_ids(o, [n for n in manifest_shards(o) if (o / n).is_file()]) for o in outs]
    code = main(argv(pair, template, "--resume"))
    captured = capsys.readouterr()
    stdout = ANSI.sub("", captured.out)
    assert code == 0, f"{context}: {captured.err}"
    kept = kept_per_output(stdout)
    counts = []
    for out, ref, ids in zip(outs, refs, before, strict=True):
        got, want = snapshot(out), snapshot(ref)
        assert sorted(got) == sorted(want), f"{context}: {sorted(got)}"
        assert all(got[n] == want[n] for n in want), f"{context}: {out.name} differs from the uninterrupted sweep"
        after = stat_ids(out, list(ids))
        untouched = [n for n in ids if after[n] == ids[n]]
        assert kept[str(out)] == len(untouched), f"{context}: {out}: {kept} kept, untouched {untouched}\n{stdout}"
        counts.append(kept[str(out)])
    return counts


@pytest.mark.slow  # test_resume.py kills a single merge the same way in the fast tier
def test_sweep_killed_after_two_shards_then_resumed(capsys, pair, reference, tmp_path: Path) -> None:
    refs, _ = reference
    template = tmp_path / "out-{weight}"
    first = outputs(template)[0]
    proc = start_cli(*argv(pair, template))
    reached = wait_for(lambda: len(manifest_shards(first)) >= 2, proc)
    finished = kill(proc)
    assert reached and finished is None, "the child finished before it could be killed"
    assert (first / LOCK_NAME).exists(), "expected the dead run's (stale) lock file"
    assert not (first / "model.safetensors.index.json").exists()
    kept = resume_and_check(capsys, pair, template, refs, "sweep killed after two shards")
    assert kept[0] >= 2 and all(k >= 1 for k in kept), kept


@pytest.mark.slow
def test_sweep_killed_at_random_moments_then_resumed(capsys, pair, reference, tmp_path: Path) -> None:
    refs, seconds = reference
    seed = int(os.environ.get("LAZYMERGE_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    for k in range(2):
        delay = (k + rng.random()) / 2 * seconds
        template = tmp_path / f"kill{k}" / "out-{weight}"
        proc = start_cli(*argv(pair, template))
        wait_for(lambda t=template: (outputs(t)[-1] / LOCK_NAME).exists(), proc)
        time.sleep(delay)
        kill(proc)
        resume_and_check(capsys, pair, template, refs, f"seed {seed}, kill after {delay:.3f} s of {seconds:.2f} s")


def shard_input_bytes(plan: MergePlan, k: int) -> int:
    return sum(
        seg.count * DTYPE_SIZES[src.dtype] for t in plan.shards[k].tensors for seg in t.segments for src in seg.sources
    )


@pytest.mark.slow
def test_outputs_that_kept_different_shards_read_each_range_once(pair, tmp_path: Path) -> None:
    # Output 0 lost shard 2 (deleted), output 1 has a damaged shard 4, output 2 is complete: the
    # resume rewrites exactly those two files and reads the inputs of those two shards, once.
    rm, sft = pair
    weights = [0.1, 0.5, 0.9]
    template = tmp_path / "o-{weight}"
    kw = {"max_shard_size": SHARD_SIZE, "chunk_elements": CHUNK, "device": "cpu"}
    lazymerge.dogerm(rm, sft, weights, template, **kw)
    outs = [Path(str(template).format(weight=f"{w:g}")) for w in weights]
    want = [snapshot(o) for o in outs]
    plans = lazymerge.dogerm(rm, sft, weights, template, dry_run=True, overwrite=True, **kw)
    names = [s.name for s in plans[0].shards]
    assert len(names) >= 5
    (outs[0] / names[2]).unlink()
    victim = outs[1] / names[4]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    victim.write_bytes(bytes(raw))
    redo = {(0, names[2]), (1, names[4])}
    before = [stat_ids(o, [n for n in names if (v, n) not in redo]) for v, o in enumerate(outs)]

    events = []
    stats = lazymerge.dogerm(rm, sft, weights, template, resume=True, progress=events.append, **kw)
    assert [s.resumed_shards for s in stats] == [len(names) - 1, len(names) - 1, len(names)]
    assert stats[0].bytes_read == shard_input_bytes(plans[0], 2) + shard_input_bytes(plans[0], 4)
    for v, out in enumerate(outs):
        assert snapshot(out) == want[v], out
        assert stat_ids(out, list(before[v])) == before[v], f"{out}: a kept shard was rewritten"
    total = sum(s.size for p in plans for s in p.shards)
    written = [e.bytes_written for e in events]
    assert written == sorted(written) and events[-1].kind == "done" and written[-1] == total
    assert all(e.total_bytes == total for e in events)
    assert sum(e.kind == "skip" for e in events) == 3 * len(names) - 2
