"""The output-folder contract: lazymerge writes only into a missing or empty folder, a folder holding
an earlier lazymerge output, or with --overwrite; --overwrite removes the earlier output's files
and nothing else (never through a symlink); --resume does not imply --overwrite; no file of the
user's is replaced without --overwrite; `demo` deletes no folder it did not make; no input, seen
through any symlink, is the output or in it; a symlink at a name lazymerge writes is never followed;
the free-space check counts the shards a resumed run keeps; an unfilled `{weight}` template is
refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_folder, write_model
from helpers import cli

import lazymerge
from lazymerge.io.writer import ShardWriter, write_side_file
from lazymerge.lock import LOCK_NAME, LOCK_NAMES
from lazymerge.manifest import MANIFEST_NAME
from lazymerge.plan import OutputShard
from lazymerge.verify import verify

INDEX = "model.safetensors.index.json"


def dogerm(capsys, pair: tuple[Path, Path], out: Path, *extra: object, shard: str = "60kB", weight: str = "0.3"):
    rm, sft = pair
    args = ["dogerm", "--reward-model", rm, "--domain-model", sft, "--weight", weight, "-o", out, "-q"]
    return cli(capsys, *args, "--device", "cpu", "--max-shard-size", shard, *extra)


def assert_refused(result: tuple[int, str, str], *fragments: str) -> str:
    """Exit 2, one `error:` line (and an optional hint) holding each fragment, no traceback."""
    code, stdout, err = result
    assert code == 2, (code, stdout, err)
    assert "Traceback" not in stdout + err and "internal error" not in err, err
    lines = err.splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def state(folder: Path) -> dict[str, bytes | str]:
    """Every entry: a file's bytes, a symlink's target (not followed)."""
    return {
        p.name: os.readlink(p) if p.is_symlink() else p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.name not in LOCK_NAMES
    }


def shards(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.safetensors"))


# -- demo -----------------------------------------------------------------------------------------


def test_demo_never_deletes_a_folder_it_did_not_make(capsys, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert_refused(cli(capsys, "demo", "--output", mine), str(mine), "not empty")
    assert state(mine) == {"thesis.tex": b"years of work"}


def test_demo_makes_its_folder_then_reuses_it(capsys, tmp_path: Path) -> None:
    work = tmp_path / "demo"
    code, _, err = cli(capsys, "demo", "--output", work)
    assert code == 0, err
    (work / "merged" / "stale.txt").write_text("from the first run")
    code, _, err = cli(capsys, "demo", "--output", work)  # an earlier demo's folder: replaced
    assert code == 0, err
    assert not (work / "merged" / "stale.txt").exists()
    assert verify(work / "merged").ok


# -- --overwrite removes the earlier output, and only it ----------------------------------------------


@pytest.mark.parametrize(("first", "second"), [("60kB", "5GB"), ("60kB", "120kB")])
def test_overwrite_removes_the_earlier_shards_and_index(capsys, llama_pair, tmp_path: Path, first, second) -> None:
    out = tmp_path / "out"
    assert dogerm(capsys, llama_pair, out, shard=first)[0] == 0
    old = shards(out)
    (out / "notes.txt").write_text("mine")
    code, _, err = dogerm(capsys, llama_pair, out, "--overwrite", shard=second, weight="0.7")
    assert code == 0, err
    reference = tmp_path / "reference"
    assert dogerm(capsys, llama_pair, reference, shard=second, weight="0.7")[0] == 0
    assert shards(out) == shards(reference) and len(shards(out)) < len(old)
    assert (out / INDEX).exists() == (reference / INDEX).exists()
    assert (out / "notes.txt").read_text() == "mine", "--overwrite removed a file lazymerge did not write"
    assert verify(out).ok
    got, want = load_folder(out), load_folder(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    opened = lazymerge.open_model(out)
    assert sorted(opened.files) == shards(reference)


def test_overwrite_removes_a_foreign_sharded_model_it_replaces(capsys, llama_pair, tmp_path: Path) -> None:
    # No manifest: the model's index says which shards are the earlier output.
    out = write_model(tmp_path / "out", {f"t{i}": torch.ones(4) for i in range(6)}, shards=3)
    (out / "pytorch_model.bin").write_bytes(b"not ours to remove")
    code, _, err = dogerm(capsys, llama_pair, out, "--overwrite", shard="5GB")
    assert code == 0, err
    assert shards(out) == ["model.safetensors"] and not (out / INDEX).exists()
    assert (out / "pytorch_model.bin").read_bytes() == b"not ours to remove"
    assert verify(out).ok


def test_overwrite_never_follows_a_symlink_out_of_the_folder(capsys, llama_pair, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert dogerm(capsys, llama_pair, out)[0] == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.bin"
    victim.write_bytes(b"precious")
    # An earlier shard replaced by a link out of the folder; an index naming a path outside it.
    first = shards(out)[0]
    (out / first).unlink()
    (out / first).symlink_to(victim)
    index = json.loads((out / INDEX).read_text())
    index["weight_map"]["extra"] = "../outside/victim.bin"
    (out / INDEX).write_text(json.dumps(index))
    (out / (shards(out)[1] + ".partial")).symlink_to(victim)  # at the name the next run writes first
    code, _, err = dogerm(capsys, llama_pair, out, "--overwrite")
    assert code == 0, err
    assert victim.read_bytes() == b"precious"
    assert state(outside) == {"victim.bin": b"precious"}
    assert not (out / first).is_symlink() and verify(out).ok


def test_dry_run_with_overwrite_removes_nothing(capsys, llama_pair, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert dogerm(capsys, llama_pair, out)[0] == 0
    before = state(out)
    code, _, err = dogerm(capsys, llama_pair, out, "--overwrite", "--dry-run", shard="5GB")
    assert code == 0, err
    assert state(out) == before


# -- the user's files ---------------------------------------------------------------------------------


def test_resume_does_not_replace_a_foreign_model(capsys, llama_pair, tmp_path: Path) -> None:
    out = write_model(tmp_path / "out", {"x": torch.ones(3)})
    before = state(out)
    line = assert_refused(dogerm(capsys, llama_pair, out, "--resume", shard="5GB"), "already holds a model")
    assert "model.safetensors" in line
    assert state(out) == before


@pytest.mark.parametrize("name", ["README.md", "config.json", "tokenizer.json"])
@pytest.mark.parametrize("extra", [(), ("--resume",)])
def test_users_own_side_file_is_not_replaced(capsys, llama_pair, tmp_path: Path, name: str, extra: tuple) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("my own")
    assert_refused(dogerm(capsys, llama_pair, out, *extra), str(out), name)
    assert state(out) == {name: b"my own"}
    code, _, err = dogerm(capsys, llama_pair, out, "--overwrite")
    assert code == 0, err
    assert (out / name).read_text() != "my own" and verify(out).ok


def test_users_file_added_to_an_interrupted_output_is_not_replaced(capsys, llama_pair, tmp_path: Path) -> None:
    # The folder is lazymerge's (its manifest says so) but README.md is not recorded there.
    out = tmp_path / "out"
    assert dogerm(capsys, llama_pair, out)[0] == 0
    (out / "README.md").unlink()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["files"].remove("README.md")
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    (out / "README.md").write_text("my own card")
    assert_refused(dogerm(capsys, llama_pair, out, "--resume"), "README.md", "did not write")
    assert (out / "README.md").read_text() == "my own card"


def test_a_finished_lazymerge_output_needs_resume_or_overwrite(capsys, llama_pair, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert dogerm(capsys, llama_pair, out)[0] == 0
    before = state(out)
    line = assert_refused(dogerm(capsys, llama_pair, out), "already holds a model")
    assert state(out) == before, line
    code, _, err = dogerm(capsys, llama_pair, out, "--resume")  # the same merge: every shard kept
    assert code == 0, err
    assert state(out) == before


# -- inputs -------------------------------------------------------------------------------------------


def test_an_input_reached_through_a_symlink_is_never_replaced(capsys, tmp_path: Path) -> None:
    a = write_model(tmp_path / "a", {"w": torch.arange(6, dtype=torch.float32)})
    b = write_model(tmp_path / "b", {"w": torch.ones(6)})
    links = tmp_path / "links"
    links.mkdir()
    (links / "a.safetensors").symlink_to(a / "model.safetensors")
    recipe = tmp_path / "recipe.yml"
    models = [{"model": str(links / "a.safetensors")}, {"model": str(b)}]
    recipe.write_text(json.dumps({"merge_method": "linear", "models": models}))
    before = state(a)
    for out in (a, tmp_path / "alias"):
        if out.name == "alias":
            out.symlink_to(a)  # the output named through a folder symlink
        line = assert_refused(cli(capsys, "merge", recipe, "-o", out, "--overwrite", "-q"), str(out))
        assert "input" in line, line
        assert state(a) == before


# -- symlinks at names lazymerge writes -------------------------------------------------------------------


def test_a_partial_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json.partial").symlink_to(victim)
    (out / "model.safetensors.partial").symlink_to(victim)
    write_side_file(out, "config.json", b"{}")
    header = b"\x02\x00\x00\x00\x00\x00\x00\x00{}"
    writer = ShardWriter(out, OutputShard("model.safetensors", header, [], len(header)))
    writer.finish()
    assert victim.read_bytes() == b"precious"
    assert (out / "config.json").read_bytes() == b"{}" and not (out / "config.json").is_symlink()
    assert (out / "model.safetensors").read_bytes() == header


def test_a_lock_file_symlink_is_not_followed(capsys, llama_pair, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).symlink_to(victim)
    result = dogerm(capsys, llama_pair, out)
    assert victim.read_bytes() == b"precious"
    assert_refused(result, LOCK_NAME)


# -- free space on --resume ----------------------------------------------------------------------------


def test_resume_counts_the_kept_shards_as_already_written(
    capsys, llama_pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    assert dogerm(capsys, llama_pair, out)[0] == 0
    reference = state(out)
    # As a disk-full run leaves it: the first shards finished and recorded, the rest missing.
    names = shards(out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for name in names[2:]:
        (out / name).unlink()
        del manifest["shards"][name]
    (out / INDEX).unlink()
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    missing = sum(len(reference[n]) for n in [*names[2:], INDEX])
    side = sum(len(reference[n]) for n in reference if not n.endswith(".safetensors"))
    free = missing + side + 4096  # room for what is left, not for the whole model
    real = shutil.disk_usage

    def little(path):
        usage = real(path)
        return type(usage)(usage.total, usage.total - free, free)

    monkeypatch.setattr(shutil, "disk_usage", little)
    code, stdout, err = dogerm(capsys, llama_pair, out, "--resume")
    assert code == 0, err
    assert state(out) == reference
    assert "2 shard(s)" in stdout


# -- templates --------------------------------------------------------------------------------------------


def test_an_unfilled_template_on_a_single_run_is_refused(capsys, llama_pair, tmp_path: Path) -> None:
    out = tmp_path / "x-{weight}"
    assert_refused(dogerm(capsys, llama_pair, out), "{weight}", "template")
    assert not out.exists()


@pytest.mark.parametrize("template", ["x-{weight.real}", "x-{weight[0]}", "x-{}", "x-{weight!r:>{i.x}}"])
def test_a_sweep_template_reaching_into_the_value_is_refused(capsys, llama_pair, tmp_path: Path, template) -> None:
    out = tmp_path / template
    rm, sft = llama_pair
    args = ["dogerm", "--reward-model", rm, "--domain-model", sft, "--weight", "0.1,0.2", "-o", out, "-q"]
    assert_refused(cli(capsys, *args), "template")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair"]
