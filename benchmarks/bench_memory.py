"""Benchmark (not a test): what a CPU DogeRM merge costs in memory and start-up, numpy vs torch kernels.

A DogeRM merge on the CPU runs on numpy and never imports torch (`lazymerge.kernels.numpy_cpu`);
`LAZYMERGE_CPU_KERNELS=torch` runs the same merge on the torch kernels (the path before, with
whatever torch build is installed). Each variant runs as a child process of the CLI; per run:

- wall time (spawn -> `os.wait4`) and peak RSS (`ru_maxrss` from the same `wait4`);
- launch -> first input byte: seconds from just before the spawn to the first data read of an
  input (`os.preadv`, the executor's reads and the start-up prefetch alike; header reads during
  planning are not counted), and to the executor's first chunk read;
- whether torch was imported, and the shards' checksums (the manifest's), which must be equal
  across variants;
- the disk floor measured in the same invocation (`dd` read of every input byte, then a `dd`
  write of the output's size, cold page cache);
- the small-box proof: the numpy variant in a fresh memory cgroup of `--cgroup-limit` (default
  256 MiB; cgroup v1 charges page cache too), reporting whether it finished, its peak charge and
  `oom_kill`.

Runs are interleaved (floor, numpy, torch, then reversed), the page cache dropped before each
(root only; `--no-drop-caches` keeps it), medians over `--repeat`. Writes `results/memory-<name>.json`.

    python benchmarks/bench_memory.py --size 1b --repeat 2
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import bench_merge as bm  # noqa: E402  (a sibling script, not a package)
import synthetic  # noqa: E402

# Runs in the child: records when the first input data byte is read, then runs the CLI.
_BOOTSTRAP = r"""
import os, sys, time
t0 = float(os.environ["BENCH_T0"])
events = os.environ["BENCH_EVENTS"]
seen = set()
def note(what):
    if what not in seen:
        seen.add(what)
        with open(events, "a") as f:
            f.write(f"{what} {time.time() - t0:.4f}\n")
            # CPU seconds of the process so far: about what the wall figure would be on an idle
            # machine, less the interpreter's own start (which the wall figure includes).
            f.write(f"{what}_cpu {time.process_time():.4f}\n")
real_preadv = os.preadv
def preadv(fd, buffers, offset, *rest):
    note("first_data_read")
    return real_preadv(fd, buffers, offset, *rest)
os.preadv = preadv
from lazymerge.io import reader
real_read_into = reader.InputReader.read_into
def read_into(self, *args, **kwargs):
    note("first_chunk_read")
    return real_read_into(self, *args, **kwargs)
