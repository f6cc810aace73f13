"""Hub-to-Hub DogeRM merge on a network we control: lazymerge streaming vs the mergekit way.

A local Hub-protocol server (tests/hub_server.py, loopback only) holds a synthetic RM + SFT pair
(`synthetic.py`, kind dogerm) and serves it under a bandwidth cap per direction and a latency
per request (`--down`, `--up` bytes/s, `--latency` s). Two contenders run as child processes, in
the same invocation, against the same server:

- `lazymerge`: `lazymerge dogerm --reward-model bench/rm --domain-model bench/sft --low-disk
  --push-to-hub bench/out-lazymerge --delete-after-upload`: inputs streamed by range requests,
  each shard uploaded while the next merges.
- `mergekit-way`: what a mergekit user does: `snapshot_download` both repos in full, merge
  (lazymerge on the local copies, the fastest local merge we have: the difference is the
  workflow), then `upload_folder` (mergekit cannot push).

For each: wall time (spawn -> wait4), the child's CPU seconds (user + system: near wall x cores,
the run is bound by the CPU, not the network), peak RSS, and the disk high-water
mark: input + output bytes on disk (allocated blocks of the child's HF cache, temporary folder
and output folder, sampled every 20 ms). Three floors, each labelled in the output:

- `floor` (the caps): max(input weight bytes / down cap, output bytes / up cap); `x floor`.
- `probe floor` (what the server delivers here, now): before the contenders, a plain client in
  a child process (`--probe-client`) downloads `--probe-bytes` of an input with 16 MiB ranges,
  4 at a time, and uploads as many through the LFS protocol; the same formula with those rates.
  The server's CPU seconds per GB each way are reported with it (this process is idle otherwise).
- `measured floor`: the longer of the mergekit way's pure download and upload phases
  (`x measured`): the network as a real client saw it during this run.

`--probe-only` runs the probe alone (the server without any merge: MB/s and CPU s/GB). Both
pushed repos must list the same tensors in their index (their shard layouts differ: a push has
short edge shards), and `lazymerge verify --hub` must pass on lazymerge's (its manifest's sha256
against the Hub's LFS ids). Peak RSS is the child's VmHWM, sampled (ru_maxrss would start at this process's).

    python benchmarks/bench_hub.py --size tiny
    python benchmarks/bench_hub.py --size 1b --down 500e6 --up 250e6 --latency 0.02 --max-shard-size 500MB
    python benchmarks/bench_hub.py --size 7b --contenders lazymerge --cgroup-limit 1G ...   # the small-box proof

`--sink-uploads` makes the server check every upload in full (size, sha256) without keeping its bytes,
for runs whose pushed outputs would not fit the disk (the 7B mergekit way); recorded in the JSON.

`--cgroup-limit` runs the lazymerge child in a fresh memory cgroup (bench_merge's helpers; v1 charges
page cache too) and records its peak charge and `oom_kill` count.

Writes `results/hub-<size>.json` (or `--name`). The server runs in this process: on a machine
with few cores its Python threads compete with the children for CPU, say so with the figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO_ROOT / "tests"))

import synthetic  # noqa: E402  (a sibling script, not a package)

TOKEN = "hf_benchBenchBenchBench"
RM, SFT = "bench/rm", "bench/sft"
CONTENDERS = ("lazymerge", "mergekit-way")


def _du(folders: list[Path]) -> tuple[int, int]:
    """Bytes allocated on disk under `folders` (blocks, so a reserved shard counts whole): all of
    them, and those of weight files (shards, also while written under a temporary name)."""
    total = weights = 0
    stack = [str(f) for f in folders]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        elif e.is_file(follow_symlinks=False):
                            n = e.stat(follow_symlinks=False).st_blocks * 512
                            total += n
                            weights += n if (".safetensors" in e.name or ".bin" in e.name) else 0
                    except OSError:
                        pass
        except OSError:
            pass
    return total, weights


def _timeline(requests: list, t0: float) -> dict[str, float | None]:
    """Seconds from the spawn: first and last weight-file byte down, first and last upload (LFS
    PUT), and the last answer (the commit). Where the run's wall goes over the floor."""
    weights = [
        r
        for r in requests
        if r.method == "GET" and r.bytes_sent and (r.filename or "").endswith((".safetensors", ".bin"))
    ]
    puts = sorted((r for r in requests if r.method == "PUT" and r.bytes_received), key=lambda r: r.started)

    def at(values: list[float], pick) -> float | None:
        return round(pick(values) - t0, 3) if values else None

    return {
        "first_download": at([r.started for r in weights], min),
        "last_download_done": at([r.ended for r in weights], max),
        "first_upload": at([r.started for r in puts], min),
        "last_upload_done": at([r.ended for r in puts], max),
        "last_answer": at([r.ended for r in requests], max),
        # the upload direction: seconds sending shard bodies (PUTs) and seconds between them
        "upload_busy": round(sum(r.ended - r.started for r in puts), 3),
        "upload_gaps": round(sum(max(0.0, b.started - a.ended) for a, b in itertools.pairwise(puts)), 3),
    }


