"""The local Hub-protocol server (tests/hub_server.py) driven by the REAL huggingface_hub client."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from huggingface_hub import CommitOperationAdd, HfApi, close_session, hf_hub_download
from huggingface_hub.errors import (
    BadRequestError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session
from safetensors.numpy import save_file

try:  # tests/ is on sys.path when it has no __init__.py (pytest rootdir import mode)
    from hub_server import HubError, HubServer, Rate, RequestRecord, configure_hf_client
except ImportError:  # pragma: no cover - tests/ became a package
    from tests.hub_server import HubError, HubServer, Rate, RequestRecord, configure_hf_client

TOKEN = "hf_test_token"
# The client itself PUTs LFS files with httpx2's deprecated `data=<file>`.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def make_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., HubServer]]:
    """make_hub(lfs_redirect=False) -> a started server, with huggingface_hub pointed at it."""
    servers: list[HubServer] = []

    def make(**kw: object) -> HubServer:
        server = HubServer(tmp_path / f"hub{len(servers)}", token=TOKEN, **kw).start()  # type: ignore[arg-type]
        servers.append(server)
        configure_hf_client(monkeypatch, server.endpoint, tmp_path / "hf_home")
        return server

    yield make
    close_session()  # drop pooled keep-alive connections to servers about to stop
    for s in servers:
        s.stop()


@pytest.fixture
def hub(make_hub: Callable[..., HubServer]) -> HubServer:
    return make_hub()


def api(server: HubServer, token: str | bool | None = TOKEN) -> HfApi:
    return HfApi(endpoint=server.endpoint, token=token)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def puts(server: HubServer) -> list[RequestRecord]:
    return [r for r in server.requests if r.method == "PUT"]


def test_env_is_patched(hub: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import constants
    from huggingface_hub.utils._runtime import is_xet_available

    assert not is_xet_available()  # uploads take the plain LFS path
    assert constants.HF_HUB_CACHE == str(tmp_path / "hf_home" / "hub")
    assert os.environ["HF_HUB_DISABLE_XET"] == "1"


def test_create_repo_info_and_list(hub: HubServer) -> None:
    a = api(hub)
    url = a.create_repo("alice/m1")
    assert url.repo_id == "alice/m1" and url.startswith(hub.endpoint)
    with pytest.raises(HfHubHTTPError) as err:
        a.create_repo("alice/m1")
    assert err.value.response.status_code == 409
    assert a.create_repo("alice/m1", exist_ok=True).repo_id == "alice/m1"
    assert a.create_repo("m2").repo_id == "testuser/m2"  # no namespace: the token's user

    info = a.model_info("alice/m1", files_metadata=True)
    assert info.private is False and info.sha == hub.head("alice/m1")
    assert [s.rfilename for s in info.siblings or []] == [".gitattributes"]  # the Hub's initial commit
    assert a.list_repo_files("alice/m1") == [".gitattributes"]
    assert a.repo_info("alice/m1").id == "alice/m1"
    with pytest.raises(RepositoryNotFoundError):
        a.model_info("alice/nope")


def test_preupload_then_one_commit_roundtrip(hub: HubServer, tmp_path: Path) -> None:
    a = api(hub)
    a.create_repo("alice/merged")
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, 12 * 1024 * 1024 + 7, dtype=np.uint8).tobytes()  # >10 MB: LFS by size
    shard = rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    (tmp_path / "big.dat").write_bytes(big)
    (tmp_path / "shard.safetensors").write_bytes(shard)
    ops = [
        CommitOperationAdd("model-00001-of-00002.safetensors", str(tmp_path / "shard.safetensors")),
        CommitOperationAdd("blobs/big.dat", str(tmp_path / "big.dat")),
    ]
    a.preupload_lfs_files("alice/merged", ops)
    assert sorted(hub.lfs_uploads) == sorted([(sha(shard), len(shard)), (sha(big), len(big))])
    assert len(puts(hub)) == 2 and all(r.status == 200 for r in puts(hub))
    assert a.list_repo_files("alice/merged") == [".gitattributes"]  # uploaded, not committed: nothing visible

    config = json.dumps({"model_type": "llama"}).encode()
    card = b"---\nlicense: apache-2.0\n---\n# merged\n"
    info = a.create_commit(
        "alice/merged",
        [*ops, CommitOperationAdd("config.json", config), CommitOperationAdd("README.md", card)],
        commit_message="merge",
    )
    assert info.oid == hub.head("alice/merged")
    assert len(hub.lfs_uploads) == 2  # create_commit did not upload the preuploaded shards again
    files = hub.files("alice/merged")
    assert files["model-00001-of-00002.safetensors"].lfs and files["blobs/big.dat"].lfs
    assert not files["config.json"].lfs and not files["README.md"].lfs
    assert sorted(a.list_repo_files("alice/merged")) == sorted(
        [".gitattributes", "README.md", "blobs/big.dat", "config.json", "model-00001-of-00002.safetensors"]
    )
    sib = {s.rfilename: s for s in a.model_info("alice/merged", files_metadata=True).siblings or []}
    assert sib["blobs/big.dat"].lfs is not None and sib["blobs/big.dat"].lfs.sha256 == sha(big)
    assert sib["config.json"].size == len(config) and sib["config.json"].lfs is None

    hub.reset_log()
    for name, data in [("model-00001-of-00002.safetensors", shard), ("blobs/big.dat", big), ("config.json", config)]:
        path = hf_hub_download("alice/merged", name, endpoint=hub.endpoint, token=TOKEN)
        assert Path(path).read_bytes() == data
    # The LFS file is cached under its sha256: the client used X-Linked-Etag.
    cached = hf_hub_download("alice/merged", "blobs/big.dat", endpoint=hub.endpoint, token=TOKEN)
    assert Path(cached).resolve().name == sha(big)
    assert hub.bytes_served == len(shard) + len(big) + len(config)
    assert a.file_exists("alice/merged", "config.json") and not a.file_exists("alice/merged", "nope.json")


def test_existing_lfs_object_is_not_uploaded_again(hub: HubServer) -> None:
    a = api(hub)
    a.create_repo("alice/m")
    data = os.urandom(50_000)
    a.preupload_lfs_files("alice/m", [CommitOperationAdd("a.safetensors", data)])
    assert hub.lfs_uploads == [(sha(data), len(data))]
    hub.reset_log()
    # Same content under another name: the batch answer has no "actions", so the client skips the PUT.
    op = CommitOperationAdd("b.safetensors", data)
    a.preupload_lfs_files("alice/m", [op])
    assert hub.lfs_uploads == [] and puts(hub) == []
    assert any(r.path.endswith(".git/info/lfs/objects/batch") for r in hub.requests)
    a.create_commit("alice/m", [op], commit_message="b")
    assert hub.read("alice/m", "b.safetensors") == data


def test_a_sink_server_checks_uploads_but_keeps_no_bytes(make_hub: Callable[..., HubServer]) -> None:
    """keep_uploads=False (bench_hub --sink-uploads): the 7B mergekit way's outputs would not fit twice."""
    hub = make_hub(keep_uploads=False)
    a = api(hub)
    a.create_repo("alice/m")
    data = os.urandom(4 << 20)
    a.create_commit("alice/m", [CommitOperationAdd("a.safetensors", data)], commit_message="a")
    entry = hub.files("alice/m")["a.safetensors"]
    assert (entry.sha256, entry.size) == (sha(data), len(data))
    blob = hub.blob_path(sha(data)).stat()
    assert blob.st_size == len(data) and blob.st_blocks * 512 < len(data) // 4  # sparse: size, not blocks
    assert hub.lfs_uploads == [(sha(data), len(data))]

    bad = CommitOperationAdd("b.safetensors", data[:-1] + b"x")
    bad.upload_info.sha256 = hashlib.sha256(b"something else").digest()
    with pytest.raises(RuntimeError):  # still received and checked in full
        a.preupload_lfs_files("alice/m", [bad])
    assert [r.status for r in puts(hub)][-1] == 400 and puts(hub)[-1].bytes_received == len(data)


