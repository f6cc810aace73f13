"""Which weight? A search that merges into memory and scores preference pairs, writing no model.

DogeRM's result is a curve: reward accuracy against lambda. `search_weights` loads the merged model once
(`lazymerge.load`), tokenizes the pairs once, and for each value of the sweep re-merges the same
parameters in place (`MergedModel.remerge`) and scores every pair. The best value is the one with
the highest accuracy (the first of them, in the order given, on a tie). Writing or pushing the
best model is an ordinary run (`lazymerge.dogerm`/`merge` with that value): the CLI does it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lazymerge.errors import EvalDataError, OutputError, RecipeError
from lazymerge.options import HubOptions, RunOptions
from lazymerge.pairs import Pair
from lazymerge.sweep import Sweep

__all__ = ["SearchResult", "WeightResult", "search_weights", "write_plot"]


@dataclass
class WeightResult:
    """The accuracy of one value of the sweep, and what it cost."""

    weight: float
    accuracy: float
    correct: int
    pairs: int
    subsets: dict[str, tuple[int, int]] = field(default_factory=dict)  # subset -> (correct, pairs)
    merge_seconds: float = 0.0
    score_seconds: float = 0.0


@dataclass
class SearchResult:
    """Every value's accuracy, and the best value."""

    key: str
    results: list[WeightResult]
    load_seconds: float = 0.0  # building the model and its first merge

    @property
    def best(self) -> float:
        """The value with the highest accuracy (the first one on a tie)."""
        return max(self.results, key=lambda r: r.accuracy).weight  # max keeps the first maximum

    def to_json(self) -> dict:
        """`{"results": [{"weight", "accuracy", "pairs", "subsets": {...}}, ...], "best": w}`."""
        return {
            "results": [
                {
                    "weight": r.weight,
                    "accuracy": r.accuracy,
                    "correct": r.correct,
                    "pairs": r.pairs,
                    "subsets": {
                        name: {"accuracy": c / n, "correct": c, "pairs": n}
                        for name, (c, n) in sorted(r.subsets.items())
                    },
                    "merge_seconds": round(r.merge_seconds, 4),
                    "score_seconds": round(r.score_seconds, 4),
                }
                for r in self.results
            ],
            "best": self.best,
            "key": self.key,
        }

    def write_report(self, path: str | os.PathLike[str]) -> Path:
        """Write `to_json()` to `path` (JSON). Raises OutputError when it cannot be written."""
        path = Path(path)
        try:
            path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror}") from None
        return path


def search_weights(
    recipe: str | os.PathLike[str] | dict,
    sweep: Sweep,
    pairs: Sequence[Pair] | str | os.PathLike[str],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    device: str = "cpu",
    resident: bool | None = None,
    options: RunOptions | None = None,
    hub: HubOptions | None = None,
    on_result: Callable[[WeightResult], None] | None = None,
) -> SearchResult:
    """Score `pairs` with the model `recipe` makes at each value of `sweep`, merged in memory.

    Args:
        recipe: as for `lazymerge.load` (DogeRM: `{"merge_method": "dogerm", ...}`; its `dtype`
            is the dtype the model scores in).
        sweep: the values to try, e.g. `Sweep("weight", [0, 0.05, ..., 1])`.
        pairs: the preference pairs (`lazymerge.pairs.load_pairs`), or a file or Hub dataset id
            to read them from with `load_pairs`'s defaults.
        batch_size: texts per forward pass. max_length: tokens kept per text (default: all).
        device: where the model lives ("cpu" or "cuda"). resident: see `lazymerge.load`.
        options, hub: as for `lazymerge.load`.
        on_result: called with each value's result as soon as it is scored.

    Returns:
        SearchResult (`.best`, `.to_json()`).

    Raises:
        LazyMergeError: as for `lazymerge.load`; EvalDataError when no pair is given.

    Example:
        >>> result = lazymerge.search_weights(
        ...     {"merge_method": "dogerm", "reward_model": "rm", "domain_model": "sft", "weight": 0},
        ...     lazymerge.Sweep("weight", [0, 0.25, 0.5, 0.75, 1]), "pairs.jsonl")
        >>> result.best, result.to_json()["results"][0]["accuracy"]
    """
    from lazymerge.in_memory import load_model
    from lazymerge.scoring import accuracy, encode_pairs, score_texts

    if isinstance(pairs, (str, os.PathLike)):
        from lazymerge.pairs import load_pairs

        pairs = load_pairs(pairs, token=(hub or HubOptions()).token)
    if not pairs:
        raise EvalDataError("no preference pairs to score")
    if batch_size < 1:
        raise RecipeError(f"the batch size must be >= 1, got {batch_size}")
    from lazymerge.config import load_recipe

    base = next(iter(Sweep(sweep.key, sweep.values[:1]).variants(load_recipe(recipe))))
    began = time.perf_counter()
    merged = load_model(base, options or RunOptions(), hub or HubOptions(), device=device, resident=resident)
    merged.preload(sweep.values, key=sweep.key)  # resident inputs: every byte read once, here
    load_seconds = time.perf_counter() - began
    encoded = encode_pairs(merged.tokenizer, pairs, max_length)
    results = []
    for i, value in enumerate(sweep.values):
        began = time.perf_counter()
        if i:
            merged.remerge(value, key=sweep.key)
        merged_at = time.perf_counter()
        merge_seconds = merged_at - began if i else merged.stats.seconds  # the first merge is part of the load
        scores = score_texts(merged.model, encoded.ids, batch_size)
        acc = accuracy(encoded.pairs, scores)
        result = WeightResult(
            value, acc.value, acc.correct, acc.pairs, dict(acc.subsets), merge_seconds, time.perf_counter() - merged_at,
        )  # fmt: skip
        results.append(result)
        if on_result is not None:
            on_result(result)
    return SearchResult(sweep.key, results, load_seconds)


def write_plot(result: SearchResult, path: str | os.PathLike[str]) -> Path | None:
    """A PNG of accuracy against the swept value (overall and per subset); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    xs = [r.weight for r in result.results]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r.accuracy for r in result.results], marker="o", label="all pairs", linewidth=2)
    for name in sorted({s for r in result.results for s in r.subsets}):
        ys = [r.subsets[name][0] / r.subsets[name][1] if name in r.subsets else float("nan") for r in result.results]
        ax.plot(xs, ys, marker=".", linestyle="--", label=name)
    ax.axvline(result.best, color="grey", linewidth=0.8)
    ax.set_xlabel(result.key)
    ax.set_ylabel("accuracy (chosen > rejected)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        plt.close(fig)
    return path
