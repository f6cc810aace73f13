"""Hub inputs streamed with HTTP range requests (--low-disk): the bytes, the disk, the faults.

A streamed merge writes exactly what a merge of the same models on local disk writes, with no
input weight byte on disk and several range requests in flight at once; a connection dropped
mid-range resumes it, 500/503 answers are retried, a persistent error or an expired token is one
line (the token never in it), and the read-ahead stays within its bound.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lazymerge.config import plan_recipe
from lazymerge.errors import HubError
from lazymerge.execute import execute
from lazymerge.io import hub_stream
from lazymerge.io.hub_pieces import plan_pieces

try:  # tests/ is on sys.path when it has no __init__.py (pytest rootdir import mode)
    from conftest import write_model
    from helpers import load_folder
    from hub_server import HubServer, serving_hub
    from test_hub import TOKEN, upload
except ImportError:  # pragma: no cover - tests/ became a package
    from tests.conftest import write_model
    from tests.helpers import load_folder
    from tests.hub_server import HubServer, serving_hub
    from tests.test_hub import TOKEN, upload

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
WEIGHTS = (".safetensors", ".bin")
PIECE = 64 << 10  # small pieces, so that a model of a few MB makes many range requests


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    monkeypatch.setattr(hub_stream, "PIECE_BYTES", PIECE)
    monkeypatch.setattr(hub_stream, "_BACKOFF", 0.01)  # retries in milliseconds, not seconds
    yield from serving_hub(tmp_path, monkeypatch, TOKEN)


@pytest.fixture
def models(hub: HubServer, tmp_path: Path) -> tuple[Path, Path]:
    """Two models on the Hub, one safetensors, one .bin (fp32, 3 shards of ~700 KB each)."""
    folders = []
    for name, fmt, seed in (("a", "safetensors", 1), ("b", "bin", 2)):
        gen = torch.Generator().manual_seed(seed)
        tensors = {f"layers.{i}.weight": torch.randn(256, 256 + i, generator=gen) for i in range(6)}
        tensors["norm.weight"] = torch.randn(256, generator=gen)
        folder = write_model(tmp_path / name, tensors, shards=3, fmt=fmt, config={"model_type": "llama"})
        upload(hub, folder, f"alice/{name}")
        folders.append(folder)
    hub.reset_log()
    return folders[0], folders[1]


RECIPE = {"merge_method": "linear", "models": [{"model": "alice/a"}, {"model": "alice/b"}]}


def _merge_streamed(out: Path, before_run=None):
    plan, opened = plan_recipe(RECIPE, out, low_disk=True)
    if before_run is not None:
        before_run()
    try:
        execute(plan, opened, device="cpu")
    finally:
        for c in opened:
            c.close()
    return plan, opened


def _reference(models: tuple[Path, Path], out: Path) -> dict[str, torch.Tensor]:
    recipe = {"merge_method": "linear", "models": [{"model": str(models[0])}, {"model": str(models[1])}]}
    plan, opened = plan_recipe(recipe, out)
    execute(plan, opened, device="cpu")
    return load_folder(out)


def _weight_gets(hub: HubServer) -> list:
    return [r for r in hub.requests if r.method == "GET" and r.filename and r.filename.endswith(WEIGHTS)]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("cdn", [False, True], ids=["hub", "cdn-redirect"])
def test_streamed_merge_is_exact_and_keeps_no_input_on_disk(
    hub: HubServer, models: tuple[Path, Path], tmp_path: Path, cdn: bool
) -> None:
    hub.shape(latency=0.02)  # a round trip per request: only requests in parallel keep the pace
    hub.lfs_redirect = cdn  # LFS files answered with a 302 to a signed URL on another origin
    plan, opened = plan_recipe(RECIPE, tmp_path / "out", low_disk=True)
    hub.reset_log()
    try:
        execute(plan, opened, device="cpu")
    finally:
        for c in opened:
            c.close()
    if cdn:  # the redirect is followed once per file, then its URL reused: one round trip per range
        resolves = [r for r in _weight_gets(hub) if "/resolve/" in r.path]
        # At most the first window of each file goes through the Hub before the first answer.
        assert 0 < len(resolves) <= sum(len(c.files) for c in opened) * hub_stream.AHEAD
        assert len([r for r in _weight_gets(hub) if r.path.startswith("/_lfs_blobs/")]) > len(resolves)
    assert _same(load_folder(tmp_path / "out"), _reference(models, tmp_path / "ref"))
    gets = _weight_gets(hub)
    assert gets and all(r.range for r in gets)  # every weight byte came by a range request
    assert hub.peak_in_flight >= 4  # several ranges in flight at once
    cache = Path(os.environ["HF_HUB_CACHE"])
    assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix in WEIGHTS]
    for c in opened:
        stats = c.stream_stats
        tensor_bytes = sum(t.nbytes for t in c.tensors.values())
        assert stats.bytes_fetched == tensor_bytes  # each byte once: no range read twice
        # The read-ahead bound: AHEAD pieces per input model however many of its files are open,
        # plus the piece a reading thread fetches on demand (the reader, a write lane's copy).
        assert 0 < stats.peak_buffered <= (hub_stream.AHEAD + 2) * PIECE, stats.peak_buffered
        assert stats.buffered == 0  # every piece freed


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["drop", 503, 500])
def test_dropped_ranges_and_5xx_are_retried(
    hub: HubServer, models: tuple[Path, Path], tmp_path: Path, fault: str | int
) -> None:
    failed: list[str] = []

    def inject(h) -> str | int | None:
        if h.headers.get("Range") and len(failed) < 5:  # the first five streamed ranges fail
            failed.append(h.headers["Range"])
            return fault
        return None

    _, opened = _merge_streamed(tmp_path / "out", before_run=lambda: setattr(hub, "fault", inject))
    assert len(failed) == 5
    assert sum(c.stream_stats.retries for c in opened) >= 5
    assert _same(load_folder(tmp_path / "out"), _reference(models, tmp_path / "ref"))
    if fault == "drop":  # a dropped range resumed where it stopped: the half already sent is kept
        resumed = [r.range for r in _weight_gets(hub) if r.range and r.range not in failed]
        assert any(r.split("-")[1] == f.split("-")[1] for f in failed for r in resumed)


def test_persistent_error_is_one_line(hub: HubServer, models: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(HubError) as info:
        _merge_streamed(tmp_path / "out", before_run=lambda: setattr(hub, "fault", lambda h: 503))
    message = str(info.value)
    assert "\n" not in message and "alice/" in message, message
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_token_expiring_mid_run_is_a_clear_error_without_the_token(
    hub: HubServer, models: tuple[Path, Path], tmp_path: Path
) -> None:
    def expire() -> None:
        hub.token = "hf_rotatedRotatedRotated"  # the server no longer accepts the run's token

    with pytest.raises(HubError) as info:
        _merge_streamed(tmp_path / "out", before_run=expire)
    text = f"{info.value} {info.value.hint or ''}"
    assert TOKEN not in text and "hf_rotated" not in text, text
    assert "token" in text.lower(), text
    gc.collect()


def test_pieces_join_neighbours_cut_large_reads_and_follow_the_run_order() -> None:
    # Four small neighbouring reads, a large one, a gap, and a read the run makes first.
    reads = [(1000, 10), (0, 30), (30, 30), (60, 30), (90, 5), (200, 250)]
    by_offset, order = plan_pieces(reads, 100)
    spans = [(p.start, p.end) for p in by_offset]
    assert spans == [(0, 95), (200, 300), (300, 400), (400, 450), (1000, 1010)]
    assert [p.left for p in by_offset] == [95, 100, 100, 50, 10]  # planned bytes each piece serves
    assert (order[0].start, order[0].end) == (1000, 1010)  # fetched in the order the run reads


class _Recorded:
    """A pool that records the pieces a source starts, and runs none."""

    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []

    def submit(self, fn, piece) -> None:  # type: ignore[no-untyped-def]
        self.started.append((fn.__self__.name, piece.start))


def test_open_files_of_one_model_share_one_read_ahead_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two files of one input open at once (a chunk spanning two shards) hold AHEAD pieces
    together, not AHEAD each; a freed slot goes to the file with the fewest pieces ahead, and a
    closed file gives its slots back."""
    import threading

    monkeypatch.setattr(hub_stream, "PIECE_BYTES", 100)
    pool, window = _Recorded(), hub_stream.ReadAhead()
    reads = [(k * 100, 100) for k in range(10)]

    def source(name: str) -> hub_stream.HttpRangeSource:
        return hub_stream.HttpRangeSource(
            "http://unused",
            1000,
            None,
            {},
            name,
            reads,
            pool,
            threading.Event(),
            window=window,  # type: ignore[arg-type]
        )

    a = source("a")
    b = source("b")
    assert [n for n, _ in pool.started] == ["a"] * hub_stream.AHEAD and window.ahead == hub_stream.AHEAD
    first = a._pieces[0]
    first.buf = bytearray(100)
    first.event.set()
    a.read_into(0, memoryview(bytearray(100)))  # consumed and freed: the slot goes to b (none ahead)
    assert pool.started[-1] == ("b", 0) and window.ahead == hub_stream.AHEAD
    a.close()
    assert [n for n, _ in pool.started].count("b") == hub_stream.AHEAD and window.ahead == hub_stream.AHEAD
    b.close()
    assert window.ahead == 0 and window.sources == []


def test_token_expiring_mid_run_cli_is_one_line(
    hub: HubServer, models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The token is rotated on the server when the first tensor range of the safetensors model is
    asked for: planning read its headers with one range from byte 0, so the merge is running."""
    from lazymerge.cli import main

    original = hub._h_resolve

    def resolve(h, repo: str, rev: str, path: str) -> None:  # type: ignore[no-untyped-def]
        rng = h.headers.get("Range")
        if path.endswith(".safetensors") and rng and not rng.startswith("bytes=0-"):
            hub.token = "hf_rotatedRotatedRotated"
        original(h, repo, rev, path)

    hub._h_resolve = resolve  # type: ignore[method-assign]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: alice/a\n  - model: alice/b\n")
    code = main(["merge", str(recipe), "-o", str(tmp_path / "out"), "--low-disk", "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error:") and lines[1].startswith("hint:"), err
    assert "rejected the token" in err and TOKEN not in err and "hf_rotated" not in err, err
