"""Merge methods beyond linear: mergekit and peft as oracles, chunk-size independence, DARE."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_folder

import lazymerge
from lazymerge.errors import RecipeError
from lazymerge.methods.dare import keep_mask
from lazymerge.methods.task_arithmetic import generalized_task_arithmetic
from lazymerge.methods_config import evaluate_setting
from lazymerge.tiny_models import build_llama as tiny_llama

MKVENV = Path("/opt/mkvenv/bin")


def _mergekit_yaml() -> str | None:
    for cand in (
        shutil.which("mergekit-yaml"),
        Path(sys.executable).parent / "mergekit-yaml",
        MKVENV / "mergekit-yaml",
    ):
        if cand and Path(cand).exists():
            return str(cand)
    return None


def _peft_python() -> str | None:
    for py in (sys.executable, str(MKVENV / "python")):
        if (
            Path(py).exists()
            and subprocess.run([py, "-c", "import peft.utils.merge_utils"], capture_output=True).returncode == 0
        ):
            return py
    return None


MERGEKIT = _mergekit_yaml()
needs_mergekit = pytest.mark.skipif(
    MERGEKIT is None, reason="mergekit-yaml not installed (pip install mergekit, or /opt/mkvenv)"
)


@pytest.fixture
def three(tmp_path: Path) -> list[Path]:
    return [tiny_llama(tmp_path / f"m{i}", i) for i in range(3)]


def _assert_bits_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        assert torch.equal(got[k].view(torch.int32), w.view(torch.int32)), k


def _configs(m: list[Path]) -> dict[str, dict]:
    base, a, b = (str(p) for p in m)
    return {
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.7}},
                {"model": b, "parameters": {"weight": [{"filter": "mlp", "value": 0.2}, {"value": -0.4}]}},
            ],
            "parameters": {"normalize": True, "lambda": 0.8},
            "dtype": "float32",
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": base},
                {"model": a, "parameters": {"weight": 0.7, "density": 0.5}},
                {"model": b, "parameters": {"weight": [0.2, 0.9], "density": 0.3}},
            ],
            "dtype": "float32",
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": a}],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
            "dtype": "float32",
        },
        "dare_ties": {  # density 1: mergekit's DARE is deterministic
            "merge_method": "dare_ties",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.5, "density": 1.0}},
                {"model": b, "parameters": {"weight": 0.3}},
            ],
            "dtype": "float32",
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.5, "density": 0.6, "gamma": 0.05}},
                {"model": b, "parameters": {"weight": 0.3, "density": 0.4}},
            ],
            "dtype": "float32",
        },
    }


@needs_mergekit
@pytest.mark.slow
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "slerp", "dare_ties", "breadcrumbs_ties"])
def test_same_bits_as_mergekit(tmp_path: Path, three: list[Path], method: str) -> None:
    assert_same_bits_as_mergekit(tmp_path, _configs(three)[method])


def mergekit_and_ours(tmp_path: Path, config: dict) -> tuple[dict, dict]:
    """Run `mergekit-yaml` and lazymerge (odd chunk size) on one config: (ours, mergekit's) tensors."""
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([MERGEKIT, str(path), str(tmp_path / "mk")], capture_output=True, env=env, timeout=300)
    want = load_folder(tmp_path / "mk")
    assert want, "mergekit wrote no weights"
    lazymerge.merge(path, tmp_path / "ours", chunk_elements=37, device="cpu")
    return load_folder(tmp_path / "ours"), want


def assert_same_bits_as_mergekit(tmp_path: Path, config: dict) -> None:
    """Run mergekit and lazymerge (odd chunk size) on one config; the tensors must be bit-equal."""
    _assert_bits_equal(*mergekit_and_ours(tmp_path, config))


@pytest.mark.slow
def test_per_tensor_ties_matches_peft(tmp_path: Path, three: list[Path]) -> None:
    # Looked for here, not in a skipif: it imports peft in a child, seconds at every collection.
    peft_python = _peft_python()
    if peft_python is None:
        pytest.skip("peft not installed (it comes with mergekit / in /opt/mkvenv)")
    base, a, b = three
    config = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 1.0}}],
        "parameters": {"density": 0.4},
    }
    lazymerge.merge(config, tmp_path / "ours", chunk_elements=50, device="cpu")
    script = f"""
import torch, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from safetensors import safe_open
from safetensors.torch import save_file
from peft.utils.merge_utils import ties
def load(d):
    import glob
    out = {{}}
    for f in sorted(glob.glob(d + "/*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({{k: h.get_tensor(k) for k in h.keys()}})
    return out
base, a, b = load({str(base)!r}), load({str(a)!r}), load({str(b)!r})
out = {{k: base[k] + ties([a[k] - base[k], b[k] - base[k]], torch.tensor([1.0, 1.0]), 0.4) for k in base}}
save_file(out, {str(tmp_path / "peft.safetensors")!r})
"""
    subprocess.run([peft_python, "-c", script], check=True, timeout=300)
    from safetensors.torch import load_file

    want = load_file(tmp_path / "peft.safetensors")
    got = load_folder(tmp_path / "ours")
    for k, w in want.items():
        # peft keeps int(density * n) elements, mergekit (and we) max(1, ...): same here.
        torch.testing.assert_close(got[k], w, rtol=0, atol=1e-6, msg=k)


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "method,extra",
    [
        ("ties", {"global_magnitude": True}),
        ("dare_ties", {"seed": 7}),
        ("dare_linear", {"seed": 3}),
        ("slerp", {"t": 0.3}),
        ("breadcrumbs", {}),
    ],
)
def test_chunk_size_does_not_change_bytes(tmp_path: Path, three: list[Path], method: str, extra: dict) -> None:
    base, a, b = (str(p) for p in three)
    models = [
        {"model": a, "parameters": {"weight": 0.6, "density": 0.3}},
        {"model": b, "parameters": {"weight": 0.4, "density": 0.5}},
    ]
    if method == "slerp":
        models = [{"model": a}]
    config = {"merge_method": method, "base_model": base, "models": models, "parameters": extra, "dtype": "bfloat16"}
    outs = []
    for chunk in (13, 1000):
        lazymerge.merge(config, tmp_path / f"out{chunk}", chunk_elements=chunk, device="cpu", max_shard_size="5kB")
        outs.append(_bytes(tmp_path / f"out{chunk}"))
    assert outs[0] == outs[1]


