"""lazymerge where its users are: macOS and Windows, simulated on this Linux machine.

`lazymerge._platform` holds every platform-specific call with its fallback; the quick tests here
reach each fallback in-process (monkeypatch removes the call). The slow ones run the core (a
DogeRM merge, TIES with its statistics passes, a sweep, a killed run resumed, verify with
recomputed tensors) in child interpreters made to look like macOS's and Windows's Python by
`tests/platform_shims/sitecustomize.py` (its docstring says what is simulated and what is not),
and require every output byte-identical to the plain Linux run.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import REPO, child_env, kill, manifest_shards, snapshot, wait_for

from lazymerge import _platform
from lazymerge.io import digest
from lazymerge.io.direct import direct_io_supported
from lazymerge.lock import LOCK_NAMES
from lazymerge.tiny_models import build_llama, build_llama_pair

SHIMS = Path(__file__).parent / "platform_shims"
SIMULATED = ("macos", "windows")

# -- each fallback, in-process ----------------------------------------------------------------------


@pytest.mark.parametrize("missing", [(), ("preadv",), ("preadv", "pread", "pwrite")], ids=["linux", "macos", "windows"])
def test_positional_reads_and_writes_without_the_linux_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: tuple[str, ...]
) -> None:
    for name in missing:
        monkeypatch.delattr(os, name)
    path = tmp_path / "f"
    data = os.urandom(1 << 20)
    fd = os.open(path, _platform.open_flags(os.O_RDWR | os.O_CREAT), 0o644)
    try:
        # Written back to front, read by 8 threads at once: a seek-based fallback must not let
        # one thread's seek move another's read.
        for at in range(len(data) - 4096, -1, -4096):
            assert _platform.pwrite(fd, data[at : at + 4096], at) == 4096
        got = bytearray(len(data))

        def read(part: int) -> None:
            for at in range(part * 4096, len(data), 8 * 4096):
                assert _platform.pread_into(fd, memoryview(got)[at : at + 4096], at) == 4096

        threads = [threading.Thread(target=read, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert bytes(got) == data
        assert _platform.pread(fd, 100, len(data) - 10) == data[-10:]  # short at the end
        assert _platform.pread_into(fd, memoryview(bytearray(10)), len(data)) == 0
    finally:
        os.close(fd)


def test_copy_and_preallocation_without_the_linux_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "copy_file_range")
    monkeypatch.delattr(os, "posix_fallocate")
    fd = os.open(tmp_path / "f", _platform.open_flags(os.O_RDWR | os.O_CREAT), 0o644)
    try:
        with pytest.raises(OSError) as info:
            _platform.copy_file_range(fd, fd, 10, 0, 10)
        assert info.value.errno == errno.ENOSYS  # what the writer already falls back on
        _platform.preallocate(fd, 12345)
        assert os.fstat(fd).st_size == 12345
    finally:
        os.close(fd)


def test_no_o_direct_means_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    assert _platform.open_direct(tmp_path / "missing") is None
    assert not direct_io_supported(tmp_path)
    assert list(tmp_path.iterdir()) == [], "the probe left a file"


def test_digest_is_the_same_mapped_or_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Windows cannot drop hashed pages from a map (no madvise): blocks are read instead.
    import hashlib

    path = tmp_path / "f"
    data = os.urandom(2 * digest.BLOCK_BYTES + 12345)
    path.write_bytes(data)

    def both_hashes() -> tuple[str, str | None]:
        pool = digest.hash_pool(2)
        try:
            with open(path, "rb") as f:
                hasher = digest.BlockHasher(f.fileno(), len(data), pool, sha256=True)  # with a Hub push's sha256
                hasher.advance(len(data))
                return hasher.digest(), hasher.sha256_hex
        finally:
            pool.shutdown()

    mapped = both_hashes()
    assert mapped == (digest.file_digest(path), hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(digest, "can_drop_mapped_pages", lambda: False)
    monkeypatch.setattr(digest, "map_readonly", None)  # never called on this path
    assert both_hashes() == mapped
    assert digest.file_digest(path) == mapped[0]


def test_peak_rss_in_bytes_on_every_system(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    monkeypatch.setattr(_platform, "SYSTEM", "linux")
    assert kib * 1024 <= _platform.peak_rss_bytes() < 4 * kib * 1024
    monkeypatch.setattr(_platform, "SYSTEM", "darwin")  # ru_maxrss is in bytes there
    assert kib <= _platform.peak_rss_bytes() < 4 * kib
    monkeypatch.setitem(sys.modules, "resource", None)  # Windows: no resource, and no windll here
    assert _platform.peak_rss_bytes() is None


def test_cpu_count_follows_affinity_and_cgroup_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "process_cpu_count", lambda: 16, raising=False)
    monkeypatch.setattr(_platform, "SYSTEM", "linux")
    root = tmp_path / "cgroup"
    root.mkdir()
    assert _platform.usable_cpu_count(root) == 16  # no quota file
    (root / "cpu.max").write_text("max 100000\n")
    assert _platform.usable_cpu_count(root) == 16
    (root / "cpu.max").write_text("150000 100000\n")  # docker --cpus 1.5
    assert _platform.usable_cpu_count(root) == 2
    (root / "cpu.max").write_text("20000 100000\n")
    assert _platform.usable_cpu_count(root) == 1
    (root / "cpu.max").unlink()
    (root / "cpu").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")  # cgroup v1
    (root / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _platform.usable_cpu_count(root) == 4
    monkeypatch.delattr(os, "process_cpu_count")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)  # taskset -c 0-2
    assert _platform.usable_cpu_count(root) == 3
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(_platform, "SYSTEM", "darwin")  # no cgroups
    assert _platform.usable_cpu_count(root) == 64


def _open_or_mapped_inodes() -> set[int]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            inodes.add(os.stat(f"/proc/self/fd/{fd}").st_ino)
        except OSError:
            continue
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[4] != "0":
            inodes.add(int(fields[4]))
    return inodes


@pytest.mark.parametrize("direct", ["0", "1"], ids=["hashing-writer", "direct-writer"])
def test_a_shard_is_never_renamed_while_open_or_mapped(
    capsys, llama_pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: str
) -> None:
    # Windows refuses to rename a file with an open handle or map. Here, with the maps Linux
    # uses (the hashing writer maps each shard), every rename must find its file closed.
    from helpers import cli

    monkeypatch.setenv("LAZYMERGE_DIRECT_WRITE", direct)
    real_replace = os.replace
    renamed = []

    def replace(src, dst, **kwargs):
        assert os.stat(src).st_ino not in _open_or_mapped_inodes(), f"{src} renamed while open or mapped"
        renamed.append(Path(dst).name)
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    rm, sft = llama_pair
    code, _, err = cli(capsys, "dogerm", "--reward-model", rm, "--domain-model", sft, "--weight", "0.3",
                       "-o", tmp_path / "out", "--device", "cpu", "--max-shard-size", "60kB", "-q")  # fmt: skip
    assert code == 0, err
    assert sum(n.endswith(".safetensors") for n in renamed) >= 2, renamed


# -- the simulated platforms themselves --------------------------------------------------------------


def shim_env(flavour: str) -> dict[str, str]:
    """A child's environment for the plain interpreter ("linux") or a simulated one."""
    env = child_env()
    if flavour != "linux":
        env["PYTHONPATH"] = os.pathsep.join([str(SHIMS), env["PYTHONPATH"]])
        env["LAZYMERGE_TEST_PLATFORM"] = flavour
    return env


