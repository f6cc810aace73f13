"""Scaling of a split merge (`--part I/N` processes, and `--ray`), simulated on one machine.

    python benchmarks/bench_cluster.py [--size 1b] [--node-mbps 100,100] [--workers 1,2,4] [--ray]

What it measures: a DogeRM merge of a synthetic pair (benchmarks/synthetic.py), split into N parts,
each run by its own worker held to its own read and write rate (`node_throttle.py`: a token bucket
on the worker's positional reads and writes, "a node with its own disk of that speed"), for N = 1,
2, 4: the wall from launch to a finalized folder, and the input throughput against N x the single
worker's. Then the same N parts as Ray tasks on a local Ray cluster (`--ray`): Ray's overhead
against the `--part` processes doing the same work, cluster start-up timed apart. Every output is
checked against an unthrottled single-process run: the same small files byte for byte, and the
same size and digest (computed by each run from the bytes it wrote) for every weight shard; each
output is deleted once checked, so one output at a time is on disk.

What it is not: N machines. The inputs sit in this machine's page cache (read once before the
runs, so no run pays the cold read), every worker shares its cores and its one disk, so the
aggregate is bounded by this machine; an unthrottled single run is measured in the same process
run and printed as that bound. On a loaded machine (other jobs on the cores) the figures are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from node_throttle import ENV  # noqa: E402
from synthetic import make_pair  # noqa: E402

_WORKER = "import node_throttle; node_throttle.install(); from lazymerge.cli import main; raise SystemExit(main())"


def _env(node_mbps: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")])
    env.pop(ENV, None)
    if node_mbps:
        env[ENV] = node_mbps
    return env


def _args(rm: Path, sft: Path, out: Path, shard: str) -> list[str]:
    return [
        "dogerm", "--reward-model", str(rm), "--domain-model", str(sft), "--weight", "0.3",
        "-o", str(out), "--max-shard-size", shard, "--device", "cpu", "-q",
    ]  # fmt: skip


def _snapshot(folder: Path) -> dict[str, object]:
    """What a finished output holds, to compare runs without keeping two outputs on disk (a 7B
    output is 13 GB): every small file's bytes, and each weight shard's size and the digest the
    run computed from the bytes it wrote (the manifest's)."""
    manifest = json.loads((folder / "lazymerge_manifest.json").read_text())
    shards = {name: (s["size"], s["digest"]) for name, s in manifest["shards"].items()}
    small = {p.name: p.read_bytes() for p in folder.iterdir() if p.name not in shards and p.is_file()}
    small.pop("lazymerge_manifest.json", None)  # holds the run's timing and options
    return {"names": sorted(p.name for p in folder.iterdir()), "shards": shards, "small": small}


def _same_and_remove(folder: Path, reference: dict[str, object]) -> bool:
    same = _snapshot(folder) == reference
    shutil.rmtree(folder, ignore_errors=True)
    return same


def _warm(paths: list[Path]) -> None:
    for folder in paths:
        for f in sorted(folder.glob("*.safetensors")):
            with f.open("rb") as h:
                while h.read(64 << 20):
                    pass


def run_parts(rm: Path, sft: Path, out: Path, n: int, shard: str, node_mbps: str | None, workers: int) -> float:
    """N `--part I/N` processes at once, then `lazymerge finalize`: seconds from launch to done."""
    shutil.rmtree(out, ignore_errors=True)
    env = _env(node_mbps)
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WORKER,
                *_args(rm, sft, out, shard),
                "--part",
                f"{i}/{n}",
                "--workers",
                str(workers),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        for i in range(n)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a part failed: exit codes {codes}")
    subprocess.run(
        [sys.executable, "-m", "lazymerge", "finalize", str(out), "--sizes-only"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def run_single(rm: Path, sft: Path, out: Path, shard: str, node_mbps: str | None, workers: int | None) -> float:
    shutil.rmtree(out, ignore_errors=True)
    extra = ["--workers", str(workers)] if workers else []
    start = time.perf_counter()
    command = [sys.executable, "-c", _WORKER, *_args(rm, sft, out, shard), *extra]
    subprocess.run(command, env=_env(node_mbps), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_ray(rm: Path, sft: Path, out: Path, n: int, shard: str, node_mbps: str, workers: int) -> tuple[float, float]:
    """(cluster start-up s, merge s) of `--ray --parts N` on a local cluster of N worker CPUs."""
    import ray

    import lazymerge

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    env = {ENV: node_mbps, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])}
    ray.init(
        num_cpus=n, include_dashboard=False, log_to_driver=False,
        runtime_env={"env_vars": env, "worker_process_setup_hook": "node_throttle.install"},
    )  # fmt: skip
    up = time.perf_counter() - start
    try:
        start = time.perf_counter()
        lazymerge.dogerm(rm, sft, 0.3, out, max_shard_size=shard, device="cpu", ray=True, parts=n, workers=workers)
        return up, time.perf_counter() - start
    finally:
        ray.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1b", choices=["tiny", "1b", "7b"])
    ap.add_argument("--node-mbps", default="100,100", help="each worker's read,write rate in MB/s")
    ap.add_argument("--workers", default="1,2,4", help="N values")
    ap.add_argument("--threads", type=int, default=1, help="merge threads per worker")
    ap.add_argument("--shard", default="200MB", help="output shard cap (parts are whole shards)")
    ap.add_argument("--ray", action="store_true", help="also run --ray --parts N for each N")
    ap.add_argument("--ray-for", default=None, help="the N values --ray runs for (default: all of --workers)")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lazymerge-bench-cluster"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    ns = [int(x) for x in args.workers.split(",")]
    rm, sft = make_pair(args.size, "fp16", "dogerm", args.cache)
    read = sum(f.stat().st_size for d in (rm, sft) for f in d.glob("*.safetensors"))
    if read < os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2:
        _warm([rm, sft])  # else (7B on this machine) they cannot stay cached: every run reads the disk
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"{os.cpu_count()} cores, load {load[0]:.1f}/{load[1]:.1f}; {args.size} pair, {read / 1e9:.2f} GB of inputs")
    results: dict[str, object] = {"size": args.size, "node_mbps": args.node_mbps, "load_before": load, "runs": []}
    floor = run_single(rm, sft, work / "reference", args.shard, None, None)
    reference = _snapshot(work / "reference")
    shutil.rmtree(work / "reference")
    print(f"unthrottled single process (this machine's bound): {floor:6.1f} s  {read / floor / 1e9:5.2f} GB/s")
    results["unthrottled_s"] = floor
    base = None
    for n in ns:
        wall = run_parts(rm, sft, work / f"parts-{n}", n, args.shard, args.node_mbps, args.threads)
        same = _same_and_remove(work / f"parts-{n}", reference)
        base = base or wall * n  # N = 1 first: the single worker's time
        rate = read / wall / 1e9
        ideal = n * read / (base / 1) / 1e9 if base else 0.0
        row: dict[str, object] = {"n": n, "parts_s": wall, "gbps": rate, "ideal_gbps": ideal, "same_bytes": same}
        line = f"N={n}: --part x{n} + finalize {wall:6.1f} s  {rate:5.2f} GB/s  ({rate / ideal:4.0%} of {n} x single)"
        if args.ray and (args.ray_for is None or n in [int(x) for x in args.ray_for.split(",")]):
            up, ray_wall = run_ray(rm, sft, work / f"ray-{n}", n, args.shard, args.node_mbps, args.threads)
            row.update(ray_start_s=up, ray_s=ray_wall, ray_same_bytes=_same_and_remove(work / f"ray-{n}", reference))
            line += f"; --ray {ray_wall:6.1f} s ({ray_wall / wall - 1:+.0%}), cluster start {up:4.1f} s"
        print(line + ("" if same else "  BYTES DIFFER"))
        results["runs"].append(row)  # type: ignore[union-attr]
    results["load_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