def _write_request_log(path: Path, contender: str, requests: list, t0: float) -> None:
    """One JSON line a request, in arrival order: where each second of the run went, on the wire."""
    with path.open("a") as f:
        for r in sorted(requests, key=lambda r: r.started):
            row = {"contender": contender, "method": r.method, "path": r.path, "range": r.range,
                   "status": r.status, "down": r.bytes_sent, "up": r.bytes_received,
                   "started": round(r.started - t0, 4), "ended": round(r.ended - t0, 4)}  # fmt: skip
            f.write(json.dumps(row) + "\n")


def _spawn_measured(argv: list[str], env: dict[str, str], watch: list[Path], cgroup: object = None) -> dict:
    """One child: wall, exit code, peak RSS (ru_maxrss from wait4), disk high-water mark of `watch`;
    inside `cgroup` (a bench_merge.MemoryCgroup) from its first instruction when given."""
    peak_disk = peak_weights = peak_rss = 0
    stop = threading.Event()
    pid = 0

    def sample() -> None:
        nonlocal peak_disk, peak_weights, peak_rss
        while not stop.is_set():
            total, weights = _du(watch)
            peak_disk, peak_weights = max(peak_disk, total), max(peak_weights, weights)
            peak_rss = max(peak_rss, _vm_hwm(pid))
            stop.wait(0.02)

    log = watch[0].parent / f"{watch[0].name}.log"
    with open(log, "w") as f:
        spawned = time.monotonic()  # the server's clock (same process): for the request timeline
        began = time.perf_counter()
        if cgroup is None:
            pid = os.posix_spawn(argv[0], argv, env, file_actions=[(os.POSIX_SPAWN_DUP2, f.fileno(), 1),
                                                                  (os.POSIX_SPAWN_DUP2, f.fileno(), 2)])  # fmt: skip
        else:

            def enter() -> None:  # between fork and exec: the merge starts inside the limit
                with open(cgroup.procs_file(), "w") as procs:  # type: ignore[attr-defined]
                    procs.write(str(os.getpid()))

            pid = subprocess.Popen(argv, env=env, stdout=f, stderr=f, preexec_fn=enter).pid
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - began
    stop.set()
    sampler.join()
    text = log.read_text(errors="replace")
    # ru_maxrss would start at this process's own RSS (fork + exec keeps the high-water mark);
    # VmHWM is reset by exec, so the sampled VmHWM is the child's own peak (up to the last sample).
    return {"spawned": spawned, "wall_s": round(wall, 3), "rc": os.waitstatus_to_exitcode(status), "peak_disk_bytes": peak_disk,
            "peak_weight_disk_bytes": peak_weights,
            "peak_rss_bytes": peak_rss, "ru_maxrss_bytes": usage.ru_maxrss * 1024, "log_tail": text[-1500:],
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2)}  # fmt: skip


def _vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _mergekit_way(args: argparse.Namespace) -> int:
    """The child of the `mergekit-way` contender: download both repos whole, merge, upload_folder."""
    from huggingface_hub import HfApi, snapshot_download

    import lazymerge

    phases = {}
    t = time.perf_counter()
    rm = snapshot_download(RM)
    sft = snapshot_download(SFT)
    phases["download_s"] = time.perf_counter() - t
    t = time.perf_counter()
    lazymerge.dogerm(rm, sft, args.weight, args.out, max_shard_size=args.max_shard_size, device="cpu", progress=False)
    phases["merge_s"] = time.perf_counter() - t
    t = time.perf_counter()
    api = HfApi()
    api.create_repo(args.repo, exist_ok=True)
    api.upload_folder(repo_id=args.repo, folder_path=args.out)
    phases["upload_s"] = time.perf_counter() - t
    print(json.dumps(phases))
    return 0


