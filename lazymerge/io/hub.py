"""Models on the Hugging Face Hub as checkpoints: planned from ranged header reads, fetched on demand.

`owner/name` or `owner/name@revision` works anywhere a model path does. Opening one reads the
repo's file list, the index and each weight file's header with HTTP range requests (a
safetensors header; a `.bin` archive's zip directory, data.pkl and one 30-byte local header per
storage), and nothing else: the plan is made before any weight is downloaded. The revision is
pinned to the commit it resolved to, so every later read sees the same files.

Weight files are then fetched through huggingface_hub when the executor first reads them
(`Checkpoint.local_file`), into its cache (HF_HOME, HF_TOKEN, HF_ENDPOINT honoured), and the next
file in plan order is prefetched in the background. With `low_disk`, files go to a private
temporary folder instead, nothing is prefetched, and each file is deleted as soon as every tensor
read from it has been consumed (`Checkpoint.release_file`): about one shard per input model is
on disk at a time. With HF_HUB_OFFLINE set, the model is opened from the local cache.

Every huggingface_hub error becomes a one-line `HubError` with a hint; a token never appears in
a message.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

from lazymerge.constants import (
    BIN_INDEX_NAME,
    BIN_SINGLE_NAME,
    CARRIED_FILES,
    SAFE_INDEX_NAME,
    SAFE_SINGLE_NAME,
    TOKENIZER_FILES,
)
from lazymerge.errors import CheckpointError, HeaderError, HubError, LazyMergeError
from lazymerge.io.checkpoint import Checkpoint, TensorRef, build_checkpoint, open_checkpoint, validate_weight_map
from lazymerge.io.header import parse_header

__all__ = ["HubCheckpoint", "hub_errors", "is_repo_id", "open_any", "open_hub_checkpoint", "split_repo_id"]

# The Hub's rules: letters, digits, '-', '_', '.'; no '--' or '..'; at most 96 characters.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_REPO_RE = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[^\s@]+))?")
_SIDE_FILES = ("config.json", *TOKENIZER_FILES, *CARRIED_FILES)
_HEADER_PROBE = 64 * 1024  # one ranged read covers the header of most shards
_THREADS = 8


def split_repo_id(text: str) -> tuple[str, str | None]:
    """'owner/name@rev' -> ('owner/name', 'rev'); 'owner/name' -> ('owner/name', None)."""
    m = _REPO_RE.fullmatch(text)
    if m is None:
        raise CheckpointError(f"{text!r} is not a Hub repo id (owner/name or owner/name@revision)")
    return m["repo"], m["rev"]


def is_repo_id(text: object) -> bool:
    """True for `owner/name` or `owner/name@revision` that is not an existing local path."""
    if not isinstance(text, str) or len(text) > 300:
        return False
    m = _REPO_RE.fullmatch(text)
    if m is None or "--" in m["repo"] or ".." in m["repo"] or len(m["repo"]) > 96:
        return False
    return not os.path.exists(text)


def open_any(
    model: str | os.PathLike[str],
    label: str | None = None,
    *,
    low_disk: bool = False,
    token: str | bool | None = None,
    download_dir: str | os.PathLike[str] | None = None,
) -> Checkpoint:
    """A local folder/file with `open_checkpoint`, or a Hub repo id with `open_hub_checkpoint`."""
    if isinstance(model, str) and is_repo_id(model):
        repo_id, revision = split_repo_id(model)
        return open_hub_checkpoint(
            repo_id, revision, low_disk=low_disk, token=token, label=label or model, download_dir=download_dir
        )
    return open_checkpoint(model, label=label or str(model))


# ---- errors ------------------------------------------------------------------------------------------------


def _secrets(token: object) -> list[str]:
    found = [token] if isinstance(token, str) else []
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var):
            found.append(os.environ[var])
    with contextlib.suppress(Exception):
        from huggingface_hub import get_token

        if stored := get_token():
            found.append(stored)
    return [s for s in found if len(s) >= 4]


def scrub(text: str, token: object = None) -> str:
    """`text` on one line, with every token we know of (and anything shaped like one) masked."""
    for secret in _secrets(token):
        text = text.replace(secret, "***")
    text = re.sub(r"\bhf_[A-Za-z0-9]{8,}\b", "hf_***", text)
    text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
    return " ".join(text.split())


def _server_says(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    message = ""
    if response is not None:
        with contextlib.suppress(Exception):
            message = response.headers.get("X-Error-Message") or ""
        if not message:
            with contextlib.suppress(Exception):
                body = response.json()
                message = body.get("error", "") if isinstance(body, dict) else ""
    if not message:
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        message = lines[0] if lines else type(exc).__name__
    return str(message)[:200]


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


@contextlib.contextmanager
def hub_errors(
    repo_id: str, revision: str | None = None, *, token: object = None, writing: bool = False
) -> Iterator[None]:
    """Turn huggingface_hub / network exceptions into one-line `HubError`s (tokens masked)."""
    try:
        yield
    except LazyMergeError:
        raise
    except Exception as exc:
        error = _convert(exc, repo_id, revision, writing)
        if error is None:
            raise
        raise HubError(scrub(error.message, token), hint=scrub(error.hint, token)) from None


def _convert(exc: Exception, repo_id: str, revision: str | None, writing: bool) -> HubError | None:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = repo_id if revision is None else f"{repo_id}@{revision}"
    if isinstance(exc, HFValidationError):
        return HubError(f"{where!r} is not a valid Hub repo id ({_server_says(exc)})", hint="use owner/name")
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or (
        constants.HF_HUB_OFFLINE and isinstance(exc, (FileNotFoundError, ConnectionError))
    ):
        if constants.HF_HUB_OFFLINE:
            return HubError(
                f"{where}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set",
                hint="download it once with network access, or unset HF_HUB_OFFLINE",
            )
        return HubError(
            f"{where}: cannot reach the Hub and the files are not in the local cache",
            hint=f"check the network and HF_ENDPOINT ({constants.ENDPOINT})",
        )
    status = _status(exc)
    if status == 401 and not isinstance(exc, RepositoryNotFoundError):
        return HubError(
            f"{where}: the Hub rejected the token (401: {_server_says(exc)})",
            hint="set a valid token with HF_TOKEN, --token or `hf auth login`",
        )
    if isinstance(exc, GatedRepoError):
        return HubError(
            f"{where}: gated repo; your account has not been granted access",
            hint="accept the model's terms on its Hub page, then use a token of that account",
        )
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(
            f"{where}: repository not found on the Hub (and no local folder of that name exists)",
            hint="check the id; a private repo needs a token (HF_TOKEN, --token or `hf auth login`)",
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{where}: revision {revision or 'main'!r} not found", hint="check the branch, tag or commit")
    if isinstance(exc, EntryNotFoundError):
        return HubError(f"{where}: a file is missing on the Hub ({_server_says(exc)})")
    if status == 403:
        action = "write to" if writing else "read"
        return HubError(
            f"{where}: your token may not {action} this repo (403: {_server_says(exc)})",
            hint="use a token with write access to the namespace" if writing else "check the token's permissions",
        )
    if isinstance(exc, HfHubHTTPError):
        code = f"{status}: " if status else ""
        return HubError(f"{where}: Hub request failed ({code}{_server_says(exc)})")
    if _is_network_error(exc):
        return HubError(
            f"{where}: cannot reach the Hub at {constants.ENDPOINT} ({type(exc).__name__}: {_server_says(exc)})",
            hint="check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the local cache",
        )
    return None


def _is_network_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import httpx2
    except ImportError:  # pragma: no cover - older huggingface_hub uses requests/httpx
        return False
    return isinstance(exc, httpx2.TransportError)


# ---- ranged reads ------------------------------------------------------------------------------------------


class RangedFile(io.RawIOBase):
    """A seekable, read-only file object over one Hub file, reading with HTTP Range requests.

    Every request fetches at least `block_size` bytes (fewer at the end of the file) and is
    cached, so a parser's small reads cost few round trips; `prefetch` fetches many exact ranges
    in parallel (the local zip headers of a `.bin`). `bytes_fetched` counts content bytes."""

    def __init__(self, url: str, size: int, headers: dict[str, str], name: str, block_size: int = 64 * 1024):
        super().__init__()
        self.url, self.size, self.headers, self.name, self.block_size = url, size, headers, name, block_size
        self.bytes_fetched = 0
        self.error: BaseException | None = None  # the last network error, for callers that catch broadly
        self._pos = 0
        self._blocks: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        n = min(len(view), max(0, self.size - self._pos))
        done = 0
        while done < n:
            data = self._cached(self._pos + done, n - done)
            if data is None:
                want = max(n - done, self.block_size)
                start = self._pos + done
                if start + want > self.size:  # near the end (the zip directory): read backwards
                    start = max(0, min(start, self.size - want))
                self._fetch(start, min(self.size, start + want))
                continue
            view[done : done + len(data)] = data
            done += len(data)
        self._pos += n
        return n

    def _cached(self, pos: int, n: int) -> bytes | None:
        with self._lock:
            for start, block in self._blocks.items():
                if start <= pos < start + len(block):
                    return block[pos - start : pos - start + n]
        return None

    def _fetch(self, start: int, end: int) -> bytes:
        from huggingface_hub.utils import get_session, hf_raise_for_status

        if end <= start:
            return b""
        try:
            response = get_session().get(self.url, headers={**self.headers, "Range": f"bytes={start}-{end - 1}"})
            hf_raise_for_status(response)
        except Exception as exc:
            self.error = exc
            raise
        data = response.content
        if response.status_code == 200 and len(data) == self.size:  # the server ignored the range
            data = data[start:end]
        if len(data) != end - start:
            self.error = HeaderError(self.name, f"asked the Hub for {end - start} bytes, got {len(data)}")
            raise self.error
        with self._lock:
            self._blocks[start] = data
            self.bytes_fetched += len(data)
        return data

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """Fetch the (start, end) ranges not already cached, several at a time."""
        todo = sorted({(a, min(b, self.size)) for a, b in ranges})
        todo = [(a, b) for a, b in todo if b > a and not self._covered(a, b)]
        if not todo:
            return
        with ThreadPoolExecutor(_THREADS) as pool:
            for _ in pool.map(lambda r: self._fetch(*r), todo):
                pass

    def _covered(self, a: int, b: int) -> bool:
        with self._lock:
            return any(s <= a and b <= s + len(blk) for s, blk in self._blocks.items())


# ---- opening -----------------------------------------------------------------------------------------------


class HubCheckpoint(Checkpoint):
    """A checkpoint whose files live on the Hub; weight files are downloaded when first read."""

    remote: ClassVar[bool] = True

    repo_id: str
    revision: str | None
    commit: str

    def _setup(
        self,
        *,
        repo_id: str,
        revision: str | None,
        commit: str,
        token: str | bool | None,
        low_disk: bool,
        side_paths: dict[str, Path],
        download_dir: Path | None,
    ) -> None:
        self.repo_id, self.revision, self.commit = repo_id, revision, commit
        self.token, self.low_disk = token, low_disk
        self._side_paths = side_paths
        self._download_dir = download_dir
        self._futures: dict[str, Future[Path]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="lazymerge-download")
        self.downloads = 0  # weight files fetched (a released file read again is fetched again)
        self._finalizer = weakref.finalize(self, _cleanup, self._pool, download_dir)

    def side_file(self, name: str) -> Path | None:
        return self._side_paths.get(name)

    def local_file(self, name: str) -> Path:
        future = self._start(name)
        with hub_errors(self.repo_id, self.revision, token=self.token):
            path = future.result()
        if not self.low_disk:  # overlap the next download with reading this file
            later = self.files[self.files.index(name) + 1 :] if name in self.files else []
            nxt = next((f for f in later if f not in self._futures), None)
            if nxt is not None:
                self._start(nxt)
        return path

    def release_file(self, name: str) -> None:
        if not self.low_disk:
            return
        with self._lock:
            future = self._futures.pop(name, None)
        if future is not None and future.done() and future.exception() is None:
            Path(future.result()).unlink(missing_ok=True)

    def close(self) -> None:
        """Stop downloads and delete the private download folder (low_disk)."""
        self._finalizer()

    def _start(self, name: str) -> Future[Path]:
        with self._lock:
            future = self._futures.get(name)
            if future is None:
                future = self._futures[name] = self._pool.submit(self._download, name)
            return future

    def _download(self, name: str) -> Path:
        from huggingface_hub import hf_hub_download

        with self._lock:
            self.downloads += 1
        local_dir = str(self._download_dir) if self.low_disk and self._download_dir else None
        path = Path(hf_hub_download(self.repo_id, name, revision=self.commit, token=self.token, local_dir=local_dir))
        expected = self.file_sizes.get(name)
        if expected is not None and path.stat().st_size != expected:
            raise HeaderError(f"{self.label}/{name}", f"downloaded {path.stat().st_size} bytes, expected {expected}")
        return path


def _cleanup(pool: ThreadPoolExecutor, folder: Path | None) -> None:
    pool.shutdown(wait=True, cancel_futures=True)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def open_hub_checkpoint(
    repo_id: str,
    revision: str | None = None,
    *,
    low_disk: bool = False,
    token: str | bool | None = None,
    label: str | None = None,
    download_dir: str | os.PathLike[str] | None = None,
) -> Checkpoint:
    """Open a Hub model repo from its metadata alone (file list, index, headers by ranged reads).

    Args:
        repo_id: `owner/name`.
        revision: branch, tag or commit (default main); pinned to the commit it resolves to.
        low_disk: download weight files into a private temporary folder (under `download_dir`
            when given) and delete each once consumed, instead of keeping them in the HF cache.
        token: a Hub token; None uses HF_TOKEN or the stored login, False sends none.

    Raises:
        HubError: the repo, revision or a file cannot be reached (one line, with a hint).
        CheckpointError / HeaderError: the repo holds no loadable model, or a header is corrupt.
    """
    from huggingface_hub import HfApi, constants

    label = label or (repo_id if revision is None else f"{repo_id}@{revision}")
    with hub_errors(repo_id, revision, token=token):
        if constants.HF_HUB_OFFLINE:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(repo_id, revision=revision, token=token, local_files_only=True)
            return open_checkpoint(folder, label=label)
        api = HfApi(token=token)
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
        commit = info.sha or revision or "main"
        sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
        files, weight_map = _weight_files(api, repo_id, commit, label, sizes, token)
        headers = _auth_headers(token)
        with ThreadPoolExecutor(_THREADS) as pool:
            tables = list(pool.map(lambda f: _remote_tensors(repo_id, commit, f, sizes[f], headers, label), files))
        side_dir = None
        if low_disk:
            side_dir = Path(tempfile.mkdtemp(prefix="lazymerge-download-", dir=download_dir))
        try:
            side_paths = _download_side_files(repo_id, commit, sizes, token, side_dir)
        except BaseException:
            if side_dir is not None:
                shutil.rmtree(side_dir, ignore_errors=True)
            raise
    owner, name = repo_id.split("/", 1)
    root = side_dir or Path(constants.HF_HUB_CACHE) / f"models--{owner}--{name}" / "snapshots" / commit
    ckpt = build_checkpoint(HubCheckpoint, label, root, files, tables, {f: sizes[f] for f in files}, weight_map)
    ckpt._setup(
        repo_id=repo_id,
        revision=revision,
        commit=commit,
        token=token,
        low_disk=low_disk,
        side_paths=side_paths,
        download_dir=side_dir,
    )
    return ckpt


def _auth_headers(token: str | bool | None) -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    return build_hf_headers(token=token)


def _weight_files(
    api, repo_id: str, commit: str, label: str, sizes: dict[str, int], token: str | bool | None
) -> tuple[list[str], dict[str, str] | None]:
    import json

    for index_name in (SAFE_INDEX_NAME, BIN_INDEX_NAME):
        if index_name in sizes:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(repo_id, index_name, revision=commit, token=token)
            try:
                obj = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError) as exc:
                raise CheckpointError(f"{label}: {index_name} is not valid JSON ({exc})") from None
            weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{label}: {index_name} has no weight_map")
            validate_weight_map(label, index_name, weight_map)
            files = list(dict.fromkeys(weight_map.values()))
            for file in files:
                if file not in sizes:
                    raise CheckpointError(
                        f"{label}: shard {file} is listed in the index but missing from the repo",
                        hint="the upload is incomplete; ask the repo's owner",
                    )
            return files, weight_map
    for single in (SAFE_SINGLE_NAME, BIN_SINGLE_NAME):
        if single in sizes:
            return [single], None
    top = [f for f in sizes if "/" not in f]
    singles = sorted(f for f in top if f.endswith(".safetensors")) or sorted(
        f for f in top if f.startswith("pytorch_model") and f.endswith(".bin")
    )
    if len(singles) == 1:
        return singles, None
    raise CheckpointError(
        f"{label}: no model.safetensors, pytorch_model.bin or index file in this Hub repo",
        hint="check the repo id; a model repo holds config.json and the weight files",
    )


def _remote_tensors(
    repo_id: str, commit: str, file: str, size: int, headers: dict[str, str], label: str
) -> tuple[list[TensorRef], dict[str, str]]:
    from huggingface_hub import hf_hub_url

    url = hf_hub_url(repo_id, file, revision=commit)
    source = f"{label}/{file}"
    reader = RangedFile(url, size, headers, source)
    if file.endswith(".safetensors"):
        if size < 8:
            raise HeaderError(source, f"file is {size} bytes, too short for a safetensors header")
        probe = reader.read(min(size, _HEADER_PROBE))
        n = int.from_bytes(probe[:8], "little")
        if 8 + n > len(probe) and 8 + n <= size and n <= 100_000_000:
            probe += reader.read(8 + n - len(probe))
        header = parse_header(probe, file_size=size, source=source)
        refs = [
            TensorRef(e.name, e.dtype, e.shape, file, header.data_start + e.begin, e.nbytes)
            for e in header.tensors.values()
        ]
        return refs, header.metadata
    if file.endswith((".bin", ".pt")):
        return _remote_bin_tensors(reader, file, source), {}
    raise HeaderError(source, "unknown weight file type (expected .safetensors or .bin)")


def _remote_bin_tensors(reader: RangedFile, file: str, source: str) -> list[TensorRef]:
    import zipfile

    from lazymerge.io.torchbin import read_bin_tensors

    # Warm the cache with everything the parser will read: the zip directory (the last block),
    # data.pkl and byteorder whole, and the fixed 30-byte local header of every storage.
    try:
        with zipfile.ZipFile(reader) as zf:
            infos = zf.infolist()
        ranges = []
        for info in infos:
            if info.filename.endswith(("/data.pkl", "/byteorder", "/version")) and info.file_size < 256 << 20:
                end = info.header_offset + 30 + 2 * len(info.filename) + 1024 + info.compress_size
                ranges.append((info.header_offset, end))
            else:
                ranges.append((info.header_offset, info.header_offset + 30))
        reader.prefetch(ranges)
    except Exception:
        if reader.error is not None:
            raise reader.error from None
        # not a zip: the parser below says so in its own words
    try:
        found = read_bin_tensors(reader, name=source)
    except HeaderError:
        if reader.error is not None:
            raise reader.error from None
        raise
    return [TensorRef(t.name, t.dtype, t.shape, file, t.offset, t.nbytes) for t in found]


def _download_side_files(
    repo_id: str, commit: str, sizes: dict[str, int], token: str | bool | None, folder: Path | None
) -> dict[str, Path]:
    from huggingface_hub import hf_hub_download

    names = [n for n in _SIDE_FILES if n in sizes]

    def fetch(name: str) -> Path:
        local_dir = str(folder) if folder is not None else None
        return Path(hf_hub_download(repo_id, name, revision=commit, token=token, local_dir=local_dir))

    with ThreadPoolExecutor(_THREADS) as pool:
        return dict(zip(names, pool.map(fetch, names), strict=True))
