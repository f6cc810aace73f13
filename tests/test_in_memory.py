"""`lazymerge.load`: a merge filled straight into a transformers model's parameters.

The oracle is the ordinary run: the same recipe merged to a folder and loaded with transformers'
`from_pretrained`. The in-memory model must hold the same bytes (parameters and buffers), give the
same scores, and keep its parameter storage across re-merges.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lazymerge  # noqa: E402
from lazymerge.errors import PlanError  # noqa: E402
from lazymerge.tiny_models import build_llama, build_llama_pair, save_model  # noqa: E402

IDS = torch.tensor([[1, 5, 6, 7, 8, 2], [1, 9, 10, 2, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def _dtype(value: object) -> dict[str, object]:
    """The dtype keyword of from_pretrained: `dtype` since transformers 4.56, `torch_dtype` before."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": value}


def _dogerm(rm: Path, sft: Path, weight: float) -> dict:
    return {"merge_method": "dogerm", "reward_model": str(rm), "domain_model": str(sft), "weight": weight}


def _written(recipe: dict, out: Path, cls: type, dtype: torch.dtype) -> torch.nn.Module:
    lazymerge.merge(recipe, out, overwrite=True)
    return cls.from_pretrained(out, **_dtype(dtype)).eval()


def _assert_same_bytes(got: torch.nn.Module, want: torch.nn.Module) -> None:
    g = dict(got.named_parameters()) | dict(got.named_buffers())
    w = dict(want.named_parameters()) | dict(want.named_buffers())
    assert set(g) == set(w)
    for name, tensor in w.items():
        assert g[name].dtype == tensor.dtype, name
        assert (
            torch.equal(g[name].view(torch.uint8), tensor.view(torch.uint8))
            if tensor.is_floating_point()
            else (torch.equal(g[name], tensor))
        ), name


@pytest.mark.parametrize("sft_format", ["bin", "safetensors"])
def test_dogerm_in_memory_equals_the_written_merge_and_remerges_in_place(tmp_path: Path, sft_format: str) -> None:
    rm, sft = build_llama_pair(tmp_path / "pair", sft_format=sft_format)  # fp16 RM, fp32 SFT, extra [PAD]
    merged = lazymerge.load(_dogerm(rm, sft, 0.3), workers=1)
    cls = transformers.LlamaForSequenceClassification
    assert type(merged.model) is cls
    assert merged.model.config.vocab_size == 513  # the union vocabulary, from the plan's config
    assert merged.tokenizer.convert_tokens_to_ids("[PAD]") == 512
    want = _written(_dogerm(rm, sft, 0.3), tmp_path / "out-0.3", cls, torch.float16)
    _assert_same_bytes(merged.model, want)
    with torch.no_grad():
        assert torch.equal(merged.model(IDS, attention_mask=MASK).logits, want(IDS, attention_mask=MASK).logits)
    assert merged.stats.files == [] and not any(tmp_path.glob("**/(in memory)"))

    storage = {n: p.data_ptr() for n, p in merged.model.named_parameters()}
    assert merged.remerge(0.75) is merged.model
    assert {n: p.data_ptr() for n, p in merged.model.named_parameters()} == storage  # refilled, not reallocated
    assert merged.recipe["weight"] == 0.75 and merged.plan.recipe["weight"] == 0.75
    _assert_same_bytes(merged.model, _written(_dogerm(rm, sft, 0.75), tmp_path / "out-0.75", cls, torch.float16))
    merged.set_weight(0.0)  # lambda 0: the reward model's bytes, copied (a copy task, not a merged chunk)
    _assert_same_bytes(merged.model, _written(_dogerm(rm, sft, 0.0), tmp_path / "out-0", cls, torch.float16))


def test_a_mergekit_recipe_in_memory_equals_the_written_merge(tmp_path: Path) -> None:
    a, b = build_llama(tmp_path / "a", seed=1), build_llama(tmp_path / "b", seed=2)
    recipe = {
        "merge_method": "ties",
        "base_model": str(a),
        "models": [{"model": str(b), "parameters": {"weight": 0.7, "density": 0.5}}],
        "parameters": {"lambda": 1.0},
        "dtype": "bfloat16",
    }
    merged = lazymerge.load(recipe, workers=1)
    cls = transformers.LlamaForCausalLM
    _assert_same_bytes(merged.model, _written(recipe, tmp_path / "out", cls, torch.bfloat16))
    merged.remerge(0.5, key="parameters.lambda")
    recipe["parameters"]["lambda"] = 0.5
    _assert_same_bytes(merged.model, _written(recipe, tmp_path / "out-half", cls, torch.bfloat16))


