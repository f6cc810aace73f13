"""L1 rescaling of ties/breadcrumbs, DELLA and Model Stock: mergekit as the oracle where it is
deterministic, statistical bounds where it is random, chunk-size independence everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_folder, write_model
from test_methods import _bytes, assert_same_bits_as_mergekit, needs_mergekit, tiny_llama

import lazymerge
from lazymerge.errors import RecipeError
from lazymerge.methods.della import BINS, DellaRankStatistics, keep_probability
from lazymerge.methods.rescale import BLOCK, block_sums, det_sum
from lazymerge.methods.task_arithmetic import generalized_task_arithmetic


@pytest.fixture
def four(tmp_path: Path) -> list[Path]:
    return [tiny_llama(tmp_path / f"m{i}", i) for i in range(4)]


def _oracle_configs(m: list[Path]) -> dict[str, dict]:
    base, a, b, c = (str(p) for p in m)
    two = [
        {"model": a, "parameters": {"weight": 0.7, "density": 0.5, "gamma": 0.05}},
        {"model": b, "parameters": {"weight": [0.2, 0.9], "density": 0.3}},
    ]
    return {
        "ties_rescale": {
            "merge_method": "ties",
            "base_model": base,
            "models": [{"model": a, "parameters": {"weight": 0.7, "density": 0.5}}, two[1]],
            "parameters": {"rescale": True},
            "dtype": "float32",
        },
        "breadcrumbs_ties_rescale": {
            "merge_method": "breadcrumbs_ties",
            "base_model": base,
            "models": two,
            "parameters": {"rescale": True, "lambda": 0.9},
            "dtype": "float32",
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": base}, {"model": a}, {"model": b}, {"model": c}],
            "dtype": "float32",
        },
        "multislerp": {
            "merge_method": "multislerp",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.7}},
                {"model": b, "parameters": {"weight": 0.2}},
                {"model": c, "parameters": {"weight": [0.1, 0.5]}},
            ],
            "dtype": "float32",
        },
        "della_density_1": {  # density 1: mergekit's DELLA draws nothing, so it is deterministic
            "merge_method": "della",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.7, "density": 1.0}},
                {"model": b, "parameters": {"weight": 0.4}},
            ],
            "parameters": {"lambda": 1.3},
            "dtype": "float32",
        },
    }


@needs_mergekit
@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["ties_rescale", "breadcrumbs_ties_rescale", "model_stock", "multislerp", "della_density_1"]
)
def test_same_bits_as_mergekit(tmp_path: Path, four: list[Path], case: str) -> None:
    assert_same_bits_as_mergekit(tmp_path, _oracle_configs(four)[case])


def _reference_rescaled_ties(xs: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """mergekit's ties with rescale, in memory (argsort top-k, then the L1 ratio)."""
    base = xs[0].reshape(-1)
    keep, factors = [], []
    for x in xs[1:]:
        d = x.reshape(-1) - base
        k = max(1, int(density * d.numel()))
        mask = torch.zeros_like(d)
        mask[torch.argsort(d.abs(), descending=True)[:k]] = 1
        keep.append(mask.bool())
        factors.append(d.abs().sum() / (d * mask).abs().sum())
    return generalized_task_arithmetic(
        [base] + [x.reshape(-1) for x in xs[1:]], weights, keep=keep, factors=factors, consensus=True, normalize=True
    )


