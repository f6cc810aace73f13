"""`--ray` with Hub inputs: each task streams only the byte ranges its shards read (no input weight
file is downloaded whole on any node), from the commit the driver planned from; the output is byte
for byte a single-process run of the same models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import snapshot

import lazymerge

try:  # tests/ is on sys.path when it has no __init__.py (pytest rootdir import mode)
    from hub_server import HubServer
    from test_hub import upload
except ImportError:  # pragma: no cover - tests/ became a package
    from tests.hub_server import HubServer
    from tests.test_hub import upload

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")]
SHARD = "60kB"
WEIGHTS = (".safetensors", ".bin")


@pytest.fixture
def ray_with_hub(hub: HubServer) -> Iterator[object]:
    """A local 2-CPU Ray cluster whose workers talk to the local Hub server (its own cluster: the
    workers' environment is fixed when they start)."""
    try:
        import ray
    except ImportError:
        pytest.skip("ray is not installed (pip install 'lazymerge[ray]'): the Ray tests did NOT run")
    if ray.is_initialized():
        ray.shutdown()
    names = ("HF_ENDPOINT", "HF_TOKEN", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_DISABLE_XET", "HF_HUB_DISABLE_TELEMETRY")
    env = {k: os.environ[k] for k in names if k in os.environ}
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env},
    )  # fmt: skip
    yield ray
    ray.shutdown()


def test_ray_tasks_stream_hub_inputs_by_range_and_write_a_single_runs_bytes(
    hub: HubServer, ray_with_hub: object, tmp_path: Path, llama_pair: tuple[Path, Path]
) -> None:
    rm, sft = llama_pair
    upload(hub, rm, "alice/rm")
    upload(hub, sft, "alice/sft")
    # The same Hub inputs in one process (streamed too, so that nothing lands in the HF cache).
    lazymerge.dogerm(
        "alice/rm", "alice/sft", 0.3, tmp_path / "single", max_shard_size=SHARD, device="cpu", low_disk=True
    )
    hub.reset_log()
    stats = lazymerge.dogerm(
        "alice/rm", "alice/sft", 0.3, tmp_path / "ray", max_shard_size=SHARD, device="cpu", ray=True, parts=2
    )
    assert stats.device.startswith("ray: 2 parts")
    single = snapshot(tmp_path / "single")
    assert len([n for n in single if n.endswith(".safetensors")]) >= 2 and snapshot(tmp_path / "ray") == single
    weight_gets = [r for r in hub.requests if r.method == "GET" and r.filename and r.filename.endswith(WEIGHTS)]
    assert weight_gets and all(r.range for r in weight_gets)  # every weight byte came by a range request
    # Pinned: every weight read names the commit the driver planned from, not the branch.
    commits = {hub.repos[repo].branches["main"] for repo in ("alice/rm", "alice/sft")}
    assert all(any(f"/resolve/{c}/" in r.path for c in commits) for r in weight_gets)
    cache = Path(os.environ["HF_HUB_CACHE"])
    assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix in WEIGHTS]  # nothing downloaded whole