def _probe_client(args: argparse.Namespace) -> int:
    """The probe's child: ranged GETs of one file (4 connections, 16 MiB ranges, readinto one
    buffer each), then one LFS upload of as many bytes (batch, then a single PUT by sendfile)."""
    import hashlib
    import http.client
    from urllib.parse import urlsplit

    host, size, n = urlsplit(args.endpoint).netloc, args.probe_size, int(args.probe_bytes)
    step, starts, lock = 16 << 20, list(range(0, min(n, size), 16 << 20)), threading.Lock()

    def worker() -> None:
        conn, buf = http.client.HTTPConnection(host), memoryview(bytearray(step))
        while True:
            with lock:
                if not starts:
                    return
                start = starts.pop(0)
            length = min(step, size - start)
            conn.request("GET", args.probe_path, headers={"Range": f"bytes={start}-{start + length - 1}"})
            response, got = conn.getresponse(), 0
            while got < length:
                k = response.readinto(buf[got:length])
                if not k:
                    raise SystemExit("the server closed a range early")
                got += k
            response.read()

    down = min(n, size)
    t = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    down_s = time.perf_counter() - t
    print(json.dumps({"phase": "down", "bytes": down, "s": down_s}), flush=True)
    sys.stdin.readline()  # the parent reads its CPU time between the phases
    up = min(n, os.path.getsize(args.probe_file))
    h = hashlib.sha256()
    with open(args.probe_file, "rb") as f:
        while block := f.read(min(16 << 20, up - f.tell())):
            h.update(block)
    conn = http.client.HTTPConnection(host, blocksize=1 << 20)
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    conn.request("POST", "/api/repos/create", body=json.dumps({"name": "probe", "organization": "bench"}), headers=auth)
    conn.getresponse().read()
    body = {"operation": "upload", "objects": [{"oid": h.hexdigest(), "size": up}]}
    conn.request("POST", "/bench/probe.git/info/lfs/objects/batch", body=json.dumps(body), headers=auth)
    href = json.loads(conn.getresponse().read())["objects"][0]["actions"]["upload"]["href"]
    print(json.dumps({"phase": "up-start"}), flush=True)
    sys.stdin.readline()
    t = time.perf_counter()
    with open(args.probe_file, "rb") as f:
        conn.putrequest("PUT", urlsplit(href).path)
        conn.putheader("Content-Length", str(up))
        conn.endheaders()
        conn.sock.sendfile(f, 0, up)
    response = conn.getresponse()
    response.read()
    up_s = time.perf_counter() - t
    print(json.dumps({"phase": "up", "bytes": up, "s": up_s, "status": response.status}), flush=True)
    return 0 if response.status == 200 else 1


def _probe(server, repo: str, folder: Path, probe_bytes: float) -> dict:
    """What the server delivers on this machine now: MB/s each way and its CPU s/GB (see --probe-client)."""
    import resource

    def cpu() -> float:
        u = resource.getrusage(resource.RUSAGE_SELF)
        return u.ru_utime + u.ru_stime

    name = max((p for p in folder.iterdir() if p.suffix == ".safetensors"), key=lambda p: p.stat().st_size).name
    argv = [sys.executable, str(Path(__file__).resolve()), "--probe-client", "--endpoint", server.endpoint,
            "--probe-path", f"/{repo}/resolve/main/{name}", "--probe-size", str((folder / name).stat().st_size),
            "--probe-file", str(folder / name), "--probe-bytes", str(probe_bytes)]  # fmt: skip
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    c0 = cpu()
    down = json.loads(child.stdout.readline())
    c1 = cpu()
    child.stdin.write("\n")
    child.stdin.flush()
    json.loads(child.stdout.readline())  # hashed and ready to upload
    c2 = cpu()
    child.stdin.write("\n")
    child.stdin.flush()
    up = json.loads(child.stdout.readline())
    c3 = cpu()
    child.wait()
    if up.get("status") != 200:
        raise SystemExit(f"probe upload failed: {up}")
    return {
        "down_MBps": round(down["bytes"] / down["s"] / 1e6, 1), "up_MBps": round(up["bytes"] / up["s"] / 1e6, 1),
        "server_cpu_s_per_GB_down": round((c1 - c0) / (down["bytes"] / 1e9), 3),
        "server_cpu_s_per_GB_up": round((c3 - c2) / (up["bytes"] / 1e9), 3),
        "bytes_down": down["bytes"], "bytes_up": up["bytes"], "load_avg": os.getloadavg(),
    }  # fmt: skip


