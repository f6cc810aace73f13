"""A small, real Hugging Face Hub-protocol HTTP server for tests (standard library only).

It speaks the HTTP endpoints the real `huggingface_hub` 2.4 client uses for model repos:

    POST /api/repos/create                         create_repo (private, 409 + "url" for exist_ok)
    GET  /api/whoami-v2 · POST /api/validate-yaml (the client calls it before committing a README.md)
    GET  /api/models/{repo}[/revision/{rev}]       model_info / repo_info (siblings; ?blobs=true: sizes, lfs)
    GET  /api/models/{repo}/tree/{rev}[/{path}]    list_repo_tree / list_repo_files (?recursive=true)
    GET  /api/models/{repo}/refs · POST /api/models/{repo}/branch/{name}   list_repo_refs, create_branch
    POST /api/models/{repo}/preupload/{rev}        upload mode (regular / lfs) + remote oid per file
    POST /{repo}.git/info/lfs/objects/batch        LFS batch API (basic transfer); known objects get no actions
    PUT  /_lfs_upload/{ticket}                     single-PUT upload URL returned by the batch (no auth header)
    POST /{repo}.git/info/lfs/objects/verify       LFS verify action
    POST /api/models/{repo}/commit/{rev}           NDJSON commit: file, lfsFile, deletedFile, deletedFolder
    HEAD/GET /{repo}/resolve/{rev}/{path}          hf_hub_download, file_exists, Range requests (206 / 416)
    HEAD/GET /_lfs_blobs/{repo}/{oid}/{path}?sig=  signed "CDN" URL for LFS files when lfs_redirect=True

Blobs live on disk under `root/blobs/<sha256>` (files may be hundreds of MB, never held in RAM); every LFS
upload is checked against the size and sha256 its batch request announced (400 otherwise). `requests` logs
every request (method, path, Range, status, bytes sent/received, repo, file), `bytes_served` counts file
content bytes sent, `lfs_uploads` lists (oid, size) per accepted upload. `stall()` makes chosen requests
go unanswered (for a bounded time), as a server that accepts connections and then hangs does.
`keep_uploads=False` makes the server a sink for benchmarks whose outputs would not fit the disk
twice: each LFS upload is still received and checked in full, but its bytes are not written; the
blob is a sparse file of the announced size (metadata, verify and `files()` are unchanged). Such a
blob is never served: a download of it gets 410 and `read()` raises, and the same bytes added
later (`add_model`, a small file) replace it.

A network you control (`shape()`): a bandwidth cap per direction (shared by all connections: bytes
sent to clients, bytes received from them) and a latency added before each request is answered,
bounded (at most 1 s) and on loopback only (the server binds 127.0.0.1). Bodies move in slices of
~10 ms at the cap, paced by a token bucket per direction: downloads by socket.sendfile (zero copy),
uploads by readinto one reused buffer, so the server holds its caps up to GB/s on a 2-core machine. `fault` (a callable of the
handler) answers chosen file GETs with an error status, or sends half the range and hangs up.
`in_flight` / `peak_in_flight` count requests being handled at once.

Auth: `Authorization: Bearer <token>` must match `token` for every write and for private repos. As on the
Hub, a wrong token gets 401 + `X-Error-Message: Invalid credentials in Authorization header` (the client
raises a plain `HfHubHTTPError`), anonymous access to a private repo gets 401 + `X-Error-Code: RepoNotFound`
(`RepositoryNotFoundError`, an `HfHubHTTPError` subclass); bodies are JSON `{"error": ...}`.

Client quirks (huggingface_hub 2.4): `huggingface_hub.constants` reads the environment once, at import, so
env vars set by a test come too late. Most code reads `constants.X` at call time, so patching the module
attributes works; `configure_hf_client(monkeypatch, endpoint, home)` sets both (env + attributes), and also
the copy `utils/tqdm.py` made of HF_HUB_DISABLE_PROGRESS_BARS. Without HF_HUB_DISABLE_XET, uploads go through
hf_xet (installed) and bypass this server. Without HF_HUB_DISABLE_TELEMETRY, the first request builds a user
agent that fetches `{ENDPOINT}/api/agent-harnesses` (3 s timeout) and caches it under the import-time HF_HOME.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib
import json
import os
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# The Hub's default .gitattributes sends these to LFS; big files and binary samples go LFS too.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npy", ".model")
LFS_MIN_SIZE = 10 * 1024 * 1024
CHUNK = 1 << 20
# Bodies move in slices: sendfile (zero copy) for downloads, readinto a reused buffer for uploads.
# A slice is ~10 ms at the cap (64 KiB..8 MiB): per-slice Python work stays negligible at GB/s and
# the pacing stays smooth at the MB/s rates tests use.
_MIN_SLICE, _MAX_SLICE, _SLICE_S = 64 << 10, 8 << 20, 0.01
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
BAD_TOKEN = "Invalid credentials in Authorization header"  # exact text the client special-cases


@dataclass
class RequestRecord:
    method: str
    path: str  # URL path, still percent-encoded, without the query
    query: str = ""
    range: str | None = None  # the Range request header, if any
    status: int = 0
    bytes_sent: int = 0  # response body bytes actually written
    bytes_received: int = 0  # request body bytes read
    repo_id: str | None = None
    filename: str | None = None  # repo path, for resolve and blob requests
    started: float = 0.0  # time.monotonic() when the request arrived, and when its answer was done
    ended: float = 0.0


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str  # of the content; the blob's name on disk
    git_oid: str  # git blob sha1 of the content (regular) or of the LFS pointer (lfs)
    lfs: bool

    @property
    def pointer_size(self) -> int:
        return len(_lfs_pointer(self.sha256, self.size))


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit id
    commits: dict[str, dict[str, FileEntry]] = field(default_factory=dict)  # commit id -> file table
    lfs_objects: set[str] = field(default_factory=set)  # sha256 of LFS objects uploaded to this repo
    created: str = ""
    modified: str = ""


class HubError(Exception):
    """Becomes a JSON error response; `code` goes to X-Error-Code, which the client maps to error classes."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())  # the one format parse_datetime accepts


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _copy(src: Path, dst: Path) -> None:
    import shutil

    shutil.copyfile(src, dst)