def test_tied_embeddings_stay_one_tensor(tmp_path: Path) -> None:
    src = build_llama(tmp_path / "src", seed=3)
    config = json.loads((src / "config.json").read_text()) | {"tie_word_embeddings": True}
    tensors = {}
    from safetensors.torch import load_file

    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    del tensors["lm_head.weight"]  # a tied model's checkpoint holds the embedding once
    tied = [
        save_model(tmp_path / f"tied{i}", {k: v * (i + 1) for k, v in tensors.items()}, config=config) for i in (1, 2)
    ]
    recipe = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in tied]}
    merged = lazymerge.load(recipe, workers=1)
    assert merged.model.lm_head.weight is merged.model.model.embed_tokens.weight
    want = _written(recipe, tmp_path / "out", transformers.LlamaForCausalLM, torch.float32)
    _assert_same_bytes(merged.model, want)


def test_a_parameter_the_merge_does_not_make_is_an_error(tmp_path: Path) -> None:
    rm, sft = build_llama_pair(tmp_path / "pair", sft_format="safetensors")
    config = json.loads((rm / "config.json").read_text()) | {"architectures": ["LlamaForCausalLM"]}
    (rm / "config.json").write_text(json.dumps(config))  # the output class wants lm_head.weight
    with pytest.raises(PlanError, match=r"lm_head\.weight, which the merge does not make"):
        lazymerge.load(_dogerm(rm, sft, 0.5))


@pytest.mark.parametrize("weights", [(0.3, 0.0, 1.0, 0.55), (0.0, 0.4)])
def test_resident_inputs_remerge_to_the_streamed_bytes(tmp_path: Path, weights: tuple[float, ...]) -> None:
    rm, sft = build_llama_pair(tmp_path / "pair", sft_format="bin", rm_dtype=torch.bfloat16)
    streamed = lazymerge.load(_dogerm(rm, sft, weights[0]), workers=1)
    resident = lazymerge.load(_dogerm(rm, sft, weights[0]), resident=True, workers=1)
    assert resident.resident and not streamed.resident
    both = weights[0] not in (0.0, 1.0)  # at 0 or 1 the plan reads one model: the other comes later
    for w in weights:
        streamed.remerge(w)
        resident.remerge(w)
        _assert_same_bytes(resident.model, streamed.model)
        # From the bytes in memory: only the first weight that needs the other model reads it.
        assert (resident.stats.bytes_read > 0) == (not both and w not in (0.0, 1.0))
        both = both or w not in (0.0, 1.0)


def test_resident_remerge_on_two_threads_equals_the_streamed_bytes_for_both_accumulations(tmp_path: Path) -> None:
    # The CPU re-merge runs the rounded sum (DogeRM) on torch's intra-op threads and mergekit's
    # fused `linear` split between a pool's threads: the same bytes as the streamed merge.
    rm, sft = build_llama_pair(tmp_path / "pair", sft_format="safetensors", rm_dtype=torch.bfloat16)
    streamed = lazymerge.load(_dogerm(rm, sft, 0.3), workers=1)
    resident = lazymerge.load(_dogerm(rm, sft, 0.3), resident=True, workers=2)
    for w in (0.3, 0.7):
        streamed.remerge(w)
        resident.remerge(w)
        _assert_same_bytes(resident.model, streamed.model)
    a, b = build_llama(tmp_path / "a", seed=1), build_llama(tmp_path / "b", seed=2)
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": 0.3}}, {"model": str(b), "parameters": {"weight": 0.7}}],
    }
    streamed = lazymerge.load(recipe, workers=1)
    resident = lazymerge.load(recipe, resident=True, workers=2)
    assert resident.resident
    before = resident.model.model.embed_tokens.weight.clone()
    for w in (0.3, 0.45):
        streamed.remerge(w, key="models.0.parameters.weight")
        resident.remerge(w, key="models.0.parameters.weight")
        _assert_same_bytes(resident.model, streamed.model)
    assert resident.recipe["models"][0]["parameters"]["weight"] == 0.45
    assert not torch.equal(resident.model.model.embed_tokens.weight, before)  # the weight took effect


def test_preload_reads_every_weights_inputs_once_up_front(tmp_path: Path) -> None:
    rm, sft = build_llama_pair(tmp_path / "pair", sft_format="safetensors")
    streamed = lazymerge.load(_dogerm(rm, sft, 0.0), workers=1)
    assert streamed.preload([0.0, 0.5]) == 0  # nothing is held: every re-merge streams
    resident = lazymerge.load(_dogerm(rm, sft, 0.0), resident=True, workers=1)  # reads the RM alone
    assert resident.preload([0.0, 0.5, 1.0]) > 0  # the SFT, which weight 0 did not read
    assert resident.preload([0.25, 0.75]) == 0  # nothing more to read
    for w in (0.5, 1.0, 0.25):
        resident.remerge(w)
        streamed.remerge(w)
        assert resident.stats.bytes_read == 0
        _assert_same_bytes(resident.model, streamed.model)


