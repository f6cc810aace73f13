"""Slices and passthrough (layer stacking), tokenizer unions and chat templates: mergekit 0.1.5 as
the oracle on fp32 tiny LLaMAs (same bytes), and the plan's shape without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_folder
from test_methods import MERGEKIT, needs_mergekit

import lazymerge
from lazymerge.derived import fill_source
from lazymerge.errors import RecipeError
from lazymerge.plan import Source
from lazymerge.tiny_models import build_llama, llama_config, llama_layer_tensors, save_model

WORDS = ["<unk>", "<s>", "</s>", "[PAD]"] + [f"w{i}" for i in range(28)]


def _model(folder: Path, words: list[str], seed: int, layers: int = 2, hidden: int = 16) -> str:
    gen = torch.Generator().manual_seed(seed)
    v = len(words)
    shapes = [
        ("model.embed_tokens.weight", (v, hidden)),
        ("model.norm.weight", (hidden,)),
        ("lm_head.weight", (v, hidden)),
    ]
    for i in range(layers):
        shapes += llama_layer_tensors(i, hidden, 24, hidden)
    tensors = {n: torch.randn(*s, generator=gen) for n, s in shapes}
    cfg = llama_config(
        hidden=hidden, intermediate=24, layers=layers, heads=2, kv_heads=2, vocab=v,
        torch_dtype="float32", classifier=False, max_positions=64, rms_norm_eps=1e-6,
    )  # fmt: skip
    return str(save_model(folder, tensors, shards=2, config=cfg, vocab=words))


def _against_mergekit(tmp_path: Path, name: str, cfg: dict) -> Path:
    """Run the config through mergekit and lazymerge; assert the same tensors bit for bit, the same
    tokenizer files and the same config fields that the merge sets."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    y = tmp_path / f"{name}.yaml"
    y.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    r = subprocess.run([MERGEKIT, str(y), str(tmp_path / "mk")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lazymerge.merge(y, tmp_path / "ours", chunk_elements=37, device="cpu")
    want, got = load_folder(tmp_path / "mk"), load_folder(tmp_path / "ours")
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].shape == w.shape and torch.equal(got[k].view(torch.int32), w.view(torch.int32)), k
    mk_cfg = json.loads((tmp_path / "mk" / "config.json").read_text())
    our_cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    for key in ("num_hidden_layers", "vocab_size"):
        assert our_cfg[key] == mk_cfg[key], key
    # Without a tokenizer setting both carry the donor's tokenizer (mergekit re-serialises it when
    # the donor has no tokenizer_config.json; lazymerge copies the files as they are).
    tokenizer_set = any(k in cfg for k in ("tokenizer_source", "tokenizer", "chat_template"))
    for f in (tmp_path / "mk").iterdir() if tokenizer_set else ():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            assert (tmp_path / "ours" / f.name).read_bytes() == f.read_bytes(), f.name
    return tmp_path / "ours"


@pytest.fixture
def pair(tmp_path: Path) -> tuple[str, str]:
    return str(build_llama(tmp_path / "a", 1, layers=4)), str(build_llama(tmp_path / "b", 2, layers=4))


def _stack(a: str, b: str) -> dict:
    return {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 3]}]},
            {"sources": [{"model": b, "layer_range": [1, 4], "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]},
        ],
    }  # fmt: skip


def test_stack_plan_renumbers_layers_and_copies_bytes(tmp_path: Path, pair: tuple[str, str]) -> None:
    a, b = pair
    plan = lazymerge.plan_merge(_stack(a, b), tmp_path / "out")
    names = [t.name for t in plan.tensors]
    assert names[0] == "model.embed_tokens.weight" and set(names[-2:]) == {"lm_head.weight", "model.norm.weight"}
    assert {n.split(".")[2] for n in names if ".layers." in n} == {str(i) for i in range(6)}
    config = json.loads(plan.side_files["config.json"])
    assert config["num_hidden_layers"] == 6
    by_name = {t.name: t for t in plan.tensors}
    # layer 4 of the output is layer 2 of b: copied as bytes, except the scaled o_proj
    q = by_name["model.layers.4.self_attn.q_proj.weight"]
    assert all(q.segment_is_copy(s) for s in q.segments)
    o = by_name["model.layers.4.self_attn.o_proj.weight"]
    assert o.segments[0].sources[0].weight == 0.5 and not o.segment_is_copy(o.segments[0])
    src = q.segments[0].sources[0]
    assert plan.inputs[src.checkpoint] == b


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["slices"][0]["sources"][0].update(layer_range=[0, 9]), "goes past"),
        (lambda c: c["slices"][0]["sources"].append(dict(c["slices"][1]["sources"][0])), "one source per slice"),
        (
            lambda c: c["slices"][0]["sources"].append(
                {"model": c["slices"][1]["sources"][0]["model"], "layer_range": [0, 1]}
            ),
            "same number of layers",
        ),
        (lambda c: c.update(modules={"text": {}}), "`modules`"),
        (lambda c: c["slices"][1]["sources"][0]["parameters"].update(weight=1.0), "unsupported key.*weight"),
        (lambda c: c["slices"][0].update(parameters={"density": 0.5}), "unsupported key.*density"),
        (lambda c: c.update(tokenizer={"source": "union", "pad_to_multiple_of": 8}), "pad_to_multiple_of"),
        (lambda c: c.update(chat_template="nope"), "chat_template"),
    ],
)
def test_slice_recipe_errors(tmp_path: Path, pair: tuple[str, str], change, message: str) -> None:
    cfg = _stack(*pair)
    change(cfg)
    with pytest.raises(RecipeError, match=message):
        lazymerge.plan_merge(cfg, tmp_path / "out")


