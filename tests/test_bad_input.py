"""Bad input through the command line: one `error:` line (plus an optional `hint:` line) on
stderr, exit code 2, no traceback, and nothing in the output folder that looks complete.

Most cases call `lazymerge.cli.main([...])` in-process; a few go through a real
`python -m lazymerge` subprocess to prove what actually reaches a terminal.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import subprocess
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import write_model
from helpers import run_cli

import lazymerge
import lazymerge.execute
from lazymerge import output_folder
from lazymerge.cli import main
from lazymerge.config import plan_recipe
from lazymerge.errors import LazyMergeError
from lazymerge.io.header import read_header

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")

RM_FILE = "model.safetensors"


# -- helpers -------------------------------------------------------------------------------------


def rm_tensors(rows: int = 8, inter: int = 6, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    h = 4
    return {
        "model.embed_tokens.weight": torch.randn(rows, h, generator=g).to(dtype),
        "model.layers.0.mlp.up_proj.weight": torch.randn(inter, h, generator=g).to(dtype),
        "model.norm.weight": torch.randn(h, generator=g).to(dtype),
        "score.weight": torch.randn(1, h, generator=g).to(dtype),
    }


def sft_tensors(rows: int = 8, inter: int = 6) -> dict[str, torch.Tensor]:
    t = {k: v.float() * 2 for k, v in rm_tensors(rows, inter).items() if not k.startswith("score.")}
    t["lm_head.weight"] = torch.ones(rows, 4)
    return t


def make_pair(tmp_path: Path, **sft_kw: int) -> tuple[Path, Path]:
    rm = write_model(tmp_path / "rm", rm_tensors(), config={"model_type": "llama", "torch_dtype": "float16"})
    sft = write_model(tmp_path / "sft", sft_tensors(**sft_kw))
    return rm, sft


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, ANSI.sub("", captured.out), ANSI.sub("", captured.err)


def dogerm(capsys, rm: Path, sft: Path, out: Path, *extra: object, weight: object = 0.3) -> tuple[int, str, str]:
    return cli(
        capsys, "dogerm", "--reward-model", rm, "--domain-model", sft, "--weight", weight, "-o", out, "-q", *extra
    )


def assert_user_error(result: tuple[int, str, str], *fragments: str) -> str:
    """Exit 2, stdout empty, stderr = `error: ...` (+ `hint: ...`), each fragment in the error line."""
    code, out, err = result
    assert "Traceback" not in out + err, err
    assert code == 2, (code, out, err)
    assert out == "", out
    lines = err.splitlines()
    assert 1 <= len(lines) <= 2, f"expected one error line and an optional hint, got:\n{err}"
    assert lines[0].startswith("error: "), err
    if len(lines) == 2:
        assert lines[1].startswith("hint: "), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def assert_nothing_complete(out: Path) -> None:
    """No file that a loader could take for a finished model, and no leftover `.partial`."""
    if not out.exists():
        return
    names = sorted(p.name for p in out.rglob("*"))
    assert not [n for n in names if n.endswith(".partial")], names
    assert not [n for n in names if n.endswith((".safetensors", ".bin", ".index.json"))], names


def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every way the executor reads tensor bytes fail loudly."""

    def forbidden(*_args: object, **_kw: object) -> None:
        raise AssertionError("a tensor byte was read")

    for name in ("pread", "preadv", "copy_file_range"):
        monkeypatch.setattr(os, name, forbidden)
    monkeypatch.setattr(lazymerge.execute, "execute_sweep", forbidden)


def _sft_file(sft: Path) -> Path:
    return sft / "model.safetensors"


# -- corrupt input files (found at plan time, from headers alone) ---------------------------------


def _raw(header: dict, data: bytes, *, length: int | None = None, text: bytes | None = None) -> bytes:
    body = text if text is not None else json.dumps(header).encode()
    n = len(body) if length is None else length
    return n.to_bytes(8, "little") + body + data


