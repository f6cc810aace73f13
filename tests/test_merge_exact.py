"""Merged bytes equal an in-memory reference merge exactly, for every dtype and layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_folder, write_model

import lazymerge
from lazymerge.constants import MERGEABLE_DTYPES

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def reference_linear(xs: list[torch.Tensor], ws: list[float], out_dtype: torch.dtype, divisor: float | None = None):
    """The arithmetic contract, spelled out on whole tensors: fp32, one rounding per operation."""
    acc = xs[0].float() * torch.tensor(ws[0], dtype=torch.float32)
    for x, w in zip(xs[1:], ws[1:], strict=True):
        acc = acc + x.float() * torch.tensor(w, dtype=torch.float32)
    if divisor is not None:
        acc = acc / torch.tensor(divisor, dtype=torch.float32)
    return acc.to(out_dtype)


def reference_mergekit_linear(
    xs: list[torch.Tensor], ws: list[float], out_dtype: torch.dtype, divisor: float | None = None
) -> torch.Tensor:
    """mergekit's `linear` arithmetic: `acc.addcmul_(x, w)` from zeros (fused on AVX2/AVX-512)."""
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("torch's non-vector CPU build does not fuse addcmul_")
    acc = torch.zeros(xs[0].shape, dtype=torch.float32)
    for x, w in zip(xs, ws, strict=True):
        acc.addcmul_(x.float(), torch.tensor(w, dtype=torch.float32))
    if divisor is not None:
        acc = acc / torch.tensor(divisor, dtype=torch.float32)
    return acc.to(out_dtype)


def _words(n: int) -> list[str]:
    return ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(n - 3)]


