"""`--ray`: the parts of a split merge as Ray tasks on a local cluster (127.0.0.1, 2 worker CPUs),
finalized on the driver, byte for byte a single-process run; pushed with one commit."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import cli, snapshot, stat_ids, ties_recipe

import lazymerge
from lazymerge.tiny_models import build_llama as tiny_llama

SHARD = "60kB"


def test_ray_missing_is_one_line_with_the_install_command(
    tmp_path: Path, llama_pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    rm, sft = llama_pair
    code, _, err = cli(
        capsys, "dogerm", "--reward-model", rm, "--domain-model", sft, "--weight", "0.3", "-o", tmp_path / "o", "--ray"
    )
    assert code == 2 and "--ray needs Ray" in err and "pip install 'lazymerge[ray]'" in err
    assert len(err.strip().splitlines()) == 2 and "Traceback" not in err  # the error and its hint


def _ray():
    try:
        import ray
    except ImportError:
        pytest.skip("ray is not installed (pip install 'lazymerge[ray]'): the Ray tests did NOT run")
    return ray


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[object]:
    ray = _ray()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_dogerm_equals_one_run_and_resume_keeps_finished_parts(
    ray_cluster: object, tmp_path: Path, llama_pair: tuple[Path, Path]
) -> None:
    rm, sft = llama_pair
    lazymerge.dogerm(rm, sft, 0.3, tmp_path / "single", max_shard_size=SHARD, device="cpu")
    stats = lazymerge.dogerm(rm, sft, 0.3, tmp_path / "ray", max_shard_size=SHARD, device="cpu", ray=True, parts=2)
    assert snapshot(tmp_path / "ray") == snapshot(tmp_path / "single")
    assert stats.device.startswith("ray: 2 parts") and stats.bytes_written == sum(
        p.stat().st_size for p in (tmp_path / "ray").glob("*.safetensors")
    )
    # An earlier run finished part 0 only (its task done, part 1's lost): --resume keeps part 0.
    out = tmp_path / "again"
    first = lazymerge.dogerm(rm, sft, 0.3, out, max_shard_size=SHARD, device="cpu", part="0/2")
    kept = stat_ids(out, [f.name for f in first.files])
    stats = lazymerge.dogerm(
        rm, sft, 0.3, out, max_shard_size=SHARD, device="cpu", ray=True, parts=2, resume=True
    )  # fmt: skip
    assert stats.resumed_shards == len(kept) and stat_ids(out, list(kept)) == kept
    assert snapshot(out) == snapshot(tmp_path / "single")


@pytest.mark.slow
def test_ray_ties_sweep_equals_one_sweep(ray_cluster: object, tmp_path: Path) -> None:
    base, a, b = (tiny_llama(tmp_path / f"m{i}", i) for i in range(3))
    # Model-wide statistics (global_magnitude): each part reads every input for them.
    config = ties_recipe(base, a, b, {"global_magnitude": True})
    sweep = lazymerge.Sweep("parameters.lambda", [0.5, 1.0])
    kw = {"device": "cpu", "max_shard_size": "3kB", "sweep": sweep}
    lazymerge.merge(config, tmp_path / "one-{lambda}", **kw)
    lazymerge.merge(config, tmp_path / "ray-{lambda}", ray=True, parts=3, **kw)
    for v in ("0.5", "1"):
        assert snapshot(tmp_path / f"ray-{v}") == snapshot(tmp_path / f"one-{v}")


@pytest.mark.slow
def test_ray_push_uploads_on_workers_and_commits_once(
    ray_cluster: object, tmp_path: Path, llama_pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_hub import TOKEN
    from test_sweep_hub import assert_pushed

    try:
        from hub_server import serving_hub
    except ImportError:  # pragma: no cover - tests/ became a package
        from tests.hub_server import serving_hub

    ray = _ray()
    hubs = serving_hub(tmp_path, monkeypatch, TOKEN)
    hub = next(hubs)
    try:
        # The workers must reach the test's Hub server: a cluster started with the client's settings.
        ray.shutdown()
        env = {k: v for k, v in os.environ.items() if k.startswith("HF_")}
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
        rm, sft = llama_pair
        stats = lazymerge.dogerm(
            rm, sft, 0.3, tmp_path / "out", max_shard_size=SHARD, device="cpu", ray=True, parts=2,
            push_to_hub="alice/merged",
        )  # fmt: skip
        assert stats.push is not None and stats.push.repo_id == "alice/merged"
        assert_pushed(hub, "alice/merged", tmp_path / "out", tmp_path / "back")
        assert len(hub.lfs_uploads) == len(list((tmp_path / "out").glob("*.safetensors")))
    finally:
        ray.shutdown()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # for the module fixture's teardown
        next(hubs, None)


def _dies_once_after_its_part(plans: list, inputs: list, options: object, hub: object) -> list:
    """A part runner whose worker process dies once, after part 0 wrote all its shards."""
    from lazymerge.job import run_part_job

    stats = run_part_job(plans, inputs, options, hub)  # type: ignore[arg-type]
    marker = plans[0].output_dir.parent / "worker-died"
    if options.part.index == 0 and not marker.exists():  # type: ignore[attr-defined]
        marker.write_text("once")
        os._exit(1)  # the worker process is gone: Ray retries the task
    return stats


@pytest.mark.slow
def test_ray_retries_a_lost_task_and_the_retry_keeps_its_shards(
    ray_cluster: object, tmp_path: Path, llama_pair: tuple[Path, Path]
) -> None:
    import ray

    from lazymerge.cluster import run_job_on_ray
    from lazymerge.job import plan_dogerm_job
    from lazymerge.options import HubOptions, RunOptions

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    rm, sft = llama_pair
    lazymerge.dogerm(rm, sft, 0.3, tmp_path / "single", max_shard_size=SHARD, device="cpu")
    options = RunOptions(max_shard_size=SHARD, device="cpu", ray=True, parts=2)
    job = plan_dogerm_job(rm, sft, [0.3], tmp_path / "ray", sweep=False, dtype=None, options=options, hub=HubOptions())
    [stats] = run_job_on_ray(job, _dies_once_after_its_part)
    assert (tmp_path / "worker-died").exists()  # the first attempt's worker did die
    assert stats.resumed_shards >= 1  # the retry kept what the lost attempt had finished
    assert snapshot(tmp_path / "ray") == snapshot(tmp_path / "single")
