"""Sweeps: K outputs from one read equal K separate runs, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import cli, snapshot

import lazymerge
from lazymerge.cli import main
from lazymerge.errors import LazyMergeError
from lazymerge.tiny_models import build_llama as tiny_llama


def test_dogerm_sweep_equals_separate_runs_and_reads_once(tmp_path: Path, llama_pair: tuple[Path, Path]) -> None:
    rm, sft = llama_pair
    weights = [0.1, 0.25, 0.5]
    stats = lazymerge.dogerm(
        rm, sft, weights, tmp_path / "sweep-{weight}", max_shard_size="100kB", chunk_elements=500, device="cpu"
    )
    assert len(stats) == 3
    for w in weights:
        single = lazymerge.dogerm(rm, sft, w, tmp_path / f"single-{w:g}", max_shard_size="100kB", device="cpu")
        assert snapshot(tmp_path / f"sweep-{w:g}") == snapshot(tmp_path / f"single-{w:g}")
    assert stats[0].bytes_read == single.bytes_read  # the inputs were read once, not three times


def test_merge_sweep_with_stats_method(tmp_path: Path) -> None:
    models = [tiny_llama(tmp_path / f"m{i}", i) for i in range(3)]
    config = {
        "merge_method": "ties",
        "base_model": str(models[0]),
        "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.4}} for m in models[1:]],
        "parameters": {"lambda": 1.0},
    }
    values = [0.5, 1.5]
    sweep = lazymerge.Sweep("parameters.lambda", values)
    stats = lazymerge.merge(config, tmp_path / "out-{lambda}", sweep=sweep, chunk_elements=77, device="cpu")
    for v in values:
        config["parameters"]["lambda"] = v
        lazymerge.merge(config, tmp_path / f"single-{v:g}", device="cpu")
        assert snapshot(tmp_path / f"out-{v:g}") == snapshot(tmp_path / f"single-{v:g}")
    assert stats[0].bytes_written == stats[1].bytes_written


def test_sweep_needs_distinct_outputs(tmp_path: Path, llama_pair: tuple[Path, Path]) -> None:
    rm, sft = llama_pair
    with pytest.raises(LazyMergeError, match="same folder"):
        lazymerge.dogerm(rm, sft, [0.1, 0.2], tmp_path / "same", device="cpu")


def test_sweep_of_a_layout_key_is_refused(tmp_path: Path) -> None:
    models = [tiny_llama(tmp_path / f"m{i}", i) for i in range(2)]
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(models[0]),
        "models": [{"model": str(models[1]), "parameters": {"weight": 1.0}}],
    }
    with pytest.raises(LazyMergeError, match="same"):
        lazymerge.merge(
            config, tmp_path / "o-{i}", sweep=lazymerge.Sweep("dtype", ["float32", "bfloat16"]), device="cpu"
        )


def test_cli_dogerm_weight_list(tmp_path: Path, llama_pair: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    rm, sft = llama_pair
    out = str(tmp_path / "cli-{weight}")
    code = main(
        [
            "dogerm",
            "--reward-model",
            str(rm),
            "--domain-model",
            str(sft),
            "--weight",
            "0.2,0.4",
            "--output",
            out,
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    assert (tmp_path / "cli-0.2").is_dir() and (tmp_path / "cli-0.4").is_dir()
    assert "2 models from one read" in capsys.readouterr().out


def test_sweep_dry_run_lists_each_output_and_writes_nothing(
    tmp_path: Path, llama_pair: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    rm, sft = llama_pair
    template = tmp_path / "dry-{weight}"
    code, out, err = cli(
        capsys, "dogerm", "--reward-model", rm, "--domain-model", sft, "--weight", "0.1,0.3", "-o", template,
        "--max-shard-size", "100kB", "--dry-run", "--push-to-hub", "me/dry-{weight}",
    )  # fmt: skip
    assert code == 0, err
    assert "Sweep: 2 outputs from one read" in out and "checks passed" in out
    for w in ("0.1", "0.3"):
        assert f"dry-{w}" in out and f"weight={w}" in out and f"me/dry-{w}" in out
    assert not list(tmp_path.glob("dry-*"))
    plans = lazymerge.dogerm(rm, sft, [0.1, 0.3], template, max_shard_size="100kB", dry_run=True)
    assert [p.output_dir.name for p in plans] == ["dry-0.1", "dry-0.3"] and not list(tmp_path.glob("dry-*"))


def test_merge_sweep_dry_run_and_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    models = [tiny_llama(tmp_path / f"m{i}", i) for i in range(2)]
    config = tmp_path / "ta.yml"
    config.write_text(
        f"merge_method: task_arithmetic\nbase_model: {models[0]}\n"
        f"models:\n  - model: {models[1]}\n    parameters: {{weight: 1.0}}\n"
    )
    base = ["merge", config, "--sweep", "models.0.parameters.weight=0.5,1", "-o", tmp_path / "w-{weight}"]
    code, out, err = cli(capsys, *base, "--dry-run")
    assert code == 0, err
    assert "models.0.parameters.weight=0.5" in out and "w-1" in out and not list(tmp_path.glob("w-*"))
    code, out, err = cli(capsys, *base, "--device", "cpu")  # no --quiet: progress lines on stderr (not a terminal)
    assert code == 0, err
    assert "] done: " in err and "2 models from one read" in out
    assert err.count("] closed ") == 2 * len(list((tmp_path / "w-1").glob("*.safetensors")))  # each shard of each
    code, out, err = cli(capsys, *base, "--device", "cpu", "--resume", "-q")
    assert code == 0 and err == "", err
    assert out.count("shard(s) kept from the earlier run") == 2


def test_sweep_delete_after_upload_needs_push(
    tmp_path: Path, llama_pair: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    rm, sft = llama_pair
    code, out, err = cli(
        capsys, "dogerm", "--reward-model", rm, "--domain-model", sft, "--weight", "0.1,0.3",
        "-o", tmp_path / "x-{weight}", "--delete-after-upload",
    )  # fmt: skip
    assert (
        code == 2
        and out == ""
        and err.startswith("error: --delete-after-upload needs --push-to-hub")
        and err.count("\n") == 2
    )
    assert not list(tmp_path.glob("x-*"))