def test_a_sink_server_never_serves_zeros_nor_hides_real_bytes(
    make_hub: Callable[..., HubServer], tmp_path: Path
) -> None:
    hub = make_hub(keep_uploads=False)
    a = api(hub)
    a.create_repo("alice/m")
    sunk, kept = os.urandom(1 << 20), os.urandom(1 << 20)
    a.create_commit("alice/m", [CommitOperationAdd("a.safetensors", sunk)], commit_message="a")
    with pytest.raises((HfHubHTTPError, LocalEntryNotFoundError)):  # an error, never a file of zeros
        hf_hub_download("alice/m", "a.safetensors", cache_dir=tmp_path / "dl")
    assert not list((tmp_path / "dl").rglob("a.safetensors"))
    r = get_session().get(f"{hub.endpoint}/alice/m/resolve/main/a.safetensors")
    assert r.status_code == 410 and "kept no bytes" in r.json()["error"]
    with pytest.raises(HubError, match="kept no bytes"):
        hub.read("alice/m", "a.safetensors")

    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "w.safetensors").write_bytes(kept)
    (seed / "again.safetensors").write_bytes(sunk)  # the real bytes of the sunk upload replace it
    hub.add_model("alice/seed", seed)
    a.create_commit("alice/m", [CommitOperationAdd("b.safetensors", kept)], commit_message="b")  # PUT, sunk
    assert hub.lfs_uploads[-1] == (sha(kept), len(kept))
    assert hub.read("alice/m", "b.safetensors") == kept == hub.read("alice/seed", "w.safetensors")
    assert hub.read("alice/m", "a.safetensors") == sunk


