"""The weight search: `lazymerge dogerm --eval PAIRS` scores each weight merged in memory.

Oracles: the same merge written to a folder and loaded with transformers' `from_pretrained`,
scored one text at a time with its own tokenizer (no padding, no batching); the accuracy counted
from those scores by hand; the best weight's model written by the ordinary run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import cli, load_folder  # noqa: E402

import lazymerge  # noqa: E402
from lazymerge.errors import EvalDataError, RecipeError  # noqa: E402
from lazymerge.pairs import Pair, _split_of, load_pairs  # noqa: E402
from lazymerge.scoring import accuracy, encode_pairs, format_text, score_texts  # noqa: E402
from lazymerge.sweep import Sweep, parse_values  # noqa: E402
from lazymerge.tiny_models import build_llama_pair  # noqa: E402

PROMPTS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10", "w11 w12", "w13 w14 w15"]


def _dtype(value: object) -> dict[str, object]:
    """The dtype keyword of from_pretrained: `dtype` since transformers 4.56, `torch_dtype` before."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": value}


def _pairs(n: int = 6) -> list[dict]:
    rows = []
    for i in range(n):
        words = [f"w{20 + 7 * i + j}" for j in range(7)]
        rows.append(
            {
                "prompt": PROMPTS[i % len(PROMPTS)],
                "chosen": " ".join(words[: 2 + i % 4]),
                "rejected": " ".join(words[3 : 4 + i % 3]),
                "subset": ["math", "code"][i % 2],
            }
        )
    return rows


def _dogerm(rm: Path, sft: Path, weight: float) -> dict:
    return {"merge_method": "dogerm", "reward_model": str(rm), "domain_model": str(sft), "weight": weight}


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return build_llama_pair(tmp_path / "pair", sft_format="safetensors")


# ---------------------------------------------------------------- ranges


def test_a_range_gives_exact_decimal_values() -> None:
    assert parse_values("0:1:0.05") == [round(0.05 * i, 2) for i in range(21)]
    assert parse_values("0:1:0.05")[3] == 0.15  # not 0.15000000000000002
    assert parse_values("0,0.5:1:0.25") == [0.0, 0.5, 0.75, 1.0]
    assert parse_values("0:1:0.3") == [0.0, 0.3, 0.6, 0.9]  # stop included only when reached
    assert parse_values("1e-3:3e-3:1e-3") == [0.001, 0.002, 0.003]
    assert Sweep.parse("parameters.lambda=0.5:1:0.25").values == (0.5, 0.75, 1.0)  # sweeps too


@pytest.mark.parametrize("text", ["1:0:0.1", "0:1:0", "0:1", "0:1:-0.1", "0:1:1e-6", "a:1:0.1", "0:inf:1"])
def test_a_bad_range_is_a_recipe_error(text: str) -> None:
    with pytest.raises(RecipeError):
        parse_values(text)


# ---------------------------------------------------------------- pairs


def test_pairs_from_json_jsonl_and_columns(tmp_path: Path) -> None:
    rows = _pairs()
    want = [Pair(**r) for r in rows]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "c.json").write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    assert load_pairs(tmp_path / "a.json") == want
    assert load_pairs(tmp_path / "b.jsonl") == want
    assert load_pairs(tmp_path / "c.json") == want
    assert load_pairs(tmp_path / "a.json", subsets=["code"], max_pairs=2) == [want[1], want[3]]