def test_global_ties_matches_in_memory_reference(tmp_path: Path, three: list[Path]) -> None:
    base, a, b = three
    weights, densities = [0.6, 0.4], [0.3, 0.5]
    config = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(m), "parameters": {"weight": w, "density": d}}
            for m, w, d in zip((a, b), weights, densities, strict=True)
        ],
        "parameters": {"global_magnitude": True},
    }
    lazymerge.merge(config, tmp_path / "out", chunk_elements=29, device="cpu")
    xs = [load_folder(p) for p in three]
    names = sorted(xs[0])
    thresholds = []
    for i, d in enumerate(densities):
        mags = torch.cat([(xs[i + 1][n] - xs[0][n]).abs().reshape(-1) for n in names])
        k = int(d * mags.numel())
        thresholds.append(mags.sort(descending=True).values[k - 1])
    got = load_folder(tmp_path / "out")
    kept = [0, 0]
    for n in names:
        flat = [x[n].reshape(-1) for x in xs]
        keep = [(flat[i + 1] - flat[0]).abs() >= thresholds[i] for i in range(2)]
        kept = [kept[i] + int(keep[i].sum()) for i in range(2)]
        want = generalized_task_arithmetic(flat, weights, keep=keep, consensus=True, normalize=True)
        assert torch.equal(got[n].reshape(-1), want), n
    total = sum(xs[0][n].numel() for n in names)
    assert kept == [int(d * total) for d in densities]  # exactly k per model, over the whole model