def _preallocate(fd: int, size: int) -> None:
    """Reserve a blob's blocks before it streams in: block allocation per write costs more CPU than
    the sha256 of the same bytes on a small VM. Where there is no posix_fallocate, writes allocate."""
    if size > 0 and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:  # file systems without it (EOPNOTSUPP), or a full disk that the writes will report
            pass


def _lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def _true(h: _Handler, key: str) -> bool:
    return h.query.get(key, ["false"])[0].lower() in ("1", "true")


_REPO, _REV = r"(?P<repo>[^/]+/[^/]+)", r"(?P<rev>[^/]+)"  # the client quotes revisions with safe=""
_ROUTES = [
    (m.split("|"), re.compile(p), name)
    for m, p, name in [
        ("POST", r"/api/repos/create", "create_repo"),
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", rf"/api/models/{_REPO}(?:/revision/{_REV})?", "info"),
        ("GET", rf"/api/models/{_REPO}/refs", "refs"),
        ("GET", rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.+))?", "tree"),
        ("POST", rf"/api/models/{_REPO}/branch/{_REV}", "branch"),
        ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", "preupload"),
        ("POST", rf"/api/models/{_REPO}/commit/{_REV}", "commit"),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/verify", "lfs_verify"),
        ("PUT", r"/_lfs_upload/(?P<ticket>[0-9a-f]+)", "lfs_put"),
        ("GET|HEAD", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", "resolve"),
        ("GET|HEAD", rf"/_lfs_blobs/{_REPO}/(?P<oid>[0-9a-f]{{64}})/(?P<path>.+)", "blob"),
    ]
]


class Rate:
    """A bandwidth cap shared by every connection (a token bucket): `take(n)` returns once n more
    bytes fit the rate. Up to `burst_s` seconds of unused rate are kept as credit, so a thread that
    wakes late (a busy machine) catches up instead of losing that time for good; over any window
    the bytes taken stay within rate x (window + burst_s)."""

    def __init__(self, bytes_per_second: float, burst_s: float = 0.05) -> None:
        if not bytes_per_second > 0:
            raise ValueError("a rate must be positive")
        self.rate, self.burst_s = float(bytes_per_second), burst_s
        self._free_at = 0.0  # when the bytes already granted have all been paid for
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._free_at = max(now - self.burst_s, self._free_at) + n / self.rate
            until = self._free_at
        delay = until - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def _slice(rate: Rate | None) -> int:
    if rate is None:
        return _MAX_SLICE
    return int(min(_MAX_SLICE, max(_MIN_SLICE, rate.rate * _SLICE_S)))