def _e(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _truncate_data(path: Path) -> str:
    os.truncate(path, path.stat().st_size - 7)
    return "truncated?"


def _replace(content: bytes, fragment: str) -> Callable[[Path], str]:
    def apply(path: Path) -> str:
        path.write_bytes(content)
        return fragment

    return apply


CORRUPT_SAFETENSORS: dict[str, Callable[[Path], str]] = {
    "truncated data": _truncate_data,
    "corrupt json": _replace(_raw({}, b"", text=b'{"a": {"dtype": "F32", "sha'), "not valid UTF-8 JSON"),
    "non-utf8 header": _replace(_raw({}, b"", text=b'{"\xc3\x28": 1}'), "not valid UTF-8 JSON"),
    "header past eof": _replace(_raw({}, b"", length=4096, text=b"{}"), "runs past the end of the file"),
    "header absurd": _replace(_raw({}, b"\0" * 64, length=2**62, text=b"{}"), "exceeds the 100 MB limit"),
    "overlap": _replace(_raw({"a": _e("F32", [2], 0, 8), "b": _e("F32", [2], 4, 12)}, b"\0" * 12), "overlaps"),
    "out of range": _replace(_raw({"a": _e("F32", [250], 0, 1000)}, b"\0" * 16), "need 1000 data bytes"),
    "hole": _replace(_raw({"a": _e("F32", [1], 0, 4), "b": _e("F32", [1], 8, 12)}, b"\0" * 12), "hole of 4 bytes"),
    "unknown dtype": _replace(_raw({"a": _e("F12", [1], 0, 4)}, b"\0" * 4), "unknown dtype 'F12'"),
    "size mismatch": _replace(_raw({"a": _e("F32", [3, 3], 0, 32)}, b"\0" * 32), "spans 32 bytes but F32 [3, 3]"),
    "empty file": _replace(b"", "too short"),
}


@pytest.mark.parametrize("case", list(CORRUPT_SAFETENSORS))
def test_corrupt_safetensors_shard(tmp_path: Path, capsys, case: str) -> None:
    rm, sft = make_pair(tmp_path)
    bad = _sft_file(sft)
    fragment = CORRUPT_SAFETENSORS[case](bad)
    out = tmp_path / "out"
    assert_user_error(dogerm(capsys, rm, sft, out), str(bad), fragment)
    assert not out.exists()
    # `inspect` reports the same problem the same way.
    assert_user_error(cli(capsys, "inspect", sft), str(bad), fragment)


def test_truncated_shard_of_a_sharded_model_found_at_plan_time(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    rm = write_model(tmp_path / "rm", rm_tensors(), shards=2)
    sft = write_model(tmp_path / "sft", sft_tensors())
    shard = rm / "model-00002-of-00002.safetensors"
    os.truncate(shard, shard.stat().st_size - 1)
    no_tensor_reads(monkeypatch)
    out = tmp_path / "out"
    assert_user_error(dogerm(capsys, rm, sft, out), str(shard), "truncated?")
    assert not out.exists()


def _bin_model(tmp_path: Path) -> Path:
    return write_model(tmp_path / "sftbin", sft_tensors(), fmt="bin")


def test_truncated_bin_shard(tmp_path: Path, capsys) -> None:
    rm, _ = make_pair(tmp_path)
    sft = _bin_model(tmp_path)
    bad = sft / "pytorch_model.bin"
    os.truncate(bad, bad.stat().st_size - 100)
    out = tmp_path / "out"
    assert_user_error(dogerm(capsys, rm, sft, out), str(bad), "not a zip-format PyTorch checkpoint")
    assert not out.exists()


def test_corrupt_bin_shard(tmp_path: Path, capsys) -> None:
    rm, _ = make_pair(tmp_path)
    sft = _bin_model(tmp_path)
    bad = sft / "pytorch_model.bin"
    raw = bytearray(bad.read_bytes())
    raw[: len(raw) // 2] = os.urandom(len(raw) // 2)
    raw[-64:] = os.urandom(64)  # the end-of-central-directory record too
    bad.write_bytes(bytes(raw))
    out = tmp_path / "out"
    assert_user_error(dogerm(capsys, rm, sft, out), str(bad))
    assert not out.exists()


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _evil_bin(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True)
    path = folder / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"model.norm.weight": _System(f"touch {marker}")}, protocol=2))
        z.writestr("archive/byteorder", b"little")
    return path


def test_bin_pickle_with_disallowed_global_is_refused_not_run(tmp_path: Path, capsys) -> None:
    rm, _ = make_pair(tmp_path)
    marker = tmp_path / "pwned"
    bad = _evil_bin(tmp_path / "evil", marker)
    out = tmp_path / "out"
    line = assert_user_error(dogerm(capsys, rm, bad.parent, out), str(bad), "system")
    assert "never needs" in line
    assert not marker.exists(), "the pickle's payload was executed"
    assert not out.exists()