@pytest.mark.slow  # importing pyarrow takes seconds
def test_pairs_from_parquet(tmp_path: Path) -> None:
    rows = _pairs()
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert load_pairs(tmp_path / "d.parquet") == [Pair(**r) for r in rows]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('[{"prompt": "p", "chosen": "c"}]', "no rejected column"),
        ('[{"prompt": "p", "chosen": "c", "rejected": 3}]', "must be text"),
        ("[]", "no preference pairs"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_pairs_are_one_line_errors(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "p.json").write_text(content)
    with pytest.raises(EvalDataError, match=match):
        load_pairs(tmp_path / "p.json")


def test_hub_dataset_files_are_grouped_by_split() -> None:
    assert _split_of("data/filtered-00000-of-00001.parquet") == "filtered"  # RewardBench's layout
    assert _split_of("data/train-00003-of-00010.parquet") == "train"
    assert _split_of("test.jsonl") == "test"
    assert _split_of("validation/part-0.parquet") == "validation"


# ---------------------------------------------------------------- scoring


def test_without_a_chat_template_the_text_is_prompt_newline_response() -> None:
    class Plain:
        chat_template = None

    assert format_text(Plain(), "What is 2+2?", "4") == ("What is 2+2?\n4", False)


def test_a_chat_template_formats_the_turns() -> None:
    class Templated:
        chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"

        def apply_chat_template(self, messages: list[dict], tokenize: bool) -> str:
            assert tokenize is False
            return "".join(f"<{m['role']}>{m['content']}" for m in messages)

    assert format_text(Templated(), "p", "r") == ("<user>p<assistant>r", True)


@pytest.mark.slow
def test_scores_and_accuracy_equal_the_written_merge_scored_text_by_text(
    tmp_path: Path, pair: tuple[Path, Path]
) -> None:
    rm, sft = pair
    pairs = [Pair(**r) for r in _pairs()]
    merged = lazymerge.load(_dogerm(rm, sft, 0.4), workers=1)
    encoded = encode_pairs(merged.tokenizer, pairs)
    batched = score_texts(merged.model, encoded.ids, batch_size=4)

    lazymerge.dogerm(rm, sft, 0.4, tmp_path / "out")
    written = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", **_dtype(torch.float16))
    assert torch.equal(score_texts(written.eval(), encoded.ids, batch_size=4), batched)  # same bytes, same scores

    # By hand: the written model's own tokenizer, one text at a time, no padding.
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    with torch.no_grad():

        def score(prompt: str, response: str) -> float:
            ids = tok(f"{prompt}\n{response}", return_tensors="pt")["input_ids"]
            return written(input_ids=ids).logits[0, 0].item()

        wins = [score(p.prompt, p.chosen) > score(p.prompt, p.rejected) for p in pairs]
        singles = torch.tensor([score(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)])
    torch.testing.assert_close(batched, singles, rtol=0, atol=2e-3)  # padding changes the fp16 sums a little
    acc = accuracy(pairs, batched)
    assert (acc.correct, acc.pairs) == (sum(wins), len(pairs))
    by_subset = {s: (sum(w for w, p in zip(wins, pairs, strict=True) if p.subset == s), 3) for s in ("code", "math")}
    assert acc.subsets == by_subset


# ---------------------------------------------------------------- the search and its CLI


@pytest.mark.slow
def test_the_cli_search_reports_every_weight_and_writes_only_the_best(
    tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rm, sft = pair
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in _pairs()))
    report = tmp_path / "report.json"
    code, out, err = cli(
        capsys, "dogerm", "--reward-model", rm, "--domain-model", sft, "--weight", "0:1:0.25",
        "--eval", tmp_path / "pairs.jsonl", "--eval-report", report, "--output", tmp_path / "best-{weight}", "-q",
        "--workers", "1", "--eval-batch-size", "3", "--eval-resident",
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(report.read_text())
    weights = [r["weight"] for r in data["results"]]
    assert weights == [0.0, 0.25, 0.5, 0.75, 1.0]
    accs = [r["accuracy"] for r in data["results"]]
    assert data["best"] == weights[accs.index(max(accs))]
    for r in data["results"]:
        assert r["pairs"] == 6 and r["accuracy"] == r["correct"] / 6
        assert set(r["subsets"]) == {"code", "math"}
        assert sum(s["correct"] for s in r["subsets"].values()) == r["correct"]
    assert "best weight:" in out and "accuracy" in out

    # The same accuracies from the public API, one weight at a time, streamed (the CLI re-merged
    # from resident inputs).
    pairs = load_pairs(tmp_path / "pairs.jsonl")
    for w, a in zip(weights, accs, strict=True):
        again = lazymerge.search_weights(
            _dogerm(rm, sft, w), Sweep("weight", [w]), pairs, options=lazymerge.RunOptions(workers=1)
        )
        assert again.results[0].accuracy == a

    # Only the best model is written, and it is the ordinary merge at that weight.
    written = sorted(p.name for p in tmp_path.glob("best-*"))
    assert written == [f"best-{data['best']:g}"]
    lazymerge.dogerm(rm, sft, data["best"], tmp_path / "direct")
    assert load_folder(tmp_path / written[0]).keys() == load_folder(tmp_path / "direct").keys()
    for name, t in load_folder(tmp_path / "direct").items():
        assert torch.equal(load_folder(tmp_path / written[0])[name], t), name


def test_search_flags_are_checked_before_any_merge(
    tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rm, sft = pair
    (tmp_path / "pairs.json").write_text(json.dumps(_pairs()))
    base = ["dogerm", "--reward-model", rm, "--domain-model", sft, "--weight", "0:1:0.5"]
    code, _, err = cli(capsys, *base)
    assert code == 2 and "needs --output" in err
    code, _, err = cli(capsys, *base, "--eval", tmp_path / "pairs.json", "--dry-run")
    assert code == 2 and "--dry-run" in err
    code, _, err = cli(capsys, *base, "--eval", tmp_path / "pairs.json", "--push-to-hub", "me/rm")
    assert code == 2 and "--push-to-hub needs --output" in err
    code, _, err = cli(capsys, *base, "--eval", tmp_path / "missing.json")
    assert code == 2 and "no such file" in err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "model.safetensors").write_bytes(b"x")
    code, _, err = cli(capsys, *base, "--eval", tmp_path / "pairs.json", "--output", tmp_path / "taken")
    assert code == 2 and "error:" in err and "accuracy" not in err  # refused before the search


def test_a_hub_dataset_reads_the_files_of_its_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file choice and the calls made (the local Hub server serves model repos only, so the
    client's two calls are replaced here)."""
    import huggingface_hub

    rows = _pairs()
    files = {
        "data/filtered-00000-of-00002.jsonl": rows[:4],
        "data/filtered-00001-of-00002.jsonl": rows[4:],
        "data/raw-00000-of-00001.jsonl": rows[:1],
        "README.md": None,
    }
    calls = []

    def list_repo_files(self: object, repo_id: str, **kw: object) -> list[str]:
        calls.append(("list", repo_id, kw["repo_type"], kw["revision"]))
        return list(files)

    def download(repo_id: str, filename: str, **kw: object) -> str:
        calls.append(("get", filename, kw["repo_type"]))
        path = tmp_path / filename.replace("/", "_")
        path.write_text("\n".join(json.dumps(r) for r in files[filename]))
        return str(path)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(EvalDataError, match="several splits"):
        load_pairs("allenai/reward-bench")
    assert load_pairs("allenai/reward-bench@v1", split="filtered") == [Pair(**r) for r in rows]
    assert ("list", "allenai/reward-bench", "dataset", "v1") in calls
    assert [c[1] for c in calls if c[0] == "get"] == [
        "data/filtered-00000-of-00002.jsonl",
        "data/filtered-00001-of-00002.jsonl",
    ]
    with pytest.raises(EvalDataError, match="no split 'test'"):
        load_pairs("allenai/reward-bench", split="test")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_hub_inputs_in_memory_and_only_the_best_pushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Against tests/hub_server.py: models given as repo ids are merged in memory (bytes equal to
    the local folders'), and a search with --push-to-hub pushes one repo: the best weight's."""
    from hub_server import serving_hub
    from test_hub import TOKEN, upload

    monkeypatch.delenv("LAZYMERGE_DEBUG", raising=False)
    serving = serving_hub(tmp_path, monkeypatch, TOKEN)
    server = next(serving)
    try:
        rm, sft = build_llama_pair(tmp_path / "pair", sft_format="safetensors")
        upload(server, rm, "alice/rm")
        upload(server, sft, "alice/sft")
        remote = lazymerge.load(_dogerm("alice/rm", "alice/sft", 0.5), workers=1)
        local = lazymerge.load(_dogerm(rm, sft, 0.5), workers=1)
        for (name, a), (_, b) in zip(remote.model.named_parameters(), local.model.named_parameters(), strict=True):
            assert torch.equal(a, b), name
        (tmp_path / "pairs.json").write_text(json.dumps(_pairs()))
        code, out, err = cli(
            capsys, "dogerm", "--reward-model", "alice/rm", "--domain-model", "alice/sft", "--weight", "0:1:0.5",
            "--eval", tmp_path / "pairs.json", "--eval-report", tmp_path / "r.json", "--output",
            tmp_path / "best-{weight}", "--push-to-hub", "alice/best-{weight}", "-q", "--workers", "1",
        )  # fmt: skip
        assert code == 0, err
        best = json.loads((tmp_path / "r.json").read_text())["best"]
        assert sorted(r for r in server.repos if r.startswith("alice/best")) == [f"alice/best-{best:g}"]
        assert f"pushed to alice/best-{best:g}" in out
    finally:
        next(serving, None)  # runs the rest of the fixture body: the server stops


def test_the_report_marks_the_first_best_weight_and_skips_absent_subsets(tmp_path: Path) -> None:
    from rich.console import Console

    from lazymerge.report import print_search
    from lazymerge.search import SearchResult, WeightResult

    result = SearchResult(
        "weight",
        [WeightResult(0.0, 0.5, 2, 4), WeightResult(0.5, 0.75, 3, 4), WeightResult(1.0, 0.75, 3, 4, {"math": (1, 2)})],
    )
    assert result.best == 0.5  # the first of the two best
    console = Console(record=True, width=120)
    print_search(console, result)
    text = console.export_text()
    assert "0.5 *" in text and "1 *" not in text and "best weight: 0.5" in text
    assert "math" in text and " - " in text  # a weight without that subset shows a dash
    data = json.loads(result.write_report(tmp_path / "r.json").read_text())
    assert data["best"] == 0.5 and data["results"][2]["subsets"] == {
        "math": {"accuracy": 0.5, "correct": 1, "pairs": 2}
    }
    assert [r["weight"] for r in data["results"]] == [0.0, 0.5, 1.0]
