"""The public surface: `lazymerge.__all__` is exactly what we mean to export (as httpx tests it)."""

from __future__ import annotations

from pathlib import Path

import lazymerge

EXPECTED = {
    "HubOptions",
    "LazyMergeError",
    "MergePlan",
    "MergeStats",
    "PlanWarning",
    "ProgressEvent",
    "RunOptions",
    "Sweep",
    "__version__",
    "dogerm",
    "finalize",
    "merge",
    "open_model",
    "plan_merge",
}


def test_all_is_sorted_and_exactly_the_public_surface() -> None:
    assert lazymerge.__all__ == sorted(lazymerge.__all__)
    assert set(lazymerge.__all__) == EXPECTED


def test_every_exported_member_is_public_and_ours() -> None:
    for name in lazymerge.__all__:
        member = getattr(lazymerge, name)
        if name == "__version__":
            assert isinstance(member, str)
            continue
        assert not name.startswith("_")
        assert member.__module__.startswith("lazymerge."), (name, member.__module__)


def test_no_function_hides_a_module_of_the_same_name() -> None:
    package = Path(lazymerge.__file__).parent
    modules = {p.stem for p in package.glob("*.py")} | {p.name for p in package.iterdir() if p.is_dir()}
    assert not (set(lazymerge.__all__) & modules)
    for name in ("plan", "sweep", "execute", "api"):  # reached as modules, never shadowed by a function
        assert not callable(getattr(lazymerge, name, None)), name


def test_plan_repr_is_short(tmp_path: Path, llama_pair: tuple[Path, Path]) -> None:
    rm, sft = llama_pair
    plan = lazymerge.dogerm(rm, sft, 0.3, tmp_path / "out", dry_run=True)
    text = repr(plan)
    assert text.startswith("MergePlan(dogerm of ") and f"{len(plan.tensors)} tensors" in text
    assert len(text) < 400 and "Segment" not in text