# -- models that do not fit together --------------------------------------------------------------


def test_dogerm_shape_mismatch_names_tensor_and_both_shapes(tmp_path: Path, capsys) -> None:
    rm, sft = make_pair(tmp_path, inter=7)
    out = tmp_path / "out"
    assert_user_error(
        dogerm(capsys, rm, sft, out),
        "'model.layers.0.mlp.up_proj.weight'",
        "[6, 4]",
        "[7, 4]",
        str(rm),
        str(sft),
    )
    assert not out.exists()


def _recipe(tmp_path: Path, spec: dict | str, name: str = "recipe.yml") -> Path:
    path = tmp_path / name
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec))  # JSON is valid YAML
    return path


def _linear(*models: Path, weights: tuple[float, ...] | None = None, **extra: object) -> dict:
    weights = weights or tuple(1.0 for _ in models)
    entries = [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights, strict=True)]
    return {"merge_method": "linear", "models": entries, **extra}


def test_linear_shape_mismatch_names_tensor_and_both_shapes(tmp_path: Path, capsys) -> None:
    a = write_model(tmp_path / "a", rm_tensors())
    b = write_model(tmp_path / "b", rm_tensors(inter=5))
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, _linear(a, b))
    assert_user_error(
        cli(capsys, "merge", recipe, "-o", out, "-q"), "'model.layers.0.mlp.up_proj.weight'", "[6, 4]", "[5, 4]"
    )
    assert not out.exists()


def test_linear_missing_tensor_is_named(tmp_path: Path, capsys) -> None:
    a = write_model(tmp_path / "a", rm_tensors())
    b_tensors = rm_tensors()
    del b_tensors["model.norm.weight"]
    b = write_model(tmp_path / "b", b_tensors)
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, _linear(a, b))
    assert_user_error(cli(capsys, "merge", recipe, "-o", out, "-q"), "'model.norm.weight'", "missing from", str(b))
    assert not out.exists()


# -- indexes from strangers -----------------------------------------------------------------------


def _sharded(tmp_path: Path) -> tuple[Path, Path]:
    rm = write_model(tmp_path / "rm", rm_tensors(), shards=2)
    sft = write_model(tmp_path / "sft", sft_tensors())
    return rm, sft


def _edit_index(folder: Path, tensor: str, file: str) -> None:
    index = folder / "model.safetensors.index.json"
    obj = json.loads(index.read_text())
    obj["weight_map"][tensor] = file
    index.write_text(json.dumps(obj))


@pytest.mark.parametrize("target", ["../x.safetensors", "sub/../../x.safetensors", "/etc/passwd", "~/x.safetensors"])
def test_index_pointing_outside_the_folder(tmp_path: Path, capsys, target: str) -> None:
    rm, sft = _sharded(tmp_path)
    outside = tmp_path / "x.safetensors"
    shutil.copy(rm / "model-00001-of-00002.safetensors", outside)  # a real file is there: still refused
    _edit_index(rm, "model.norm.weight", target)
    out = tmp_path / "out"
    assert_user_error(
        dogerm(capsys, rm, sft, out), "model.safetensors.index.json", repr(target), "outside the model folder"
    )
    assert not out.exists()


def test_index_naming_a_missing_shard(tmp_path: Path, capsys) -> None:
    rm, sft = _sharded(tmp_path)
    (rm / "model-00002-of-00002.safetensors").unlink()
    out = tmp_path / "out"
    assert_user_error(dogerm(capsys, rm, sft, out), "model-00002-of-00002.safetensors", "missing")
    assert not out.exists()


def test_index_and_shard_disagree(tmp_path: Path, capsys) -> None:
    rm, sft = _sharded(tmp_path)
    _edit_index(rm, "model.norm.weight", "model-00001-of-00002.safetensors")  # it is in shard 2
    out = tmp_path / "out"
    assert_user_error(dogerm(capsys, rm, sft, out), "'model.norm.weight'", "lacks it")


# -- the output folder ----------------------------------------------------------------------------