def _pushed_tensor_names(server, repo: str) -> list[str]:
    """The tensor names a pushed repo's shard index lists, sorted. A repo of one file has no index:
    its file name stands in (a sink server keeps no header bytes to read names from)."""
    index = "model.safetensors.index.json"
    if repo not in server.repos:
        return []
    files = server.files(repo)
    if index not in files:
        return sorted(p for p in files if p.endswith(".safetensors"))
    return sorted(json.loads(server.read(repo, index))["weight_map"])


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(synthetic.SIZES), default="tiny")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--down", type=float, default=500e6, help="bytes/s the server sends (default 500e6)")
    ap.add_argument("--up", type=float, default=250e6, help="bytes/s the server receives (default 250e6)")
    ap.add_argument("--latency", type=float, default=0.02, help="seconds added to each request (default 0.02)")
    ap.add_argument("--weight", type=float, default=0.3)
    ap.add_argument("--max-shard-size", default=None, help="output shard cap (default: 1MB tiny, 500MB otherwise)")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--name", default=None)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (server blobs, outputs)")
    ap.add_argument(
        "--sink-uploads",
        action="store_true",
        help="the server checks each upload in full but keeps no bytes (sparse blobs): the 7B mergekit way "
        "needs ~40 GB of its own disk, and would need another 13.2 GB for what it pushes",
    )
    ap.add_argument("--cgroup-limit", default="", help="run lazymerge in a memory cgroup of this size (e.g. 1G)")
    ap.add_argument("--probe-bytes", type=float, default=1e9, help="bytes each way for the server probe (default 1e9)")
    ap.add_argument(
        "--keep-shards", action="store_true", help="lazymerge without --delete-after-upload (the disk holds the output)"
    )
    ap.add_argument("--probe-only", action="store_true", help="measure the server alone (no merge), then exit")
    ap.add_argument(
        "--request-log", type=Path, help="write each contender's requests here (JSON lines, seconds from spawn)"
    )
    # internal: the mergekit-way child
    ap.add_argument("--mergekit-way", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--repo", help=argparse.SUPPRESS)
    # internal: the probe's child
    ap.add_argument("--probe-client", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--endpoint", "--probe-path", "--probe-file"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--probe-size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.max_shard_size is None:
        args.max_shard_size = "1MB" if args.size == "tiny" else "500MB"
    if args.mergekit_way:
        return _mergekit_way(args)
    if args.probe_client:
        return _probe_client(args)

    from hub_server import HubServer

    rm_dir, sft_dir = synthetic.make_pair(args.size, args.dtype, "dogerm", args.cache)
    cache = args.cache or synthetic.default_cache()
    work = cache / "bench-out" / f"hub-{args.size}-{os.getpid()}"
    work.mkdir(parents=True)
    server = HubServer(work / "hub", token=TOKEN, keep_uploads=not args.sink_uploads).start()
    try:
        t = time.perf_counter()
        server.add_model(RM, rm_dir)
        server.add_model(SFT, sft_dir)
        seeded = time.perf_counter() - t
        server.shape(down=args.down, up=args.up, latency=args.latency)
        in_bytes = _weight_bytes(rm_dir) + _weight_bytes(sft_dir)
        probe = _probe(server, RM, rm_dir, args.probe_bytes)
        print(f"probe (server alone, caps {args.down / 1e6:.0f}/{args.up / 1e6:.0f} MB/s): "
              f"down {probe['down_MBps']} MB/s at {probe['server_cpu_s_per_GB_down']} CPU s/GB, "
              f"up {probe['up_MBps']} MB/s at {probe['server_cpu_s_per_GB_up']} CPU s/GB", flush=True)  # fmt: skip
        if args.probe_only:
            return 0
        results = {}
        for name in args.contenders.split(","):
            folder = work / name
            home, tmp, out = folder / "hf_home", folder / "tmp", folder / "out"
            for d in (home, tmp):
                d.mkdir(parents=True)
            env = {
                **os.environ, "HF_ENDPOINT": server.endpoint, "HF_TOKEN": TOKEN, "HF_HOME": str(home),
                "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "TMPDIR": str(tmp), "PYTHONPATH": str(REPO_ROOT),
            }  # fmt: skip
            repo = f"bench/out-{name}"
            if name == "lazymerge":
                argv_ = [sys.executable, "-m", "lazymerge", "dogerm", "--reward-model", RM, "--domain-model", SFT,
                         "--weight", str(args.weight), "-o", str(out), "--low-disk", "--push-to-hub", repo,
                         "--max-shard-size", args.max_shard_size, "--device", "cpu", "-q"]  # fmt: skip
                if not args.keep_shards:
                    argv_.append("--delete-after-upload")
            elif name == "mergekit-way":
                argv_ = [sys.executable, str(Path(__file__).resolve()), "--mergekit-way", "--out", str(out),
                         "--repo", repo, "--weight", str(args.weight), "--max-shard-size", args.max_shard_size]  # fmt: skip
            else:
                raise SystemExit(f"unknown contender {name!r}")
            server.reset_log()
            cg = None
            if args.cgroup_limit and name == "lazymerge":
                import bench_merge as bm  # a sibling script: cgroup v1/v2 helpers

                cg, where = bm.create_memory_cgroup(
                    bm.parse_size(args.cgroup_limit), f"lazymerge-benchhub-{os.getpid()}"
                )
                if cg is None:
                    raise SystemExit(f"--cgroup-limit: no memory cgroup here ({where})")
            r = _spawn_measured(argv_, env, [home, tmp, out], cg)
            if cg is not None:
                r.update(
                    cgroup=where,
                    cgroup_limit_bytes=cg.limit,
                    cgroup_peak_bytes=cg.peak_bytes(),
                    oom_kill=cg.oom_kills(),
                )
                cg.remove()
            r["bytes_down"] = server.bytes_served
            r["bytes_up"] = sum(x.bytes_received for x in server.requests)
            r["requests"] = len(server.requests)
            r["peak_requests_in_flight"] = server.peak_in_flight
            spawned = r.pop("spawned")
            r["timeline_s"] = _timeline(server.requests, spawned)
            if args.request_log:
                _write_request_log(args.request_log, name, server.requests, spawned)
            server.peak_in_flight = 0
            if name == "mergekit-way" and r["rc"] == 0:
                try:
                    r["phases"] = json.loads(r["log_tail"].strip().splitlines()[-1])
                except (ValueError, IndexError):
                    pass
            results[name] = r
            print(f"{name}: rc {r['rc']}, {r['wall_s']:.2f} s, CPU {r['cpu_s']:.1f} s, RSS {r['peak_rss_bytes'] / 1e6:.0f} MB, "
                  f"disk {r['peak_disk_bytes'] / 1e6:.1f} MB ({r['peak_weight_disk_bytes'] / 1e6:.1f} MB weights); timeline {r['timeline_s']}", flush=True)  # fmt: skip
        out_shards = {}
        for name in results:
            files = server.files(f"bench/out-{name}") if f"bench/out-{name}" in server.repos else {}
            out_shards[name] = {p: e.sha256 for p, e in files.items() if p.endswith(".safetensors")}
        out_bytes = max(
            (sum(server.files(f"bench/out-{n}")[p].size for p in s) for n, s in out_shards.items() if s), default=0
        )
        floor = max(in_bytes / args.down, out_bytes / args.up)
        probe_floor = max(in_bytes / (probe["down_MBps"] * 1e6), out_bytes / (probe["up_MBps"] * 1e6))
        for r in results.values():
            r["x_floor"] = round(r["wall_s"] / floor, 3) if floor else None
            r["x_probe_floor"] = round(r["wall_s"] / probe_floor, 3) if probe_floor else None
        # Shard headers name the inputs (repo ids vs downloaded paths), so bytes differ: compare names.
        # The shard layouts differ too: a pushed merge has short first and last shards
        # (`with_short_edge_shards`). What must match is the set of tensors the index lists.
        tensor_sets = {n: _pushed_tensor_names(server, f"bench/out-{n}") for n in out_shards}
        identical = (  # None: one contender, nothing to compare
            len({tuple(v) for v in tensor_sets.values()}) == 1 and all(tensor_sets.values())
            if len(tensor_sets) > 1
            else None
        )
        # The network as it was: the mergekit way's pure download and upload phases measure what the
        # server and this machine delivered (on a loaded machine, far less than the caps).
        phases = results.get("mergekit-way", {}).get("phases")
        measured = None
        if phases:
            measured = max(phases["download_s"], phases["upload_s"])
            for r in results.values():
                r["x_measured_floor"] = round(r["wall_s"] / measured, 3)
        verify_rc = None
        if "lazymerge" in results and results["lazymerge"]["rc"] == 0:
            env = {**os.environ, "HF_ENDPOINT": server.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
                   "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO_ROOT),
                   "HF_HOME": str(work / "lazymerge" / "hf_home")}  # fmt: skip
            server.shape()  # verification is not part of the figures
            verify_rc = subprocess.run(
                [sys.executable, "-m", "lazymerge", "verify", str(work / "lazymerge" / "out"), "--hub",
                 "bench/out-lazymerge"], env=env, capture_output=True, text=True,
            ).returncode  # fmt: skip
        largest_out = max(
            (server.files("bench/out-lazymerge")[p].size for p in out_shards.get("lazymerge", {})), default=0
        )
        if "lazymerge" in results:  # the target: no more than two output shards' bytes on disk at once
            r = results["lazymerge"]
            r["weights_on_disk_in_shards"] = (
                round(r["peak_weight_disk_bytes"] / largest_out, 3) if largest_out else None
            )
        record = {
            "size": args.size, "dtype": args.dtype, "down_Bps": args.down, "up_Bps": args.up,
            "latency_s": args.latency, "max_shard_size": args.max_shard_size, "input_weight_bytes": in_bytes,
            "output_bytes": out_bytes, "largest_output_shard": largest_out, "floor_s": round(floor, 3),
            "probe": probe, "probe_floor_s": round(probe_floor, 3),
            "seed_s": round(seeded, 2), "same_tensor_names": identical, "server_keeps_uploads": not args.sink_uploads,
            "measured_floor_s": round(measured, 3) if measured else None, "verify_hub_rc": verify_rc,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "load_avg": os.getloadavg()},
            "contenders": results,
        }  # fmt: skip
        results_dir = BENCH_DIR / "results"
        results_dir.mkdir(exist_ok=True)
        path = results_dir / f"{args.name or 'hub-' + args.size}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(
            f"floor (caps) {floor:.2f} s (in {in_bytes / 1e9:.3f} GB at {args.down / 1e6:.0f} MB/s, "
            f"out {out_bytes / 1e9:.3f} GB at {args.up / 1e6:.0f} MB/s, latency {args.latency * 1e3:.0f} ms)"
        )
        print(f"probe floor (what the server delivered alone) {probe_floor:.2f} s (down {probe['down_MBps']} MB/s, "
              f"up {probe['up_MBps']} MB/s)")  # fmt: skip
        for name, r in results.items():
            print(f"  {name:13s} {r['wall_s']:8.2f} s  x floor {r['x_floor']}  x probe floor {r['x_probe_floor']}  x measured {r.get('x_measured_floor')}  RSS {r['peak_rss_bytes'] / 1e6:7.0f} MB"
                  f"  disk high-water {r['peak_disk_bytes'] / 1e6:9.1f} MB ({r['peak_weight_disk_bytes'] / 1e6:.1f} MB weights)  down {r['bytes_down'] / 1e6:.1f} MB"
                  f"  up {r['bytes_up'] / 1e6:.1f} MB  in flight <= {r['peak_requests_in_flight']}")  # fmt: skip
        if measured:
            print(f"measured floor {measured:.2f} s (the mergekit way's download or upload phase, whichever is longer)")
        print(f"same tensor names: {identical}; verify --hub rc {verify_rc}; {path}")
        return 0 if all(r["rc"] == 0 for r in results.values()) else 1
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
