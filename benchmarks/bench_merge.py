"""Benchmark harness (not a test): merge contenders as child processes, wall time and peak RSS.

Every contender runs as a child process; its wall time is measured around spawn -> `os.wait4`,
its peak RSS is `ru_maxrss` from the same `wait4` (KiB on Linux; includes reaped grandchildren,
and file-backed mapped pages, i.e. RSS as `top` shows it). Between runs the page cache is dropped
when we are root, so every run reads cold; contenders are interleaved and the order flips every
round (A B C, C B A, A B C, ...), so slow drift of the machine, and whatever a run leaves the disk
still doing (a virtual disk may go on flushing a 13 GB write long after `sync` returns), hit all
of them alike; `--pause S` waits S seconds after each run's sync as well. Medians over `--repeat`
runs are reported.

Contenders (see README.md): lazymerge-dogerm, lazymerge-linear, mergekit, naive, naive-dogerm,
lazymerge-sweep5 (one DogeRM run writing 5 lambdas) vs lazymerge-dogerm-x5 (5 separate runs),
floor. Inputs are the synthetic pairs of `synthetic.py` (built on first use).

Writes `results/<name>.json` and, when matplotlib is installed (`pip install -e ".[bench]"`),
`results/<name>.png`: wall time per contender next to the floor (read and write stacked), peak
RSS on a log axis. Each invocation works in a folder of its own, `<cache>/bench-out/<name>-<pid>-<random>/`,
and deletes only that folder when it ends, so benchmarks run side by side never delete each other's
outputs. Merge outputs are deleted after each run unless `--keep-output` is given (then the last
output of each merge is left in that folder, which is printed and recorded as `output_dir` in the
JSON, for `lazymerge verify`).

    python benchmarks/bench_merge.py --size 1b --contenders floor,naive,lazymerge-dogerm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import synthetic  # noqa: E402  (a sibling script, not a package)

ALL_CONTENDERS = (
    "floor",
    "naive",
    "naive-dogerm",
    "lazymerge-dogerm",
    "lazymerge-linear",
    "mergekit",
    "lazymerge-stack",
    "mergekit-stack",
    "lazymerge-sweep5",
    "lazymerge-dogerm-x5",
)
# DogeRM lambdas of the sweep contenders: one run writing 5 models vs 5 separate runs.
SWEEP_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_CONTENDERS = "floor,naive,lazymerge-dogerm,lazymerge-linear,mergekit"
DOGERM_WEIGHT = 0.3
MB = 1e6
MIB = 1 << 20
GB = 1e9


# ---------------------------------------------------------------------------------------------
# Machine facts
# ---------------------------------------------------------------------------------------------


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    except OSError:
        pass
    return out


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, object]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = meminfo()
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "ram_gb": round(mem.get("MemTotal", 0) / GB, 1),
        "ram_available_gb": round(mem.get("MemAvailable", 0) / GB, 1),
        "swap_gb": round(mem.get("SwapTotal", 0) / GB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "safetensors": package_version("safetensors"),
        "mergekit": mergekit_version(),
    }


def mergekit_version() -> str:
    """mergekit's version: from this interpreter, or from the one `mergekit-yaml` on PATH runs
    with (mergekit usually lives in a virtual environment of its own)."""
    here = package_version("mergekit")
    exe = shutil.which("mergekit-yaml")
    if here != "not installed" or exe is None:
        return here
    probe = "from importlib.metadata import version; print(version('mergekit'))"
    try:
        done = subprocess.run([_script_interpreter(exe), "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return f"unknown ({exe})"
    return f"{done.stdout.strip()} ({exe})" if done.returncode == 0 else f"unknown ({exe})"


# ---------------------------------------------------------------------------------------------
# Page cache
# ---------------------------------------------------------------------------------------------


def drop_caches() -> bool:
    """sync, then drop the page cache; False when this process may not (not root, read-only /proc)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    warm_code()
    return True


# Interpreters whose libraries are read back into the page cache after each drop (see warm_code);
# main() adds mergekit's when it lives in another environment.
CODE_INTERPRETERS: set[str] = {sys.executable}


def warm_code() -> None:
    """Import torch and safetensors once in each contender's interpreter, after the drop.

    "Cold cache" here means cold *model bytes*: reading torch's ~1 GB of shared libraries from
    disk (3.4 s measured on this machine) is not merge I/O, and a user who runs a merge has
    usually loaded torch before. Every contender that uses torch (lazymerge, mergekit, the naive
    script) gets the same warm libraries; the floor uses none.
    """
    for py in sorted(CODE_INTERPRETERS):
        subprocess.run([py, "-c", "import torch, safetensors"], check=False, capture_output=True)


def _script_interpreter(script: str) -> str:
    """The Python a console script runs with (its #! line), for warm_code."""
    try:
        first = Path(script).read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return sys.executable
    return first[2:].strip().split()[0] if first.startswith("#!") and "python" in first else sys.executable


# ---------------------------------------------------------------------------------------------
# Memory cgroups
# ---------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """ "1G", "512M", "1.5GB", "1GiB" -> bytes (G/M/K are binary, as memory limits usually are)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def cgroup_mounts() -> tuple[list[Path], Path | None]:
    """(cgroup2 mount points, cgroup v1 memory mount point or None) from /proc/mounts."""
    v2: list[Path] = []
    v1_memory: Path | None = None
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return v2, None
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        mnt, fstype, opts = Path(parts[1]), parts[2], parts[3].split(",")
        if fstype == "cgroup2":
            v2.append(mnt)
        elif fstype == "cgroup" and "memory" in opts:
            v1_memory = mnt
    return v2, v1_memory