def test_output_folder_is_an_input_folder(tmp_path: Path, capsys) -> None:
    rm, sft = make_pair(tmp_path)
    before = sorted(p.name for p in rm.iterdir())
    assert_user_error(dogerm(capsys, rm, sft, rm), "is an input folder")
    assert_user_error(dogerm(capsys, rm, sft, sft / "." / ".." / "sft"), "is an input folder")
    assert sorted(p.name for p in rm.iterdir()) == before


def test_output_folder_already_holds_a_model(tmp_path: Path, capsys) -> None:
    rm, sft = make_pair(tmp_path)
    out = tmp_path / "out"
    existing = write_model(out, {"x": torch.ones(3)}) / "model.safetensors"
    content = existing.read_bytes()
    result = dogerm(capsys, rm, sft, out)
    assert_user_error(result, str(out), "already holds a model", "model.safetensors")
    assert "hint: " in result[2] and "--overwrite" in result[2]
    assert existing.read_bytes() == content, "the existing model was touched"
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    # With --overwrite the same command succeeds.
    code, _, err = dogerm(capsys, rm, sft, out, "--overwrite")
    assert code == 0, err


def test_output_path_is_a_file(tmp_path: Path, capsys) -> None:
    rm, sft = make_pair(tmp_path)
    out = tmp_path / "out.txt"
    out.write_text("hello")
    assert_user_error(dogerm(capsys, rm, sft, out), "is not a folder")
    assert out.read_text() == "hello"


def test_too_little_disk_space_is_a_plan_time_error(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    rm, sft = make_pair(tmp_path)
    real = shutil.disk_usage

    def little(path):
        usage = real(path)
        return type(usage)(usage.total, usage.total - 100, 100)

    monkeypatch.setattr(shutil, "disk_usage", little)
    no_tensor_reads(monkeypatch)
    out = tmp_path / "out"
    assert_user_error(dogerm(capsys, rm, sft, out), str(out), "has 0.0 MB free but the merged model needs")
    assert not out.exists()
    # The linear recipe checks it too.
    recipe = _recipe(tmp_path, _linear(rm, rm))
    assert_user_error(cli(capsys, "merge", recipe, "-o", out, "-q"), "free but the merged model needs")
    assert not out.exists()


# -- a real ENOSPC while writing --------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 2 MiB tmpfs (needs root and mount permission; skipped otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot create a small file system for a real ENOSPC")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs for a real ENOSPC (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


@pytest.mark.parametrize("reserve", ["fallocate", "sparse"])
def test_real_disk_full_while_writing(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, small_tmpfs: Path, reserve: str
) -> None:
    # 2.1 MB of output on a 2 MiB file system; the plan-time check is told there is room, so the
    # writer meets the real ENOSPC (at fallocate, or mid-write when the file is sparse).
    big = rm_tensors(rows=8, inter=1024 * 256)  # up_proj: 1 Mi fp16 elements = 2 MiB
    rm = write_model(tmp_path / "rm", big)
    sft = write_model(tmp_path / "sft", sft_tensors(rows=8, inter=1024 * 256))
    monkeypatch.setattr(output_folder, "free_space", lambda _path: 1 << 40)
    if reserve == "sparse":

        def no_fallocate(*_args: object) -> None:
            raise OSError(errno.EOPNOTSUPP, "not supported")

        monkeypatch.setattr(os, "posix_fallocate", no_fallocate)
    out = small_tmpfs / "out"
    inputs = {p: (p.read_bytes(), p.stat().st_mtime_ns) for d in (rm, sft) for p in sorted(d.iterdir())}
    line = assert_user_error(dogerm(capsys, rm, sft, out), "disk full while writing model.safetensors", str(out))
    size = sum(p.stat().st_size for p in rm.iterdir()) / 1e6  # the merged file is about the RM's size
    needs = re.search(r"it needs ([0-9.]+) MB", line)
    assert needs and abs(float(needs.group(1)) - size) < 0.1 * size, line  # the space it needs, in MB
    assert_nothing_complete(out)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in inputs} == inputs, "an input changed"
    assert shutil.disk_usage(small_tmpfs).used < 1 << 20, "the partial shard still takes the space"


# -- inputs truncated after planning -----------------------------------------------------------------


