"""Every merge method lazymerge knows, declared once (torch-free; see `declaration.py`).

The task-vector methods are configured instances of one family, as in mergekit's registry:
`generalized_task_arithmetic` with a sparsification (none, DARE, TIES magnitude, breadcrumbs,
DELLA), with or without TIES sign consensus, and each its mergekit defaults for `normalize` and
`rescale`. Semantics of every parameter are mergekit 0.1.5's.
"""

from __future__ import annotations

from types import MappingProxyType

from lazymerge.errors import RecipeError
from lazymerge.methods.declaration import UNIT, GpuKernel, MergeMethod, Parameter, Range

__all__ = ["METHODS"]

_WEIGHTED_GPU = GpuKernel("lazymerge.kernels.triton:linear_combine")
# Non-base models one launch of the fused task-vector kernel handles, plus the base.
TASK_VECTOR_GPU = GpuKernel("lazymerge.kernels.triton_methods:task_vector_combine", min_inputs=2, max_inputs=8)

_WEIGHT = Parameter("weight", per_model=True, key="weights")
_DENSITY = Parameter("density", default=1.0, per_model=True, allowed=UNIT, key="densities", statistics=True)
_GAMMA = Parameter("gamma", default=0.01, per_model=True, allowed=UNIT, key="gammas", statistics=True)
_EPSILON = Parameter("epsilon", default=0.15, per_model=True, allowed=UNIT, key="epsilons", statistics=True)
_LAMBDA = Parameter("lambda", default=1.0)
_INT8_MASK = Parameter("int8_mask", bool, default=False, ignored=True)  # mergekit's memory saving
_SEED = Parameter("seed", int, default=0)  # lazymerge: the seed of DARE's and DELLA's masks
# lazymerge: one magnitude threshold per model over every tensor (the TIES paper's ranking).
_GLOBAL = Parameter("global_magnitude", bool, default=False, key="global", per_tensor=False)


def _della_tensor(params: dict, shape: tuple[int, ...], where: str) -> None:
    # mergekit ranks magnitudes along each row (dim 1 of a 2-D tensor; a 1-D one is one row).
    numel = 1
    for s in shape:
        numel *= s
    params["row"] = shape[-1] if len(shape) >= 2 else max(1, numel)
    for i, (d, e) in enumerate(zip(params["densities"], params["epsilons"], strict=True)):
        if 0 < d < 1 and (d + e >= 1 or d - e <= 0):
            raise RecipeError(
                f"models[{i}] tensor {where}: della needs density +/- epsilon in (0, 1), "
                f"got density {d} and epsilon {e}",
                hint="lower `epsilon` (mergekit raises the same error)",
            )


# sparsification -> (per-model parameters beyond weight, module, statistics factory)
_SPARSIFY: dict[str | None, tuple[tuple[Parameter, ...], str, str | None]] = {
    None: ((), "task_arithmetic", None),
    "dare": ((_DENSITY,), "dare", None),
    "magnitude": ((_DENSITY,), "ties", "ties_statistics"),
    "breadcrumbs": ((_DENSITY, _GAMMA), "ties", "breadcrumbs_statistics"),
    "della": ((_DENSITY, _EPSILON), "della", "della_statistics"),
}


def _task_vector(
    name: str,
    *,
    sparsify: str | None,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    url: str,
    gpu: GpuKernel | None = None,
) -> MergeMethod:
    """One configured instance of mergekit's `GeneralizedTaskArithmeticMerge`."""
    per_model, module, statistics = _SPARSIFY[sparsify]
    global_ranking = sparsify in ("magnitude", "breadcrumbs")
    parameters = (
        _WEIGHT,
        *per_model,
        Parameter("normalize", bool, default=normalize),
        Parameter("rescale", bool, default=rescale, statistics=True),
        _LAMBDA,
        _INT8_MASK,
        _SEED,
        *((_GLOBAL,) if global_ranking else ()),
    )
    return MergeMethod(
        name,
        url,
        parameters,
        chunk=f"lazymerge.methods.{module}:{name}",
        statistics=f"lazymerge.methods.{module}:{statistics}" if statistics else None,
        global_flag="global" if global_ranking else None,
        gpu=gpu,
        family="task_vector",
        options=MappingProxyType({"sparsify": sparsify, "consensus": consensus}),
        check_tensor=_della_tensor if sparsify == "della" else None,
    )