def test_upload_file_folder_branch_and_tree(hub: HubServer, tmp_path: Path) -> None:
    a = api(hub)
    a.create_repo("alice/m")
    folder = tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "w.bin").write_bytes(os.urandom(1000))
    a.upload_folder(repo_id="alice/m", folder_path=folder)
    assert sorted(a.list_repo_files("alice/m")) == [".gitattributes", "config.json", "sub/w.bin"]
    top = {e.path: type(e).__name__ for e in a.list_repo_tree("alice/m")}
    assert top == {"sub": "RepoFolder", ".gitattributes": "RepoFile", "config.json": "RepoFile"}
    assert [e.path for e in a.list_repo_tree("alice/m", "sub")] == ["sub/w.bin"]
    assert hub.files("alice/m")["sub/w.bin"].lfs

    a.create_branch("alice/m", branch="dev")
    assert {b.name for b in a.list_repo_refs("alice/m").branches} == {"main", "dev"}
    a.upload_file(path_or_fileobj=b"dev only", path_in_repo="notes.txt", repo_id="alice/m", revision="dev")
    assert a.file_exists("alice/m", "notes.txt", revision="dev")
    assert not a.file_exists("alice/m", "notes.txt")
    path = hf_hub_download("alice/m", "notes.txt", revision="dev", endpoint=hub.endpoint, token=TOKEN)
    assert Path(path).read_bytes() == b"dev only"
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("alice/m", "notes.txt", endpoint=hub.endpoint, token=TOKEN)
    with pytest.raises(RevisionNotFoundError):
        a.model_info("alice/m", revision="nope")


@pytest.mark.parametrize("lfs_redirect", [False, True])
def test_ranged_reads(make_hub: Callable[..., HubServer], lfs_redirect: bool) -> None:
    hub = make_hub(lfs_redirect=lfs_redirect)
    a = api(hub)
    a.create_repo("alice/m")
    data = os.urandom(200_000)
    a.upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id="alice/m")
    url = f"{hub.endpoint}/alice/m/resolve/main/w.safetensors"
    auth = {"authorization": f"Bearer {TOKEN}"}
    hub.reset_log()
    for rng, want in [
        ("bytes=10-19", data[10:20]),
        ("bytes=199990-", data[199990:]),
        ("bytes=-5", data[-5:]),
        ("bytes=199995-300000", data[199995:]),
    ]:
        r = get_session().get(url, headers={**auth, "Range": rng})
        assert r.status_code == 206 and r.content == want
        assert r.headers["Content-Range"].endswith("/200000")
    assert hub.bytes_served == 10 + 10 + 5 + 5
    served = [r for r in hub.requests if r.filename == "w.safetensors" and r.bytes_sent]
    assert [r.range for r in served] == ["bytes=10-19", "bytes=199990-", "bytes=-5", "bytes=199995-300000"]
    assert get_session().get(url, headers={**auth, "Range": "bytes=200000-"}).status_code == 416
    head = get_session().head(url, headers=auth, follow_redirects=False)
    assert head.headers["X-Linked-Size"] == "200000" and head.headers["X-Linked-Etag"] == f'"{sha(data)}"'
    assert head.headers["X-Repo-Commit"] == hub.head("alice/m")
    assert head.status_code == (302 if lfs_redirect else 200)
    path = hf_hub_download("alice/m", "w.safetensors", endpoint=hub.endpoint, token=TOKEN)
    assert Path(path).read_bytes() == data


