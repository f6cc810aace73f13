"""Recipe files on a budget (lazymerge/io/yaml_recipe.py) and error lines that stay one short,
printable line whatever value they quote."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from hostile_inputs import alias_bomb

from lazymerge.cli import main
from lazymerge.config import load_recipe
from lazymerge.errors import RecipeError
from lazymerge.io.yaml_recipe import MAX_RECIPE_BYTES


def _write(tmp_path: Path, text: str, name: str = "recipe.yml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_alias_bomb_is_refused_while_composing(tmp_path: Path) -> None:
    path = _write(tmp_path, alias_bomb(levels=9))  # 516 bytes standing for 387 million strings
    assert path.stat().st_size < 600
    tracemalloc.start()
    try:
        with pytest.raises(RecipeError, match=r"aliases expand it past [\d,]+ nodes"):
            load_recipe(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MB to refuse a {path.stat().st_size}-byte recipe"


def test_alias_bomb_through_the_cli_is_one_short_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: the whole expanded value was quoted in an 8 MB error line.
    path = _write(tmp_path, alias_bomb(levels=6))  # 531,441 strings: expanded, past the budget
    code = main(["merge", str(path), "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err) < 2000 and err.startswith("error: ") and len(err.splitlines()) <= 2, err[:300]


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recursive alias"):
        load_recipe(_write(tmp_path, "merge_method: linear\nmodels: &m [a, *m]\n"))


@pytest.mark.slow
def test_deep_nesting_and_oversized_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="nested more than"):
        load_recipe(_write(tmp_path, "a: " + "[" * 5000 + "]" * 5000 + "\n"))
    with pytest.raises(RecipeError, match=r"more than [\d,]+ nodes"):
        load_recipe(_write(tmp_path, "a: [" + "1, " * 150_000 + "1]\n"))
    with pytest.raises(RecipeError, match=r"a recipe is at most"):
        load_recipe(_write(tmp_path, "# " + "x" * MAX_RECIPE_BYTES + "\n"))


def test_modest_anchors_and_json_still_load(tmp_path: Path) -> None:
    text = (
        "merge_method: linear\n"
        "parameters: &p {weight: 0.5, normalize: true}\n"
        "models:\n"
        "  - {model: a, parameters: *p}\n"
        "  - {model: b, parameters: {<<: *p, weight: 0.25}}\n"
    )
    spec = load_recipe(_write(tmp_path, text))
    assert spec["models"][0]["parameters"] == {"weight": 0.5, "normalize": True}
    assert spec["models"][1]["parameters"] == {"weight": 0.25, "normalize": True}
    assert load_recipe(_write(tmp_path, '{"merge_method": "linear"}', "r.json")) == {"merge_method": "linear"}
    with pytest.raises(RecipeError, match="not valid YAML/JSON"):
        load_recipe(_write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(RecipeError, match="not valid YAML/JSON"):
        load_recipe(_write(tmp_path, "{", "bad.json"))


def test_a_long_value_in_an_error_is_cut_to_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, f"merge_method: '{'x' * 20000}'\nmodels: []\n")
    code = main(["merge", str(path), "-o", str(tmp_path / "out"), "-q"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(lines[0]) < 1100 and lines[0].endswith("…"), lines[0][-80:]


def test_error_quoting_a_terminal_escape_prints_it_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "model\x1b[2J\x1b]0;title\x07"
    code = main(["inspect", str(missing)])
    err = capsys.readouterr().err
    assert code == 2
    assert "\x1b" not in err and "\x07" not in err
    assert "\\x1b[2J" in err


def test_recipe_error_messages_are_capped_when_built() -> None:
    exc = RecipeError("bad value " + "\n" * 3 + "y" * 10_000, hint="line one\nline two")
    assert "\n" not in exc.message and len(exc.message) <= 1000 and exc.message.endswith("…")
    assert exc.hint == "line one\\x0aline two"
