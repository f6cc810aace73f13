"""A push overlapping the merge: sha256 computed while writing, uploads while the next shard merges.

Each pushed shard's plain sha256 (the LFS object id) is computed by its writer, in file order,
from the blocks it writes (both writers, blocks of several sizes), recorded in the manifest, and
given to huggingface_hub, which then never reads a shard to hash it. With delete_after_upload a
closed shard uploads while the next one is written: at most two shards on disk, and the merge
does not wait for each upload.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
import torch

import lazymerge
from lazymerge.io import digest, direct
from lazymerge.io.hub_upload import HubPusher

try:  # tests/ is on sys.path when it has no __init__.py (pytest rootdir import mode)
    from hub_server import HubServer
    from test_hub import SHARD, TOKEN, DiskWatch, pair  # pair: a fixture
except ImportError:  # pragma: no cover - tests/ became a package
    from tests.hub_server import HubServer
    from tests.test_hub import SHARD, TOKEN, DiskWatch, pair  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def _no_second_read(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.lfs

    def refuse(*_: object, **__: object) -> bytes:
        raise AssertionError("a shard was read again to hash it")

    monkeypatch.setattr(huggingface_hub.lfs, "sha_fileobj", refuse)


@pytest.mark.parametrize("direct_write", ["1", "0"], ids=["o_direct", "buffered"])
@pytest.mark.parametrize("block", [8192, 16 << 20], ids=["many-blocks", "one-block"])
def test_pushed_shards_sha256_computed_while_written(
    hub: HubServer,
    pair: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    direct_write: str,
    block: int,
) -> None:
    monkeypatch.setenv("LAZYMERGE_DIRECT_WRITE", direct_write)
    monkeypatch.setattr(digest, "BLOCK_BYTES", block)  # many blocks per shard: the order matters
    monkeypatch.setattr(direct, "BLOCK_BYTES", block)
    _no_second_read(monkeypatch)
    out = tmp_path / "out"
    stats = lazymerge.dogerm(*pair, 0.3, out, max_shard_size=SHARD, push_to_hub="alice/m", device="cpu")
    entries = json.loads((out / "lazymerge_manifest.json").read_text())["shards"]
    on_hub = hub.files("alice/m")
    assert len(entries) >= 2
    for name, entry in entries.items():
        plain = hashlib.sha256((out / name).read_bytes()).hexdigest()
        assert entry["sha256"] == plain == on_hub[name].sha256  # the server checks it against the bytes too
    assert stats.push is not None and sorted(stats.push.uploaded) == sorted(entries)


def test_unpushed_merge_computes_no_sha256(pair: tuple[Path, Path], tmp_path: Path) -> None:
    lazymerge.dogerm(*pair, 0.3, tmp_path / "out", max_shard_size=SHARD, device="cpu")
    entries = json.loads((tmp_path / "out" / "lazymerge_manifest.json").read_text())["shards"]
    assert entries and not any("sha256" in e for e in entries.values())


@pytest.mark.slow
def test_delete_after_upload_uploads_while_the_next_shard_merges(
    hub: HubServer, pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.shape(up=2e6)  # ~0.15 s per shard upload: slower than merging one
    closed: dict[str, float] = {}
    uploaded: dict[str, float] = {}
    original = HubPusher._upload

    def timed_upload(self, job) -> None:  # type: ignore[no-untyped-def]
        original(self, job)
        uploaded[job.name] = time.monotonic()

    monkeypatch.setattr(HubPusher, "_upload", timed_upload)
    out = tmp_path / "out"
    is_shard = lambda p: p.name.endswith((".safetensors", ".safetensors.partial"))  # noqa: E731
    watch = DiskWatch({"output": (out, is_shard)})
    lock = threading.Lock()

    def progress(event) -> None:  # type: ignore[no-untyped-def]
        watch.sample()
        if event.kind == "shard":
            with lock:
                closed[event.shard] = time.monotonic()

    with watch:
        stats = lazymerge.dogerm(
            *pair, 0.3, out, max_shard_size=SHARD, push_to_hub="alice/m", delete_after_upload=True,
            device="cpu", progress=progress,
        )  # fmt: skip
    names = [p.name for p in stats.files]
    largest = max(s for s in (len(hub.read("alice/m", n)) for n in names))
    assert len(names) >= 3
    assert 0 < watch.peak["output"] <= 2 * largest  # two shards at most
    assert not list(out.glob("*.safetensors"))
    # The merge went on while shards uploaded: a later shard closed before an earlier one was up.
    assert any(closed[names[k + 1]] < uploaded[names[k]] for k in range(len(names) - 1)), (closed, uploaded)


def test_verify_compares_the_manifest_with_the_hubs_lfs_ids(
    hub: HubServer, pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lazymerge.cli import main
    from lazymerge.verify import verify

    out = tmp_path / "out"
    lazymerge.dogerm(
        *pair, 0.3, out, max_shard_size=SHARD, push_to_hub="alice/m", delete_after_upload=True, device="cpu"
    )
    assert not list(out.glob("*.safetensors"))  # only the Hub holds the shards now
    report = verify(out, hub="alice/m")
    assert report.ok and [c.name for c in report.checks] == ["hub"], report.checks
    assert main(["verify", str(out), "--hub", "alice/m"]) == 0
    manifest = out / "lazymerge_manifest.json"
    body = json.loads(manifest.read_text())
    first = sorted(body["shards"])[0]
    body["shards"][first]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(body))
    capsys.readouterr()
    assert main(["verify", str(out), "--hub", "alice/m"]) == 2
    assert f"{first} differs on the Hub" in capsys.readouterr().out


@pytest.mark.slow
def test_streamed_push_killed_then_resumed_uploads_and_reads_nothing_twice(
    hub: HubServer, pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """kill -9 of a --low-disk --delete-after-upload push, then --resume: a shard the Hub already
    holds (deleted locally) is neither merged nor uploaded again; only the unfinished shards'
    input ranges are streamed again."""
    from lazymerge.io.reader import planned_reads
    from lazymerge.plan import iter_chunks

    try:
        from helpers import kill_during_second_upload, load_folder
        from test_hub import download_repo, upload
    except ImportError:  # pragma: no cover
        from tests.helpers import kill_during_second_upload, load_folder
        from tests.test_hub import download_repo, upload

    upload(hub, pair[0], "alice/rm")
    upload(hub, pair[1], "alice/sft")
    out = tmp_path / "out"
    args = ["dogerm", "--reward-model", "alice/rm", "--domain-model", "alice/sft", "--weight", "0.3", "-o", str(out)]
    args += ["--max-shard-size", SHARD, "--push-to-hub", "alice/m", "--low-disk", "--delete-after-upload"]
    args += ["--device", "cpu", "-q"]

    def uploaded_and_deleted() -> list[str]:
        try:
            recorded = json.loads((out / "lazymerge_manifest.json").read_text())["shards"]
        except (OSError, ValueError):
            return []
        done = {oid for oid, _ in hub.lfs_uploads}
        return [n for n, e in recorded.items() if e.get("sha256") in done and not (out / n).exists()]

    # The first shard's upload goes through; every later one is held until the child is dead
    # (killed once the first shard is deleted: its verify ends while the second body starts).
    first = kill_during_second_upload(hub, *args, settled=uploaded_and_deleted, HF_TOKEN=TOKEN)
    recorded = json.loads((out / "lazymerge_manifest.json").read_text())["shards"]
    gone = uploaded_and_deleted()
    assert len(first) == 1 and len(gone) == 1  # uploaded, then deleted locally

    rm = lazymerge.open_model("alice/rm", low_disk=True)
    sft = lazymerge.open_model("alice/sft", low_disk=True)
    plan = lazymerge.dogerm(rm, sft, 0.3, out, max_shard_size=SHARD, dry_run=True, resume=True)
    hub.reset_log()
    stats = lazymerge.dogerm(
        rm, sft, 0.3, out, max_shard_size=SHARD, push_to_hub="alice/m", delete_after_upload=True, resume=True,
        device="cpu", progress=False,
    )  # fmt: skip
    assert not {oid for oid, _ in first} & {oid for oid, _ in hub.lfs_uploads}  # not uploaded twice
    assert stats.push is not None and gone[0] in stats.push.reused
    # Streamed again: at most the inputs of the shards not finished before the kill.
    redo = [k for k, s in enumerate(plan.shards) if s.name not in recorded]
    bound = sum(n for reads in planned_reads(list(iter_chunks(plan, 1 << 21, redo))).values() for _, n in reads)
    again = rm.stream_stats.bytes_fetched + sft.stream_stats.bytes_fetched
    assert 0 < again <= bound, (again, bound)
    ref = tmp_path / "ref"
    lazymerge.dogerm(*pair, 0.3, ref, max_shard_size=SHARD, device="cpu")
    download_repo(hub, "alice/m", tmp_path / "back")  # headers name the inputs differently: compare tensors
    mine, theirs = load_folder(tmp_path / "back"), load_folder(ref)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)


def _layout_of(names_sizes: list[tuple[str, int]], max_shard_size: int, edges: bool):
    from lazymerge.plan import OutputTensor, build_plan, with_short_edge_shards

    tensors = [OutputTensor(name, "F16", (size // 2,), (), "test") for name, size in names_sizes]
    plan = build_plan(recipe={}, inputs=[], output_dir="out", tensors=tensors, max_shard_size=max_shard_size)
    return with_short_edge_shards(plan, max_shard_size) if edges else plan


def test_a_pushed_plan_has_short_first_and_last_shards() -> None:
    # An upload can start only once a shard is whole, and the last shard is uploaded after the
    # last input byte: both edges are kept to an eighth of the cap. The first shard takes the small
    # tensors of what would be the first shard (not the large embedding that opens the model);
    # everything else keeps its order.
    sizes = [("embed", 300), *((f"layer{i}.{j}", 40) for i in range(6) for j in range(4)), ("norm", 8), ("head", 8)]
    plain, pushed = _layout_of(sizes, 400, edges=False), _layout_of(sizes, 400, edges=True)
    assert len(plain.shards) == 4 and [t.name for t in plain.shards[0].tensors] == ["embed", "layer0.0", "layer0.1"]
    order = [n for n, _ in sizes]
    names = [sorted((t.name for t in s.tensors), key=order.index) for s in pushed.shards]
    assert names[0] == ["layer0.0"]  # from the plain first shard, within the edge (50)
    rest = [n for shard in names[1:] for n in shard]
    assert sorted(rest + names[0]) == sorted(n for n, _ in sizes)
    assert rest == [n for n, _ in sizes if n != "layer0.0"]  # in the plain order
    bodies = [sum(t.nbytes for t in s.tensors) for s in pushed.shards]
    assert bodies[0] <= 50 and bodies[-1] <= 50 and {"norm", "head"} <= set(names[-1])
    assert all(b <= 400 for b in bodies)
    index = json.loads(pushed.side_files["model.safetensors.index.json"])["weight_map"]
    assert {t.name: pushed.shards[t.shard].name for t in pushed.tensors} == index


def test_a_first_shard_without_small_tensors_is_its_first_tensor_alone() -> None:
    pushed = _layout_of([("embed", 300), ("big", 250), ("big2", 250), ("tail", 8)], 400, edges=True)
    assert [[t.name for t in s.tensors] for s in pushed.shards] == [["embed"], ["big"], ["big2"], ["tail"]]


def test_a_model_within_the_edge_stays_one_shard_when_pushed() -> None:
    pushed = _layout_of([("a", 10), ("b", 10)], 400, edges=True)
    assert [s.name for s in pushed.shards] == ["model.safetensors"]


def test_a_push_uploads_short_edge_shards_and_the_hub_model_loads(
    hub: HubServer, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    from helpers import load_folder
    from safetensors.torch import load as load_bytes

    from lazymerge.constants import parse_size

    local = lazymerge.dogerm(*pair, 0.3, tmp_path / "local", max_shard_size=SHARD, device="cpu")
    pushed = lazymerge.dogerm(*pair, 0.3, tmp_path / "out", max_shard_size=SHARD, push_to_hub="alice/m", device="cpu")
    edge = parse_size(SHARD, "max_shard_size") // 8
    index = json.loads(hub.read("alice/m", "model.safetensors.index.json"))["weight_map"]
    files = sorted(set(index.values()))
    shards = {name: load_bytes(hub.read("alice/m", name)) for name in files}
    for name in (files[0], files[-1]):  # each edge: tensors within the edge, or one larger tensor alone
        body = sum(t.numel() * t.element_size() for t in shards[name].values())
        assert body <= edge or len(shards[name]) == 1, (name, body, edge)
    assert len(pushed.files) > len(local.files)
    # the same tensors, byte for byte, whatever the layout
    merged_hub = {k: v for tensors in shards.values() for k, v in tensors.items()}
    merged_local = load_folder(tmp_path / "local")
    assert merged_hub.keys() == merged_local.keys()
    assert all(torch.equal(merged_hub[k], merged_local[k]) for k in merged_local)