def write_sharded_model(folder: Path) -> dict[str, np.ndarray]:
    """A tiny 2-shard safetensors model; each shard is bigger than the client's 100 kB header probe."""
    rng = np.random.default_rng(1)
    tensors = {f"layers.{i}.weight": rng.standard_normal((128, 256)).astype(np.float32) for i in range(4)}
    tensors["embed.weight"] = rng.standard_normal((10, 8)).astype(np.float16)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    folder.mkdir(parents=True)
    for file, group in shards.items():
        save_file({n: tensors[n] for n in group}, str(folder / file), metadata={"format": "pt"})
    total = sum(t.nbytes for t in tensors.values())
    weight_map = {n: f for f, group in shards.items() for n in group}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors


@pytest.mark.parametrize("lfs_redirect", [False, True])
def test_get_safetensors_metadata_reads_headers_only(
    make_hub: Callable[..., HubServer], tmp_path: Path, lfs_redirect: bool
) -> None:
    hub = make_hub(lfs_redirect=lfs_redirect)
    a = api(hub)
    a.create_repo("alice/tiny", private=True)
    tensors = write_sharded_model(tmp_path / "tiny")
    a.upload_folder(repo_id="alice/tiny", folder_path=tmp_path / "tiny")
    assert len(hub.lfs_uploads) == 2
    hub.reset_log()

    meta = a.get_safetensors_metadata("alice/tiny")
    assert meta.sharded and meta.metadata == {"total_size": sum(t.nbytes for t in tensors.values())}
    assert set(meta.weight_map) == set(tensors)
    for name, t in tensors.items():
        info = meta.files_metadata[meta.weight_map[name]].tensors[name]
        assert info.shape == list(t.shape) and info.dtype == {"float32": "F32", "float16": "F16"}[str(t.dtype)]
    assert all(m.metadata == {"format": "pt"} for m in meta.files_metadata.values())

    shard_reads = [r for r in hub.requests if r.filename and r.filename.startswith("model-0") and r.bytes_sent]
    assert sorted(r.filename or "" for r in shard_reads) == sorted(meta.files_metadata)  # one read per shard
    for r in shard_reads:  # a ranged probe of the header, never the whole shard
        size = (tmp_path / "tiny" / (r.filename or "")).stat().st_size
        assert r.range is not None and 0 < r.bytes_sent <= 100_001 < size
    assert hub.lfs_uploads == []


def test_wrong_token_is_a_clean_401(hub: HubServer) -> None:
    api(hub).create_repo("alice/m")
    bad = api(hub, token="hf_wrong")
    with pytest.raises(HfHubHTTPError) as err:
        bad.model_info("alice/m")
    assert err.value.response.status_code == 401
    assert not isinstance(err.value, RepositoryNotFoundError)
    assert "Invalid credentials" in str(err.value)
    with pytest.raises(HfHubHTTPError) as err:
        bad.create_repo("alice/m2")
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError):
        hf_hub_download("alice/m", ".gitattributes", endpoint=hub.endpoint, token="hf_wrong")
    with pytest.raises(HfHubHTTPError) as err:  # anonymous writes are refused too
        api(hub, token=False).create_repo("alice/m3")
    assert err.value.response.status_code == 401
    assert "alice/m2" not in hub.repos and "alice/m3" not in hub.repos


def test_private_repo_needs_the_token(hub: HubServer) -> None:
    a = api(hub)
    a.create_repo("alice/secret", private=True)
    a.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="alice/secret")
    assert a.model_info("alice/secret").private is True
    anon = api(hub, token=False)
    with pytest.raises(RepositoryNotFoundError) as err:
        anon.model_info("alice/secret")
    assert err.value.response.status_code == 401
    assert err.value.response.json() == {"error": "Repository not found: alice/secret"}
    with pytest.raises(RepositoryNotFoundError):
        anon.list_repo_files("alice/secret")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", "config.json", endpoint=hub.endpoint, token=False)
    assert not anon.file_exists("alice/secret", "config.json")
    assert (
        Path(hf_hub_download("alice/secret", "config.json", endpoint=hub.endpoint, token=TOKEN)).read_bytes() == b"{}"
    )


