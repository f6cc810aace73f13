"""Logs that work when nobody watches: progress lines flushed as the run goes when stderr is not a
terminal, nothing wrapped in a file or a pipe at any width, one labelled rate, "starting…" until
the first bytes, and `--json` documents that parse (and agree with the Python API)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import REPO, child_env, cli, write_model

import lazymerge
from lazymerge.consoles import UNLIMITED_WIDTH, LogConsole, watched
from lazymerge.errors import RecipeError
from lazymerge.events import MergeStats, ProgressEvent
from lazymerge.io.hub_upload import PushResult
from lazymerge.options import RunOptions
from lazymerge.progress_lines import ProgressLines, progress_display
from lazymerge.report import print_results
from lazymerge.units import Throughput, duration_text, rate_text
from lazymerge.verify import verify

# Longer than any terminal's width: a wrapped name or path cannot be found whole on one line.
LONG = "model.layers.0.self_attention_with_a_long_descriptive_name_that_grep_must_find.query_key_value"
STATUS = re.compile(r"\d+% written \S+ \S+ of \S+ \S+, \S+ \S+/s read, ETA (\d+:\d\d:\d\d|\?)")


def _recipe(tmp_path: Path, tensors: int = 6, rows: int = 64) -> Path:
    """Two models with long tensor names (2 shards each) and a linear recipe over them."""
    gen = torch.Generator().manual_seed(0)
    models = []
    for name in ("a", "b"):
        weights = {f"{LONG}.{i}.weight": torch.randn(rows, 64, generator=gen) for i in range(tensors)}
        models.append(write_model(tmp_path / name, weights, shards=2))
    recipe = tmp_path / "linear.yml"
    spec = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models]}
    recipe.write_text(json.dumps(spec))  # JSON is YAML
    return recipe


def _names(tensors: int = 6) -> list[str]:
    return [f"{LONG}.{i}.weight" for i in range(tensors)]


# -- nothing wrapped in a file or a pipe -------------------------------------------------------------


def test_dry_run_redirected_to_a_file_folds_no_name(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    out = tmp_path / ("output-folder-with-a-name-longer-than-forty-columns-" + "x" * 40)
    plan_txt = tmp_path / "plan.txt"
    with plan_txt.open("w") as stdout:  # `lazymerge merge ... --dry-run > plan.txt`, a 40-column terminal
        proc = subprocess.run(
            [sys.executable, "-m", "lazymerge", "merge", str(recipe), "-o", str(out), "--dry-run"],
            stdout=stdout, stderr=subprocess.PIPE, text=True, env=child_env(COLUMNS="40"), cwd=REPO, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = plan_txt.read_text().splitlines()
    for name in _names():  # `grep NAME plan.txt` finds each tensor on its row
        assert sum(name in line for line in lines) == 1, name
    assert any(str(out) in line for line in lines)
    assert max(map(len, lines)) > 100  # laid out for the content, not for 40 or 80 columns


def test_results_and_push_url_are_never_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    url = "https://huggingface.co/someone/a-model-with-a-long-name/commit/" + "0123456789abcdef" * 3
    push = PushResult("someone/a-model-with-a-long-name", "main", url, uploaded=["model.safetensors"])
    long_dir = Path("/tmp") / ("merged-" + "y" * 90)
    stats = [
        MergeStats(3, 900, 300, 1.5, 10**8, "cpu", output_dir=long_dir / str(k), push=push) for k in range(2)
    ]  # fmt: skip
    file = io.StringIO()
    print_results(LogConsole(file=file, highlight=False), stats)
    text = file.getvalue()
    assert text.count(url) == 2 and f"{long_dir}/0: " in text
    assert "(600 B/s read)" in text  # the sweep line's rate, labelled


def test_log_console_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    assert LogConsole(file=io.StringIO()).width == UNLIMITED_WIDTH  # a file: no width
    terminal = LogConsole(file=io.StringIO(), force_terminal=True)
    assert terminal.width == 40 and watched(terminal)  # a terminal keeps its own
    notebook = LogConsole(file=io.StringIO(), force_jupyter=True)
    assert watched(notebook) and notebook.width < UNLIMITED_WIDTH  # rich's notebook width, and its widget bar


def test_demo_output_is_not_wrapped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    code, out, err = cli(capsys, "demo", "--output", tmp_path / "demo")
    assert code == 0, err
    command = next(line for line in out.splitlines() if line.startswith("running: lazymerge dogerm"))
    assert command.endswith("--max-shard-size 200kB") and "--domain-model" in command
    assert re.search(r"read rate +│ +\S+ \S+/s read", out)


# -- progress lines when stderr is not a terminal ----------------------------------------------------

# The child's progress callback sleeps after the first shard closes: a run that lasts long enough
# for a log to be read while it goes, whatever the machine's speed.
_SLOWED = """
import sys, time
from lazymerge import progress_lines
original = progress_lines.ProgressLines.__call__
def slowed(self, event):
    original(self, event)
    if event.kind == "shard" and self.closed == 1:
        time.sleep(1.0)