def test_derived_rows_mean_and_zero() -> None:
    data = {("a", 0): torch.tensor([1.0, 2.0]), ("b", 0): torch.tensor([4.0, 8.0])}

    def read(checkpoint: int, file: str, offset: int, buf: torch.Tensor) -> None:
        buf.copy_(data[(file, offset)].view(torch.uint8))

    parts = (Source(0, "a", 0, "F32"), Source(1, "b", 0, "F32"))
    buf = torch.empty(8, dtype=torch.uint8)
    fill_source(read, Source(-1, "", 0, "F32", 1.0, "mean", parts), 2, buf)
    assert buf.view(torch.float32).tolist() == [2.5, 5.0]
    fill_source(read, Source(-1, "", 0, "F32", 1.0, "zero"), 2, buf)
    assert buf.view(torch.float32).tolist() == [0.0, 0.0]


@pytest.mark.slow
@needs_mergekit
def test_stacks_match_mergekit(tmp_path: Path, pair: tuple[str, str]) -> None:
    a, b = pair
    _against_mergekit(tmp_path / "stack", "stack", _stack(a, b))
    slerp = {
        "merge_method": "slerp",
        "base_model": a,
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}], "parameters": {"t": [0, 1]}},
            {"sources": [{"model": a, "layer_range": [1, 4]}, {"model": b, "layer_range": [1, 4]}],
             "parameters": {"t": [{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.4}]}},
        ],
    }  # fmt: skip
    _against_mergekit(tmp_path / "slerp", "slerp", slerp)
    linear = {
        "merge_method": "linear",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2], "parameters": {"weight": 0.25}}, {"model": b, "layer_range": [2, 4], "parameters": {"weight": 0.5}}]},
            {"sources": [{"model": b, "layer_range": [0, 2], "parameters": {"weight": 1.0}}, {"model": a, "layer_range": [2, 4], "parameters": {"weight": 2.0}}]},
        ],
    }  # fmt: skip
    _against_mergekit(tmp_path / "linear", "linear", linear)


@pytest.fixture
def vocabs(tmp_path: Path) -> dict[str, str]:
    return {
        "a": _model(tmp_path / "A", WORDS, 1),
        "b": _model(tmp_path / "B", [*WORDS, "zz", "<|im_start|>"], 2),  # a word and an added token
        "b2": _model(tmp_path / "B2", [*WORDS, "<|im_start|>"], 4),
        "c2": _model(tmp_path / "C2", [*WORDS, "<|im_start|>"], 5),
        "c": _model(tmp_path / "C", ["<unk>", "<s>", "</s>", "qq", *WORDS[4:], "<|im_start|>"], 3),  # no [PAD]
    }