def _pair_tensors(rm_dtype: torch.dtype, sft_dtype: torch.dtype, rm_vocab: int, sft_vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = 24

    def r(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    rm = {
        "model.embed_tokens.weight": r(rm_vocab, h, dtype=rm_dtype),
        "model.layers.0.self_attn.q_proj.weight": r(h, h, dtype=rm_dtype),
        "model.layers.0.mlp.up_proj.weight": r(3 * h + 1, h, dtype=rm_dtype),  # odd sizes cross chunks
        "model.layers.0.input_layernorm.weight": r(h, dtype=rm_dtype),
        "model.norm.weight": r(h, dtype=rm_dtype),
        "model.layers.0.buffer_i64": torch.arange(7, dtype=torch.int64),
        "model.layers.0.buffer_f64": torch.randn(5, generator=g, dtype=torch.float64),
        "model.layers.0.buffer_f8": torch.randn(9, generator=g).to(torch.float8_e4m3fn),
        "model.layers.0.buffer_u8": torch.arange(4, dtype=torch.uint8),
        "model.empty": torch.zeros(0, h, dtype=rm_dtype),
        "score.weight": r(1, h, dtype=rm_dtype),
    }
    sft = {
        k: (r(*v.shape, dtype=sft_dtype) if v.dtype in FLOATS else v.view(torch.uint8).flip(0).view(v.dtype))
        for k, v in rm.items()
    }
    del sft["score.weight"]
    sft["model.embed_tokens.weight"] = r(sft_vocab, h, dtype=sft_dtype)
    sft["lm_head.weight"] = r(sft_vocab, h, dtype=sft_dtype)
    return rm, sft


def reference_dogerm(rm: dict, sft: dict, lam: float, out_dtype: torch.dtype | None = None) -> dict:
    """DogeRM semantics with row i = token i (the tokenizers in these tests agree on ids)."""
    out = {}
    for name, x in rm.items():
        if name not in sft or x.dtype not in FLOATS or sft[name].dtype not in FLOATS:
            out[name] = x.to(out_dtype) if (out_dtype and x.dtype in FLOATS) else x
            continue
        dtype = out_dtype or x.dtype
        y = sft[name]
        if name.endswith("embed_tokens.weight"):
            n_shared = min(x.shape[0], y.shape[0])
            shared = reference_linear([x[:n_shared], y[:n_shared]], [1 - lam, lam], dtype)
            tail = x[n_shared:] if x.shape[0] > y.shape[0] else y[n_shared:]
            out[name] = torch.cat([shared, tail.to(dtype)])
        else:
            out[name] = reference_linear([x, y], [1 - lam, lam], dtype)
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        # Compare bits: NaN-safe and exact.
        assert g.contiguous().view(torch.uint8).tolist() == w.contiguous().view(torch.uint8).tolist(), name


@pytest.mark.parametrize("rm_dtype", FLOATS)
@pytest.mark.parametrize("sft_dtype", FLOATS)
def test_dogerm_matches_reference_every_dtype(tmp_path: Path, rm_dtype: torch.dtype, sft_dtype: torch.dtype) -> None:
    rm, sft = _pair_tensors(rm_dtype, sft_dtype, 40, 41)
    rm_dir = write_model(tmp_path / "rm", rm, shards=3, vocab=_words(40))
    sft_dir = write_model(tmp_path / "sft", sft, shards=2, vocab=[*_words(40), "[PAD]"])
    lazymerge.dogerm(rm_dir, sft_dir, 0.3, tmp_path / "out", max_shard_size=1500, chunk_elements=37)
    assert_same(load_folder(tmp_path / "out"), reference_dogerm(rm, sft, 0.3))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("out_dtype", ["float32", "float16", "bfloat16"])
def test_dogerm_dtype_override_and_bin_input(tmp_path: Path, fmt: str, out_dtype: str) -> None:
    rm, sft = _pair_tensors(torch.bfloat16, torch.float32, 40, 41, seed=1)
    rm_dir = write_model(tmp_path / "rm", rm, shards=2, vocab=_words(40))
    sft_dir = write_model(tmp_path / "sft", sft, shards=3, fmt=fmt, vocab=[*_words(40), "[PAD]"])
    lazymerge.dogerm(rm_dir, sft_dir, 0.25, tmp_path / "out", dtype=out_dtype, chunk_elements=64)
    want = reference_dogerm(rm, sft, 0.25, getattr(torch, out_dtype))
    assert_same(load_folder(tmp_path / "out"), want)


def test_vocab_mismatch_rm_larger_keeps_rm_rows(tmp_path: Path) -> None:
    rm, sft = _pair_tensors(torch.float16, torch.float16, 43, 40, seed=2)
    rm_dir = write_model(tmp_path / "rm", rm, vocab=[*_words(40), "<a>", "<b>", "<c>"])
    sft_dir = write_model(tmp_path / "sft", sft, vocab=_words(40))
    lazymerge.dogerm(rm_dir, sft_dir, 0.5, tmp_path / "out", chunk_elements=50)
    got = load_folder(tmp_path / "out")
    assert_same(got, reference_dogerm(rm, sft, 0.5))
    assert got["model.embed_tokens.weight"].shape[0] == 43
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]["vocab"]["<c>"] == 42


def test_vocab_union_adds_sft_tokens_to_tokenizer_and_config(tmp_path: Path) -> None:
    rm, sft = _pair_tensors(torch.float16, torch.float32, 40, 42, seed=3)
    rm_dir = write_model(tmp_path / "rm", rm, vocab=_words(40), config={"vocab_size": 40, "torch_dtype": "float16"})
    sft_dir = write_model(tmp_path / "sft", sft, vocab=[*_words(40), "[PAD]", "<extra>"])
    lazymerge.dogerm(rm_dir, sft_dir, 0.4, tmp_path / "out")
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 42
    added = {t["content"]: t["id"] for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"]}
    assert added["[PAD]"] == 40 and added["<extra>"] == 41
    assert_same(load_folder(out), reference_dogerm(rm, sft, 0.4))


def test_token_with_different_ids_is_an_error(tmp_path: Path) -> None:
    rm, sft = _pair_tensors(torch.float16, torch.float16, 40, 40, seed=4)
    words = _words(40)
    swapped = [*words[:3], words[4], words[3], *words[5:]]
    rm_dir = write_model(tmp_path / "rm", rm, vocab=words)
    sft_dir = write_model(tmp_path / "sft", sft, vocab=swapped)
    with pytest.raises(lazymerge.LazyMergeError, match="w0"):
        lazymerge.dogerm(rm_dir, sft_dir, 0.4, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_without_tokenizers_row_i_is_token_i(tmp_path: Path) -> None:
    rm, sft = _pair_tensors(torch.bfloat16, torch.bfloat16, 40, 41, seed=5)
    rm_dir = write_model(tmp_path / "rm", rm)
    sft_dir = write_model(tmp_path / "sft", sft)
    lazymerge.dogerm(rm_dir, sft_dir, 0.7, tmp_path / "out", chunk_elements=1000)
    assert_same(load_folder(tmp_path / "out"), reference_dogerm(rm, sft, 0.7))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n_models", [2, 3, 5])
def test_linear_merge_matches_reference(tmp_path: Path, normalize: bool, n_models: int) -> None:
    g = torch.Generator().manual_seed(n_models)
    dtypes = [FLOATS[i % 3] for i in range(n_models)]
    shapes = {"a.weight": (17, 5), "b.weight": (3,), "c.weight": (64, 33), "d.idx": (4,)}
    models, weights = [], []
    for i, dtype in enumerate(dtypes):
        t = {k: torch.randn(*s, generator=g).to(dtype) for k, s in shapes.items() if k != "d.idx"}
        t["d.idx"] = torch.arange(4, dtype=torch.int32) * (i + 1)
        models.append(t)
        weights.append(round(0.1 + 0.37 * i, 3))
    paths = [write_model(tmp_path / f"m{i}", t, shards=2) for i, t in enumerate(models)]
    config = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, weights, strict=True)],
        "parameters": {"normalize": normalize},
        "dtype": "bfloat16",
    }
    lazymerge.merge(config, tmp_path / "out", chunk_elements=100)
    # mergekit's denominator: the fp32 weights summed by torch (not Python's float64 sum).
    divisor = torch.tensor([weights], dtype=torch.float32).sum(dim=1).item() if normalize else None
    want = {
        k: reference_mergekit_linear([m[k] for m in models], weights, torch.bfloat16, divisor)
        for k in shapes
        if k != "d.idx"
    }
    want["d.idx"] = models[0]["d.idx"]
    assert_same(load_folder(tmp_path / "out"), want)


@pytest.mark.slow
def test_chunk_size_does_not_change_bytes(tmp_path: Path, llama_pair: tuple[Path, Path]) -> None:
    rm_dir, sft_dir = llama_pair
    outputs = []
    for chunk in (13, 4096, 1 << 20):
        out = tmp_path / f"out{chunk}"
        lazymerge.dogerm(rm_dir, sft_dir, 0.3, out, max_shard_size="100kB", chunk_elements=chunk)
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outputs[0] == outputs[1] == outputs[2]
    assert "model.safetensors.index.json" in outputs[0]


def test_mergeable_dtypes_are_the_float_ones() -> None:
    assert {"F32", "F16", "BF16"} == MERGEABLE_DTYPES
