"""Each merge method declared once: complete declarations, values checked where they enter.

A declaration (`lazymerge.methods.registry`) holds a method's parameters with their types,
defaults, scope and allowed range, its base-model need, chunk function, statistics passes and
GPU kernel. Recipes are refused with the allowed range in the message when a value is outside
it, and NaN, infinities and overflowing numbers (`1e309`) are never accepted. DogeRM's lambda
at 0 and 1 selects the reward model / the domain model instead of multiplying (0 * inf = NaN).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_folder, write_model

import lazymerge
from lazymerge import methods
from lazymerge.cli import main
from lazymerge.errors import RecipeError
from lazymerge.kernels.device import gpu_capable
from lazymerge.methods import REQUIRED, Range, check_value

NAMES = methods.names()


def _tensors(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=g).to(dtype),
        "model.layers.1.mlp.up_proj.weight": torch.randn(6, 4, generator=g).to(dtype),
        "model.norm.weight": torch.randn(4, generator=g).to(dtype),
    }


@pytest.fixture
def three(tmp_path: Path) -> list[Path]:
    return [write_model(tmp_path / f"m{i}", _tensors(i)) for i in range(3)]


# -- declarations -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_method_has_a_complete_declaration(name: str) -> None:
    m = methods.get(name)
    assert m.name == name and m.reference_url.startswith("https://")
    assert callable(m.combine), "the chunk function resolves"
    if m.needs_statistics:
        assert m.global_flag is None or any(p.params_key == m.global_flag for p in m.parameters)
        assert callable(m.new_statistics)
    assert m.min_models >= 1 and (m.max_models is None or m.max_models >= m.min_models)
    seen = set()
    for p in m.parameters:
        assert p.name not in seen, f"{name} declares {p.name} twice"
        seen.add(p.name)
        assert p.kind in (bool, int, float)
        if p.default is not REQUIRED:
            assert p.check(p.default) == p.default, f"{name}.{p.name}: the default is valid"
        if p.per_model:
            assert p.params_key != p.name, "per-model values are lists under a plural key"
    if m.gpu is not None:
        assert callable(m.gpu_kernel)
    if m.weighted_sum:
        assert m.gpu is not None and not m.needs_statistics and not m.needs_base


def test_the_task_vector_methods_are_one_family() -> None:
    family = [n for n in NAMES if methods.get(n).family == "task_vector"]
    assert set(family) == {
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
    }
    for n in family:
        opts = methods.get(n).options
        assert set(opts) == {"sparsify", "consensus"}
        assert opts["consensus"] == (n in ("ties", "dare_ties", "breadcrumbs_ties", "della"))


def test_gpu_capability_comes_from_the_declaration() -> None:
    pytest.importorskip("triton")
    import lazymerge.kernels.triton_methods as tm

    with_kernel = [n for n in NAMES if methods.get(n).gpu is not None]
    assert set(tm.GPU_METHODS) == {n for n in with_kernel if not methods.get(n).weighted_sum}
    for n in NAMES:
        for k in (1, 2, 8, 9, 20):
            assert gpu_capable(n, k) == methods.get(n).gpu_capable(k)
    assert gpu_capable("linear", 20) and gpu_capable("dare_ties", 8)
    assert not gpu_capable("dare_ties", 9) and not gpu_capable("ties", 3)


def test_declarations_and_the_resolver_are_torch_free() -> None:
    code = (
        "import sys, lazymerge.methods, lazymerge.methods_config, lazymerge.config\n"
        "[lazymerge.methods.get(n).parameters for n in lazymerge.methods.names()]\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_check_value_says_the_range() -> None:
    assert str(Range(0.0, 1.0)) == "[0, 1]"
    assert str(Range(0.0, None, low_open=True)) == "(0, inf)"
    assert check_value("density", "0.5", float, Range(0.0, 1.0)) == 0.5
    with pytest.raises(RecipeError, match=r"density must be in \[0, 1\], got 1\.5"):
        check_value("density", 1.5, float, Range(0.0, 1.0))
    for bad in (float("nan"), float("inf"), "1e309", "nan"):
        with pytest.raises(RecipeError, match="must be"):
            check_value("lambda", bad, float)
    with pytest.raises(RecipeError, match="true or false"):
        check_value("normalize", 1, bool)
    with pytest.raises(RecipeError, match="an integer"):
        check_value("seed", 1.5, int)


# -- values checked where they enter ------------------------------------------------------------


def _ties(models: list[Path], model_params: dict, top: dict | None = None, method: str = "ties") -> dict:
    base, a, b = models
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(a), "parameters": {"weight": 1.0, "density": 0.5, **model_params}},
            {"model": str(b), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "parameters": top or {},
    }


@pytest.mark.parametrize(
    "method,model_params,top,needle",
    [
        ("ties", {"density": 1.5}, {}, r"models\[0\]\.parameters\.density must be in \[0, 1\], got 1\.5"),
        ("ties", {"density": 2}, {}, r"density must be in \[0, 1\], got 2"),
        ("ties", {"density": -1}, {}, r"density must be in \[0, 1\], got -1"),
        ("ties", {"density": float("nan")}, {}, r"density must be in \[0, 1\], got nan"),
        ("ties", {"weight": float("nan")}, {}, r"weight must be a finite number, got nan"),
        ("ties", {"weight": "1e309"}, {}, r"weight must be a finite number, got '1e309'"),
        ("ties", {}, {"lambda": float("inf")}, r"parameters\.lambda must be a finite number, got inf"),
        ("ties", {}, {"lambda": "1e309"}, r"lambda must be a finite number"),
        ("ties", {}, {"lambda": [0.0, float("inf")]}, r"lambda must be a finite number"),
        ("breadcrumbs", {"gamma": 1.5}, {}, r"gamma must be in \[0, 1\], got 1\.5"),
        ("della", {"epsilon": -0.1}, {}, r"epsilon must be in \[0, 1\], got -0\.1"),
        ("dare_ties", {}, {"seed": 0.5}, r"seed must be an integer"),
        ("ties", {}, {"normalize": "yes"}, r"normalize must be true or false"),
        ("ties", {"lambda": 0.5}, {}, r"lambda is a global parameter"),
    ],
)
def test_out_of_range_and_non_finite_are_refused(
    tmp_path: Path, three: list[Path], method: str, model_params: dict, top: dict, needle: str
) -> None:
    with pytest.raises(RecipeError) as info:
        lazymerge.plan_merge(_ties(three, model_params, top, method), tmp_path / "out")
    text = f"{info.value} hint: {info.value.hint}"
    assert re.search(needle, text), text


@pytest.mark.parametrize(
    "config,needle",
    [
        ({"merge_method": "slerp", "parameters": {"t": 1.5}}, r"t must be in \[0, 1\], got 1\.5"),
        ({"merge_method": "multislerp", "parameters": {"weight": 1.0, "eps": 0}}, r"eps must be in \(0, inf\), got 0"),
        ({"merge_method": "task_arithmetic", "parameters": {"weight": float("-inf")}}, "weight must be a finite"),
    ],
)
def test_other_methods_check_their_ranges(tmp_path: Path, three: list[Path], config: dict, needle: str) -> None:
    base, a, b = three
    models = [{"model": str(a)}] if config["merge_method"] == "slerp" else [{"model": str(a)}, {"model": str(b)}]
    spec = {**config, "base_model": str(base), "models": models}
    with pytest.raises(RecipeError, match=needle):
        lazymerge.plan_merge(spec, tmp_path / "out")


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "'1e309'", "1e309"])
def test_linear_weight_from_yaml_is_refused_in_one_line(tmp_path: Path, three: list[Path], capsys, value: str) -> None:
    _, a, b = three
    recipe = tmp_path / "linear.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: {value}}}\n  - model: {b}\n"
    )
    code = main(["merge", str(recipe), "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "internal error" not in err, err
    assert "models[0].parameters.weight must be a finite number" in err
    assert not (tmp_path / "out").exists()


def test_ties_lambda_and_density_nan_from_yaml(tmp_path: Path, three: list[Path], capsys) -> None:
    base, a, b = three
    for top, needle in (
        ("{lambda: .inf}", "lambda must be a finite number"),
        ("{density: .nan}", "density must be in"),
    ):
        recipe = tmp_path / "ties.yml"
        recipe.write_text(
            f"merge_method: ties\nbase_model: {base}\nparameters: {top}\n"
            f"models:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n  - model: {b}\n    parameters: {{weight: 1.0}}\n"
        )
        code = main(["merge", str(recipe), "-o", str(tmp_path / "out"), "-q"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and "internal error" not in err, err
        assert needle in err


@pytest.mark.parametrize("weight", [".nan", ".inf", "'1e309'", "2", "-1"])
def test_dogerm_recipe_weight_is_finite_and_in_unit_range(tmp_path: Path, three: list[Path], capsys, weight) -> None:
    _, a, b = three
    recipe = tmp_path / "dogerm.yml"
    recipe.write_text(f"merge_method: dogerm\nreward_model: {a}\ndomain_model: {b}\nweight: {weight}\n")
    code = main(["merge", str(recipe), "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "between 0 and 1" in err


def test_dogerm_sweep_weights_are_checked(tmp_path: Path, three: list[Path]) -> None:
    _, a, b = three
    for bad in (float("nan"), float("inf"), 1.5):
        with pytest.raises(RecipeError, match="between 0 and 1"):
            lazymerge.dogerm(a, b, [0.5, bad], tmp_path / "out-{weight}", dry_run=True)


# -- DogeRM's lambda at its ends: select, don't multiply ------------------------------------------


def _with_specials(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = _tensors(seed, dtype)
    w = out["model.layers.0.mlp.up_proj.weight"]
    w[0, 0], w[0, 1], w[0, 2], w[0, 3] = float("inf"), float("-inf"), float("nan"), -0.0
    out["model.norm.weight"][0] = -0.0
    emb = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed)).to(dtype)
    emb[1, 1], emb[2, 2] = float("inf"), -0.0
    out["model.embed_tokens.weight"] = emb  # the union-vocabulary path (same rows, no tokenizer)
    return out


def _dogerm(tmp_path: Path, rm: Path, sft: Path, weight: str, *extra: str) -> dict[str, torch.Tensor]:
    out = tmp_path / f"out-{weight}-{len(extra)}"
    argv = ["dogerm", "--reward-model", str(rm), "--domain-model", str(sft), "--weight", weight]
    assert main([*argv, "-o", str(out), "-q", "--device", "cpu", *extra]) == 0
    return load_folder(out)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.mark.parametrize("weight", ["0", "1"])
def test_dogerm_lambda_end_is_exactly_one_model(tmp_path: Path, weight: str) -> None:
    # Inf, NaN and -0.0 in both models: 0 * inf would be NaN, and x + 0.0 turns -0.0 into +0.0.
    rm_t, sft_t = _with_specials(1, torch.float16), _with_specials(2, torch.float16)
    sft_t["model.layers.1.mlp.up_proj.weight"][2, 2] = float("inf")
    rm = write_model(tmp_path / "rm", rm_t)
    sft = write_model(tmp_path / "sft", sft_t)
    want = rm_t if weight == "0" else sft_t
    got = _dogerm(tmp_path, rm, sft, weight)
    for name, t in want.items():
        assert got[name].dtype == t.dtype
        assert torch.equal(_bits(got[name]), _bits(t)), name


@pytest.mark.parametrize("weight", ["0", "1"])
def test_dogerm_lambda_end_casts_like_the_merge(tmp_path: Path, weight: str) -> None:
    # The selected model in another dtype: the same fp32 -> dtype rounding (RNE) as any merge.
    rm_t, sft_t = _with_specials(3, torch.float16), _with_specials(4, torch.float32)
    rm_t["model.layers.0.mlp.up_proj.weight"][1, 0] = float("inf")
    sft_t["model.layers.0.mlp.up_proj.weight"][1, 1] = 1.0 + 2.0**-11  # a tie: RNE rounds to even
    rm = write_model(tmp_path / "rm", rm_t)
    sft = write_model(tmp_path / "sft", sft_t)
    got = _dogerm(tmp_path, rm, sft, weight, "--dtype", "bfloat16")
    want = rm_t if weight == "0" else sft_t
    for name, t in want.items():
        expected = t.float().to(torch.bfloat16)
        nan = torch.isnan(expected)
        assert torch.equal(torch.isnan(got[name]), nan), name
        assert torch.equal(_bits(got[name])[~nan], _bits(expected)[~nan]), name