def test_resident_inputs_refuse_a_method_that_is_not_a_weighted_sum(tmp_path: Path) -> None:
    a, b = build_llama(tmp_path / "a", seed=1), build_llama(tmp_path / "b", seed=2)
    recipe = {"merge_method": "ties", "base_model": str(a), "models": [{"model": str(b), "parameters": {"weight": 1}}]}
    with pytest.raises(PlanError, match="weighted-sum"):
        lazymerge.load(recipe, resident=True)
    assert not lazymerge.load(recipe).resident  # the default streams


def test_the_fused_kernel_remerges_resident_inputs_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA re-merge path (Triton's fused kernel over resident inputs), run on the CPU by
    Triton's interpreter when there is no GPU."""
    import importlib

    pytest.importorskip("triton")
    from lazymerge.resident import ResidentInputs

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    import lazymerge.kernels.triton as lt

    if not torch.cuda.is_available() and not lt._INTERPRETED:
        lt = importlib.reload(lt)  # imported earlier without the interpreter: rebuild the kernels
    if not lt.available()[0]:
        pytest.skip(lt.available()[1])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rm, sft = build_llama_pair(tmp_path / "pair", hidden=32, inter=64, vocab=64, sft_format="safetensors")
    merged = lazymerge.load(_dogerm(rm, sft, 0.35), workers=1)
    want = {n: p.detach().clone() for n, p in merged.model.named_parameters()}
    targets = {n: torch.empty_like(p, device=device) for n, p in want.items()}
    inputs = ResidentInputs(list(merged._opened.values()), device, kernel="triton")
    inputs.merge_into(merged.plan, targets)
    for name, tensor in want.items():
        assert torch.equal(targets[name].cpu().view(torch.uint8), tensor.view(torch.uint8)), name


_MEMORY_CHILD = """
import json, sys
from pathlib import Path
import lazymerge
from lazymerge.tiny_models import build_llama_pair

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

tiny = build_llama_pair(Path(sys.argv[1]) / "tiny", sft_format="safetensors")
lazymerge.load({"merge_method": "dogerm", "reward_model": str(tiny[0]), "domain_model": str(tiny[1]),
                "weight": 0.5}, workers=1)  # imports and warms everything up
big = Path(sys.argv[1]) / "big"
# The high-water mark restarts here (ru_maxrss would keep the pytest parent's, inherited at fork).
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
merged = lazymerge.load({"merge_method": "dogerm", "reward_model": str(big / "reward-model"),
                         "domain_model": str(big / "domain-model"), "weight": 0.5}, workers=1)
loaded = status("VmHWM")
merged.remerge(0.25)
remerged = status("VmHWM")
model = sum(p.numel() * p.element_size() for p in merged.model.parameters())
print(json.dumps({"before": before, "loaded": loaded, "remerged": remerged, "model": model}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM reset)")
def test_peak_memory_is_the_model_plus_bounded_buffers(tmp_path: Path) -> None:
    """RSS as `top` shows it, in a child: loading a ~170 MB model raises the high-water mark by
    the model and the run's chunk buffers, not by a second copy; a re-merge adds nothing."""
    import subprocess
    import sys

    build_llama_pair(tmp_path / "big", hidden=1024, layers=4, vocab=32000, inter=2816, sft_format="safetensors")
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(lazymerge.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    m = json.loads(done.stdout.strip().splitlines()[-1])
    grown = m["loaded"] - m["before"]
    assert m["model"] > 150e6
    assert 0.9 * m["model"] < grown < m["model"] + 120e6, m  # a second copy would add another model
    assert m["remerged"] - m["loaded"] < 40e6, m


def test_without_transformers_load_says_which_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers import cli, dogerm_args

    from lazymerge.errors import MissingExtraError

    rm, sft = build_llama_pair(tmp_path / "pair", sft_format="safetensors")
    (tmp_path / "pairs.json").write_text(json.dumps([{"prompt": "w1", "chosen": "w2", "rejected": "w3"}]))
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # `import transformers` fails
    with pytest.raises(MissingExtraError) as err:
        lazymerge.load(_dogerm(rm, sft, 0.5))
    assert "lazymerge[eval]" in err.value.hint
    code, _, stderr = cli(capsys, *dogerm_args(rm, sft, "0.5", "--eval", tmp_path / "pairs.json"))
    assert code == 2 and "transformers, which is not installed" in stderr and "lazymerge[eval]" in stderr
