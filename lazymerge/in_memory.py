"""A merged model in memory: a transformers model whose parameters the streaming engine fills.

`lazymerge.load(recipe)` plans the merge as for a file run (`lazymerge.job.plan_memory_job`),
builds the output model's class from the plan's `config.json` with every parameter on the meta
device (no memory), allocates each parameter once in the plan's dtype (on the CPU or a GPU) and
runs the plan with a `TensorSink`: each merged chunk is copied into its parameter's storage, so
there is no output file and no second copy of the model. Peak memory is the model plus the run's
bounded chunk buffers. `MergedModel.remerge(w)` plans the same recipe with another weight and
refills the same parameters: the inputs are streamed again (from the page cache when they fit in
RAM), or, with resident inputs (`lazymerge.resident`: by default on a GPU when both fit next to
the model), merged from device memory by the fused kernel without reading a file.

Buffers that are not in a checkpoint (the rotary embedding's `inv_freq`) are built by the model
class itself on the CPU, as `from_pretrained` does; tied parameters stay one tensor.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lazymerge._platform import peak_rss_bytes
from lazymerge.errors import MissingExtraError, PlanError
from lazymerge.events import MergeStats
from lazymerge.io.checkpoint import Checkpoint
from lazymerge.io.tensor_sink import STORAGE_DTYPES
from lazymerge.job import MergeJob, plan_memory_job, run_job_into
from lazymerge.options import HubOptions, RunOptions
from lazymerge.plan import MergePlan
from lazymerge.resident import ResidentInputs, fits_on_device, supports
from lazymerge.sweep import Sweep

__all__ = ["MergedModel", "build_skeleton", "import_transformers", "load_model"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def import_transformers() -> Any:
    """The transformers module, or a one-line error naming the extra to install."""
    try:
        import transformers
    except ImportError:
        raise MissingExtraError("a model in memory needs transformers, which is not installed") from None
    return transformers


@dataclass
class MergedModel:
    """A merged model held in memory, and the recipe it came from.

    Attributes:
        model: the transformers model (the output class of the recipe, e.g. the reward model's
            LlamaForSequenceClassification), in eval mode, without gradients.
        tokenizer: the merged model's tokenizer (None when the plan carries none).
        plan: the plan of the current parameters.
        stats: MergeStats of the last (re-)merge.
        recipe: the recipe as a dict (with the current weight).
    """

    model: Any
    tokenizer: Any
    plan: MergePlan
    stats: MergeStats
    recipe: dict
    _targets: dict[str, torch.Tensor]
    _unused: list[str]
    _opened: dict[str, Checkpoint]
    _options: RunOptions
    _hub: HubOptions
    _resident: ResidentInputs | None = None

    @property
    def resident(self) -> bool:
        """Whether the inputs are held in (device) memory and re-merged from there."""
        return self._resident is not None

    def remerge(self, value: float, key: str = "weight") -> Any:
        """Merge again with `key` set to `value` (DogeRM's `weight`, or a dotted config key such as
        `parameters.lambda`), into the same parameters. Returns the model.

        Raises:
            LazyMergeError: the new value is out of range, or changes a tensor's shape or dtype.
        """
        (spec,) = Sweep(key, [value]).variants(self.recipe)
        job = plan_memory_job(spec, self._options, self._hub, self._opened)
        self.stats = _fill(job, self._targets, self._unused, self._resident)
        self.plan, self.recipe = job.plans[0], spec
        return self.model

    def preload(self, values: Sequence[float], key: str = "weight") -> int:
        """With resident inputs, read now every input range the merges at `values` need, so that
        each later `remerge` among them reads nothing (a weight search knows its values up front;
        DogeRM at weight 0 reads the reward model alone, the next weight would read the other).
        Returns the bytes read; 0 without resident inputs (they stream at each re-merge).
        """
        if self._resident is None:
            return 0
        before = self._resident.nbytes
        for spec in Sweep(key, list(values)).variants(self.recipe):
            self._resident.load(plan_memory_job(spec, self._options, self._hub, self._opened).plans[0])
        return self._resident.nbytes - before

    def set_weight(self, weight: float) -> Any:
        """DogeRM: `remerge(weight)`."""
        return self.remerge(weight)


def load_model(
    recipe: str | Path | dict,
    options: RunOptions,
    hub: HubOptions,
    device: str = "cpu",
    resident: bool | None = None,
) -> MergedModel:
    """Plan `recipe`, build its model class empty and fill it by a streaming merge (`lazymerge.load`).

    `resident`: keep the inputs' bytes on `device` and merge from there (None: when `device` is
    CUDA, the plan is a weighted sum, Triton is usable and the inputs fit in free device memory)."""
    from lazymerge.config import load_recipe

    transformers = import_transformers()
    spec = dict(load_recipe(recipe))
    opened: dict[str, Checkpoint] = {}
    job = plan_memory_job(spec, options, hub, opened)
    plan = job.plans[0]
    config, tokenizer = _config_and_tokenizer(transformers, plan)
    model, targets, unused = build_skeleton(transformers, config, plan, device)
    keep = _resident(plan, torch.device(device), resident)
    inputs = ResidentInputs(job.checkpoints, device, workers=options.workers) if keep else None
    stats = _fill(job, targets, unused, inputs)
    return MergedModel(model, tokenizer, plan, stats, spec, targets, unused, opened, options, hub, inputs)


def _resident(plan: MergePlan, device: torch.device, wanted: bool | None) -> bool:
    if wanted is False:
        return False
    if not supports(plan):
        if wanted:
            raise PlanError("only weighted-sum merges (linear, task arithmetic, DogeRM) re-merge from resident inputs")
        return False
    if wanted:
        return True
    from lazymerge.kernels import triton as triton_kernels

    return device.type == "cuda" and triton_kernels.available()[0] and fits_on_device(plan, device)


def _fill(
    job: MergeJob, targets: dict[str, torch.Tensor], unused: list[str], resident: ResidentInputs | None
) -> MergeStats:
    if resident is None:
        return run_job_into(job, targets, unused)
    plan = job.plans[0]
    began = time.perf_counter()
    before = resident.nbytes
    with torch.no_grad():
        resident.merge_into(plan, targets)
    if resident.device.type == "cuda":
        torch.cuda.synchronize(resident.device)
    return MergeStats(
        tensors=len(plan.tensors), bytes_read=resident.nbytes - before, bytes_written=plan.total_size,
        seconds=time.perf_counter() - began, peak_rss_bytes=peak_rss_bytes(),
        device=f"{resident.device} ({resident.kernel} kernel, resident inputs)",
    )  # fmt: skip


def _config_and_tokenizer(transformers: Any, plan: MergePlan) -> tuple[Any, Any]:
    """The output's config and tokenizer, from the plan's side files (a few kB, in a temporary folder)."""
    if "config.json" not in plan.side_files:
        raise PlanError("the merge has no config.json, so its model class is unknown", hint="merge to a folder instead")
    with tempfile.TemporaryDirectory(prefix="lazymerge-config-") as tmp:
        for name, data in plan.side_files.items():
            if name == "config.json" or name in _TOKENIZER_FILES:
                (Path(tmp) / name).write_bytes(data)
        config = transformers.AutoConfig.from_pretrained(tmp)
        tokenizer = None
        if any(name in plan.side_files for name in _TOKENIZER_FILES):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tokenizer = transformers.AutoTokenizer.from_pretrained(tmp)
    return config, tokenizer


def build_skeleton(
    transformers: Any, config: Any, plan: MergePlan, device: str | torch.device = "cpu"
) -> tuple[Any, dict[str, torch.Tensor], list[str]]:
    """The model class of `config` with each parameter allocated once, uninitialised, in the
    plan's dtype on `device`, ready to be filled.

    Returns:
        (model, name -> tensor to fill for every plan tensor the model holds, the plan tensors it
        has no place for, as `from_pretrained` ignores unexpected keys).

    Raises:
        PlanError: the config names no known model class, or the model has a parameter that the
            merge does not make (from_pretrained would initialise it randomly).
    """
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise PlanError(f"config.json names no model class transformers knows ({names or 'none'})")
    with _parameters_on_meta():
        model = cls(config)
        if hasattr(model, "tie_weights"):  # as from_pretrained does: a tied head is the embedding itself
            model.tie_weights()
    model.eval()
    model.requires_grad_(False)
    planned = {t.name: t for t in plan.tensors}
    members = list(model.named_parameters(remove_duplicate=False))
    # Tied parameters are one object under several names: the merge makes it under any of them.
    made = {id(param): planned[name] for name, param in members if name in planned}
    new: dict[int, torch.nn.Parameter] = {}  # id(meta parameter) -> its allocation
    targets: dict[str, torch.Tensor] = {}
    if odd := sorted({t.dtype for t in plan.tensors if t.dtype not in STORAGE_DTYPES}):
        raise PlanError(f"this torch has no dtype for {odd[0]} tensors, so they cannot be held in memory")
    for name, param in members:
        t = made.get(id(param))
        if t is None:
            raise PlanError(
                f"{type(model).__name__} has {name}, which the merge does not make",
                hint="merge models whose checkpoints hold every parameter of the output class",
            )
        if tuple(param.shape) != tuple(t.shape):
            raise PlanError(
                f"{name}: {type(model).__name__} wants shape {tuple(param.shape)}, the merge makes {t.shape}"
            )
        if id(param) not in new:
            new[id(param)] = torch.nn.Parameter(
                torch.empty(t.shape, dtype=STORAGE_DTYPES[t.dtype], device=device), False
            )
        module_name, _, leaf = name.rpartition(".")
        model.get_submodule(module_name)._parameters[leaf] = new[id(param)]
        if name in planned:
            targets[name] = new[id(param)].data
    for name, buf in list(model.named_buffers()):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if name in planned:
            t = planned[name]
            module._buffers[leaf] = torch.empty(t.shape, dtype=STORAGE_DTYPES[t.dtype], device=device)
            targets[name] = module._buffers[leaf]
        elif buf.device != torch.device(device):
            module._buffers[leaf] = buf.to(device)
    unused = [n for n in planned if n not in targets]
    return model, targets, unused


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block lives on the meta device (no memory); buffers
    stay real, so the ones a model computes in `__init__` (rotary `inv_freq`) are right. The
    transient `torch.empty` a layer allocates is never touched, so it never becomes resident."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":  # a meta one may be tied: keep it
            meta = module._parameters[name].to("meta")
            module._parameters[name] = type(param)(meta, requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]
