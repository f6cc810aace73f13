"""Inputs are read-only: every input file is opened for reading only, and its bytes (sha256) and
mtime (ns) are unchanged after a DogeRM merge, a linear merge, `verify --recompute` and a resume;
a merge also works when the input files are 0444 and their folders 0555."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import stat
from pathlib import Path

import pytest

from lazymerge.cli import main
from lazymerge.demo import build_llama_pair

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def snapshot(roots: list[Path]) -> dict[str, tuple[str, int, int]]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                st = p.stat()
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size)
    return out


class OpenSpy:
    """Records every open of a file under the input roots, with its flags or mode."""

    def __init__(self, roots: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
        self.roots = [str(r.resolve()) for r in roots]
        self.opens: list[tuple[str, str]] = []
        real_os_open, real_open = os.open, builtins.open

        def os_open(path, flags, *args, **kw):
            self._note(path, f"flags={flags:#o}", flags & WRITE_FLAGS != 0)
            return real_os_open(path, flags, *args, **kw)

        def py_open(file, mode="r", *args, **kw):
            if isinstance(file, (str, bytes, os.PathLike)):
                self._note(file, f"mode={mode}", any(c in mode for c in "wax+"))
            return real_open(file, mode, *args, **kw)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", py_open)
        monkeypatch.setattr(io, "open", py_open)
        self.writes: list[tuple[str, str]] = []

    def _note(self, path: object, how: str, writes: bool) -> None:
        text = os.path.abspath(os.fsdecode(path))
        if any(text == r or text.startswith(r + os.sep) for r in self.roots):
            self.opens.append((text, how))
            if writes:
                self.writes.append((text, how))


def cli(capsys, *args: object) -> None:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert code == 0, captured.err


def make_inputs(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    rm, sft = build_llama_pair(tmp_path / "pair")  # fp16 safetensors RM, fp32 .bin SFT
    other_rm, _ = build_llama_pair(tmp_path / "pair2", seed=1, sft_format="safetensors")
    recipe = tmp_path / "recipes" / "linear.yml"
    recipe.parent.mkdir()
    recipe.write_text(
        json.dumps(
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(rm), "parameters": {"weight": 0.4}},
                    {"model": str(other_rm), "parameters": {"weight": 0.6}},
                ],
            }
        )
    )
    return rm, sft, other_rm, recipe


def run_everything(capsys, rm: Path, sft: Path, recipe: Path, out_root: Path) -> None:
    dogerm = ["dogerm", "--reward-model", rm, "--domain-model", sft, "--weight", "0.3", "-q", "--device", "cpu"]
    cli(capsys, *dogerm, "-o", out_root / "dogerm", "--max-shard-size", "60kB")
    cli(capsys, *dogerm, "-o", out_root / "dogerm", "--max-shard-size", "60kB", "--resume")
    cli(capsys, "verify", out_root / "dogerm", "--recompute", "3")
    cli(capsys, "merge", recipe, "-o", out_root / "linear", "-q", "--device", "cpu")
    cli(capsys, "verify", out_root / "linear", "--recompute", "3")
    cli(capsys, "inspect", sft, "--tensors")


def test_inputs_are_opened_read_only_and_unchanged(capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rm, sft, other_rm, recipe = make_inputs(tmp_path)
    roots = [rm.parent, other_rm.parent, recipe.parent]
    before = snapshot(roots)
    spy = OpenSpy(roots, monkeypatch)
    run_everything(capsys, rm, sft, recipe, tmp_path / "out")
    monkeypatch.undo()
    opened = {path for path, _ in spy.opens}
    weights = [p for r in (rm, sft, other_rm) for p in r.iterdir() if p.suffix in (".safetensors", ".bin")]
    assert weights and all(str(p.resolve()) in opened for p in weights), "the spy missed an input weight file"
    assert not spy.writes, f"inputs opened for writing: {spy.writes[:5]}"
    assert snapshot(roots) == before
    # Nothing was added to the input folders either (no lock, partial or cache file).
    assert sorted(snapshot(roots)) == sorted(before)


def _set_modes(roots: list[Path], file_mode: int, dir_mode: int) -> None:
    for root in roots:
        for p in sorted(root.rglob("*"), reverse=True):  # files before their folders
            p.chmod(dir_mode if p.is_dir() else file_mode)
        root.chmod(dir_mode)


def test_merge_works_with_read_only_files_and_folders(capsys, tmp_path: Path) -> None:
    rm, sft, other_rm, recipe = make_inputs(tmp_path)
    roots = [rm.parent, other_rm.parent, recipe.parent]
    before = snapshot(roots)
    _set_modes(roots, 0o444, 0o555)
    try:
        assert stat.S_IMODE((rm / "config.json").stat().st_mode) == 0o444
        run_everything(capsys, rm, sft, recipe, tmp_path / "out")
        after = snapshot(roots)
    finally:
        for root in roots:
            root.chmod(0o755)
            for p in root.rglob("*"):
                p.chmod(0o755 if p.is_dir() else 0o644)
    assert after == before
    merged = tmp_path / "out" / "dogerm"
    from safetensors import safe_open

    with safe_open(next(merged.glob("model-00001-*.safetensors")), "pt") as f:
        assert all(f.get_tensor(k).isfinite().all() for k in f.keys())