# Two models, or extra tokens that do not depend on the order of the models: mergekit builds the
# union in the order of a Python set, which varies between runs for three or more models.
UNIONS = {
    # only one model has a token (the other gets that row); only the base has [PAD]
    "union_linear": lambda m: {"merge_method": "linear", "base_model": m["a"], "dtype": "float32", "tokenizer_source": "union",
                               "models": [{"model": m["a"], "parameters": {"weight": 0.5}}, {"model": m["c"], "parameters": {"weight": 0.25}}]},
    "union_ties": lambda m: {"merge_method": "ties", "base_model": m["a"], "dtype": "float32", "tokenizer_source": "union",
                             "models": [{"model": m["b"], "parameters": {"weight": 0.5, "density": 0.6}}]},
    # two of three models have the token, the base does not: the mean of their rows
    "mean_ties": lambda m: {"merge_method": "ties", "base_model": m["a"], "dtype": "float32", "tokenizer_source": "union",
                            "models": [{"model": m["b2"], "parameters": {"weight": 0.5, "density": 0.6}},
                                       {"model": m["c2"], "parameters": {"weight": 0.5, "density": 0.6}}]},
    "mean_linear": lambda m: {"merge_method": "linear", "base_model": m["a"], "dtype": "float32", "tokenizer_source": "union",
                              "models": [{"model": m["b2"], "parameters": {"weight": 0.5}}, {"model": m["c2"], "parameters": {"weight": 0.25}},
                                         {"model": m["a"], "parameters": {"weight": 0.25}}]},
    "base": lambda m: {"merge_method": "task_arithmetic", "base_model": m["a"], "dtype": "float32", "tokenizer_source": "base",
                       "models": [{"model": m["b"], "parameters": {"weight": 0.5}}, {"model": m["c"], "parameters": {"weight": 0.5}}]},
    "model": lambda m: {"merge_method": "linear", "dtype": "float32", "tokenizer_source": m["b"],
                        "models": [{"model": m["a"], "parameters": {"weight": 1.0}}, {"model": m["c"], "parameters": {"weight": 1.0}}]},
    # the tokenizer block: a forced model source, zero, model_token by token and by id; a chat template
    "block": lambda m: {"merge_method": "ties", "base_model": m["a"], "dtype": "float32", "chat_template": "chatml",
                        "tokenizer": {"source": "union", "tokens": {
                            "<|im_start|>": {"source": m["b"], "force": True}, "zz": {"source": {"kind": "zero"}},
                            "<|im_end|>": {"source": {"kind": "model_token", "model": m["b2"], "token": "w9"}},
                            "w3": {"source": {"kind": "model_token", "model": m["a"], "token_id": 5}, "force": True}}},
                        "models": [{"model": m["b"], "parameters": {"weight": 0.5, "density": 0.6}},
                                   {"model": m["b2"], "parameters": {"weight": 0.5, "density": 0.6}}]},
    "stack_union": lambda m: {"merge_method": "passthrough", "base_model": m["a"], "dtype": "float32", "tokenizer_source": "union",
                              "slices": [{"sources": [{"model": m["a"], "layer_range": [0, 2]}]},
                                         {"sources": [{"model": m["c"], "layer_range": [0, 2]}]}]},
}  # fmt: skip


@pytest.mark.slow
@needs_mergekit
@pytest.mark.parametrize("name", sorted(UNIONS))
def test_tokenizers_match_mergekit(tmp_path: Path, vocabs: dict[str, str], name: str) -> None:
    out = _against_mergekit(tmp_path, name, UNIONS[name](vocabs))
    if name == "block":
        assert "<|im_start|>" in (out / "chat_template.jinja").read_text()


def test_union_plan_rows(tmp_path: Path, vocabs: dict[str, str]) -> None:
    plan = lazymerge.plan_merge(UNIONS["mean_ties"](vocabs), tmp_path / "out")
    embed = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    assert embed.shape == (33, 16)
    last = embed.segments[-1]
    # row 32 (<|im_start|>): the base lacks it, so its row is the mean of the two others' rows
    assert last.start == 32 * 16 and last.sources[0].derived == "mean" and len(last.sources[0].parts) == 2
    assert [s.derived for s in last.sources[1:]] == ["", ""]
    assert json.loads(plan.side_files["config.json"])["vocab_size"] == 33
    assert "<|im_start|>" in json.loads(plan.side_files["tokenizer.json"])["added_tokens"][-1]["content"]


def test_chat_template_string_is_written(tmp_path: Path, pair: tuple[str, str]) -> None:
    a, b = pair
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    cfg = {"merge_method": "linear", "chat_template": template, "models": [{"model": a}, {"model": b}]}
    plan = lazymerge.plan_merge(cfg, tmp_path / "out")
    written = plan.side_files.get("chat_template.jinja", b"") + plan.side_files.get("tokenizer_config.json", b"")
    assert "<|{{ m['role'] }}|>" in written.decode()


def test_tokenizer_merge_without_transformers_names_the_extra(
    tmp_path: Path, vocabs: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(RecipeError, match="need transformers") as info:
        lazymerge.plan_merge(UNIONS["union_ties"](vocabs), tmp_path / "out")
    assert "lazymerge[tokenizer]" in str(info.value.hint)