def test_rescale_on_a_tensor_longer_than_a_block(tmp_path: Path) -> None:
    """Beyond 32768 elements the L1 sums go by blocks: chunk-independent, within an ulp of torch's."""
    g = torch.Generator().manual_seed(0)
    shape = (300, 250)  # 75000 elements: three blocks of the L1 sums
    models = [write_model(tmp_path / f"m{i}", {"w": torch.randn(*shape, generator=g)}) for i in range(3)]
    config = {
        "merge_method": "ties",
        "base_model": str(models[0]),
        "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.3}} for m in models[1:]],
        "parameters": {"rescale": True},
    }
    outs = []
    for chunk in (999, 40_000):
        lazymerge.merge(config, tmp_path / f"out{chunk}", chunk_elements=chunk, device="cpu")
        outs.append(_bytes(tmp_path / f"out{chunk}"))
    assert outs[0] == outs[1]
    xs = [load_folder(m)["w"] for m in models]
    want = _reference_rescaled_ties(xs, [1.0, 1.0], 0.3)
    got = load_folder(tmp_path / "out999")["w"].reshape(-1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_block_sums_are_torch_sums_up_to_a_block() -> None:
    v = torch.randn(BLOCK, generator=torch.Generator().manual_seed(1))
    assert torch.equal(det_sum(block_sums(v)), v.sum())
    w = torch.randn(3 * BLOCK + 5, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(det_sum(block_sums(w)), w.double().sum().float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "method,extra",
    [
        ("ties", {"rescale": True}),
        ("breadcrumbs", {"rescale": True, "global_magnitude": True}),
        ("della", {"seed": 4, "epsilon": 0.2}),
        ("della_linear", {"rescale": False}),
        ("model_stock", {}),
        ("multislerp", {"normalize_weights": False}),
    ],
)
def test_chunk_size_does_not_change_bytes(tmp_path: Path, four: list[Path], method: str, extra: dict) -> None:
    base, a, b, _ = (str(p) for p in four)
    models = [
        {"model": a, "parameters": {"weight": 0.6, "density": 0.3}},
        {"model": b, "parameters": {"weight": 0.4, "density": 0.5}},
    ]
    if method == "model_stock":
        models = [{"model": a}, {"model": b}]
    if method == "multislerp":
        models = [{"model": a, "parameters": {"weight": 0.6}}, {"model": b, "parameters": {"weight": 0.4}}]
    config = {"merge_method": method, "base_model": base, "models": models, "parameters": extra, "dtype": "bfloat16"}
    outs = []
    for chunk in (13, 1000):
        lazymerge.merge(config, tmp_path / f"out{chunk}", chunk_elements=chunk, device="cpu", max_shard_size="5kB")
        outs.append(_bytes(tmp_path / f"out{chunk}"))
    assert outs[0] == outs[1]


def _exact_probabilities(delta: torch.Tensor, density: float, eps: float) -> torch.Tensor:
    """mergekit's della_magprune probabilities (ranks within each row; 1-D is one row)."""
    t = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    ranks = torch.argsort(torch.argsort(t.abs(), dim=1), dim=1).double() + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    return ((density - eps) + rank_norm * 2 * eps).reshape(-1)


def test_della_keeps_at_the_ranked_rates_and_rescales_exactly(tmp_path: Path, four: list[Path]) -> None:
    base, a = four[0], four[1]
    density, eps = 0.5, 0.2
    config = {
        "merge_method": "della_linear",
        "base_model": str(base),
        "models": [{"model": str(a), "parameters": {"weight": 1.0, "density": density, "epsilon": eps}}],
        "parameters": {"seed": 9},  # rescale: true is della's default
    }
    lazymerge.merge(config, tmp_path / "out", chunk_elements=41, device="cpu")
    got, x0, x1 = load_folder(tmp_path / "out"), load_folder(base), load_folder(a)
    expected = variance = observed = 0.0
    top_kept = top_n = bottom_kept = bottom_n = 0
    for name in x0:
        delta = x1[name] - x0[name]
        kept = (got[name] != x0[name]).reshape(-1)
        mask = kept.reshape(delta.shape).to(torch.float32)
        factor = delta.abs().sum() / (delta * mask).abs().sum()  # mergekit's L1 ratio, this mask
        want = x0[name] + (delta * mask) * factor
        assert torch.equal(got[name], want), name  # exact: the drop, the ratio, the arithmetic
        p = _exact_probabilities(delta, density, eps)
        expected += float(p.sum())
        variance += float((p * (1 - p)).sum())
        observed += int(kept.sum())
        top, bottom = p > density, p < density
        top_kept, top_n = top_kept + int(kept[top].sum()), top_n + int(top.sum())
        bottom_kept, bottom_n = bottom_kept + int(kept[bottom].sum()), bottom_n + int(bottom.sum())
    assert abs(observed - expected) < 5 * variance**0.5
    # Larger magnitudes are kept more often: the halves' rates are density +/- eps / 2.
    for rate, target, n in (
        (top_kept / top_n, density + eps / 2, top_n),
        (bottom_kept / bottom_n, density - eps / 2, bottom_n),
    ):
        assert abs(rate - target) < 5 * (target * (1 - target) / n) ** 0.5


def test_della_rank_estimate_is_close_to_the_exact_rank() -> None:
    g = torch.Generator().manual_seed(3)
    base, other = torch.randn(40, 3000, generator=g), torch.randn(40, 3000, generator=g)
    density, eps = 0.4, 0.1
    params = {"row": 3000, "densities": [density]}
    stats = DellaRankStatistics(params, base.numel())
    while stats.needs_pass():
        for s in range(0, base.numel(), 7001):  # chunks that straddle rows
            stats.update([base.reshape(-1)[s : s + 7001], other.reshape(-1)[s : s + 7001]], s)
        stats.end_pass()
    ranks = stats.result()
    mag = (other - base).abs().reshape(-1)
    got = keep_probability(mag, ranks, 1, 0, density, eps)
    want = _exact_probabilities(other - base, density, eps)
    worst_bin = int(ranks.count[1].max())
    assert float((got - want).abs().max()) <= 2 * eps * worst_bin / 2999 + 1e-12
    assert float((got - want).abs().mean()) < 2 * eps * 0.01  # well inside a percent of the range
    assert ranks.count[1].numel() == 40 * BINS


def test_model_stock_matches_the_formula(tmp_path: Path, four: list[Path]) -> None:
    base, *others = four
    lazymerge.merge(
        {"merge_method": "model_stock", "base_model": str(base), "models": [{"model": str(m)} for m in others]},
        tmp_path / "out",
        chunk_elements=50,
        device="cpu",
    )
    got, xs = load_folder(tmp_path / "out"), [load_folder(m) for m in four]
    for name in xs[0]:
        w0, ws = xs[0][name].reshape(-1), [x[name].reshape(-1) for x in xs[1:]]
        offs = [w - w0 for w in ws]
        cos = [
            torch.dot(offs[i], offs[j]) / (offs[i].norm() * offs[j].norm()) for i in range(3) for j in range(i + 1, 3)
        ]
        c = torch.stack(cos).mean()
        t = 3 * c / (1 + 2 * c)
        want = t * (ws[0] + ws[1] + ws[2]) / 3 + (1 - t) * w0
        torch.testing.assert_close(got[name].reshape(-1), want, rtol=1e-5, atol=1e-5, msg=name)


def test_ties_keeps_exactly_k_with_tied_magnitudes(tmp_path: Path) -> None:
    """Magnitudes tied at the threshold, in a tensor that is not the first: still exactly k kept."""
    g = torch.Generator().manual_seed(5)
    shapes = {"a": (10, 10), "b": (20, 10)}
    base = {n: torch.zeros(s) for n, s in shapes.items()}
    other = {n: torch.randint(0, 2, s, generator=g).float() * 2 - 1 for n, s in shapes.items()}  # all |d| = 1
    m0, m1 = write_model(tmp_path / "base", base), write_model(tmp_path / "other", other)
    config = {
        "merge_method": "ties",
        "base_model": str(m0),
        "models": [{"model": str(m1), "parameters": {"weight": 1.0, "density": 0.3}}],
    }
    lazymerge.merge(config, tmp_path / "out", chunk_elements=7, device="cpu")
    got = load_folder(tmp_path / "out")
    for name, shape in shapes.items():
        n = shape[0] * shape[1]
        assert int((got[name] != 0).sum()) == int(0.3 * n), name
        kept = (got[name] != 0).reshape(-1).nonzero().reshape(-1)
        assert kept.tolist() == list(range(int(0.3 * n))), name  # the first ones by position


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda c: c.update(merge_method="model_stock") or c["parameters"].update(filter_wise=True), "filter_wise"),
        (lambda c: c["models"][0]["parameters"].update(epsilon=0.6), "epsilon"),
        (lambda c: c.update(merge_method="nuslerp"), "nuslerp"),
        (lambda c: c.update(merge_method="sce"), "sce"),
        (lambda c: c.update(merge_method="multislerp") or c.pop("base_model"), "base_model"),
        (lambda c: c["parameters"].update(global_magnitude=True), "global_magnitude"),
        (lambda c: c["parameters"].update(gamma=0.1), "gamma"),
    ],
)
def test_unsupported_keys_are_named(tmp_path: Path, four: list[Path], edit, needle: str) -> None:
    base, a, b, _ = four
    config = {
        "merge_method": "della",
        "base_model": str(base),
        "models": [
            {"model": str(a), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(b), "parameters": {"weight": 1.0, "density": 0.5}},
        ],
        "parameters": {},
    }
    edit(config)
    if config["merge_method"] == "model_stock":
        for m in config["models"]:
            m.pop("parameters")
    with pytest.raises(RecipeError, match=needle):
        lazymerge.plan_merge(config, tmp_path / "out")


def test_model_stock_needs_two_models(tmp_path: Path, four: list[Path]) -> None:
    config = {"merge_method": "model_stock", "base_model": str(four[0]), "models": [{"model": str(four[1])}]}
    with pytest.raises(RecipeError, match="at least two"):
        lazymerge.plan_merge(config, tmp_path / "out")
