"""End to end: a DogeRM output is a real transformers model, equal to an independent reference.

The inputs are made with transformers' own classes and a real `tokenizers` tokenizer: a reward
model (LlamaForSequenceClassification, fp16 or bf16 safetensors shards) and a domain SFT model
(LlamaForCausalLM, fp32, safetensors or PyTorch `.bin` shards) fine-tuned (here: perturbed) from
one base. One of them has an extra `[PAD]` token (the SFT like MetaMath-7B, or the RM).

The reference below is written from DESIGN.md alone and does not call lazymerge: it loads both
models whole with transformers and computes, in fp32 with one rounding per operation,
`acc = x_rm * (1 - lam); acc = acc + x_sft * lam`, then casts to the RM dtype (round to nearest
even) for every shared parameter except the embedding and the heads; `score.*` comes from the RM,
`lm_head` is dropped, the embedding covers the union vocabulary (shared tokens averaged, a token
only one model has keeps that model's row).
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

import yaml  # noqa: E402
from conftest import load_folder  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

import lazymerge  # noqa: E402
from lazymerge.cli import main as cli_main  # noqa: E402
from lazymerge.constants import parse_size  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, INTER = 64, 2, 4, 2, 128
WORDS = [
    "<unk>",
    "<s>",
    "</s>",
    *"the a of to and is in that it for on with as was at by be this are from or an which".split(),
    *"one two three four five six seven eight nine ten plus minus times equals answer".split(),
]
V = len(WORDS)  # the base vocabulary; the model with the extra token has V + 1 rows
EXTRA = "[PAD]"
TEXTS = ["one plus two equals three", "the answer is four", "five times six is", "ten minus one equals nine"]
INPUT_SHARD = "100KB"
OUTPUT_SHARD = "60KB"  # the merged fp16/bf16 model is ~155 kB: three shards
SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


def _dtype(value: object) -> dict[str, object]:
    """The dtype keyword of from_pretrained/from_config: `dtype` since 4.56, `torch_dtype` before."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": value}


# ---------------------------------------------------------------- building the inputs


def _tokenizer(pad: str, extra: bool) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if extra:  # like MetaMath-7B: `[PAD]` appended as a special token, id = base vocabulary size
        assert tok.add_special_tokens({"pad_token": EXTRA}) == 1
        assert tok.convert_tokens_to_ids(EXTRA) == V
    else:
        tok.pad_token = pad
    return tok


def _config(pad_token_id: int | None) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=V,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
        num_labels=1,
    )


@torch.no_grad()
def _finetune(model: torch.nn.Module, base: dict[str, torch.Tensor], seed: int) -> None:
    """Load the base weights it shares, then move every parameter by a seeded perturbation."""
    missing = model.load_state_dict({k: v for k, v in base.items() if k.startswith("model.")}, strict=False)
    assert set(missing.missing_keys) <= {"score.weight", "lm_head.weight"} and not missing.unexpected_keys
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.01 * torch.randn(p.shape, generator=g))


@torch.no_grad()
def _add_extra_row(model: torch.nn.Module, value: float) -> None:
    model.resize_token_embeddings(V + 1, mean_resizing=False)
    assert model.config.vocab_size == V + 1
    # A distinctive row: easy to tell from an average or a random init.
    model.get_input_embeddings().weight[V] = torch.linspace(-value, value, HIDDEN)
    if (head := model.get_output_embeddings()) is not None:
        head.weight[V] = torch.linspace(value, -value, HIDDEN)


def _save(model: torch.nn.Module, folder: Path, fmt: str) -> None:
    params = inspect.signature(model.save_pretrained).parameters
    if fmt == "safetensors":
        kw = {"safe_serialization": True} if "safe_serialization" in params else {}
        model.save_pretrained(folder, max_shard_size=INPUT_SHARD, **kw)
    elif "safe_serialization" in params:  # transformers 4.x still writes PyTorch .bin shards
        model.save_pretrained(folder, max_shard_size=INPUT_SHARD, safe_serialization=False)
    else:  # transformers >= 5 writes safetensors only: write .bin shards as 4.x did
        _save_bin(model, folder)
    files = {p.suffix for p in folder.iterdir()}
    assert (".bin" in files) == (fmt == "bin") and (".safetensors" in files) == (fmt == "safetensors")