progress_lines.ProgressLines.__call__ = slowed
from lazymerge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # a child that imports torch, slowed by a second
def test_progress_lines_reach_a_redirected_log_while_the_run_goes(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, tensors=6, rows=256)
    out = tmp_path / ("merged-into-a-folder-whose-path-is-longer-than-forty-columns-" + "z" * 30)
    log, summary = tmp_path / "err.log", tmp_path / "out.log"
    argv = ["merge", str(recipe), "-o", str(out), "--max-shard-size", "100kB", "--progress-interval", "0.2"]
    with log.open("w") as err, summary.open("w") as stdout:
        proc = subprocess.Popen(
            [sys.executable, "-c", _SLOWED, *argv], stdout=stdout, stderr=err, env=child_env(COLUMNS="40"), cwd=REPO
        )
    try:
        deadline = time.monotonic() + 120
        while "(1 of " not in log.read_text():
            assert proc.poll() is None, log.read_text()  # the run ended before its first shard line was in the log
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # The line is in the file while the run still goes: nothing waits for the end.
        assert proc.poll() is None and summary.read_text() == ""
        assert proc.wait(timeout=120) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = log.read_text().splitlines()
    assert all(line.startswith("lazymerge [") for line in lines)
    body = [line.split("] ", 1)[1] for line in lines]
    assert body[0].startswith("starting: ") and any(b.startswith("merging model-00001-of-") for b in body)
    assert body[-1].startswith("done: ")
    closed = [k for k, b in enumerate(body) if b.startswith("closed ")]
    assert len(closed) == len(list(out.glob("*.safetensors"))) >= 3
    assert all(f"{out}/model-0000" in body[k] for k in closed)  # the long path on one line, at 40 columns
    # While the first shard's close was slowed, the timer wrote status lines every 0.2 s.
    between = body[closed[0] + 1 : closed[1]]
    assert sum(bool(STATUS.fullmatch(b.split("; ")[0])) for b in between) >= 2, between
    assert STATUS.search(body[closed[0]])
    assert str(out) in summary.read_text() and "/s read" in summary.read_text()


def test_progress_lines_without_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    recipe = _recipe(tmp_path)
    out = tmp_path / ("out-" + "w" * 60)
    code, stdout, err = cli(capsys, "merge", recipe, "-o", out, "--max-shard-size", "20kB", "--device", "cpu")
    assert code == 0, err
    lines = err.splitlines()
    assert lines[0].startswith("lazymerge [0:00:00] starting: ") and "━" not in err and "\x1b" not in err
    shards = sorted(out.glob("*.safetensors"))
    assert [line.split("] closed ")[1].split(" (")[0] for line in lines if "] closed " in line] == [
        str(p) for p in shards
    ]
    assert f"({len(shards)} of {len(shards)} shards)" in err and re.search(r"\] done: \S+ \S+ written", err)
    assert re.search(r"read rate +│ +\S+ \S+/s read", stdout)  # the summary's rate, the same label
    code, stdout, err = cli(capsys, "merge", recipe, "-o", out, "--overwrite", "--device", "cpu", "-q")
    assert code == 0 and err == ""  # --quiet: no progress at all


def test_progress_lines_events_and_timer() -> None:
    now = [100.0]
    written: list[str] = []
    plans = [SimpleNamespace(shards=[SimpleNamespace(size=600), SimpleNamespace(size=400)])]
    lines = ProgressLines(written.append, plans, interval=0, clock=lambda: now[0])  # type: ignore[arg-type]
    with lines:
        assert written == ["lazymerge [0:00:00] starting: 2 shard(s), 1.00 kB to write (loading the merge backend)"]
        now[0] += 3
        lines(ProgressEvent("chunk", "model-1.st", 100, 1000, 300))
        assert written[-1] == "lazymerge [0:00:03] merging model-1.st: first bytes after 0:00:03"
        now[0] += 1
        lines(ProgressEvent("chunk", "model-1.st", 200, 1000, 600))
        now[0] += 1
        lines(ProgressEvent("shard", "model-1.st", 600, 1000, 1800, Path("/out/model-1.st")))
        assert written[-1] == (
            "lazymerge [0:00:05] closed /out/model-1.st (1 of 2 shards); "
            "60% written 600 B of 1.00 kB, 750 B/s read, ETA 0:00:02"
        )
        lines.upload(600, 1000)  # from the Hub pusher's thread: shown in the next status line
        assert "uploaded" not in written[-1] and lines._status().endswith("; uploaded 600 B of 1.00 kB")
        lines(ProgressEvent("done", "", 1000, 1000, 3000))
        assert written[-1] == "lazymerge [0:00:05] done: 1.00 kB written, 3.00 kB read"
        lines.upload(1000, 1000)
        lines.upload(1000, 1000)
        assert written[-1] == "lazymerge [0:00:05] uploaded 1.00 kB to the Hub; committing"
        assert sum("committing" in line for line in written) == 1
    real: list[str] = []
    with ProgressLines(real.append, plans, interval=0.05):  # type: ignore[arg-type]
        time.sleep(0.3)
    assert sum(line.endswith("starting... (no bytes merged yet)") for line in real) >= 2, real