_PROBE = """
import json, mmap, os, sys
facts = {"os": sorted(n for n in ("posix_fadvise", "posix_fallocate", "copy_file_range", "O_DIRECT",
         "preadv", "pread", "pwrite", "sched_getaffinity", "O_BINARY") if hasattr(os, n)),
         "mmap": hasattr(mmap, "PROT_READ") or hasattr(mmap, "MADV_DONTNEED")}
for name in ("fcntl", "resource"):
    try:
        __import__(name)
        facts[name] = True
    except ImportError:
        facts[name] = False
import lazymerge, lazymerge._platform as p
facts["system"] = p.SYSTEM
facts["peak"] = p.peak_rss_bytes()
path = sys.argv[1]
fd = os.open(path, p.open_flags(os.O_RDWR | os.O_CREAT), 0o644)
try:
    os.replace(path, path + ".moved")
    facts["renamed_while_open"] = True
except PermissionError:
    facts["renamed_while_open"] = False
os.close(fd)
print(json.dumps(facts))
"""


@pytest.mark.slow  # three interpreters start
def test_the_simulated_platforms_lack_what_they_should(tmp_path: Path) -> None:
    facts = {}
    for flavour in ("linux", *SIMULATED):
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, str(tmp_path / flavour)],
            capture_output=True, text=True, env=shim_env(flavour), cwd=REPO, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        facts[flavour] = json.loads(done.stdout)
    linux, macos, windows = facts["linux"], facts["macos"], facts["windows"]
    assert {"posix_fadvise", "copy_file_range", "preadv", "pread"} <= set(linux["os"]) and linux["fcntl"]
    assert macos["os"] == ["pread", "pwrite"] and macos["fcntl"] and macos["mmap"] and macos["system"] == "darwin"
    assert windows["os"] == ["O_BINARY"] and not windows["fcntl"] and not windows["resource"] and not windows["mmap"]
    # Peak RSS in bytes whatever the unit of ru_maxrss; not measured where the call is missing. A
    # child's ru_maxrss starts at its parent's high-water mark (kept across exec), which a long
    # pytest run can take past 2 GB: compare the two probes with each other, not with a fixed size.
    # A wrong unit is off by 1024x, far outside the factor of 4 allowed between them.
    assert 10e6 < linux["peak"] < 1e11 and windows["peak"] is None
    assert 0.25 < macos["peak"] / linux["peak"] < 4, (macos["peak"], linux["peak"])
    assert linux["renamed_while_open"] and macos["renamed_while_open"] and not windows["renamed_while_open"]