class HubServer:
    """`server = HubServer(tmp_path / "hub").start()` ... `server.stop()`, or `with HubServer(...) as server:`."""

    def __init__(
        self,
        root: Path,
        token: str = "hf_test_token",
        *,
        user: str = "testuser",
        lfs_redirect: bool = False,
        keep_uploads: bool = True,
    ):
        self.root, self.token, self.user = Path(root), token, user
        self.keep_uploads = keep_uploads
        self._sunk: set[str] = set()  # oids whose blob is a sink's sparse file: no bytes to serve
        # lfs_redirect: resolve answers an LFS file with a 302 to a signed URL on another origin
        # (http://localhost:PORT), like the Hub's CDN: the client takes metadata off the 302 and drops auth.
        self.lfs_redirect = lfs_redirect
        self.requests: list[RequestRecord] = []
        self.bytes_served = 0
        self.lfs_uploads: list[tuple[str, int]] = []
        self.repos: dict[str, Repo] = {}
        self.port, self.endpoint = 0, ""
        self._tickets: dict[str, tuple[str, str, int]] = {}  # upload ticket -> (repo_id, oid, size)
        self._secret = secrets.token_bytes(16)
        self._lock = threading.RLock()
        self._conns: set[socket.socket] = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0
        # stall(): requests that get no answer, how long each waits before the hang-up, and the
        # events that tell a test a request is stalled / release the stalled ones.
        self._stall_match: Callable[[_Handler], bool] | None = None
        self._stall_seconds = 0.0
        self._unstall = threading.Event()
        self.stalled = threading.Event()
        # shape(): the network; fault: per-request errors for file GETs ("drop", or a status code).
        self.down: Rate | None = None
        self.up: Rate | None = None
        self.latency = 0.0
        self.fault: Callable[[_Handler], str | int | None] | None = None
        self.in_flight = 0
        self.peak_in_flight = 0

    def start(self) -> HubServer:
        for sub in ("blobs", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        self.port = self._httpd.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hub", daemon=True)
        self._thread.start()
        return self

    def stall(self, match: Callable[[_Handler], bool] | None = None, *, seconds: float = 30.0) -> None:
        """From now on the requests `match(handler)` accepts (every request without `match`) get no answer:
        the connection is accepted, the request read, and nothing is sent for `seconds` (or until
        `unstall()` or `stop()`); then the server hangs up. `stalled` is set when the first one arrives.
        Bounded, so that a client without a timeout never keeps a test (or its server thread) forever."""
        self._unstall.clear()
        self._stall_match, self._stall_seconds = match or (lambda h: True), seconds

    def shape(self, *, down: float | None = None, up: float | None = None, latency: float = 0.0) -> None:
        """Cap the bytes/s sent to clients (`down`) and received from them (`up`), and answer each
        request `latency` seconds late (0 to 1 s); None: no cap."""
        if not 0 <= latency <= 1.0:
            raise ValueError("latency must be between 0 and 1 s")
        self.down = Rate(down) if down else None
        self.up = Rate(up) if up else None
        self.latency = latency

    def unstall(self) -> None:
        """Answer requests again; the ones stalled now are hung up on at once."""
        self._stall_match = None
        self._unstall.set()

    def stop(self) -> None:
        self.unstall()
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        for conn in list(self._conns):  # else keep-alive connections stay served by their handler threads
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset_log(self) -> None:
        with self._lock:
            self.requests.clear()
            self.lfs_uploads.clear()
            self.bytes_served = 0

    # ---- state, for assertions ---------------------------------------------------------------------------
    def head(self, repo_id: str, revision: str = "main") -> str:
        return self._commit_of(self.repos[repo_id], revision)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, FileEntry]:
        return dict(self.repos[repo_id].commits[self.head(repo_id, revision)])

    def read(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        return self._served_blob(self.files(repo_id, revision)[path].sha256).read_bytes()

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def _holds(self, sha256: str) -> bool:
        """Whether the blob store has this object's bytes (a sink's sparse blob has none)."""
        return self.blob_path(sha256).exists() and sha256 not in self._sunk

    def _served_blob(self, sha256: str) -> Path:
        if sha256 in self._sunk:
            raise HubError(410, f"This server kept no bytes of {sha256} (keep_uploads=False)")
        return self.blob_path(sha256)

    def add_model(self, repo_id: str, folder: Path, *, private: bool = False) -> str:
        """Put every file of `folder` into a new repo directly (no HTTP), as one commit; weight files
        are hard-linked into the blob store where the file system allows. For benchmarks: seeding a
        4 GB pair this way takes seconds of hashing instead of an upload through this server."""
        table: dict[str, FileEntry] = {}
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            h = hashlib.sha256()
            with path.open("rb") as f:
                while block := f.read(CHUNK * 8):
                    h.update(block)
            sha, size = h.hexdigest(), path.stat().st_size
            blob = self.blob_path(sha)
            if not self._holds(sha):
                blob.unlink(missing_ok=True)  # a sink's sparse blob: the real bytes replace it
                try:
                    os.link(path, blob)
                except OSError:
                    _copy(path, blob)
                self._sunk.discard(sha)
            lfs = name.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE
            git_oid = _git_sha1(_lfs_pointer(sha, size)) if lfs else _git_sha1(path.read_bytes())
            table[name] = FileEntry(size, sha, git_oid, lfs)
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id, private, created=_now()))
            if lfs_objects := {e.sha256 for e in table.values() if e.lfs}:
                repo.lfs_objects |= lfs_objects
        entry = FileEntry(len(GITATTRIBUTES), self._store(GITATTRIBUTES), _git_sha1(GITATTRIBUTES), False)
        return self._new_commit(repo, "main", {".gitattributes": entry, **table}, f"add {repo_id}")

    # ---- internals ---------------------------------------------------------------------------------------
    def _auth(self, h: _Handler) -> bool:
        """True with the right token, False with none; a wrong token is an error everywhere (as on the Hub)."""
        header = h.headers.get("Authorization")
        if header is None:
            return False
        if not hmac.compare_digest(header.encode(), f"Bearer {self.token}".encode()):
            raise HubError(401, BAD_TOKEN, headers={"X-Error-Message": BAD_TOKEN})
        return True

    def _repo(self, h: _Handler, repo_id: str, write: bool = False) -> Repo:
        if write and not h.authed:
            raise HubError(401, "You must be authenticated to write to the Hub")
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_id}", code="RepoNotFound")
        if repo.private and not h.authed:  # 401 + RepoNotFound: the Hub does not confirm the repo exists
            raise HubError(401, f"Repository not found: {repo_id}", code="RepoNotFound")
        return repo

    def _commit_of(self, repo: Repo, rev: str) -> str:
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.commits:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")

    def _store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        with self._lock:
            if not self._holds(sha):
                tmp = self.root / "tmp" / secrets.token_hex(8)
                tmp.write_bytes(data)
                os.replace(tmp, self.blob_path(sha))  # atomic: a concurrent reader never sees half a blob
                self._sunk.discard(sha)
        return sha

    def _new_commit(self, repo: Repo, branch: str, table: dict[str, FileEntry], message: str) -> str:
        with self._lock:
            self._counter += 1
            seed = json.dumps([repo.branches.get(branch), message, sorted((p, e.git_oid) for p, e in table.items())])
            cid = hashlib.sha1(f"{seed}{self._counter}{time.time_ns()}".encode()).hexdigest()
            repo.commits[cid], repo.branches[branch], repo.modified = table, cid, _now()
        return cid

    def _sign(self, repo_id: str, oid: str) -> str:
        return hmac.new(self._secret, f"{repo_id}/{oid}".encode(), hashlib.sha256).hexdigest()[:32]

    def _route(self, h: _Handler, path: str) -> None:
        for methods, pattern, name in _ROUTES:
            m = pattern.fullmatch(path)
            if m and h.command in methods:
                args = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                h.rec.repo_id = args.get("repo")
                getattr(self, f"_h_{name}")(h, **args)
                return
        raise HubError(404, f"No route for {h.command} {path}")

    # ---- API ---------------------------------------------------------------------------------------------
    def _h_whoami(self, h: _Handler) -> None:
        if not h.authed:
            raise HubError(401, "Invalid username or password.")
        h.send_json(200, {"type": "user", "name": self.user, "orgs": [], "auth": {"accessToken": {"role": "write"}}})

    def _h_validate_yaml(self, h: _Handler) -> None:
        h.read_body()
        h.send_json(200, {"warnings": []})

    def _h_create_repo(self, h: _Handler) -> None:
        if not h.authed:
            raise HubError(401, "You must be authenticated to create a repo")
        body = json.loads(h.read_body() or b"{}")
        if body.get("type", "model") != "model":
            raise HubError(400, "This test server only hosts model repos")
        repo_id = h.rec.repo_id = f"{body.get('organization') or self.user}/{body['name']}"
        url = f"{self.endpoint}/{repo_id}"
        with self._lock:
            if repo_id in self.repos:  # the client's exist_ok path reads "url" from this 409 body
                h.send_json(409, {"error": "You already created this model repo", "url": url})
                return
            repo = self.repos[repo_id] = Repo(repo_id, body.get("visibility", "public") != "public", created=_now())
            # Like the Hub, a new repo has one commit holding .gitattributes.
            entry = FileEntry(len(GITATTRIBUTES), self._store(GITATTRIBUTES), _git_sha1(GITATTRIBUTES), False)
            self._new_commit(repo, "main", {".gitattributes": entry}, "initial commit")
        h.send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _h_info(self, h: _Handler, repo: str, rev: str = "main") -> None:
        r = self._repo(h, repo)
        cid = self._commit_of(r, rev)
        siblings: list[dict[str, Any]] = []
        for path, e in sorted(r.commits[cid].items()):
            sib: dict[str, Any] = {"rfilename": path}
            if _true(h, "blobs"):  # files_metadata=True
                sib.update(size=e.size, blobId=e.git_oid)
                if e.lfs:
                    sib["lfs"] = {"size": e.size, "sha256": e.sha256, "pointerSize": e.pointer_size}
            siblings.append(sib)
        info = {"id": repo, "author": repo.split("/")[0], "sha": cid, "private": r.private, "tags": []}
        h.send_json(200, {**info, "createdAt": r.created, "lastModified": r.modified, "siblings": siblings})

    def _h_refs(self, h: _Handler, repo: str) -> None:
        r = self._repo(h, repo)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in sorted(r.branches.items())]
        h.send_json(200, {"branches": branches, "tags": [], "converts": [], "pullRequests": []})

    def _h_tree(self, h: _Handler, repo: str, rev: str, path: str = "") -> None:
        r = self._repo(h, repo)
        table = r.commits[self._commit_of(r, rev)]
        recursive, prefix = _true(h, "recursive"), (path.strip("/") + "/" if path.strip("/") else "")
        files: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for p, e in sorted(table.items()):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix) :].split("/")
            dirs.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts) - 1 if recursive else 0))
            if not recursive and len(parts) > 1:
                dirs.add(prefix + parts[0])
            else:
                item: dict[str, Any] = {"type": "file", "oid": e.git_oid, "size": e.size, "path": p}
                if e.lfs:
                    item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": e.pointer_size}
                files.append(item)
        if prefix and not files and not dirs:
            raise HubError(404, f"{path} does not exist", code="EntryNotFound")
        # No git trees here: a folder's oid is a stable hash of its path.
        folders = [{"type": "directory", "oid": _git_sha1(d.encode()), "size": 0, "path": d} for d in sorted(dirs)]
        h.send_json(200, folders + files)

    def _h_branch(self, h: _Handler, repo: str, rev: str) -> None:
        r = self._repo(h, repo, write=True)
        start = json.loads(h.read_body() or b"{}").get("startingPoint") or "main"
        with self._lock:
            if rev in r.branches:
                raise HubError(409, f"Reference refs/heads/{rev} already exists")
            r.branches[rev] = self._commit_of(r, start)
        h.send_json(200, {})

    def _h_preupload(self, h: _Handler, repo: str, rev: str) -> None:
        r = self._repo(h, repo, write=True)
        table = r.commits[self._commit_of(r, rev)]
        out = []
        for f in json.loads(h.read_body())["files"]:
            sample = base64.b64decode(f.get("sample", ""))
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE or b"\0" in sample
            e = table.get(f["path"])
            # The client skips unchanged files by comparing this oid: sha256 for LFS, git sha1 otherwise.
            oid = None if e is None else (e.sha256 if e.lfs else e.git_oid)
            mode = "lfs" if lfs else "regular"
            out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        h.send_json(200, {"files": out})

    def _h_lfs_batch(self, h: _Handler, repo: str) -> None:
        r = self._repo(h, repo, write=True)
        body = json.loads(h.read_body())
        if body.get("operation") != "upload":
            raise HubError(400, "This test server only implements LFS uploads")
        objects = []
        for obj in body["objects"]:
            oid, size = obj.get("oid"), obj.get("size")
            if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int)):
                raise HubError(422, f"Invalid LFS object {obj!r}")
            blob = self.blob_path(oid)
            if oid in r.lfs_objects and blob.exists() and blob.stat().st_size == size:
                objects.append({"oid": oid, "size": size})  # no "actions": the client skips the upload
                continue
            ticket = secrets.token_hex(16)  # a capability URL: the client PUTs without any auth header
            with self._lock:
                self._tickets[ticket] = (repo, oid, size)
            verify = f"{self.endpoint}/{repo}.git/info/lfs/objects/verify"
            actions = {"upload": {"href": f"{self.endpoint}/_lfs_upload/{ticket}"}, "verify": {"href": verify}}
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        out = {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
        h.send_json(200, out, content_type="application/vnd.git-lfs+json")

    def _h_lfs_put(self, h: _Handler, ticket: str) -> None:
        with self._lock:
            target = self._tickets.get(ticket)
        if target is None:
            raise HubError(404, "Unknown or already used upload URL")
        repo, oid, size = target
        h.rec.repo_id = repo
        tmp, digest, got = self.root / "tmp" / f"{ticket}.part", hashlib.sha256(), 0
        try:
            with tmp.open("wb", buffering=0) as f:  # stream to disk while hashing: never the whole object in RAM
                if self.keep_uploads:
                    _preallocate(f.fileno(), size)
                for view in h.iter_body(reuse=True):
                    digest.update(view)
                    got += len(view)
                    if self.keep_uploads:
                        f.write(view)
                if not self.keep_uploads:
                    f.truncate(got)  # sparse: the size without the blocks
            if got != size or digest.hexdigest() != oid:
                raise HubError(
                    400,
                    f"Upload does not match the batch request: announced {oid} ({size} bytes), "
                    f"received {digest.hexdigest()} ({got} bytes)",
                )
            with self._lock:
                if self.keep_uploads:
                    os.replace(tmp, self.blob_path(oid))
                    self._sunk.discard(oid)
                elif not self.blob_path(oid).exists():  # a sink never hides a real blob
                    os.replace(tmp, self.blob_path(oid))
                    self._sunk.add(oid)
        finally:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._tickets.pop(ticket, None)  # single use, whatever the outcome
        with self._lock:
            self.repos[repo].lfs_objects.add(oid)
            self.lfs_uploads.append((oid, size))
        h.send_json(200, None, headers={"ETag": f'"{oid}"'})

    def _h_lfs_verify(self, h: _Handler, repo: str) -> None:
        r = self._repo(h, repo, write=True)
        body = json.loads(h.read_body())
        blob = self.blob_path(body["oid"])
        if body["oid"] not in r.lfs_objects or not blob.exists() or blob.stat().st_size != body["size"]:
            raise HubError(404, f"LFS object {body['oid']} not found")
        h.send_json(200, {"message": "Object verified"})

    def _h_commit(self, h: _Handler, repo: str, rev: str) -> None:
        r = self._repo(h, repo, write=True)
        lines = [json.loads(x) for x in h.read_body().splitlines() if x.strip()]
        if h.query.get("create_pr"):
            raise HubError(400, "Pull requests are not implemented by this test server")
        if rev not in r.branches:
            raise HubError(404, f"Invalid rev id: {rev} (commits go to a branch)", code="RevisionNotFound")
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        with self._lock:  # read-modify-write of the branch head: one commit at a time
            head, parent = r.branches[rev], header.get("parentCommit")
            if parent and not head.startswith(parent):
                raise HubError(412, f"A commit has happened since {parent}; head is {head}")
            table = dict(r.commits[head])
            for item in lines[1:]:
                key, v = item["key"], item["value"]
                path = v["path"]
                if key == "file":
                    data = base64.b64decode(v["content"])
                    table[path] = FileEntry(len(data), self._store(data), _git_sha1(data), lfs=False)
                elif key == "lfsFile":
                    oid, blob = v["oid"], self.blob_path(v["oid"])
                    if oid not in r.lfs_objects or not blob.exists():
                        raise HubError(400, f"LFS object {oid} for {path} was never uploaded to {repo}")
                    size = blob.stat().st_size
                    if v.get("size") not in (None, size):
                        raise HubError(400, f"LFS object {oid} has {size} bytes, not {v['size']}")
                    table[path] = FileEntry(size, oid, _git_sha1(_lfs_pointer(oid, size)), lfs=True)
                elif key == "deletedFile":
                    if table.pop(path, None) is None:
                        raise HubError(404, "A file with this name doesn't exist", code="EntryNotFound")
                elif key == "deletedFolder":
                    for p in [p for p in table if p.startswith(path.rstrip("/") + "/")]:
                        del table[p]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            cid = self._new_commit(r, rev, table, header.get("summary", ""))
        url = f"{self.endpoint}/{repo}/commit/{cid}"
        h.send_json(200, {"success": True, "commitOid": cid, "commitUrl": url, "pullRequestUrl": None})

    # ---- downloads ---------------------------------------------------------------------------------------
    def _h_resolve(self, h: _Handler, repo: str, rev: str, path: str) -> None:
        h.rec.filename = path
        r = self._repo(h, repo)
        cid = self._commit_of(r, rev)
        e = r.commits[cid].get(path)
        if e is None:  # X-Repo-Commit lets the client cache the non-existence
            raise HubError(404, f"Entry not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": cid})
        headers = {"X-Repo-Commit": cid, "ETag": f'"{e.sha256 if e.lfs else e.git_oid}"'}
        if e.lfs:  # the client prefers these to ETag / Content-Length, which may describe a redirect
            headers.update({"X-Linked-Etag": f'"{e.sha256}"', "X-Linked-Size": str(e.size)})
            if self.lfs_redirect:
                cdn = f"http://localhost:{self.port}/_lfs_blobs/{repo}/{e.sha256}/{path}"
                headers["Location"] = f"{cdn}?sig={self._sign(repo, e.sha256)}"
                h.send_json(302, None, headers=headers, content_type="text/plain")
                return
        h.send_blob(self._served_blob(e.sha256), e.size, headers)

    def _h_blob(self, h: _Handler, repo: str, oid: str, path: str) -> None:
        h.rec.filename = path
        if not hmac.compare_digest(h.query.get("sig", [""])[0], self._sign(repo, oid)):
            raise HubError(403, "Bad signature")
        blob = self._served_blob(oid)
        h.send_blob(blob, blob.stat().st_size, {"ETag": f'"{oid}"'})


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client connection must not block stop()
    hub: HubServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer (a run that stops at an error, a cancelled download)
        # is not a server error: socketserver would print it to stderr, inside the CLI's one-line
        # error a test is reading. Anything else is printed as before.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms delayed-ACK stalls
    server: _HTTPServer
    rec: RequestRecord
    query: dict[str, list[str]]
    authed: bool

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the log is `hub.requests`
        pass

    def setup(self) -> None:
        super().setup()
        self.server.hub._conns.add(self.connection)

    def finish(self) -> None:
        self.server.hub._conns.discard(self.connection)
        super().finish()

    def _dispatch(self) -> None:
        hub, url = self.server.hub, urlsplit(self.path)
        self.rec = RequestRecord(self.command, url.path, url.query, self.headers.get("Range"), started=time.monotonic())
        self.query, self._body_started = parse_qs(url.query), False
        with hub._lock:  # logged first and filled in as we go: complete before the client sees the response
            hub.requests.append(self.rec)
            hub.in_flight += 1
            hub.peak_in_flight = max(hub.peak_in_flight, hub.in_flight)
        try:
            if hub.latency:
                time.sleep(hub.latency)
            self._answer(hub, url)
        finally:
            self.rec.ended = time.monotonic()
            with hub._lock:
                hub.in_flight -= 1

    def _answer(self, hub: HubServer, url: Any) -> None:
        match = hub._stall_match
        if match is not None and match(self):
            hub.stalled.set()
            hub._unstall.wait(hub._stall_seconds)
            self.close_connection = True  # no answer at all: the client sees the connection close
            return
        try:
            self.authed = hub._auth(self)
            hub._route(self, url.path)
        except HubError as e:
            self._drain()  # keep the keep-alive connection in sync
            code = {"X-Error-Code": e.code} if e.code else {}
            self.send_json(e.status, {"error": e.message}, headers={**e.headers, **code})
        except Exception as e:  # a server bug or a client that hung up: drop the (maybe desynced) connection
            self.close_connection = True
            if not self.rec.status and not isinstance(e, OSError):  # nothing sent yet: tell the client
                self.send_json(500, {"error": f"test hub server error: {e!r}"})

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    # ---- request body: Content-Length or chunked (streamed uploads) --------------------------------------
    def iter_body(self, *, reuse: bool = False) -> Iterator[memoryview]:
        """The body in slices. With `reuse`, every slice is a view of one buffer kept by this
        connection, valid until the next slice is asked for (no allocation per slice)."""
        if self._body_started:
            return
        self._body_started = True
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            yield from self._read(int(self.headers.get("Content-Length") or 0), reuse)
            return
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            yield from self._read(size, reuse)
            self.rfile.readline()  # the CRLF closing each chunk
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass

    def _read(self, left: int, reuse: bool) -> Iterator[memoryview]:
        rate = self.server.hub.up
        step = _slice(rate)
        if reuse:
            if len(getattr(self, "_buffer", b"")) < step:
                self._buffer = memoryview(bytearray(step))
            buffer = self._buffer
        while left:
            n = min(left, step)
            if rate is not None:  # paid before the read: the client's sends wait in the socket buffers
                rate.take(n)
            view = buffer[:n] if reuse else memoryview(bytearray(n))
            got = self.rfile.readinto(view)  # BufferedReader: fills the view unless the client hangs up
            if got < n:
                raise ConnectionError("client closed the connection mid-body")
            left -= n
            self.rec.bytes_received += n
            yield view

    def read_body(self) -> bytes:
        return b"".join(self.iter_body())

    def _drain(self) -> None:
        try:
            for _ in self.iter_body():
                pass
        except (OSError, ValueError):
            self.close_connection = True

    # ---- responses ---------------------------------------------------------------------------------------
    def send_json(
        self, status: int, obj: Any, *, headers: dict[str, str] | None = None, content_type: str = "application/json"
    ) -> None:
        body = b"" if obj is None else json.dumps(obj).encode()
        self._send_head(status, {"Content-Type": content_type, **(headers or {}), "Content-Length": str(len(body))})
        if self.command != "HEAD":
            self.rec.bytes_sent += len(body)
            self.wfile.write(body)

    def _send_head(self, status: int, headers: dict[str, str]) -> None:
        self.rec.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def send_blob(self, blob: Path, size: int, headers: dict[str, str]) -> None:
        start, end, status, rng = 0, size - 1, 200, self.headers.get("Range")
        if rng and size > 0:
            m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", rng)  # one range only, as the client sends
            a, b = m.groups() if m else ("", "")
            if a:
                start, end = int(a), min(int(b), size - 1) if b else size - 1
            elif b:  # suffix range: the last N bytes
                start = max(0, size - int(b))
            if not (a or b) or start >= size or start > end:
                raise HubError(
                    416, f"Range {rng!r} not satisfiable (size {size})", headers={"Content-Range": f"bytes */{size}"}
                )
            status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{size}"
        length = end - start + 1 if size else 0
        hub = self.server.hub
        fault = hub.fault(self) if hub.fault is not None and self.command == "GET" else None
        if isinstance(fault, int):
            raise HubError(fault, f"injected HTTP {fault}")
        headers.update({"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"})
        self._send_head(status, {**headers, "Content-Length": str(length)})
        if self.command == "HEAD":
            return
        end = start + (length // 2 if fault == "drop" else length)  # drop: send half, then hang up
        step = _slice(hub.down)
        with blob.open("rb") as f:
            offset = start
            while offset < end:
                n = min(end - offset, step)
                if hub.down is not None:
                    hub.down.take(n)
                # Count before sending: the client may act on the last byte before this thread runs again.
                self.rec.bytes_sent += n
                with hub._lock:
                    hub.bytes_served += n
                sent = 0
                try:  # socket.sendfile: os.sendfile (no copy through Python) where there is one, else send
                    sent = self.connection.sendfile(f, offset, n)
                finally:
                    if sent < n:  # the client hung up (or the file shrank): count only what was sent
                        self.rec.bytes_sent -= n - sent
                        with hub._lock:
                            hub.bytes_served -= n - sent
                if sent < n:
                    raise ConnectionError("file ended before the announced length")
                offset += n
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


def configure_hf_client(monkeypatch: Any, endpoint: str, home: Path) -> None:
    """Point an already imported huggingface_hub at `endpoint` for one test, caches and token under `home`.

    Sets the env vars (for subprocesses and late readers) AND the `huggingface_hub.constants` attributes
    (read from the environment at import only). `monkeypatch` is pytest's fixture: all is undone afterwards.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent

    home = Path(home)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)  # no stray real token, no offline mode
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for k in ("HF_HUB_DISABLE_XET", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(k, "1")
        monkeypatch.setattr(constants, k, True)
    paths = {"HF_HOME": home, "HF_HUB_CACHE": home / "hub", "HF_ASSETS_CACHE": home / "assets"}
    for k, v in {**paths, "HF_TOKEN_PATH": home / "token", "HF_STORED_TOKENS_PATH": home / "stored_tokens"}.items():
        monkeypatch.setenv(k, str(v))
        monkeypatch.setattr(constants, k, str(v))
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # HfApi() and hf_hub_download() without endpoint=
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"  # hf_hub_url() builds URLs from it
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    # utils/tqdm.py copied this flag at import (`from ..constants import ...`): patch its own global.
    monkeypatch.setattr(importlib.import_module("huggingface_hub.utils.tqdm"), "HF_HUB_DISABLE_PROGRESS_BARS", True)
    monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)  # never ask the real Hub


def serving_hub(tmp_path: Path, monkeypatch: Any, token: str) -> Iterator[HubServer]:
    """The body of a pytest fixture: a server under tmp_path/hub, the client pointed at it with
    `token` as HF_TOKEN; stopped (and the client's session closed) after the test."""
    from huggingface_hub import close_session

    server = HubServer(tmp_path / "hub", token=token).start()
    configure_hf_client(monkeypatch, server.endpoint, tmp_path / "hf_home")
    monkeypatch.setenv("HF_TOKEN", token)
    yield server
    close_session()
    server.stop()