def test_bar_in_a_terminal_says_starting_then_labels_its_rate() -> None:
    file = io.StringIO()
    console = LogConsole(file=file, force_terminal=True, width=200, color_system=None)
    plans = [SimpleNamespace(shards=[SimpleNamespace(size=1000)])]
    with progress_display(console, plans) as callback:  # type: ignore[arg-type]
        assert "starting…" in file.getvalue() and "0%" not in file.getvalue()
        callback(ProgressEvent("chunk", "model.safetensors", 500, 1000, 1000))
        time.sleep(0.05)
        callback(ProgressEvent("chunk", "model.safetensors", 1000, 1000, 2000))
        callback(ProgressEvent("done", "", 1000, 1000, 2000))
    final = file.getvalue().rsplit("\r", 1)[-1]
    assert "done" in final and "1.00 kB/1.00 kB written" in final and re.search(r"\S+ \S+/s read", final)


def test_throughput_and_units() -> None:
    now = [0.0]
    meter = Throughput(window=10, clock=lambda: now[0])
    assert meter.read_rate() is None and meter.eta(100) is None
    for t in range(0, 31):
        now[0] = float(t)
        meter.add(read=1000 * t if t <= 20 else 20_000 + 3000 * (t - 20), written=100 * t)  # 1 kB/s, then 3
    assert meter.read_rate() == pytest.approx(3000)  # the last 10 s, not the average since the start
    assert meter.eta(500) == pytest.approx(5.0) and meter.eta(0) == 0.0
    now[0] = 40.0  # ten seconds without an event (a stalled download): the rate falls, the ETA grows
    assert meter.read_rate() == pytest.approx(1500) and meter.eta(500) == pytest.approx(10.0)
    assert rate_text(1.52e9) == "1.52 GB/s read" and rate_text(None) == "? B/s read"
    assert duration_text(3723.4) == "1:02:03" and duration_text(None) == "?"


def test_progress_interval_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert RunOptions(progress_interval=0).progress_interval == 0
    for bad in (-1, float("nan"), float("inf"), "10", True):
        with pytest.raises(RecipeError, match="progress_interval must be"):
            RunOptions(progress_interval=bad)  # type: ignore[arg-type]
    with pytest.raises(SystemExit) as exit_code:
        cli(capsys, "merge", "x.yml", "-o", "out", "--progress-interval", "-1")
    assert exit_code.value.code == 2 and "expected a number of seconds >= 0" in capsys.readouterr().err


# -- --json --------------------------------------------------------------------------------------------