reader.InputReader.read_into = read_into
import atexit
atexit.register(lambda: note("torch_imported" if sys.modules.get("torch") is not None else "torch_not_imported"))
from lazymerge.cli import run
sys.argv = ["lazymerge", *sys.argv[1:]]
run()
"""

VARIANTS = {"numpy": {}, "torch": {"LAZYMERGE_CPU_KERNELS": "torch"}}


def run_merge(pair: bm.Pair, work: Path, variant: str, cgroup_limit: int | None, drop: bool, rep: int) -> dict:
    out = work / f"out-{variant}"
    shutil.rmtree(out, ignore_errors=True)
    if drop:
        bm.drop_caches()
    events = work / f"events-{variant}-{rep}.txt"
    events.unlink(missing_ok=True)
    argv = [sys.executable, "-c", _BOOTSTRAP, "dogerm", "--reward-model", str(pair.first)]
    argv += ["--domain-model", str(pair.second), "--weight", str(bm.DOGERM_WEIGHT), "-o", str(out), "-q"]
    cg, where = (None, "")
    if cgroup_limit is not None:
        cg, where = bm.create_memory_cgroup(cgroup_limit, f"lazymerge-benchmem-{os.getpid()}-{variant}-{rep}")
        if cg is None:
            return {"variant": variant, "skipped": f"no memory cgroup: {where}"}
    env = {**os.environ, **VARIANTS[variant.split("@")[0]], "BENCH_EVENTS": str(events)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(bm.REPO_ROOT), os.environ.get("PYTHONPATH")]))
    log = work / f"log-{variant}-{rep}.txt"
    env["BENCH_T0"] = repr(time.time())
    wall, rss_kib, rc, sig = bm.run_child(argv, log, env, cg)
    row: dict = {
        "variant": variant,
        "rep": rep,
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(rss_kib * 1024 / 1e6, 1),
    }
    row.update({"returncode": rc, "signal": sig})
    for line in events.read_text().splitlines() if events.exists() else []:
        key, _, value = line.partition(" ")
        row[key] = float(value) if key.startswith("first") else True
    row["torch_imported"] = row.pop("torch_imported", False)
    for key in ("torch_not_imported", "torch_not_imported_cpu", "torch_imported_cpu"):
        row.pop(key, None)
    if cg is not None:
        row.update({"cgroup": where, "cgroup_limit_mb": round(cg.limit / 1e6, 1)})
        row.update({"cgroup_peak_mb": round(cg.peak_bytes() / 1e6, 1), "oom_kill": cg.oom_kills()})
        cg.remove()
    if rc != 0:
        row["log"] = bm.tail(log)
    manifest = out / "lazymerge_manifest.json"
    if manifest.exists():
        shards = json.loads(manifest.read_text())["shards"]
        row["digests"] = {name: s["digest"] for name, s in sorted(shards.items())}
    shutil.rmtree(out, ignore_errors=True)
    log.unlink(missing_ok=True)
    events.unlink(missing_ok=True)
    return row


def run_floor(pair: bm.Pair, work: Path, drop: bool, rep: int) -> dict:
    c = bm.floor_contender(pair, work)
    walls = {}
    for step in c.steps:
        r = bm.run_step(c, step, rep, work, None, drop)
        walls[step.label] = r.wall_s
    return {"variant": "floor", "rep": rep, "read_s": round(walls["read"], 2), "write_s": round(walls["write"], 2)}


def _torch_build() -> str | None:
    # The installed build (e.g. 2.13.0+cpu or 2.13.0+cu130), read without importing torch.
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return round(statistics.median(values), 3) if values else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(synthetic.SIZES), default="tiny")
    ap.add_argument("--dtype", choices=sorted(synthetic.DTYPES), default="fp16")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cgroup-limit", default="256M", help="memory cgroup limit of the small-box run ('' for none)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch-kernel variant")
    ap.add_argument("--no-drop-caches", action="store_true")
    ap.add_argument("--cache", type=Path, default=synthetic.default_cache())
    ap.add_argument("--results", type=Path, default=BENCH_DIR / "results")
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    drop = not args.no_drop_caches
    pair = bm.load_pair(args.size, args.dtype, "dogerm", args.cache)
    work = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=args.cache))
    variants = ["numpy"] + ([] if args.no_torch else ["torch"])
    rows: list[dict] = []
    load = os.getloadavg()
    try:
        for rep in range(args.repeat):
            order = ["floor", *variants]
            for v in order if rep % 2 == 0 else order[::-1]:
                row = run_floor(pair, work, drop, rep) if v == "floor" else run_merge(pair, work, v, None, drop, rep)
                print(json.dumps({k: x for k, x in row.items() if k != "digests"}), flush=True)
                rows.append(row)
        if args.cgroup_limit:
            limit = bm.parse_size(args.cgroup_limit)
            row = run_merge(pair, work, f"numpy@cgroup-{args.cgroup_limit}", limit, drop, 0)
            print(json.dumps({k: x for k, x in row.items() if k != "digests"}), flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    digests = {json.dumps(r["digests"]) for r in rows if "digests" in r}
    summary = {
        v: {
            k: median([r for r in rows if r["variant"] == v], k)
            for k in ("wall_s", "peak_rss_mb", "first_data_read", "first_data_read_cpu", "first_chunk_read")
        }
        for v in variants
    }
    floor = [r for r in rows if r["variant"] == "floor"]
    summary["floor"] = {"read_s": median(floor, "read_s"), "write_s": median(floor, "write_s")}
    result = {
        "size": args.size,
        "dtype": args.dtype,
        "input_gb": round(pair.input_bytes / 1e9, 2),
        "machine": bm.machine_info(),
        "load_average_at_start": [round(x, 2) for x in load],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch_build": _torch_build(),
        "same_output_bytes": len(digests) == 1,
        "summary": summary,
        "runs": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"memory-{args.name or f'{args.size}-{args.dtype}'}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"same output bytes in every run: {result['same_output_bytes']}; results in {path}")
    return 0 if result["same_output_bytes"] else 1


if __name__ == "__main__":
    sys.exit(main())