def test_lfs_upload_sha_or_size_mismatch_is_rejected(hub: HubServer) -> None:
    a = api(hub)
    a.create_repo("alice/m")
    data = os.urandom(4096)
    op = CommitOperationAdd("w.safetensors", data)
    op.upload_info.sha256 = hashlib.sha256(b"something else").digest()  # announce a sha the bytes won't match
    with pytest.raises(RuntimeError) as err:  # the client wraps the failed upload
        a.preupload_lfs_files("alice/m", [op])
    cause = err.value.__cause__
    assert isinstance(cause, BadRequestError) and cause.response.status_code == 400
    assert "does not match" in str(cause)
    assert hub.lfs_uploads == [] and not hub.blob_path(sha(data)).exists()
    assert [r.status for r in puts(hub)] == [400]

    # Size: announce one byte more than is sent, through the raw protocol.
    batch = get_session().post(
        f"{hub.endpoint}/alice/m.git/info/lfs/objects/batch",
        headers={"authorization": f"Bearer {TOKEN}"},
        json={"operation": "upload", "transfers": ["basic"], "objects": [{"oid": sha(data), "size": len(data) + 1}]},
    )
    href = batch.json()["objects"][0]["actions"]["upload"]["href"]
    r = get_session().put(href, content=data)
    assert r.status_code == 400 and "received" in r.json()["error"]
    assert hub.lfs_uploads == []
    assert get_session().put(href, content=data).status_code == 404  # the upload URL is single-use

    # A streamed (Transfer-Encoding: chunked) upload of the right bytes is accepted, then verified.
    batch = get_session().post(
        f"{hub.endpoint}/alice/m.git/info/lfs/objects/batch",
        headers={"authorization": f"Bearer {TOKEN}"},
        json={"operation": "upload", "transfers": ["basic"], "objects": [{"oid": sha(data), "size": len(data)}]},
    )
    actions = batch.json()["objects"][0]["actions"]
    r = get_session().put(actions["upload"]["href"], content=iter([data[:1000], data[1000:]]))
    assert r.status_code == 200 and hub.lfs_uploads == [(sha(data), len(data))]
    assert puts(hub)[-1].bytes_received == len(data)
    verify = get_session().post(
        actions["verify"]["href"], headers={"authorization": f"Bearer {TOKEN}"}, json={"oid": sha(data), "size": 4096}
    )
    assert verify.status_code == 200


def test_commit_of_never_uploaded_lfs_object_is_rejected(hub: HubServer) -> None:
    a = api(hub)
    a.create_repo("alice/m")
    op = CommitOperationAdd("w.safetensors", os.urandom(1000))
    op._upload_mode, op._is_uploaded = "lfs", True  # pretend it was preuploaded
    with pytest.raises(BadRequestError) as err:
        a.create_commit("alice/m", [op], commit_message="broken")
    assert "never uploaded" in str(err.value)
    assert a.list_repo_files("alice/m") == [".gitattributes"]


def test_rate_is_a_token_bucket_with_a_bounded_burst() -> None:
    """A thread that wakes late catches up on up to `burst_s` of unused rate, never more."""
    rate = Rate(1e6, burst_s=0.05)
    began = time.monotonic()
    rate.take(50_000)  # idle so far: the burst credit pays for it at once
    assert time.monotonic() - began < 0.03
    rate.take(100_000)  # credit spent: 0.1 s at 1 MB/s
    assert time.monotonic() - began >= 0.095


def test_shaped_bodies_move_in_paced_sendfile_slices(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloads go through socket.sendfile (zero copy) in ~10 ms slices at the cap (64 KiB floor),
    uploads through one reused buffer; both keep the cap (give or take the 50 ms burst)."""
    a = api(hub)
    a.create_repo("alice/m")
    data = os.urandom(1_000_000)
    hub.shape(down=4e6, up=4e6)
    began = time.monotonic()
    a.upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id="alice/m")
    assert time.monotonic() - began >= (len(data) - 0.05 * 4e6) / 4e6
    assert hub.lfs_uploads == [(sha(data), len(data))] and hub.read("alice/m", "w.safetensors") == data
    sent: list[int] = []
    original = socket.socket.sendfile

    def counting(self: socket.socket, file: Any, offset: int = 0, count: int | None = None) -> int:
        sent.append(count or 0)
        return original(self, file, offset, count)

    monkeypatch.setattr(socket.socket, "sendfile", counting)
    url = f"{hub.endpoint}/alice/m/resolve/main/w.safetensors"
    began = time.monotonic()
    r = get_session().get(url, headers={"authorization": f"Bearer {TOKEN}", "Range": "bytes=1000-"})
    assert r.status_code == 206 and r.content == data[1000:]
    assert time.monotonic() - began >= (len(data) - 1000 - 0.05 * 4e6) / 4e6
    assert sum(sent) == len(data) - 1000 and max(sent) == 64 << 10 and len(sent) == 16