# -- the core, on each simulated platform ----------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    rm, sft = build_llama_pair(root / "pair")
    base, a, b = (build_llama(root / f"llama{i}", i) for i in range(3))
    recipe = root / "ties.yml"
    recipe.write_text(
        f"merge_method: ties\nbase_model: {base}\ndtype: float32\nmodels:\n  - model: {base}\n"
        f"  - model: {a}\n    parameters: {{weight: 0.7, density: 0.5}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.4, density: 0.3}}\n"
    )
    return {"rm": rm, "sft": sft, "recipe": recipe}


_IN_PROCESS = """
import json, sys
from lazymerge.cli import main
codes = {}
for name, argv in json.loads(sys.argv[1]).items():
    codes[name] = main(argv)
print(json.dumps(codes))
"""


def run_core(flavour: str, inputs: dict[str, Path], out: Path) -> dict[str, dict[str, bytes]]:
    """Every core run under one interpreter; {output folder name: its files}."""
    env = shim_env(flavour)
    dogerm = ["dogerm", "--reward-model", inputs["rm"], "--domain-model", inputs["sft"], "--device", "cpu"]
    dogerm += ["--max-shard-size", "60kB", "-q"]

    def child(*args: object, module: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "lazymerge"] if module else [sys.executable, "-c"]
        done = subprocess.run(
            [*argv, *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False
        )
        assert done.returncode == 0, (flavour, args, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        return done

    # The CLI entry point itself, as a user runs it.
    child(*dogerm, "--weight", "0.3", "-o", out / "dogerm")
    # SIGKILLed after its first shard, then resumed.
    killed = subprocess.Popen(
        [sys.executable, "-m", "lazymerge", *map(str, dogerm), "--weight", "0.3", "-o", out / "resumed",
         "--chunk-elements", "64"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO,
    )  # fmt: skip
    assert wait_for(lambda: len(manifest_shards(out / "resumed")) >= 1, killed)
    assert kill(killed) is None, "the run finished before it could be killed"
    child(*dogerm, "--weight", "0.3", "-o", out / "resumed", "--resume")
    # The rest in one interpreter (each start imports torch): TIES, a sweep, verify.
    runs = {
        "ties": ["merge", inputs["recipe"], "-o", out / "ties", "--device", "cpu", "--max-shard-size", "20kB", "-q"],
        "sweep": [*dogerm, "--weight", "0.1,0.6", "-o", out / "sweep-{weight}"],
    }
    for name in ("dogerm", "resumed", "ties", "sweep-0.1", "sweep-0.6"):
        runs[f"verify {name}"] = ["verify", out / name, "--recompute", "4"]
    done = child(_IN_PROCESS, json.dumps({k: [str(a) for a in v] for k, v in runs.items()}), module=False)
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    assert codes == dict.fromkeys(runs, 0), (flavour, codes, done.stderr)
    folders = {}
    for folder in sorted(out.iterdir()):
        files = snapshot(folder)
        assert not set(LOCK_NAMES) & set(files) and not [n for n in files if n.endswith(".partial")], (flavour, files)
        folders[folder.name] = files
    return folders


@pytest.fixture(scope="module")
def linux_outputs(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    return run_core("linux", inputs, tmp_path_factory.mktemp("linux"))


@pytest.mark.slow
@pytest.mark.parametrize("flavour", SIMULATED)
def test_core_is_byte_identical_on_simulated_platforms(
    flavour: str, inputs: dict[str, Path], linux_outputs: dict[str, dict[str, bytes]], tmp_path: Path
) -> None:
    assert sorted(linux_outputs) == ["dogerm", "resumed", "sweep-0.1", "sweep-0.6", "ties"]
    assert linux_outputs["resumed"] == linux_outputs["dogerm"]
    outputs = run_core(flavour, inputs, tmp_path / "out")
    for name, files in linux_outputs.items():
        assert sorted(outputs[name]) == sorted(files), (flavour, name)
        for file, data in files.items():
            assert outputs[name][file] == data, f"{flavour}: {name}/{file} differs from the Linux run"