def test_json_plan_run_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "merge", recipe, "-o", out, "--max-shard-size", "20kB", "--dry-run", "--json")
    assert code == 0 and err == "", err
    plan_doc = json.loads(stdout)
    assert plan_doc["version"] == 1 and plan_doc["kind"] == "plan" and plan_doc["ok"] is True
    [entry] = plan_doc["outputs"]
    assert entry["label"] is None and entry["push_to_hub"] is None
    assert sorted(t["name"] for t in entry["tensors"]) == _names()
    assert entry["tensors"][0] == {
        "name": f"{LONG}.0.weight", "dtype": "F32", "shape": [64, 64], "how": entry["tensors"][0]["how"],
        "shard": entry["shards"][0]["name"], "nbytes": 64 * 64 * 4,
    }  # fmt: skip
    assert sum(r["bytes"] for r in entry["reads"]) == entry["input_bytes"] == 2 * 6 * 64 * 64 * 4
    assert [c["name"] for c in entry["checks"]] == ["shapes and dtypes", "tensors", "free space"]
    assert all(c["ok"] for c in entry["checks"]) and not out.exists()
    # The CLI prints what the Python API returns.
    api = lazymerge.plan_merge(recipe, out, max_shard_size="20kB").to_dict()
    assert {k: v for k, v in api.items() if k not in ("free_bytes", "checks")} == {
        k: v for k, v in entry.items() if k not in ("free_bytes", "checks", "label", "push_to_hub")
    }

    code, stdout, err = cli(capsys, "merge", recipe, "-o", out, "--max-shard-size", "20kB", "--device", "cpu", "--json")
    assert code == 0, err
    run_doc = json.loads(stdout)  # stdout holds the document alone; the progress went to stderr
    assert "] done: " in err and run_doc["kind"] == "merge" and run_doc["ok"] is True
    [stats] = run_doc["outputs"]
    shards = sorted(out.glob("*.safetensors"))
    assert stats["files"] == [str(p) for p in shards] and stats["output_dir"] == str(out)
    assert stats["bytes_written"] == sum(p.stat().st_size for p in shards) and stats["bytes_read"] > 0
    assert stats["read_rate"] == pytest.approx(stats["bytes_read"] / stats["seconds"])
    assert stats["push"] is None and stats["resumed_shards"] == 0 and stats["peak_rss_bytes"] > 0
    assert set(stats) == set(MergeStats(0, 0, 0, 0.0, 0, "cpu").to_dict())

    code, stdout, err = cli(capsys, "verify", out, "--json")
    assert code == 0 and err == ""
    verify_doc = json.loads(stdout)
    assert verify_doc["kind"] == "verify" and verify_doc["ok"] is True and verify_doc["folder"] == str(out)
    assert {c["name"] for c in verify_doc["checks"]} >= {"index", "checksums"}
    with shards[0].open("r+b") as f:  # one byte changed: the checksum check fails
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    code, stdout, err = cli(capsys, "verify", out, "--json")
    verify_doc = json.loads(stdout)
    assert code == 2 and verify_doc["ok"] is False
    assert [c["name"] for c in verify_doc["checks"] if not c["ok"]] == ["checksums"]
    assert err.count("\n") == 1 and err.startswith("error: ") and "failed verification: checksums" in err


def test_json_sweep_plan_labels_each_output(
    tmp_path: Path, llama_pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rm, sft = llama_pair
    code, stdout, err = cli(
        capsys, "dogerm", "--reward-model", rm, "--domain-model", sft, "--weight", "0.1,0.3",
        "-o", tmp_path / "rm-{weight}", "--push-to-hub", "me/rm-{weight}", "--dry-run", "--json",
    )  # fmt: skip
    assert code == 0, err
    outputs = json.loads(stdout)["outputs"]
    assert [(o["label"], o["push_to_hub"], Path(o["output_dir"]).name) for o in outputs] == [
        ("weight=0.1", "me/rm-0.1", "rm-0.1"),
        ("weight=0.3", "me/rm-0.3", "rm-0.3"),
    ]
    assert outputs[0]["method"] == "dogerm" and outputs[0]["dropped"] == ["lm_head.weight"]
    assert outputs[0]["reads"] == outputs[1]["reads"]  # one read serves both


def test_json_error_is_a_document_and_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = cli(
        capsys, "dogerm", "--reward-model", tmp_path / "missing", "--domain-model", tmp_path / "missing",
        "--weight", "0.3", "-o", tmp_path / "out", "--json", "-q",
    )  # fmt: skip
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 2  # the message and its hint
    doc = json.loads(stdout)
    assert doc["kind"] == "error" and doc["ok"] is False
    assert doc["error"]["type"] == "CheckpointError" and doc["error"]["exit_code"] == 2
    assert doc["error"]["message"] in err and doc["error"]["hint"] in err


def test_api_to_json(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    stats = lazymerge.merge(recipe, tmp_path / "out", device="cpu")
    assert json.loads(stats.to_json()) == stats.to_dict()
    pushed = MergeStats(1, 2, 3, 0.0, 4, "cpu", push=PushResult("me/x", "main", "https://hub/commit/1", ["a"], ["b"]))
    doc = json.loads(pushed.to_json(indent=None))
    assert doc["read_rate"] is None  # no division by a zero time, and no NaN in the JSON
    assert doc["push"] == {
        "repo_id": "me/x", "revision": "main", "commit_url": "https://hub/commit/1", "uploaded": ["a"], "reused": ["b"],
    }  # fmt: skip
    plan = lazymerge.plan_merge(recipe, tmp_path / "out2")
    assert json.loads(plan.to_json()) == json.loads(json.dumps(plan.to_dict()))
    report = verify(tmp_path / "out")
    assert json.loads(report.to_json()) == {
        "folder": str(tmp_path / "out"),
        "ok": True,
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in report.checks],
    }