_TIES = "https://arxiv.org/abs/2306.01708"
_DARE = "https://arxiv.org/abs/2311.03099"
_BREADCRUMBS = "https://arxiv.org/abs/2312.06795"
_DELLA = "https://arxiv.org/abs/2406.11617"

_DECLARED = (
    MergeMethod(
        "linear",
        "https://arxiv.org/abs/2203.05482",
        (
            Parameter("weight", default=1.0, per_model=True, key="weights"),
            Parameter("normalize", bool, default=True),
        ),
        chunk="lazymerge.methods.linear:linear",
        needs_base=False,
        min_models=2,
        gpu=_WEIGHTED_GPU,
        weighted_sum=True,
        accumulation="fused",  # mergekit's `result.addcmul_(x, w)`: its bytes for the same YAML
    ),
    MergeMethod(
        "weighted_sum",
        "https://arxiv.org/abs/2407.01470",
        (
            Parameter("weight", default=1.0, per_model=True, key="weights"),
            Parameter("normalize", bool, default=False),
        ),
        chunk="lazymerge.methods.linear:weighted_sum",
        needs_base=False,
        gpu=_WEIGHTED_GPU,
        weighted_sum=True,
        # DogeRM's reference arithmetic (product and sum rounded apart), also copies, dtype
        # changes and passthrough scales: what a plan builds when no recipe method is named.
        accumulation="rounded",
        internal=True,
    ),
    _task_vector(
        "task_arithmetic",
        sparsify=None,
        consensus=False,
        normalize=False,
        rescale=False,
        url="https://arxiv.org/abs/2212.04089",
        gpu=TASK_VECTOR_GPU,
    ),
    _task_vector("ties", sparsify="magnitude", consensus=True, normalize=True, rescale=False, url=_TIES),
    _task_vector(
        "dare_linear", sparsify="dare", consensus=False, normalize=False, rescale=True, url=_DARE, gpu=TASK_VECTOR_GPU
    ),
    _task_vector(
        "dare_ties", sparsify="dare", consensus=True, normalize=False, rescale=True, url=_DARE, gpu=TASK_VECTOR_GPU
    ),
    _task_vector(
        "breadcrumbs", sparsify="breadcrumbs", consensus=False, normalize=False, rescale=False, url=_BREADCRUMBS
    ),
    _task_vector(
        "breadcrumbs_ties", sparsify="breadcrumbs", consensus=True, normalize=False, rescale=False, url=_BREADCRUMBS
    ),
    _task_vector("della", sparsify="della", consensus=True, normalize=True, rescale=True, url=_DELLA),
    _task_vector("della_linear", sparsify="della", consensus=False, normalize=False, rescale=True, url=_DELLA),
    MergeMethod(
        "slerp",
        "https://en.wikipedia.org/wiki/Slerp",
        (Parameter("t", allowed=UNIT),),
        chunk="lazymerge.methods.slerp:slerp",
        statistics="lazymerge.methods.slerp:slerp_statistics",
        max_models=1,
    ),
    MergeMethod(
        "model_stock",
        "https://arxiv.org/abs/2403.19522",
        (
            Parameter(
                "filter_wise",
                bool,
                default=False,
                ignored=True,
                choices=(False,),
                hint="remove `filter_wise`: lazymerge computes one angle per tensor, mergekit's default",
            ),
        ),
        chunk="lazymerge.methods.model_stock:model_stock",
        statistics="lazymerge.methods.model_stock:model_stock_statistics",
        min_models=2,
    ),
    MergeMethod(
        "multislerp",
        "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        (
            _WEIGHT,
            Parameter("normalize_weights", bool, default=True),
            Parameter("eps", default=1e-8, allowed=Range(0.0, None, low_open=True)),
        ),
        chunk="lazymerge.methods.multislerp:multislerp",
        statistics="lazymerge.methods.multislerp:multislerp_statistics",
    ),
)

METHODS: dict[str, MergeMethod] = {m.name: m for m in _DECLARED}
