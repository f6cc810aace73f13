"""`linear` takes every parameter form the README promises (numbers, per-layer gradients, filter
lists, both at once) and gives mergekit's bytes for the same YAML.

mergekit 0.1.5 accumulates with `addcmul_`, which torch fuses on AVX2/AVX-512 CPUs (one rounding
for `acc + x * w`); lazymerge's `linear` is declared with the same fused accumulation (see
test_linear_mergekit_exact.py), so any weights agree; `normalize` divides by mergekit's fp32
weight sum."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_methods import assert_same_bits_as_mergekit, needs_mergekit, three  # noqa: F401

import lazymerge


def _linear(m: list[Path], a_weight: object, b_weight: object, **top: object) -> dict:
    return {
        "merge_method": "linear",
        "models": [
            {"model": str(m[0]), "parameters": {"weight": a_weight}},
            {"model": str(m[1]), "parameters": {"weight": b_weight}},
        ],
        "parameters": top,
        "dtype": "float32",
    }


CASES = {
    "gradient": ([0.2, 0.8], [0.6, 0.3], {}),
    "gradient, three points, not normalized": ([0.1, 0.9, 0.3], 0.6, {"normalize": False}),
    "filter list": (
        [{"filter": "mlp", "value": 0.9}, {"value": 0.3}],
        [{"filter": "mlp", "value": 0.35}, {"value": 0.7}],
        {},
    ),
    "filter with gradient": ([{"filter": "self_attn", "value": [0, 1]}, {"value": 0.7}], 0.3, {}),
    "top-level gradient": ([0.3, 0.6, 0.45], None, {"weight": 0.125}),
}


@needs_mergekit
@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_linear_per_tensor_weights_match_mergekit(tmp_path: Path, three: list[Path], case: str) -> None:  # noqa: F811
    a, b, top = CASES[case]
    config = _linear(three, a, b, **top)
    for entry in config["models"]:
        if entry["parameters"]["weight"] is None:
            del entry["parameters"]
    assert_same_bits_as_mergekit(tmp_path, config)


def test_linear_gradient_gives_each_layer_its_weight(tmp_path: Path, three: list[Path]) -> None:  # noqa: F811
    plan = lazymerge.plan_merge(_linear(three, [0.2, 0.8], 1.0, normalize=False), tmp_path / "out")
    weights = {t.name: t.segments[0].sources[0].weight for t in plan.tensors}
    # build_llama has 3 layers: t = 0, 0.5, 1 -> 0.2, 0.5, 0.8; tensors outside layers get t = 0.
    assert weights["model.layers.0.mlp.up_proj.weight"] == pytest.approx(0.2)
    assert weights["model.layers.1.mlp.up_proj.weight"] == pytest.approx(0.5)
    assert weights["model.layers.2.mlp.up_proj.weight"] == pytest.approx(0.8)
    assert weights["model.embed_tokens.weight"] == pytest.approx(0.2)
    assert plan.recipe["models"][0]["parameters"]["weight"] == [0.2, 0.8]  # recorded as written


@pytest.mark.parametrize("n", range(1, 9))
def test_weight_sum_is_torchs_fp32_sum(n: int) -> None:
    # Up to 8 models (linear merges rarely have more); beyond, torch's lane order is not emulated.
    import random

    import torch

    from lazymerge.methods_config import weight_sum

    rng = random.Random(n)
    for _ in range(300):
        weights = [rng.uniform(-1, 2) for _ in range(n)]
        want = torch.tensor([weights], dtype=torch.float32).sum(dim=1).item()
        assert weight_sum(weights) == want, weights
