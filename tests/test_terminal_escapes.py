"""Names from strangers reach a terminal escaped: tensor names with escape sequences in
`inspect --tensors` and `--dry-run`, and in error lines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_model
from hostile_inputs import ESCAPE_NAMES

from lazymerge.cli import main
from lazymerge.text import one_line, printable

RAW_CONTROLS = ("\x1b", "\x9b", "\x07", "\u202e")


def _hostile_model(folder: Path) -> Path:
    tensors = {name: torch.ones(2) for name in ESCAPE_NAMES}
    tensors["model.norm.weight"] = torch.ones(2)
    return write_model(folder, tensors)


def _assert_escaped(text: str) -> None:
    for char in RAW_CONTROLS:
        assert char not in text, f"raw {char!r} reached the terminal"
    assert "\\x1b[2J" in text and "\\x9b31m" in text and "\\u202e" in text


def test_inspect_tensors_escapes_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _hostile_model(tmp_path / "m")
    assert main(["inspect", str(model), "--tensors"]) == 0
    _assert_escaped(capsys.readouterr().out)


def test_dry_run_escapes_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _hostile_model(tmp_path / "a"), _hostile_model(tmp_path / "b")
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}]}))
    code = main(["merge", str(recipe), "-o", str(tmp_path / "out"), "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    _assert_escaped(captured.out)


def test_printable_and_one_line() -> None:
    assert printable("model.layers.0.weight") == "model.layers.0.weight"
    assert printable("é中😀 ok") == "é中😀 ok"
    assert printable("a\x1b[2Jb\tc\x00\u200b\U000e0041") == "a\\x1b[2Jb\\x09c\\x00\\u200b\\U000e0041"
    assert one_line("a\nb") == "a\\x0ab"
    long = one_line("\x1b" * 10_000, limit=50)
    assert len(long) == 50 and long.endswith("…") and "\x1b" not in long
