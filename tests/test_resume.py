"""Crash safety and `--resume`: a real `python -m lazymerge` child is killed with SIGKILL at random
moments, then the same command plus `--resume` finishes the job. The folder must then be
byte-identical to an uninterrupted run (shards, index, config, tokenizer, model card, manifest),
with no `.partial` left; shards the killed run had finished (recorded in the manifest with size and
sha256) are kept, a damaged one is redone, and a manifest of a different merge is refused.

The kill delays are drawn at random within the measured merge time (stratified, so early, middle
and late moments are all hit); set LAZYMERGE_KILL_SEED to replay a failing draw.
"""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

import pytest
import torch
from helpers import cli, kill, manifest_shards, snapshot, start_cli, stat_ids, wait_for

from lazymerge.cli import main
from lazymerge.lock import LOCK_NAME, LOCK_NAMES
from lazymerge.tiny_models import build_llama_pair

SHARD_SIZE = "2MB"  # about 16 MB of output: 9 shards
CHUNK = 2048  # elements per chunk: thousands of chunks, so a kill lands mid-shard
KILLS = 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    # RM fp16 safetensors (2 shards) + SFT fp16 safetensors with an extra [PAD] token: 16 MB each.
    root = tmp_path_factory.mktemp("resume-pair")
    return build_llama_pair(
        root, hidden=384, layers=4, inter=1024, vocab=2048, sft_dtype=torch.float16, sft_format="safetensors"
    )


def argv(pair: tuple[Path, Path], out: Path, *extra: object, weight: str = "0.3") -> list[str]:
    rm, sft = pair
    return [
        "dogerm",
        "--reward-model",
        str(rm),
        "--domain-model",
        str(sft),
        "--weight",
        weight,
        "--output",
        str(out),
        "--max-shard-size",
        SHARD_SIZE,
        "--chunk-elements",
        str(CHUNK),
        "--device",
        "cpu",
        "-q",
        *map(str, extra),
    ]


@pytest.fixture(scope="module")
def reference(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The uninterrupted run, and how long its merge took (to place the kills)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    start = time.perf_counter()
    assert main(argv(pair, out)) == 0
    return out, time.perf_counter() - start


def assert_identical(out: Path, ref: Path, context: str) -> None:
    got, want = snapshot(out), snapshot(ref)
    assert not [n for n in got if n.endswith(".partial")], f"{context}: {sorted(got)}"
    assert sorted(got) == sorted(want), context
    for name in want:
        assert got[name] == want[name], f"{context}: {name} differs from the uninterrupted run"


def kept_count(stdout: str) -> int:
    m = re.search(r"kept from the earlier run\s*│\s*(\d+) shard", stdout)
    return int(m.group(1)) if m else 0


def resume_and_check(capsys, pair, out: Path, ref: Path, context: str) -> int:
    """Run the same command plus --resume; check the result; return how many shards were kept."""
    recorded = manifest_shards(out)
    before = stat_ids(out, [n for n in recorded if (out / n).is_file()])
    code, stdout, err = cli(capsys, *argv(pair, out, "--resume"))
    assert code == 0, f"{context}: {err}"
    assert_identical(out, ref, context)
    kept = kept_count(stdout)
    after = stat_ids(out, list(before))
    untouched = [n for n in before if after[n] == before[n]]
    # Shards reported as kept are exactly those whose file was not rewritten.
    assert kept == len(untouched), f"{context}: {kept} reported kept, untouched: {untouched}\n{stdout}"
    return kept


@pytest.mark.slow
def test_kill_at_random_moments_then_resume(capsys, pair, reference, tmp_path: Path) -> None:
    ref, merge_seconds = reference
    assert len([p for p in ref.glob("model-*.safetensors")]) >= 6
    seed = int(os.environ.get("LAZYMERGE_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    # One delay in each quarter of the merge (plus a margin past its end), measured from the
    # moment the child holds the output lock, i.e. has planned and starts writing.
    delays = [(k + rng.random()) / KILLS * merge_seconds * 1.2 for k in range(KILLS)]
    total_kept = 0
    stages = []
    for k, delay in enumerate(delays):
        out = tmp_path / f"out{k}"
        context = f"seed {seed}, kill {k} after {delay:.3f} s of a {merge_seconds:.2f} s merge"
        proc = start_cli(*argv(pair, out))
        wait_for(lambda out=out: (out / LOCK_NAME).exists(), proc)
        time.sleep(delay)
        finished = kill(proc)
        names = sorted(p.name for p in out.iterdir()) if out.exists() else []
        stages.append((round(delay, 3), finished, len(manifest_shards(out)), [n for n in names if "partial" in n]))
        if finished is None:
            # A killed run leaves nothing that looks like a finished model: no index.
            assert "model.safetensors.index.json" not in names or len(manifest_shards(out)) == 9, (context, names)
        total_kept += resume_and_check(capsys, pair, out, ref, f"{context}; state after kill {stages[-1]}")
    print(
        f"kill seed {seed}, {total_kept} shard(s) kept in all: (delay, exit code if it finished, shards in manifest, partial files) = {stages}"
    )
    assert any(s[1] is None for s in stages), f"no run was actually killed: {stages}"


@pytest.mark.slow  # builds a 16 MB pair; test_lock.py kills a run and resumes it in the quick tier
def test_kill_after_two_shards_keeps_them_then_damage(capsys, pair, reference, tmp_path: Path) -> None:
    # Deterministic counterpart of the random kills: SIGKILL as soon as the manifest records two
    # finished shards. A --resume with another weight is refused without touching the folder; the
    # right --resume keeps (does not rewrite) at least those two shards.
    ref, _ = reference
    out = tmp_path / "out"
    proc = start_cli(*argv(pair, out))
    reached = wait_for(lambda: len(manifest_shards(out)) >= 2, proc)
    finished = kill(proc)
    assert reached and finished is None, "the child finished before it could be killed"
    assert (out / LOCK_NAME).exists(), "expected the dead run's (stale) lock file"

    before = snapshot(out)
    code, stdout, err = cli(capsys, *argv(pair, out, "--resume", weight="0.7"))
    assert code == 2, (code, err)
    assert stdout == ""
    lines = err.splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), err
    assert "different merge" in lines[0] and str(out) in lines[0], err
    assert "Traceback" not in err
    after = snapshot(out)
    for name in LOCK_NAMES:
        after.pop(name, None)
        before.pop(name, None)
    assert after == before, "the refused run changed the folder"

    recorded = sorted(manifest_shards(out))
    assert len(recorded) >= 2
    kept = resume_and_check(capsys, pair, out, ref, "kill after two shards")
    assert kept >= 2, f"kept {kept} of the {len(recorded)} finished shards"

    # Now damage a finished shard (same size: only its checksum can tell) and delete another:
    # --resume redoes exactly those two.
    victim = out / "model-00003-of-00009.safetensors"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    victim.write_bytes(bytes(raw))
    (out / "model-00005-of-00009.safetensors").unlink()
    code, stdout, err = cli(capsys, *argv(pair, out, "--resume"))
    assert code == 0, err
    assert kept_count(stdout) == 7, stdout
    assert_identical(out, ref, "after --resume over a damaged and a missing shard")