def own_cgroup_path(v1: bool) -> str:
    """This process's cgroup path in the v1 memory hierarchy or in the v2 unified one."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hid, controllers, path = line.split(":", 2)
            if v1 and "memory" in controllers.split(","):
                return path
            if not v1 and hid == "0" and controllers == "":
                return path
    except (OSError, ValueError):
        pass
    return "/"


@dataclass
class MemoryCgroup:
    """A child memory cgroup with a limit; v2 `memory.max` or v1 `memory.limit_in_bytes`."""

    path: Path
    version: int
    limit: int

    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def oom_kills(self) -> int:
        # v2: memory.events "oom_kill N"; v1 (kernel >= 4.13): memory.oom_control "oom_kill N".
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return -1

    def peak_bytes(self) -> int:
        """The cgroup's own peak charge (page cache included), -1 when the kernel does not say."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return -1

    def failcnt(self) -> int:
        """How often the charge hit the limit (v1 memory.failcnt; v2 memory.events "max"), -1 unknown."""
        try:
            if self.version == 1:
                return int((self.path / "memory.failcnt").read_text().split()[0])
            for line in (self.path / "memory.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "max":
                    return int(value)
        except (OSError, ValueError, IndexError):
            pass
        return -1

    def remove(self) -> None:
        # rmdir fails while the kernel still lists exited tasks for a moment: retry briefly.
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def _try_v2(parent: Path, name: str, limit: int) -> MemoryCgroup | None:
    child = parent / name
    try:
        child.mkdir()
    except OSError:
        return None
    if not (child / "memory.max").exists():
        # The memory controller must be delegated to children of `parent`.
        try:
            (parent / "cgroup.subtree_control").write_text("+memory")
        except OSError:
            pass
    try:
        (child / "memory.max").write_text(str(limit))
        swap = child / "memory.swap.max"
        if swap.exists():
            swap.write_text("0")  # a limit that swaps instead of failing measures the disk
        return MemoryCgroup(child, 2, limit)
    except OSError:
        try:
            child.rmdir()
        except OSError:
            pass
        return None


def _try_v1(parent: Path, name: str, limit: int) -> MemoryCgroup | None:
    child = parent / name
    try:
        child.mkdir()
        (child / "memory.limit_in_bytes").write_text(str(limit))
        memsw = child / "memory.memsw.limit_in_bytes"
        if memsw.exists():  # no swapping around the limit either (memsw >= limit is required)
            try:
                memsw.write_text(str(limit))
            except OSError:
                pass
        return MemoryCgroup(child, 1, limit)
    except OSError:
        try:
            child.rmdir()
        except OSError:
            pass
        return None


def create_memory_cgroup(limit: int, name: str) -> tuple[MemoryCgroup | None, str]:
    """A fresh child memory cgroup, or (None, why not). Tries v2 first, then v1.

    Under our own cgroup first (nested limits are what a container allows), then at the root of
    the hierarchy (v2 forbids controllers in a cgroup that holds processes, the root excepted).
    """
    v2_mounts, v1_memory = cgroup_mounts()
    tried: list[str] = []
    for mnt in v2_mounts:
        controllers = (mnt / "cgroup.controllers").read_text().split() if (mnt / "cgroup.controllers").exists() else []
        if "memory" not in controllers:
            tried.append(f"v2 at {mnt}: no memory controller (controllers: {' '.join(controllers) or 'none'})")
            continue
        for parent in dict.fromkeys([mnt / own_cgroup_path(False).lstrip("/"), mnt]):
            if parent.is_dir() and (cg := _try_v2(parent, name, limit)):
                return cg, f"cgroup v2 at {cg.path}"
        tried.append(f"v2 at {mnt}: cannot create a child with memory.max")
    if v1_memory is not None:
        for parent in dict.fromkeys([v1_memory / own_cgroup_path(True).lstrip("/"), v1_memory]):
            if parent.is_dir() and (cg := _try_v1(parent, name, limit)):
                return cg, f"cgroup v1 at {cg.path}"
        tried.append(f"v1 at {v1_memory}: cannot create a child with memory.limit_in_bytes")
    else:
        tried.append("no cgroup v1 memory hierarchy mounted")
    return None, "; ".join(tried)


# ---------------------------------------------------------------------------------------------
# Running one child
# ---------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    contender: str
    step: str
    repeat: int
    wall_s: float
    maxrss_kib: int
    returncode: int
    sync_s: float = 0.0
    killed_by: str = ""
    cgroup: str = ""
    cgroup_limit: int = 0
    cgroup_peak: int = -1
    oom_kill: int = -1
    cgroup_failcnt: int = -1
    log: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_child(
    argv: list[str], log: Path, env: dict[str, str] | None, cgroup: MemoryCgroup | None
) -> tuple[float, int, int, str]:
    """Run argv; (wall s, ru_maxrss KiB, return code, signal name or "")."""

    def enter_cgroup() -> None:
        # Runs in the child between fork and exec: the merge itself starts inside the limit.
        if cgroup is not None:
            with open(cgroup.procs_file(), "w") as f:
                f.write(str(os.getpid()))

    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
            preexec_fn=enter_cgroup if cgroup else None,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen we reaped it ourselves
    sig = ""
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
    return wall, int(usage.ru_maxrss), proc.returncode, sig


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One child process of a contender (the floor has two: read and write)."""

    label: str
    argv: list[str]
    output: Path | None  # removed after the run


@dataclass
class Contender:
    name: str
    pair: str  # "dogerm" or "causal": which synthetic pair it reads
    steps: list[Step]
    input_bytes: int
    in_cgroup: bool = False
    skip: str = ""  # why it does not run, when it does not
    outputs: int = 1  # models each step writes (a sweep's K): its floor is one read + K writes


@dataclass
class Pair:
    kind: str
    first: Path
    second: Path
    files: list[Path] = field(default_factory=list)

    @property
    def input_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def load_pair(size: str, dtype: str, kind: str, cache: Path) -> Pair:
    _, first, second = synthetic.pair_paths(size, dtype, kind, cache)
    if not synthetic.is_complete(size, dtype, kind, cache):
        # In a child: generating imports torch, which would raise every later child's ru_maxrss.
        t0 = time.perf_counter()
        argv = [sys.executable, str(BENCH_DIR / "synthetic.py"), "--size", size, "--dtype", dtype, "--kind", kind]
        subprocess.run([*argv, "--cache", str(cache)], check=True, stdout=subprocess.DEVNULL)
        print(f"built the {size} {dtype} {kind} pair in {time.perf_counter() - t0:.1f} s")
    files = sorted(first.glob("*.safetensors")) + sorted(second.glob("*.safetensors"))
    return Pair(kind, first, second, files)


def stack_yaml(a: Path, b: Path, dtype: str, layers: int) -> str:
    """mergekit YAML for a depth up-scaling stack (passthrough): the first 3/4 of `a`'s layers, then
    the last 3/4 of `b`'s (a 2 x 1B pair of 22 layers gives 32 layers, about 1.6B)."""
    keep = (3 * layers) // 4
    return (
        "merge_method: passthrough\n"
        "slices:\n"
        f"  - sources:\n      - model: {json.dumps(str(a))}\n        layer_range: [0, {keep}]\n"
        f"  - sources:\n      - model: {json.dumps(str(b))}\n        layer_range: [{layers - keep}, {layers}]\n"
        f"dtype: {dtype}\n"
    )


def linear_yaml(a: Path, b: Path, dtype: str) -> str:
    """mergekit YAML for a 0.5/0.5 linear merge (json.dumps quotes paths as valid YAML)."""
    return (
        "merge_method: linear\n"
        "models:\n"
        f"  - model: {json.dumps(str(a))}\n"
        "    parameters:\n"
        "      weight: 0.5\n"
        f"  - model: {json.dumps(str(b))}\n"
        "    parameters:\n"
        "      weight: 0.5\n"
        f"dtype: {dtype}\n"
    )


def expected_output_bytes(pair: Pair) -> int:
    """Tensor bytes the merge writes: the first model's, plus the SFT-only rows for DogeRM."""
    out = synthetic.model_bytes(pair.first)
    if pair.kind == "dogerm":
        rm_vocab = json.loads((pair.first / "config.json").read_text())["vocab_size"]
        sft = json.loads((pair.second / "config.json").read_text())
        itemsize = 2  # fp16 / bf16
        out += max(0, sft["vocab_size"] - rm_vocab) * sft["hidden_size"] * itemsize
    return out


def build_contenders(
    names: list[str], pairs: dict[str, Pair], work: Path, dtype: str, args: argparse.Namespace
) -> list[Contender]:
    py = sys.executable
    torch_dtype = synthetic.DTYPE_NAMES[dtype][1]
    extra = shlex.split(args.lazymerge_args)
    out: list[Contender] = []
    for name in names:
        if name == "floor":
            for kind in sorted(pairs):
                out.append(floor_contender(pairs[kind], work))
            continue
        if name == "lazymerge-dogerm":
            p = pairs["dogerm"]
            o = work / name
            argv = [
                py,
                "-m",
                "lazymerge",
                "dogerm",
                "--reward-model",
                str(p.first),
                "--domain-model",
                str(p.second),
                "--weight",
                str(DOGERM_WEIGHT),
                "--output",
                str(o),
                *extra,
            ]
            out.append(Contender(name, "dogerm", [Step(name, argv, o)], p.input_bytes, in_cgroup=True))
        elif name in ("lazymerge-sweep5", "lazymerge-dogerm-x5"):
            p = pairs["dogerm"]
            o = work / name  # holds the 5 output folders; removed after the run
            common = [py, "-m", "lazymerge", "dogerm", "--reward-model", str(p.first), "--domain-model", str(p.second)]
            if name == "lazymerge-sweep5":
                weights = ",".join(f"{w:g}" for w in SWEEP_WEIGHTS)
                steps = [Step(name, [*common, "--weight", weights, "--output", str(o / "out-{weight}"), *extra], o)]
            else:
                steps = [
                    Step(f"{name}-{w:g}", [*common, "--weight", f"{w:g}", "--output", str(o / f"out-{w:g}"), *extra], o)
                    for w in SWEEP_WEIGHTS
                ]
            outputs = len(SWEEP_WEIGHTS) if name == "lazymerge-sweep5" else 1
            out.append(Contender(name, "dogerm", steps, p.input_bytes, in_cgroup=True, outputs=outputs))
        elif name == "lazymerge-linear":
            p = pairs["causal"]
            o, cfg = work / name, work / "linear.yaml"
            cfg.write_text(linear_yaml(p.first, p.second, torch_dtype))
            argv = [py, "-m", "lazymerge", "merge", str(cfg), "--output", str(o), *extra]
            out.append(Contender(name, "causal", [Step(name, argv, o)], p.input_bytes, in_cgroup=True))
        elif name == "mergekit":
            p = pairs["causal"]
            o, cfg = work / name, work / "mergekit.yml"
            cfg.write_text(linear_yaml(p.first, p.second, torch_dtype))
            exe = shutil.which("mergekit-yaml") or shutil.which("mergekit-yaml", path=str(Path(py).parent))
            if exe:
                CODE_INTERPRETERS.add(_script_interpreter(exe))
            c = Contender(name, "causal", [], p.input_bytes)
            if exe is None:
                c.skip = "mergekit-yaml is not on PATH (pip install mergekit to compare)"
            else:
                c.steps = [Step(name, [exe, str(cfg), str(o), "--lazy-unpickle"], o)]
            out.append(c)
        elif name in ("lazymerge-stack", "mergekit-stack"):
            p = pairs["causal"]
            o, cfg = work / name, work / f"{name}.yaml"
            cfg.write_text(stack_yaml(p.first, p.second, torch_dtype, synthetic.SIZES[args.size].layers))
            if name == "lazymerge-stack":
                argv = [py, "-m", "lazymerge", "merge", str(cfg), "--output", str(o), *extra]
                out.append(Contender(name, "causal", [Step(name, argv, o)], p.input_bytes, in_cgroup=True))
                continue
            exe = shutil.which("mergekit-yaml") or shutil.which("mergekit-yaml", path=str(Path(py).parent))
            c = Contender(name, "causal", [], p.input_bytes)
            if exe is None:
                c.skip = "mergekit-yaml is not on PATH (pip install mergekit to compare)"
            else:
                CODE_INTERPRETERS.add(_script_interpreter(exe))
                c.steps = [Step(name, [exe, str(cfg), str(o), "--lazy-unpickle"], o)]
            out.append(c)
        elif name in ("naive", "naive-dogerm"):
            kind = "causal" if name == "naive" else "dogerm"
            p = pairs[kind]
            o = work / name
            mode = "_naive" if name == "naive" else "_naive-dogerm"
            w = "0.5" if name == "naive" else str(DOGERM_WEIGHT)
            argv = [py, str(Path(__file__).resolve()), mode, str(p.first), str(p.second), str(o), w]
            c = Contender(name, kind, [Step(name, argv, o)], p.input_bytes)
            c.skip = naive_memory_check(p, args.force_naive)
            out.append(c)
        else:
            raise SystemExit(f"unknown contender {name!r}; known: {', '.join(ALL_CONTENDERS)}")
    if args.cgroup_all:
        for c in out:
            c.in_cgroup = True
    return out


def floor_contender(pair: Pair, work: Path) -> Contender:
    """Sequential read of every input byte, then a sequential write of the output's size.

    The reads drop what they read from the page cache (`iflag=nocache`), as lazymerge does: a
    plain `dd` of the 7B pair (27 GB, more than this machine's 24 GB of RAM) fills the page cache
    and then spends its time reclaiming it (measured: 39.8 s, 38 s of it system time, against
    10.9 s with `nocache`), which would make the floor a third of the speed the disk gives."""
    reads = " && ".join(
        f"dd if={shlex.quote(str(f))} of=/dev/null bs=16M iflag=nocache status=none" for f in pair.files
    )
    o = work / "floor-write.bin"
    nbytes = expected_output_bytes(pair)
    write = (
        f"dd if=/dev/zero of={shlex.quote(str(o))} bs=16M count={nbytes} iflag=count_bytes conv=fdatasync status=none"
    )
    steps = [Step("read", ["sh", "-c", reads], None), Step("write", ["sh", "-c", write], o)]
    return Contender(f"floor[{pair.kind}]", pair.kind, steps, pair.input_bytes)


def naive_memory_check(pair: Pair, force: bool) -> str:
    """Why naive must not run here (it would need about 3 models in RAM), or ""."""
    need = 3 * synthetic.model_bytes(pair.second) + 2 * synthetic.model_bytes(pair.first) // 20
    avail = meminfo().get("MemAvailable", 0)
    if not force and avail and need > 0.9 * avail:
        return f"needs about {need / GB:.1f} GB, {avail / GB:.1f} GB available (--force-naive runs it anyway)"
    return ""


# ---------------------------------------------------------------------------------------------
# The naive full-load baselines (run as `bench_merge.py _naive A B OUT W` in a child)
# ---------------------------------------------------------------------------------------------


def _load_all(folder: Path) -> dict:
    from safetensors.torch import load_file

    state: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def _save_like(state: dict, like: Path, out: Path, vocab: int | None) -> None:
    """Save `state` sharded as the model at `like` is, with its index, config and tokenizer."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    index = json.loads((like / "model.safetensors.index.json").read_text())
    files: dict[str, list[str]] = {}
    for name, file in index["weight_map"].items():
        files.setdefault(file, []).append(name)
    for file, names in files.items():
        save_file({n: state[n] for n in names}, out / file, metadata={"format": "pt"})
    index["metadata"]["total_size"] = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((like / "config.json").read_text())
    if vocab is not None:
        config["vocab_size"] = vocab
    (out / "config.json").write_text(json.dumps(config, indent=2))


def naive_linear(a: Path, b: Path, out: Path, w: float) -> None:
    """Everything in RAM at once: both models, then the whole result, then save_file."""
    sa, sb = _load_all(a), _load_all(b)
    merged = {k: (w * sa[k].float() + (1 - w) * sb[k].float()).to(sa[k].dtype) for k in sa}
    _save_like(merged, a, out, None)
    shutil.copy(a / "tokenizer.json", out / "tokenizer.json")


def naive_dogerm(rm: Path, sft: Path, out: Path, lam: float) -> None:
    """DogeRM semantics (DESIGN.md) with full loads: shared tensors averaged, score kept,
    lm_head dropped, embedding rows only the SFT model has kept from it."""
    import torch

    srm, ssft = _load_all(rm), _load_all(sft)
    merged = {}
    for k, t in srm.items():
        s = ssft.get(k)
        if k.startswith("score.") or s is None:
            merged[k] = t
        elif k == "model.embed_tokens.weight":
            n = min(t.shape[0], s.shape[0])
            mixed = ((1 - lam) * t[:n].float() + lam * s[:n].float()).to(t.dtype)
            merged[k] = torch.cat([mixed, s[n:].to(t.dtype)]) if s.shape[0] > n else torch.cat([mixed, t[n:]])
        else:
            merged[k] = ((1 - lam) * t.float() + lam * s.float()).to(t.dtype)
    vocab = merged["model.embed_tokens.weight"].shape[0]
    _save_like(merged, rm, out, vocab)
    shutil.copy(sft / "tokenizer.json", out / "tokenizer.json")


# ---------------------------------------------------------------------------------------------
# The benchmark loop
# ---------------------------------------------------------------------------------------------


def remove_output(path: Path | None) -> None:
    if path is None:
        return
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def disk_bytes(path: Path) -> int:
    """Bytes a file or folder holds (apparent sizes)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_step(
    c: Contender, step: Step, rep: int, work: Path, limit: int | None, drop: bool, keep: bool = False
) -> RunResult:
    remove_output(step.output)
    if drop:
        drop_caches()
    cg: MemoryCgroup | None = None
    if limit is not None and c.in_cgroup:
        cg, _ = create_memory_cgroup(
            limit, f"lazymerge-bench-{os.getpid()}-{c.name}-{rep}".replace("[", "-").replace("]", "")
        )
    log = work / f"{c.name}-{step.label}-{rep}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    wall, rss, rc, sig = run_child(step.argv, log, env, cg)
    t0 = time.perf_counter()
    os.sync()  # what the child left dirty in the page cache is part of its cost: shown apart
    sync_s = time.perf_counter() - t0
    r = RunResult(c.name, step.label, rep, wall, rss, rc, sync_s, sig)
    if cg is not None:
        r.cgroup, r.cgroup_limit, r.cgroup_peak, r.oom_kill = str(cg.path), cg.limit, cg.peak_bytes(), cg.oom_kills()
        r.cgroup_failcnt = cg.failcnt()
        cg.remove()
    if not r.ok:
        r.log = tail(log)
    # --keep-output keeps a merge's output (until this step runs again) for checking; never the
    # floor's zeros.
    if not (keep and r.ok and not c.name.startswith("floor")):
        remove_output(step.output)
    log.unlink(missing_ok=True)
    return r


def summarize(contenders: list[Contender], results: list[RunResult]) -> list[dict[str, object]]:
    """One row per contender step (and floor read+write sums), medians over successful runs."""
    rows: list[dict[str, object]] = []
    floors: dict[str, tuple[float, float]] = {}  # pair -> (read s, write s)
    for c in contenders:
        if c.skip:
            rows.append({"contender": c.name, "pair": c.pair, "skipped": c.skip})
            continue
        per_step: dict[str, dict[str, float]] = {}
        for step in c.steps:
            rs = [r for r in results if r.contender == c.name and r.step == step.label]
            good = [r for r in rs if r.ok]
            row: dict[str, object] = {
                "contender": c.name if len(c.steps) == 1 else f"{c.name} {step.label}",
                "pair": c.pair,
                "runs": len(rs),
                "ok": len(good),
                "input_bytes": c.input_bytes,
                "outputs": c.outputs,
            }
            if good:
                row["wall_s"] = statistics.median(r.wall_s for r in good)
                row["sync_s"] = statistics.median(r.sync_s for r in good)
                row["peak_rss_mb"] = statistics.median(r.maxrss_kib for r in good) * 1024 / MB
                per_step[step.label] = {"wall_s": float(row["wall_s"]), "peak_rss_mb": float(row["peak_rss_mb"])}
            failed = [r for r in rs if not r.ok]
            if failed:
                row["failures"] = [f"rc={r.returncode} {r.killed_by}".strip() for r in failed]
            cg = [r for r in rs if r.cgroup]
            if cg:
                row["cgroup_limit_mib"] = cg[0].cgroup_limit / MIB
                row["cgroup_finished"] = sum(r.ok for r in cg)
                row["cgroup_oom_kills"] = sum(max(r.oom_kill, 0) for r in cg)
                row["cgroup_peak_mb"] = max(r.cgroup_peak for r in cg) / MB
                row["cgroup_failcnt"] = max(r.cgroup_failcnt for r in cg)
            rows.append(row)
        if c.name.startswith("floor") and {"read", "write"} <= per_step.keys():
            total = per_step["read"]["wall_s"] + per_step["write"]["wall_s"]
            floors[c.pair] = (per_step["read"]["wall_s"], per_step["write"]["wall_s"])
            rows.append(
                {
                    "contender": f"{c.name} read+write",
                    "pair": c.pair,
                    "wall_s": total,
                    "input_bytes": c.input_bytes,
                }
            )
    for row in rows:
        wall = row.get("wall_s")
        if isinstance(wall, float) and wall > 0:
            if not str(row["contender"]).startswith("floor") or str(row["contender"]).endswith("read"):
                row["input_gb_s"] = int(row["input_bytes"]) / GB / wall
            if row["pair"] in floors:
                read, write = floors[str(row["pair"])]
                row["ratio_to_floor"] = wall / (read + int(row.get("outputs", 1)) * write)

    # Against mergekit on the same pair: its time (sync included, as it leaves dirty pages
    # behind) over this contender's, and its peak RSS over this one's.
    # A stack is compared with mergekit's stack, every other merge with mergekit's linear merge.
    def job(contender: object) -> str:
        return "stack" if str(contender).endswith("-stack") else "merge"

    mergekit = {
        (r["pair"], job(r["contender"])): r
        for r in rows
        if r["contender"] in ("mergekit", "mergekit-stack") and isinstance(r.get("wall_s"), float)
    }
    for row in rows:
        mk = mergekit.get((row["pair"], job(row["contender"])))
        if mk is None or row is mk or str(row["contender"]).startswith("floor") or "wall_s" not in row:
            continue
        row["mergekit_speedup"] = (mk["wall_s"] + mk["sync_s"]) / (row["wall_s"] + row.get("sync_s", 0.0))
        if row.get("peak_rss_mb"):
            row["mergekit_rss_ratio"] = mk["peak_rss_mb"] / row["peak_rss_mb"]
    return rows


def print_table(rows: list[dict[str, object]], title: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    def f(v: object, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    t = Table(title=title)
    cols = ("contender", "pair", "ok/runs", "wall s", "+sync s", "peak RSS MB", "input GB/s", "x floor")
    for col in (*cols, "mergekit time / this", "mergekit RSS / this", "notes"):
        t.add_column(col, justify="left" if col in ("contender", "pair", "notes") else "right", no_wrap=True)
    details: list[str] = []
    for r in rows:
        notes = []
        if int(r.get("outputs", 1)) > 1:  # type: ignore[call-overload]
            notes.append(f"floor: 1 read + {r['outputs']} writes")
        if "skipped" in r:
            notes.append("skipped")
            details.append(f"{r['contender']} skipped: {r['skipped']}")
        if r.get("failures"):
            notes.append(f"{len(r['failures'])} failed")  # type: ignore[arg-type]
            details.append(f"{r['contender']} failures: " + ", ".join(map(str, r["failures"])))  # type: ignore[call-overload]
        if "cgroup_limit_mib" in r:
            notes.append(
                f"cgroup {r['cgroup_limit_mib']:.0f} MiB: done {r['cgroup_finished']}, oom_kill {r['cgroup_oom_kills']}"
            )
            at_limit = float(r["cgroup_peak_mb"]) >= 0.99 * float(r["cgroup_limit_mib"]) * MIB / MB  # type: ignore[arg-type]
            details.append(
                f"{r['contender']}: cgroup peak charge (page cache included) {r['cgroup_peak_mb']:.0f} MB"
                + (" = the limit (page cache reclaimed there)" if at_limit else "")
                + f", failcnt {r['cgroup_failcnt']}, oom_kill {r['cgroup_oom_kills']}"
            )
        ok_runs = f"{r['ok']}/{r['runs']}" if "runs" in r else "-"
        t.add_row(
            escape(str(r["contender"])),  # "floor[dogerm]" is not rich markup
            str(r["pair"]),
            ok_runs,
            f(r.get("wall_s"), ".1f"),
            f(r.get("sync_s"), ".1f"),
            f(r.get("peak_rss_mb"), ",.0f"),
            f(r.get("input_gb_s"), ".2f"),
            f(r.get("ratio_to_floor"), ".2f"),
            f(r.get("mergekit_speedup"), ".2f"),
            f(r.get("mergekit_rss_ratio"), ".1f"),
            "; ".join(notes),
        )
    # Not a terminal (a log, CI): do not squeeze the table to 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 180)
    console.print(t)
    for line in details:
        console.print(line, highlight=False, markup=False)


def write_chart(rows: list[dict[str, object]], path: Path, title: str, cgroup_limit: int | None = None) -> str:
    """A PNG next to the JSON: wall time per contender against the floor, peak RSS (log scale).

    Left panel: one bar per contender (median wall s, its `+sync s` stacked on it, hatched) and
    per pair one reference bar for the floor, read and write stacked, with a dotted line at its
    total; bars are labelled with seconds and `x floor`. Right panel: median peak RSS on a log
    axis, the cgroup limit as a dashed line when there was one. Returns "" when written, else
    why not (matplotlib missing).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; must precede pyplot
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed (pip install 'lazymerge[bench]' or pip install matplotlib)"

    by_name = {str(r["contender"]): r for r in rows}
    pairs = sorted({str(r["pair"]) for r in rows})
    multi_pair = len(pairs) > 1
    floor_color = {"read": "#9ecae1", "write": "#3182bd"}
    # One entry per bar: (label, [(value, color, hatch, segment label)], rss MB or None, note, pair)
    bars: list[tuple[str, list[tuple[float, str, str, str]], float | None, str, str]] = []
    cgroup_peaks: dict[str, float] = {}  # label -> the cgroup's peak charge, MB (page cache included)
    for pair in pairs:
        base = f"floor[{pair}]"
        read, write = by_name.get(f"{base} read"), by_name.get(f"{base} write")
        if read and write and isinstance(read.get("wall_s"), float) and isinstance(write.get("wall_s"), float):
            rss = max(float(read.get("peak_rss_mb", 0.0)), float(write.get("peak_rss_mb", 0.0))) or None
            segs = [
                (float(read["wall_s"]), floor_color["read"], "", "floor: dd read of the inputs"),
                (float(write["wall_s"]), floor_color["write"], "", "floor: dd write of the output (fdatasync)"),
            ]
            label = f"floor {pair}: read+write" if multi_pair else "floor: read+write"
            bars.append((label, segs, rss, "1.00x floor", pair))
    for r in rows:
        name = str(r["contender"])
        if name.startswith("floor"):
            continue
        label = f"{name} ({r['pair']})" if multi_pair else name
        wall = r.get("wall_s")
        if not isinstance(wall, float):
            why = "skipped" if "skipped" in r else "failed"
            bars.append((label, [], None, why, str(r["pair"])))
            continue
        segs = [(wall, "#e6550d" if name.startswith("lazymerge") else "#756bb1", "", "")]
        sync = float(r.get("sync_s", 0.0) or 0.0)
        if sync >= 0.05 * wall:  # shown only where it is visible
            segs.append((sync, "#fdae6b", "//", "+ sync after exit (dirty pages it left)"))
        ratio = r.get("ratio_to_floor")
        note = f"{wall:.1f} s" + (f" + {sync:.1f} s sync" if len(segs) > 1 else "")
        if isinstance(ratio, float):
            note += f", {ratio:.2f}x floor"
        if r.get("failures"):
            note += f" ({len(r['failures'])} failed)"  # type: ignore[arg-type]
        if "cgroup_limit_mib" in r:
            note += f", in {r['cgroup_limit_mib']:.0f} MiB cgroup, oom_kill {r['cgroup_oom_kills']}"
        rss = float(r["peak_rss_mb"]) if isinstance(r.get("peak_rss_mb"), float) else None
        if isinstance(r.get("cgroup_peak_mb"), float) and float(r["cgroup_peak_mb"]) > 0:
            cgroup_peaks[label] = float(r["cgroup_peak_mb"])
        bars.append((label, segs, rss, note, str(r["pair"])))
    if not bars:
        return "no successful run to chart"

    n = len(bars)
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(14, 0.55 * n + 2.2), gridspec_kw={"width_ratios": [3, 2]}, sharey=True
    )
    ys = list(range(n))[::-1]  # first bar on top
    seen: set[str] = set()
    wall_max = max((sum(s[0] for s in segs) for _, segs, *_ in bars), default=1.0) or 1.0
    for y, (_label, segs, _rss, note, _pair) in zip(ys, bars, strict=True):
        left = 0.0
        for value, color, hatch, seg_label in segs:
            lab = seg_label if seg_label and seg_label not in seen else None
            if seg_label:
                seen.add(seg_label)
            ax1.barh(
                y, value, left=left, color=color, hatch=hatch, edgecolor="white" if not hatch else "#a63603", label=lab
            )
            left += value
        if note.startswith("1.00x"):
            note = f"{left:.1f} s = 1.00x floor"
        ax1.text(left + 0.01 * wall_max, y, note, va="center", fontsize=8)
    # The floor total of each pair as a dotted reference line across the panel.
    for label, segs, _rss, _note, _pair in bars:
        if label.startswith("floor") and segs:
            total = sum(s[0] for s in segs)
            ax1.axvline(total, color=floor_color["write"], linestyle=":", linewidth=1)
    ax1.set_yticks(ys, [b[0] for b in bars])
    ax1.set_xlabel("wall time, s (median; lower is better)")
    ax1.set_xlim(0, wall_max * 1.55)
    ax1.set_title("wall time vs the I/O floor (read + write)", fontsize=10)
    if seen:
        ax1.legend(loc="upper right", fontsize=8)  # the floor bars, on top, are the short ones
    ax1.grid(axis="x", alpha=0.3)

    rss_values = [b[2] for b in bars if b[2]]
    for y, (label, _segs, rss, note, _pair) in zip(ys, bars, strict=True):
        if rss:
            if label.startswith("floor"):
                color = floor_color["write"]
            else:
                color = "#e6550d" if label.startswith("lazymerge") else "#756bb1"
            ax2.barh(y, rss, color=color)
            ax2.text(rss * 1.08, y, f"{rss:,.0f} MB", va="center", fontsize=8)
        elif note in ("skipped", "failed"):
            ax2.text(1.0, y, note, va="center", fontsize=8, transform=ax2.get_yaxis_transform(), ha="right")
        if label in cgroup_peaks:
            first = label == next(iter(cgroup_peaks))
            ax2.plot(
                cgroup_peaks[label],
                y,
                "D",
                color="#de2d26",
                label="cgroup peak charge (page cache incl.)" if first else None,
            )
    if cgroup_peaks:
        ax2.legend(loc="upper right", fontsize=8)
    ax2.set_xscale("log")
    ax2.xaxis.set_major_formatter(
        matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g} GB" if v >= 1000 else f"{v:g} MB")
    )
    lo = min(rss_values, default=10.0)
    hi = max([*rss_values, *cgroup_peaks.values(), (cgroup_limit or 0) / MB], default=100.0)
    ax2.set_xlim(lo / 2, hi * 4)
    if cgroup_limit:
        ax2.axvline(cgroup_limit / MB, color="#de2d26", linestyle="--", linewidth=1)
        ax2.text(
            cgroup_limit / MB, ys[-1] - 0.6, f" cgroup limit {cgroup_limit / MIB:,.0f} MiB", color="#de2d26", fontsize=8
        )
    ax2.set_xlabel("peak RSS, MB (median ru_maxrss; log scale)")
    ax2.set_title("peak memory", fontsize=10)
    ax2.grid(axis="x", which="both", alpha=0.3)
    ax2.set_ylim(-1, n)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(synthetic.SIZES), default="tiny")
    ap.add_argument("--dtype", choices=sorted(synthetic.DTYPES), default="fp16")
    ap.add_argument("--contenders", default=DEFAULT_CONTENDERS, help=f"comma list of {', '.join(ALL_CONTENDERS)}")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--fixed-order", action="store_true", help="run contenders A B C every round (default: flip every round)"
    )
    ap.add_argument("--pause", type=float, default=0.0, help="seconds to wait after each run (and its sync)")
    ap.add_argument("--no-drop-caches", action="store_true", help="keep the page cache between runs (warm reads)")
    ap.add_argument(
        "--cgroup-limit", default=None, help="run the lazymerge children in a memory cgroup with this limit, e.g. 1G"
    )
    ap.add_argument("--cgroup-all", action="store_true", help="put every contender, not only lazymerge, in the cgroup")
    ap.add_argument(
        "--force-naive", action="store_true", help="run naive even where it needs more RAM than is available"
    )
    ap.add_argument("--lazymerge-args", default="", help="extra arguments for the lazymerge CLI, e.g. '--quiet'")
    ap.add_argument(
        "--cache", type=Path, default=None, help="synthetic pairs (default: $LAZYMERGE_BENCH_CACHE or benchmarks/cache)"
    )
    ap.add_argument("--name", default=None, help="results name (default <size>-<dtype>)")
    ap.add_argument("--results", type=Path, default=BENCH_DIR / "results")
    ap.add_argument(
        "--keep-output",
        action="store_true",
        help="keep each merge's last output in this run's folder <cache>/bench-out/<name>-<pid>-* (printed;"
        " for lazymerge verify); deleted otherwise",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    cache = args.cache or synthetic.default_cache()
    info = machine_info()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))

    drop = not args.no_drop_caches
    if drop and not drop_caches():
        print(
            "WARNING: cannot drop the page cache (needs root and a writable /proc/sys/vm/drop_caches): runs are WARM-cache"
        )
        drop = False
    print(
        "page cache: "
        + (
            "dropped before every run (model bytes cold), then torch re-imported in each contender's"
            " interpreter (libraries warm)"
            if drop
            else "NOT dropped (warm reads)"
        )
    )

    limit = parse_size(args.cgroup_limit) if args.cgroup_limit else None
    cgroup_note = "none"
    if limit is not None:
        probe, cgroup_note = create_memory_cgroup(limit, f"lazymerge-bench-{os.getpid()}-probe")
        if probe is None:
            print(f"cannot create a memory cgroup, running without a limit: {cgroup_note}")
            limit = None
        else:
            probe.remove()
            print(f"memory limit {limit / MB:.0f} MB via {cgroup_note.split(' at ')[0]} (a child cgroup per run)")

    pairs = {k: load_pair(args.size, args.dtype, k, cache) for k in sorted(kinds_needed(names))}
    name = args.name or f"{args.size}-{args.dtype}"
    # This run's own folder under <cache>/bench-out: benchmarks running side by side must not
    # delete (or overwrite) each other's outputs. Only this folder is deleted at the end.
    bench_out = cache / "bench-out"
    bench_out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{name}-{os.getpid()}-", dir=bench_out))
    work.chmod(0o755)  # as mkdir would leave it (mkdtemp makes it private); kept outputs get verified
    print(f"this run's folder: {work} ({'kept' if args.keep_output else 'deleted at the end'})")
    try:
        contenders = build_contenders(names, pairs, work, args.dtype, args)
        for c in contenders:
            if c.skip:
                print(f"skipping {c.name}: {c.skip}")

        # Every child's ru_maxrss starts at this process's RSS (exec keeps the pre-exec high-water
        # mark of the forked copy), so this is the smallest peak RSS a child can show.
        harness_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB
        print(f"harness RSS {harness_rss_mb:.0f} MB (the lowest peak RSS any child can report)")
        results: list[RunResult] = []
        runnable = [c for c in contenders if not c.skip]
        for rep in range(args.repeat):
            # Interleaved, the order flipped every round (A B C, C B A, ...): each contender
            # follows the others' writes as often as they follow its own.
            for c in runnable if rep % 2 == 0 or args.fixed_order else runnable[::-1]:
                for step in c.steps:
                    r = run_step(c, step, rep, work, limit, drop, args.keep_output)
                    time.sleep(args.pause)
                    results.append(r)
                    status = "ok" if r.ok else f"FAILED rc={r.returncode} {r.killed_by}"
                    extra = (
                        f", cgroup peak {r.cgroup_peak / MB:,.0f} MB, failcnt {r.cgroup_failcnt}, oom_kill {r.oom_kill}"
                        if r.cgroup
                        else ""
                    )
                    print(
                        f"[{rep + 1}/{args.repeat}] {c.name} {step.label}: {r.wall_s:.1f} s (+{r.sync_s:.1f} s sync), peak RSS {r.maxrss_kib * 1024 / MB:,.0f} MB, {status}{extra}"
                    )
                    if not r.ok and r.log:
                        print("  " + r.log.replace("\n", "\n  "))

        rows = summarize(contenders, results)
        title = f"lazymerge benchmark {name}: medians of {args.repeat}, {'cold' if drop else 'warm'} cache"
        print_table(rows, title)
        args.results.mkdir(parents=True, exist_ok=True)
        out = args.results / f"{name}.json"
        doc = {
            "name": name,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": info,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "page_cache_dropped": drop,
            "harness_rss_mb": harness_rss_mb,
            "cgroup": cgroup_note if limit is not None else None,
            "output_dir": str(work) if args.keep_output else None,
            "pairs": {
                k: {"first": str(p.first), "second": str(p.second), "input_bytes": p.input_bytes}
                for k, p in pairs.items()
            },
            "summary": rows,
            "runs": [asdict(r) for r in results],
        }
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {out}")
        png = out.with_suffix(".png")
        why_not = write_chart(rows, png, title, limit)
        if why_not:
            print(f"CHART SKIPPED, no {png} written: {why_not}")
        else:
            print(f"wrote {png}")
        if args.keep_output:
            kept = [s.output for c in runnable for s in c.steps if s.output is not None and s.output.exists()]
            for o in kept:
                print(f"kept output: {o} ({disk_bytes(o) / GB:.1f} GB; delete it when done)")
            print(f"kept outputs are under {work} (recorded as output_dir in {out}); delete the folder when done")
        return 0 if all(r.ok for r in results) else 1
    finally:
        if not args.keep_output:
            shutil.rmtree(work, ignore_errors=True)


def kinds_needed(names: list[str]) -> set[str]:
    """The synthetic pairs the chosen contenders read (the floor reads whichever others do)."""
    need = set()
    for n in names:
        if n in ("lazymerge-dogerm", "naive-dogerm"):
            need.add("dogerm")
        elif n in ("lazymerge-linear", "mergekit", "naive", "lazymerge-stack", "mergekit-stack"):
            need.add("causal")
    if not need and "floor" in names:
        need.add("dogerm")
    return need


def child_main(argv: list[str]) -> int:
    mode, a, b, out, w = argv
    if mode == "_naive":
        naive_linear(Path(a), Path(b), Path(out), float(w))
    else:
        naive_dogerm(Path(a), Path(b), Path(out), float(w))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_naive", "_naive-dogerm"):
        raise SystemExit(child_main(sys.argv[1:]))
    raise SystemExit(main())