def _save_bin(model: torch.nn.Module, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = model.state_dict()
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > parse_size(INPUT_SHARD):
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for k, group in enumerate(groups):
        file = f"pytorch_model-{k + 1:05d}-of-{len(groups):05d}.bin"
        torch.save({n: state[n] for n in group}, folder / file)
        weight_map.update(dict.fromkeys(group, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def build_pair(root: Path, rm_dtype: torch.dtype, sft_format: str, extra_in: str) -> tuple[Path, Path]:
    """A reward model and a domain SFT model of one base, each saved with its tokenizer."""
    assert extra_in in ("sft", "rm")
    rm_dir, sft_dir = root / "reward-model", root / "domain-model"
    torch.manual_seed(1234)
    base = LlamaForCausalLM(_config(pad_token_id=0)).state_dict()

    rm_tok = _tokenizer("<unk>", extra=extra_in == "rm")  # a Llama-2 RM pads with <unk>
    rm = LlamaForSequenceClassification(_config(pad_token_id=0 if extra_in == "sft" else None))
    _finetune(rm, base, seed=1)
    if extra_in == "rm":
        _add_extra_row(rm, 0.5)
    rm.config.pad_token_id = rm_tok.pad_token_id  # the sequence classifier needs it for batches
    rm.to(rm_dtype).save_pretrained(rm_dir, max_shard_size=INPUT_SHARD)
    rm_tok.save_pretrained(rm_dir)
    assert len(list(rm_dir.glob("model-*-of-*.safetensors"))) > 1

    sft_tok = _tokenizer("</s>", extra=extra_in == "sft")
    sft = LlamaForCausalLM(_config(pad_token_id=None))
    _finetune(sft, base, seed=2)
    if extra_in == "sft":
        _add_extra_row(sft, 0.75)
    sft.config.pad_token_id = sft_tok.pad_token_id
    _save(sft.float(), sft_dir, sft_format)
    sft_tok.save_pretrained(sft_dir)
    return rm_dir, sft_dir


_PAIRS: dict[tuple, tuple[Path, Path]] = {}


@pytest.fixture
def pair(request, tmp_path_factory) -> tuple[Path, Path]:
    """Inputs for (rm_dtype, sft_format, extra_in), built once per module."""
    params = request.node.callspec.params
    key = (params["rm_dtype"], params["sft_format"], params["extra_in"])
    if key not in _PAIRS or not _PAIRS[key][0].is_dir():
        dtype, fmt, extra = key
        _PAIRS[key] = build_pair(tmp_path_factory.mktemp(f"{str(dtype)[6:]}-{fmt}-{extra}"), *key)
    return _PAIRS[key]


# ---------------------------------------------------------------- the independent reference


def _mix(x_rm: torch.Tensor, x_sft: torch.Tensor, lam: float, dtype: torch.dtype) -> torch.Tensor:
    """fp32, one rounding per operation (no lerp, no addcmul, no alpha-add), then round to nearest even."""
    acc = x_rm.to(torch.float32) * torch.tensor(1.0 - lam, dtype=torch.float32)
    acc = acc + x_sft.to(torch.float32) * torch.tensor(lam, dtype=torch.float32)
    return acc.to(dtype)


def _load_inputs(rm_dir: Path, sft_dir: Path):
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, **_dtype("auto"))
    sft = AutoModelForCausalLM.from_pretrained(sft_dir, **_dtype(torch.float32))
    assert isinstance(rm, LlamaForSequenceClassification) and isinstance(sft, LlamaForCausalLM)
    rm_vocab = AutoTokenizer.from_pretrained(rm_dir).get_vocab()
    sft_vocab = AutoTokenizer.from_pretrained(sft_dir).get_vocab()
    return rm, sft, rm_vocab, sft_vocab


def reference_dogerm(rm, sft, rm_vocab: dict[str, int], sft_vocab: dict[str, int], lam: float):
    """DogeRM with full models in memory, from DESIGN.md. Returns (state dict, union vocab size)."""
    rm_sd, sft_sd = rm.state_dict(), sft.state_dict()
    assert set(sft_sd) - set(rm_sd) == {"lm_head.weight"}  # dropped
    assert set(rm_sd) - set(sft_sd) == {"score.weight"}  # kept from the RM
    dtype = rm_sd["score.weight"].dtype
    rm_ids = {i: t for t, i in rm_vocab.items()}
    sft_ids = {i: t for t, i in sft_vocab.items()}
    union = len(rm_vocab.keys() | sft_vocab.keys())
    out: dict[str, torch.Tensor] = {}
    for name, x in rm_sd.items():
        if name.startswith("score."):
            out[name] = x.clone()
        elif name == "model.embed_tokens.weight":
            e_rm, e_sft = x, sft_sd[name]
            rows = []
            for i in range(max(e_rm.shape[0], e_sft.shape[0])):
                t_rm, t_sft = rm_ids.get(i), sft_ids.get(i)
                if t_rm is not None and t_sft is not None:
                    assert t_rm == t_sft, f"id {i}: {t_rm!r} vs {t_sft!r}"
                    rows.append(_mix(e_rm[i], e_sft[i], lam, dtype))
                elif t_rm is not None:
                    rows.append(e_rm[i].clone())
                else:
                    assert t_sft is not None, f"row {i} belongs to no token"
                    rows.append(e_sft[i].to(dtype))
            out[name] = torch.stack(rows)
            assert out[name].shape[0] == union
        else:
            assert x.shape == sft_sd[name].shape, name
            out[name] = _mix(x, sft_sd[name], lam, dtype)
    return out, union


def _scores(model: torch.nn.Module, tok, texts: list[str]) -> torch.Tensor:
    batch = tok(texts, return_tensors="pt", padding=True)
    model = model.float().eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ---------------------------------------------------------------- the test


def _run(rm_dir: Path, sft_dir: Path, lam: float, out: Path, via_cli: bool) -> None:
    if via_cli:
        argv = ["dogerm", "--reward-model", str(rm_dir), "--domain-model", str(sft_dir)]
        argv += ["--weight", str(lam), "--output", str(out), "--max-shard-size", OUTPUT_SHARD, "--quiet"]
        assert cli_main(argv) == 0
    else:
        stats = lazymerge.dogerm(rm_dir, sft_dir, lam, out, max_shard_size=OUTPUT_SHARD)
        assert stats.tensors == 2 + 9 * LAYERS + 1  # embedding, final norm, score + 9 per layer


def _check_files(out: Path, rm_dir: Path, sft_dir: Path) -> None:
    shards = sorted(out.glob("*.safetensors"))
    matches = [SHARD_RE.fullmatch(p.name) for p in shards]
    assert all(matches), [p.name for p in shards]
    n = len(shards)
    assert n >= 2
    assert [(int(m[1]), int(m[2])) for m in matches] == [(k, n) for k in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    total = 0
    for p in shards:
        with safe_open(p, "pt") as f:
            assert f.metadata()["format"] == "pt"
            for name in f.keys():
                assert index["weight_map"][name] == p.name
                t = f.get_tensor(name)
                total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total
    assert not list(out.glob("*.bin")) and not list(out.glob("*.partial"))

    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in front  # Hub repo ids only; local folders without _name_or_path are left out
    assert f"- `{rm_dir}`" in card and f"- `{sft_dir}`" in card  # the body lists the inputs as they were named
    assert {"merge", "lazymerge"} <= set(front["tags"])


# Every input combination at lam = 0.3; the end points (lam = 0 is the RM, 1 the SFT body) with
# the headline layout (an fp32 `.bin` SFT, like MetaMath-7B). The `.bin` runs at 0.3 use the CLI.
CASES = [
    pytest.param(dtype, fmt, extra, lam, id=f"rm-{dname}-sft-{fmt}-extra-in-{extra}-lam{lam}")
    for dtype, dname in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"))
    for fmt in ("safetensors", "bin")
    for extra in ("sft", "rm")
    for lam in (0.0, 0.3, 1.0)
    if lam == 0.3 or fmt == "bin"
]


@pytest.mark.parametrize(("rm_dtype", "sft_format", "extra_in", "lam"), CASES)
def test_dogerm_output_is_the_reference_model(pair, tmp_path, rm_dtype, sft_format, extra_in, lam):
    rm_dir, sft_dir = pair
    out = tmp_path / "merged"
    _run(rm_dir, sft_dir, lam, out, via_cli=(lam == 0.3 and sft_format == "bin"))

    # transformers loads it as what it is, with nothing missing or left over.
    model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True, **_dtype("auto"))
    assert isinstance(model, LlamaForSequenceClassification)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys") and not info.get("error_msgs"), info
    tok = AutoTokenizer.from_pretrained(out)

    rm, sft, rm_vocab, sft_vocab = _load_inputs(rm_dir, sft_dir)
    ref_sd, union = reference_dogerm(rm, sft, rm_vocab, sft_vocab, lam)
    assert union == V + 1

    # Config: the RM's, with the union vocabulary.
    config = AutoConfig.from_pretrained(out)
    assert config.vocab_size == union == model.config.vocab_size
    assert model.get_input_embeddings().weight.shape == (union, HIDDEN)
    assert config.architectures == ["LlamaForSequenceClassification"] and config.num_labels == 1
    assert config.pad_token_id == rm.config.pad_token_id
    assert model.dtype == rm_dtype

    # Tokenizer: the RM's, knowing the extra token with the id it had.
    assert tok.convert_tokens_to_ids(EXTRA) == V and tok.get_vocab()[EXTRA] == V
    assert len(tok) == union
    assert tok(f"one plus {EXTRA} two")["input_ids"][-2] == V
    rm_tok = AutoTokenizer.from_pretrained(rm_dir)
    assert [tok(t)["input_ids"] for t in TEXTS] == [rm_tok(t)["input_ids"] for t in TEXTS]

    # Weights: exactly the reference, as transformers loaded them and as the files hold them.
    got = model.state_dict()
    assert set(got) == set(ref_sd)
    for name, want in ref_sd.items():
        assert got[name].dtype == want.dtype == rm_dtype, name
        assert torch.equal(got[name], want), f"{name} differs from the reference (lam={lam})"
    on_disk = load_folder(out)
    assert set(on_disk) == set(ref_sd)
    assert all(torch.equal(on_disk[k], ref_sd[k]) for k in ref_sd)
    emb = got["model.embed_tokens.weight"]
    if extra_in == "sft":
        assert torch.equal(emb[V], sft.get_input_embeddings().weight[V].to(rm_dtype))
    else:
        assert torch.equal(emb[V], rm.get_input_embeddings().weight[V])

    # Anchors that need no reference: lam = 0 is the RM, lam = 1 the SFT body with the RM head.
    rm_sd, sft_sd = rm.state_dict(), sft.state_dict()
    body = [k for k in ref_sd if k not in ("model.embed_tokens.weight", "score.weight")]
    assert torch.equal(got["score.weight"], rm_sd["score.weight"])
    if lam == 0.0:
        assert all(torch.equal(got[k], rm_sd[k]) for k in body)
        assert torch.equal(emb[:V], rm_sd["model.embed_tokens.weight"][:V])
    if lam == 1.0:
        assert all(torch.equal(got[k], sft_sd[k].to(rm_dtype)) for k in body)
        assert torch.equal(emb[:V], sft_sd["model.embed_tokens.weight"][:V].to(rm_dtype))

    # The reference as a model scores texts exactly as the merged model does.
    ref_config = AutoConfig.from_pretrained(rm_dir)
    ref_config.vocab_size = union
    # Built as from_pretrained builds (in the target dtype): `.to(dtype)` would also round the
    # non-persistent rotary buffer `inv_freq`, which from_pretrained keeps in fp32.
    reference = AutoModelForSequenceClassification.from_config(ref_config, **_dtype(rm_dtype))
    reference.load_state_dict(ref_sd, strict=True)
    ref_buffers = dict(reference.named_buffers())
    assert {k: b.dtype for k, b in model.named_buffers()} == {k: b.dtype for k, b in ref_buffers.items()}
    assert all(torch.equal(b, ref_buffers[k]) for k, b in model.named_buffers())
    texts = TEXTS + ([f"one plus {EXTRA} two equals three"] if extra_in == "sft" else [])
    got_scores = _scores(model, tok, texts)
    assert got_scores.shape == (len(texts), 1) and torch.isfinite(got_scores).all()
    assert torch.equal(got_scores, _scores(reference, tok, texts))
    if lam == 0.0:
        assert torch.equal(_scores(model, tok, TEXTS), _scores(rm, rm_tok, TEXTS))
    else:
        assert not torch.equal(_scores(model, tok, TEXTS), _scores(rm, rm_tok, TEXTS))

    _check_files(out, rm_dir, sft_dir)