def test_dare_rescales_exactly_and_drops_at_the_right_rate(tmp_path: Path, three: list[Path]) -> None:
    base, a, _ = three
    p = 0.7
    config = {
        "merge_method": "dare_linear",
        "base_model": str(base),
        "models": [{"model": str(a), "parameters": {"weight": 1.0, "density": 1 - p}}],
        "parameters": {"seed": 11},
    }
    lazymerge.merge(config, tmp_path / "out", chunk_elements=64, device="cpu")
    got, x0, x1 = load_folder(tmp_path / "out"), load_folder(base), load_folder(a)
    n_kept = n_total = 0
    density = torch.tensor(1 - p, dtype=torch.float32)
    for name in x0:
        delta = x1[name] - x0[name]
        rescaled = x0[name] + delta / density
        kept = got[name] != x0[name]
        assert torch.equal(got[name][kept], rescaled[kept]), name  # kept: delta / (1 - p), exactly
        assert torch.equal(got[name][~kept], x0[name][~kept]), name
        n_kept += int(kept.sum())
        n_total += delta.numel()
    rate = 1 - n_kept / n_total
    sigma = (p * (1 - p) / n_total) ** 0.5
    assert abs(rate - p) < 5 * sigma


def test_dare_mask_is_counter_based() -> None:
    whole = keep_mask(5, "w", 1, 0, 10_000, 0.4)
    parts = torch.cat([keep_mask(5, "w", 1, s, min(333, 10_000 - s), 0.4) for s in range(0, 10_000, 333)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, keep_mask(6, "w", 1, 0, 10_000, 0.4))
    assert not torch.equal(whole, keep_mask(5, "w", 2, 0, 10_000, 0.4))


def test_evaluate_setting_gradients_and_filters() -> None:
    assert evaluate_setting("model.layers.3.mlp.up_proj.weight", 0.5, 0.3, float) == 0.5
    assert evaluate_setting("x", [0.0, 1.0, 0.0], 0.25, float) == pytest.approx(0.5)
    setting = [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.2}]
    assert evaluate_setting("layers.0.self_attn.q", setting, 0.5, float) == 0.5
    assert evaluate_setting("layers.0.mlp.up", setting, 0.5, float) == 0.2
    assert evaluate_setting("n", [{"filter": "mlp", "value": 1.0}], 0.0, float) is None


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda c: c.update(modules={"text_decoder": {}}), "modules"),
        (lambda c: c["models"][0]["parameters"].update(epsilon=0.1), "epsilon"),
        (lambda c: c["parameters"].update(filter_wise=True), "filter_wise"),
        (lambda c: c.update(slices=[]), "slices"),
        (lambda c: c["models"][0]["parameters"].pop("weight"), "weight"),
        (lambda c: c.update(merge_method="karcher"), "karcher"),
    ],
)
def test_unsupported_keys_are_named(tmp_path: Path, three: list[Path], edit, needle: str) -> None:
    base, a, _ = three
    config = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(a), "parameters": {"weight": 1.0, "density": 0.5}}],
        "parameters": {},
    }
    edit(config)
    with pytest.raises(RecipeError, match=needle):
        lazymerge.plan_merge(config, tmp_path / "out")


def test_plan_records_method_and_params(tmp_path: Path, three: list[Path]) -> None:
    base, a, _ = three
    config = {
        "merge_method": "slerp",
        "base_model": str(base),
        "models": [{"model": str(a)}],
        "parameters": {"t": [0, 1]},
    }
    plan = lazymerge.plan_merge(config, tmp_path / "out")
    by_name = {t.name: t for t in plan.tensors}
    assert by_name["model.layers.2.mlp.up_proj.weight"].params["t"] == 1.0
    assert by_name["model.layers.1.mlp.up_proj.weight"].params["t"] == 0.5
    assert by_name["model.norm.weight"].params["t"] == 0.0
    assert json.loads(json.dumps(plan.recipe)) == plan.recipe