def test_input_truncated_after_planning_api(tmp_path: Path) -> None:
    rm, sft = make_pair(tmp_path)
    out = tmp_path / "out"
    recipe = {"merge_method": "dogerm", "reward_model": str(rm), "domain_model": str(sft), "weight": 0.5}
    plan, checkpoints = plan_recipe(recipe, out)
    bad = _sft_file(sft)
    os.truncate(bad, bad.stat().st_size // 2)  # merged tensors read from here (positional reads)
    with pytest.raises(LazyMergeError) as info:
        lazymerge.execute.execute(plan, checkpoints, chunk_elements=8)
    assert str(bad) in str(info.value) and "truncated?" in str(info.value)
    assert_nothing_complete(out)


@pytest.mark.parametrize("which", ["rm-copied-tensor", "sft-merged-tensor"])
def test_input_truncated_after_planning_cli(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    rm, sft = make_pair(tmp_path)
    # score.weight is the RM's last tensor and a plain byte copy: cutting 2 bytes hits only the copy
    # path; cutting the SFT file hits the positional-read path of merged tensors.
    bad, cut = (rm / RM_FILE, 2) if which.startswith("rm") else (_sft_file(sft), 40)
    real_execute = lazymerge.execute.execute_sweep

    def truncate_then_execute(plans, checkpoints, **kw):
        os.truncate(bad, bad.stat().st_size - cut)
        return real_execute(plans, checkpoints, **kw)

    monkeypatch.setattr(lazymerge.execute, "execute_sweep", truncate_then_execute)
    out = tmp_path / "out"
    assert_user_error(dogerm(capsys, rm, sft, out, "--chunk-elements", 4), str(bad), "truncated?")
    assert_nothing_complete(out)


# -- recipes and arguments ----------------------------------------------------------------------------


RECIPES: dict[str, tuple[Callable[[Path, Path], dict | str], str]] = {
    "yaml syntax": (lambda a, b: "merge_method: linear\nmodels: [\n  - model: : x\n", "is not valid YAML/JSON"),
    "not a mapping": (lambda a, b: "- 1\n- 2\n", "a recipe is a mapping"),
    "unknown key": (lambda a, b: _linear(a, b, frobnicate=[]), "unsupported key(s): frobnicate"),
    "unknown model key": (
        lambda a, b: {"merge_method": "linear", "models": [{"model": str(a), "density": 0.5}, {"model": str(b)}]},
        "models[0] has unsupported key(s): density",
    ),
    "unknown parameter": (lambda a, b: _linear(a, b, parameters={"t": 0.5}), "unsupported key(s): t"),
    "unknown merge_method": (lambda a, b: {**_linear(a, b), "merge_method": "karcher"}, "merge_method 'karcher'"),
    "one model": (lambda a, b: _linear(a), "at least two"),
    "weights sum to zero": (lambda a, b: _linear(a, b, weights=(1.0, -1.0)), "the weights sum to 0"),
    "weight list": (lambda a, b: _linear(a, b, weights=(["x", 0.9], 1.0)), "'x' is not a float"),  # type: ignore[arg-type]
    "bad dtype": (lambda a, b: _linear(a, b, dtype="int4"), "unsupported dtype 'int4'"),
    "missing model": (lambda a, b: _linear(a, b.parent / "nope"), "nope: no such file or folder"),
    "dogerm missing key": (lambda a, b: {"merge_method": "dogerm", "reward_model": str(a)}, "needs `domain_model`"),
    "dogerm weight": (
        lambda a, b: {"merge_method": "dogerm", "reward_model": str(a), "domain_model": str(b), "weight": 2},
        "between 0 and 1",
    ),
}


@pytest.mark.parametrize("case", list(RECIPES))
def test_bad_recipe(tmp_path: Path, capsys, case: str) -> None:
    a = write_model(tmp_path / "a", rm_tensors())
    b = write_model(tmp_path / "b", rm_tensors())
    make, fragment = RECIPES[case]
    recipe = _recipe(tmp_path, make(a, b))
    out = tmp_path / "out"
    assert_user_error(cli(capsys, "merge", recipe, "-o", out, "-q"), fragment)
    assert not out.exists()


def test_recipe_file_missing(tmp_path: Path, capsys) -> None:
    assert_user_error(cli(capsys, "merge", tmp_path / "nope.yml", "-o", tmp_path / "out"), "cannot read recipe")


def test_nonexistent_model_path(tmp_path: Path, capsys) -> None:
    rm, _ = make_pair(tmp_path)
    missing = tmp_path / "does-not-exist"
    assert_user_error(dogerm(capsys, rm, missing, tmp_path / "out"), str(missing), "no such file or folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(dogerm(capsys, empty, rm, tmp_path / "out"), str(empty), "no model.safetensors")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weight", ["1.5", "-0.1", "nan", "inf"])
def test_weight_out_of_range(tmp_path: Path, capsys, weight: str) -> None:
    rm, sft = make_pair(tmp_path)
    out = tmp_path / "out"
    assert_user_error(dogerm(capsys, rm, sft, out, weight=weight), "--weight must be between 0 and 1")
    assert not out.exists()


# -- --dry-run ----------------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_reads_no_tensor(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    rm, sft = make_pair(tmp_path)
    out = tmp_path / "out"
    plan = lazymerge.dogerm(rm, sft, 0.3, out, max_shard_size=100, dry_run=True)
    assert len(plan.shards) >= 2
    no_tensor_reads(monkeypatch)
    code, stdout, err = dogerm(capsys, rm, sft, out, "--dry-run", "--max-shard-size", "100")
    assert code == 0, err
    assert "Traceback" not in stdout + err
    for shard in plan.shards:
        assert shard.name in stdout
    assert shard.name.endswith(f"-of-{len(plan.shards):05d}.safetensors")
    assert f"total tensor bytes (index total_size): {plan.total_size}" in stdout
    assert "checks passed" in stdout
    assert not out.exists(), "--dry-run created the output folder"


# -- through a real process ------------------------------------------------------------------------


def _run(*argv: object, debug: bool = False) -> subprocess.CompletedProcess[str]:
    return run_cli(*argv, debug=debug, COLUMNS="40")  # a narrow terminal must not wrap the error line


def test_subprocess_truncated_shard_one_line_no_traceback(tmp_path: Path) -> None:
    rm, sft = make_pair(tmp_path)
    deep = tmp_path / ("x" * 60) / ("y" * 60)  # a path longer than the 40-column terminal
    shutil.copytree(sft, deep)
    bad = _sft_file(deep)
    _truncate_data(bad)
    out = tmp_path / "out"
    proc = _run("dogerm", "--reward-model", rm, "--domain-model", deep, "--weight", "0.3", "-o", out)
    assert_user_error((proc.returncode, proc.stdout, proc.stderr), str(bad), "truncated?")
    assert not out.exists()
    # LAZYMERGE_DEBUG=1: the same failure shows the traceback.
    proc = _run("dogerm", "--reward-model", rm, "--domain-model", deep, "--weight", "0.3", "-o", out, debug=True)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "HeaderError" in proc.stderr


def test_subprocess_evil_pickle_does_not_run(tmp_path: Path) -> None:
    rm, _ = make_pair(tmp_path)
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    bad = _evil_bin(tmp_path / "evil", marker)
    proc = _run("dogerm", "--reward-model", rm, "--domain-model", bad.parent, "--weight", "0.3", "-o", tmp_path / "o")
    assert_user_error((proc.returncode, proc.stdout, proc.stderr), str(bad), "system")
    assert not marker.exists()


def test_failure_in_a_later_shard_leaves_no_index(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    # Shards close (and are renamed) one by one, so an earlier shard may stay, complete and valid,
    # for a resume or an upload; but the index, which makes the folder a model, must not appear,
    # and the failing shard must leave neither its final name nor a `.partial`.
    rm, sft = make_pair(tmp_path)
    bad = rm / RM_FILE
    real_execute = lazymerge.execute.execute_sweep
    seen: list[str] = []

    def truncate_then_execute(plans, checkpoints, **kw):
        [plan] = plans
        assert len(plan.shards) >= 2 and plan.shards[-1].tensors[-1].name == "score.weight"
        seen.append(plan.shards[-1].name)
        os.truncate(bad, bad.stat().st_size - 2)  # only score.weight, in the last shard, is cut
        return real_execute(plans, checkpoints, **kw)

    monkeypatch.setattr(lazymerge.execute, "execute_sweep", truncate_then_execute)
    out = tmp_path / "out"
    assert_user_error(dogerm(capsys, rm, sft, out, "--max-shard-size", 60), str(bad), "truncated?")
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.endswith((".partial", ".index.json"))], names
    assert seen[0] not in names
    for name in names:  # whatever shard stayed is whole
        if name.endswith(".safetensors"):
            read_header(out / name)
