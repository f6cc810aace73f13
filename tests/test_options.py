"""RunOptions / HubOptions: every value checked once, when built, for the CLI and the API alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lazymerge
from lazymerge.cli import main
from lazymerge.constants import MAX_SIZE_BYTES, parse_size
from lazymerge.errors import LazyMergeError, RecipeError
from lazymerge.options import HubOptions, RunOptions


@pytest.mark.parametrize("text", ["inf", "1e400", "0.5", "1e-10GB", "0", "-1", "nan", "1e30TB", "five"])
def test_parse_size_refuses_what_is_not_1_byte_to_the_max(text: str) -> None:
    with pytest.raises(RecipeError) as info:
        parse_size(text)
    assert "from 1 byte" in info.value.message + info.value.hint  # the allowed range is in the message


@pytest.mark.parametrize(("text", "size"), [("5GB", 5 * 10**9), ("2GiB", 2 << 30), ("1", 1), ("1.5kB", 1500)])
def test_parse_size_accepts(text: str, size: int) -> None:
    assert parse_size(text) == size
    assert parse_size(MAX_SIZE_BYTES) == MAX_SIZE_BYTES


@pytest.mark.parametrize(
    ("field", "value"),
    [("workers", -1), ("workers", 0), ("chunk_elements", 0), ("write_lanes", 0), ("chunk_elements", 1.5)],
)
def test_run_options_counts_are_at_least_one(field: str, value: object) -> None:
    with pytest.raises(RecipeError, match=f"{field} must be a whole number >= 1"):
        RunOptions(**{field: value})


def test_run_options_parse_the_shard_size_and_check_the_device() -> None:
    assert RunOptions(max_shard_size="100kB").max_shard_size == 100_000
    with pytest.raises(RecipeError, match="max_shard_size must be from 1 byte"):
        RunOptions(max_shard_size="inf")
    with pytest.raises(RecipeError, match="device must be one of auto, cpu, cuda"):
        RunOptions(device="tpu")


def test_hub_options_keep_the_token_out_of_the_repr_and_need_a_push_to_delete() -> None:
    assert "secret" not in repr(HubOptions(push_to_hub="me/x", token="secret"))
    with pytest.raises(RecipeError, match="delete_after_upload needs push_to_hub"):
        HubOptions(delete_after_upload=True)


def test_unknown_keyword_names_the_options(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"RunOptions: .*workers"):
        lazymerge.merge({}, tmp_path / "out", worker=2)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-shard-size", "inf"], "max_shard_size must be from 1 byte"),
        (["--max-shard-size", "1e400"], "max_shard_size must be from 1 byte"),
        (["--max-shard-size", "0.5"], "max_shard_size must be from 1 byte"),
        (["--max-shard-size", "1e-10GB"], "max_shard_size must be from 1 byte"),
        (["--chunk-elements", "0"], "chunk_elements must be a whole number >= 1"),
        (["--workers", "-1"], "workers must be a whole number >= 1"),  # hung before
        (["--delete-after-upload"], "--delete-after-upload needs --push-to-hub"),
    ],
)
def test_cli_bad_option_is_one_line_before_anything_is_read(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The models need not exist: the options are checked before any input is opened.
    args = ["dogerm", "--reward-model", str(tmp_path / "no-rm"), "--domain-model", str(tmp_path / "no-sft")]
    code = main([*args, "--weight", "0.3", "-o", str(tmp_path / "out"), "--device", "cpu", "-q", *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"error: {message}") and "Traceback" not in err and "internal error" not in err
    assert not (tmp_path / "out").exists()


def test_sweep_takes_the_hub_options_merge_takes(tmp_path: Path, llama_pair: tuple[Path, Path]) -> None:
    # lazymerge.sweep(..., low_disk=True) raised TypeError: the sweep did not pass low_disk/token on.
    rm, sft = llama_pair
    recipe = {"merge_method": "dogerm", "reward_model": str(rm), "domain_model": str(sft), "weight": 0.1}
    sweep = lazymerge.Sweep("weight", [0.1, 0.4])
    hub = HubOptions(low_disk=True, token=False)
    stats = lazymerge.merge(recipe, tmp_path / "s-{weight}", sweep=sweep, hub=hub, device="cpu")
    assert [s.output_dir.name for s in stats] == ["s-0.1", "s-0.4"]
    single = lazymerge.merge(recipe | {"weight": 0.4}, tmp_path / "single", options=RunOptions(device="cpu"), hub=hub)
    assert isinstance(single, lazymerge.MergeStats) and single.push is None
    for f in single.files:
        assert (tmp_path / "s-0.4" / f.name).read_bytes() == f.read_bytes()


def test_planning_warnings_reach_python_users_and_the_cli(
    tmp_path: Path, llama_pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rm, sft = llama_pair
    # A tensor the domain model lacks: copied from the reward model, with a warning.
    shard = sorted(rm.glob("*.safetensors"))[0]
    save_file({**load_file(shard), "model.extra.weight": torch.ones(3)}, shard, metadata={"format": "pt"})
    index = json.loads((rm / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = shard.name
    (rm / "model.safetensors.index.json").write_text(json.dumps(index))
    message = "model.extra.weight is not in the domain model: copied from the reward model"
    with pytest.warns(lazymerge.PlanWarning) as record:
        plan = lazymerge.dogerm(rm, sft, 0.3, tmp_path / "out", dry_run=True)
    assert plan.warnings == [message] and [str(w.message) for w in record] == [message]
    assert record[0].filename == __file__  # pointed at the caller's line
    args = ["dogerm", "--reward-model", str(rm), "--domain-model", str(sft), "--weight", "0.3", "-q"]
    assert main([*args, "-o", str(tmp_path / "dry"), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert f"warning: {message}" in " ".join(captured.out.split()) and captured.err == ""  # listed with the plan
    assert main([*args, "-o", str(tmp_path / "run"), "--device", "cpu"]) == 0
    assert capsys.readouterr().err == f"warning: {message}\n"  # one line on stderr, then the run


def test_resume_is_not_overwrite(tmp_path: Path, llama_pair: tuple[Path, Path]) -> None:
    rm, sft = llama_pair
    out = tmp_path / "out"
    lazymerge.dogerm(rm, sft, 0.3, out, device="cpu")
    with pytest.raises(LazyMergeError, match="already holds a model"):
        lazymerge.dogerm(rm, sft, 0.3, out, device="cpu")
    assert lazymerge.dogerm(rm, sft, 0.3, out, device="cpu", resume=True).resumed_shards == 1


def test_progress_true_a_callback_or_none(
    tmp_path: Path, llama_pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rm, sft = llama_pair
    lazymerge.dogerm(rm, sft, 0.3, tmp_path / "bar", device="cpu", progress=True)
    captured = capsys.readouterr()
    # stderr is not a terminal here: plain progress lines, not the bar (tests/test_logs.py)
    assert "] done: " in captured.err and "━" not in captured.err and captured.out == ""
    events: list[lazymerge.ProgressEvent] = []
    lazymerge.dogerm(rm, sft, [0.3, 0.5], tmp_path / "cb-{weight}", device="cpu", progress=events.append)
    assert events[-1].kind == "done" and events[-1].bytes_written == events[-1].total_bytes
    assert {e.kind for e in events} >= {"chunk", "shard", "done"}
    lazymerge.dogerm(rm, sft, 0.3, tmp_path / "quiet", device="cpu")
    assert capsys.readouterr() == ("", "")


def test_cli_is_the_public_api_with_options_from_its_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import lazymerge.api

    calls: list[tuple] = []

    def fake_merge(recipe: object, output: object, **kw: object) -> list[lazymerge.MergeStats]:
        calls.append((recipe, output, kw))
        return [lazymerge.MergeStats(1, 2, 3, 1.0, 4, "cpu", output_dir=tmp_path / f"o-{v}") for v in (0.5, 1)]

    monkeypatch.setattr(lazymerge.api, "merge", fake_merge)
    args = ["merge", "cfg.yml", "-o", "o-{lambda}", "--sweep", "parameters.lambda=0.5,1", "--device", "cpu"]
    code = main(
        [*args, "--workers", "2", "--resume", "--max-shard-size", "1MB", "--push-to-hub", "me/m-{lambda}", "-q"]
    )
    assert code == 0, capsys.readouterr().err
    [(recipe, output, kw)] = calls
    assert (recipe, output) == (Path("cfg.yml"), Path("o-{lambda}"))
    assert kw["sweep"] == lazymerge.Sweep("parameters.lambda", [0.5, 1.0])
    assert kw["options"] == RunOptions(max_shard_size=10**6, resume=True, device="cpu", workers=2, progress=False)
    assert kw["hub"] == HubOptions(push_to_hub="me/m-{lambda}")
    assert "2 models from one read" in capsys.readouterr().out
