"""Shard uploads pipelined: a shard's LFS requests overlap the previous shard's body.

The upload direction must not idle between shards (the batch request, the PUT's latency and the
verify request would each cost a round trip a shard), and the bodies must still go one at a time
in the order the shards closed: the merge may be waiting for the oldest one (delete_after_upload).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from lazymerge.errors import HubError
from lazymerge.io.hub_upload import HubPusher
from lazymerge.io.lfs_transfer import ShardReader, Wire

try:  # tests/ is on sys.path when it has no __init__.py (pytest rootdir import mode)
    from hub_server import HubError as ServerError
    from hub_server import HubServer
    from test_hub import TOKEN
except ImportError:  # pragma: no cover - tests/ became a package
    from tests.hub_server import HubError as ServerError
    from tests.hub_server import HubServer
    from tests.test_hub import TOKEN

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def _shards(folder: Path, count: int, size: int) -> list[Path]:
    folder.mkdir()
    paths = []
    for k in range(count):
        path = folder / f"model-{k + 1:05d}-of-{count:05d}.safetensors"
        path.write_bytes(bytes([k + 1]) * size)  # distinct contents: distinct LFS objects
        paths.append(path)
    return paths


def test_the_wire_goes_to_tickets_in_order_and_is_handed_on_at_the_last_byte(tmp_path: Path) -> None:
    first, second = _shards(tmp_path / "s", 2, 3000)
    wire = Wire()
    t0, t1 = wire.ticket(), wire.ticket()
    order: list[str] = []
    second_on = threading.Event()

    def later() -> None:  # ticket 1 asks first, and must wait for ticket 0's last byte
        with wire.turn(t1, ShardReader(second, 3000), lambda: False):
            order.append("second")
            second_on.set()

    thread = threading.Thread(target=later)
    thread.start()
    assert not second_on.wait(0.3)
    reader = ShardReader(first, 3000)
    with wire.turn(t0, reader, lambda: False):
        order.append("first")
        reader.read(2999)
        assert not second_on.wait(0.3)  # one byte left: still ours
        reader.read(10)  # the last byte: the wire goes on while this body is answered
        assert second_on.wait(5)
    thread.join(5)
    reader.close()
    assert order == ["first", "second"]


def test_a_ticket_waiting_for_the_wire_gives_up_when_the_upload_is_stopped(tmp_path: Path) -> None:
    (path,) = _shards(tmp_path / "s", 1, 10)
    wire = Wire()
    wire.ticket()  # ticket 0 never sends
    stopped = threading.Event()
    threading.Timer(0.2, stopped.set).start()
    with pytest.raises(HubError, match="upload stopped"):
        with wire.turn(wire.ticket(), ShardReader(path, 10), stopped.is_set):
            pass


def test_a_shard_whose_turn_comes_after_a_failure_sends_nothing(tmp_path: Path) -> None:
    (path,) = _shards(tmp_path / "s", 1, 10)
    wire = Wire()
    first, second = wire.ticket(), wire.ticket()
    failed = threading.Event()
    outcome: list[str] = []

    def later() -> None:
        try:
            with wire.turn(second, ShardReader(path, 10), failed.is_set):
                outcome.append("sent")
        except HubError:
            outcome.append("stopped")

    thread = threading.Thread(target=later)
    thread.start()
    time.sleep(0.1)
    failed.set()  # the first shard's upload failed: recorded, then its ticket given up
    wire.done(first)
    thread.join(5)
    assert outcome == ["stopped"]


def test_a_retried_body_keeps_the_wire_until_its_last_byte(tmp_path: Path) -> None:
    (path,) = _shards(tmp_path / "s", 1, 3000)
    ends: list[int] = []
    reader = ShardReader(path, 3000)
    reader.on_end = lambda: ends.append(reader.tell())
    reader.read(1000)
    reader.seek(0)  # the request failed mid-body: huggingface_hub's retry reads from the start
    reader.read(2000)
    assert not ends
    reader.read(1000)
    assert ends == [3000]
    reader.close()


def test_each_shards_requests_overlap_the_previous_body_and_bodies_go_in_order(hub: HubServer, tmp_path: Path) -> None:
    # 8 MB a shard at 16 MB/s: each body takes 0.5 s, each request waits 0.1 s before its answer
    # (a worker sends its next batch request after its verify is answered: >= 0.2 s into a body).
    paths = _shards(tmp_path / "out", 4, 8 << 20)
    hub.shape(up=16e6, latency=0.1)
    pusher = HubPusher("alice/pipelined", token=TOKEN)
    try:
        hub.reset_log()
        for path in paths:
            pusher.submit(path.name, path)
        ops, uploaded, reused = pusher.uploads()
    finally:
        pusher.close()
    assert sorted(uploaded) == [p.name for p in paths] and not reused
    log = sorted(hub.requests, key=lambda r: r.started)
    batches = [r for r in log if r.path.endswith("/info/lfs/objects/batch")]
    puts = [r for r in log if r.method == "PUT"]
    assert len(batches) == len(puts) == 4
    # Bodies in the order the shards were queued (the server names each upload by its sha256)
    assert [oid for oid, _ in hub.lfs_uploads] == [ops[p.name].upload_info.sha256.hex() for p in paths]
    for k in range(1, 4):
        # the next shard asked where to send while this body was still going up (sequential
        # uploads ask only after this PUT and its verify are answered)
        assert batches[k].started < puts[k - 1].ended, k


def test_a_failed_upload_fails_the_push_without_a_hang(hub: HubServer, tmp_path: Path) -> None:
    paths = _shards(tmp_path / "out", 3, 1 << 20)
    original = hub._h_lfs_put

    def refuse_first(h: object, ticket: str) -> None:
        refuse_first.calls += 1  # type: ignore[attr-defined]
        if refuse_first.calls == 1:  # type: ignore[attr-defined]
            raise ServerError(403, "Forbidden: quota exceeded")
        original(h, ticket)

    refuse_first.calls = 0  # type: ignore[attr-defined]
    hub._h_lfs_put = refuse_first  # type: ignore[method-assign]
    pusher = HubPusher("alice/refused", token=TOKEN)
    began = time.monotonic()
    try:
        for path in paths:
            try:
                pusher.submit(path.name, path)
            except HubError:
                break
        with pytest.raises(HubError, match=r"403|[Ff]orbidden|quota"):
            pusher.uploads()
    finally:
        pusher.close()
        hub._h_lfs_put = original  # type: ignore[method-assign]
    assert time.monotonic() - began < 30  # nothing waits for a wire that never frees
    # (whether the next body went is timing: it is handed the wire at the failed body's last byte)
