"""Models on the Hugging Face Hub as checkpoints: planned from ranged header reads, fetched on demand.

`owner/name` or `owner/name@revision` works anywhere a model path does. Opening one reads the
repo's file list, the index and each weight file's header with HTTP range requests (a
safetensors header; a `.bin` archive's zip directory, data.pkl and one 30-byte local header per
storage), and nothing else: the plan is made before any weight is downloaded. The revision is
pinned to the commit it resolved to, so every later read sees the same files.

Weight files are then fetched through huggingface_hub when the executor first reads them
(`Checkpoint.local_file`), into its cache (HF_HOME, HF_TOKEN, HF_ENDPOINT honoured), and the next
file in plan order is prefetched in the background. With `low_disk`, weight files are never
downloaded: the executor's reads are streamed with HTTP range requests straight into its buffers
(`range_source` -> `lazymerge.io.hub_stream.HttpRangeSource`, several requests in flight per
file, a bounded read-ahead, retries that resume a dropped range), so no input weight byte is on
disk; the side files (config, tokenizer) go to a private temporary folder. With HF_HUB_OFFLINE
set, the model is opened from the local cache.

Why streaming is not the default for repo ids: the HF cache makes every later run over the same
inputs (a weight sweep run step by step, a recipe being tuned, HF_HUB_OFFLINE) read local disk
instead of the network, and the cached download is one sequential stream per file, which real
Hub CDNs serve well. Streaming wins when the disk is small or the inputs are used once.

The private folder is removed by `HubCheckpoint.close`, when the checkpoint is collected, or at
interpreter exit, and with the error when opening fails: an index that names a shard lacking a
tensor is caught from the headers, before any download or folder. A run killed before any of
these leaves it behind; the next run that makes one removes it (io/hub_folders.py). Every
huggingface_hub error becomes a one-line `HubError` with a hint (io/hub_errors.py); headers are
read by io/hub_ranged.py.

Every request has a connect/read timeout (io/hub_http.py). Downloads run on daemon threads and
a run's interruption (`cancel`) or `close` stops every wait for them at once, so Ctrl-C never
waits on a stalled download. A downloaded weight file is checked against the plan (its size and
its tensor table): a file that changed on the Hub since planning is refused, never merged.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import weakref
from concurrent.futures import Future
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
from lazymerge.errors import CheckpointError, HubError, LazyMergeError
from lazymerge.io.checkpoint import Checkpoint, TensorRef, build_checkpoint, open_checkpoint, validate_weight_map
from lazymerge.io.hub_errors import hub_errors
from lazymerge.io.hub_folders import PrivateFolder
from lazymerge.io.hub_http import DaemonPool, DownloadCancelled, bound_client, hub_timeout, run_pooled, wait_for
from lazymerge.io.hub_ranged import THREADS, local_tensors, remote_tensors
from lazymerge.io.range_source import RangeSource

STREAM_THREADS = 8  # low_disk: ranged requests in flight per input model

__all__ = ["HubCheckpoint", "is_repo_id", "open_any", "open_hub_checkpoint", "split_repo_id"]

# The Hub's rules: letters, digits, '-', '_', '.'; no '--' or '..'; at most 96 characters.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_REPO_RE = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[^\s@]+))?")
_SIDE_FILES = ("config.json", *TOKENIZER_FILES, *CARRIED_FILES)


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


# ---- the checkpoint ----------------------------------------------------------------------------------------


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
        download_dir: str | os.PathLike[str] | None,
        planned: dict[str, list[TensorRef]],
        etags: dict[str, str] | None = None,
    ) -> None:
        """Make the download pool and (low_disk) the private folder, owned from here on by `close`."""
        from lazymerge.io.hub_stream import StreamStats

        self.repo_id, self.revision, self.commit = repo_id, revision, commit
        self._etags = etags or {}
        self.stream_stats = StreamStats()  # low_disk: bytes, requests and retries of the streams
        self.token, self.low_disk = token, low_disk
        self._planned = {f: _table(refs) for f, refs in planned.items()}  # checked again after download
        self._side_paths: dict[str, Path] = {}
        self._futures: dict[str, Future[Path]] = {}
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self.downloads = 0  # weight files fetched (a released file read again is fetched again)
        # Daemon threads: a stalled download never holds up Ctrl-C or the end of the process.
        # low_disk streams several ranges at once; otherwise two whole-file downloads.
        self._pool = DaemonPool(STREAM_THREADS if low_disk else 2, "lazymerge-download")
        self._folder = PrivateFolder(download_dir) if low_disk else None
        self._download_dir = self._folder.path if self._folder is not None else None
        self._finalizer = weakref.finalize(self, _cleanup, self._pool, self._folder, self._cancelled)
        self.root = self._download_dir or self.root

    def side_file(self, name: str) -> Path | None:
        return self._side_paths.get(name)

    def local_file(self, name: str) -> Path:
        future = self._start(name)
        with hub_errors(self.repo_id, self.revision, token=self.token):
            path = wait_for(future, self._cancelled, f"{self.label}/{name}")
        if not self.low_disk:  # overlap the next download with reading this file
            later = self.files[self.files.index(name) + 1 :] if name in self.files else []
            nxt = next((f for f in later if f not in self._futures), None)
            if nxt is not None:
                self._start(nxt)
        return path

    def range_source(self, name: str, reads: list[tuple[int, int]] | None = None) -> RangeSource:
        """low_disk: the file streamed with ranged requests (nothing on disk); else the downloaded file."""
        if not self.low_disk:
            return super().range_source(name, reads)
        from huggingface_hub import hf_hub_url

        from lazymerge.io.hub_stream import HttpRangeSource

        bound_client()
        return HttpRangeSource(
            hf_hub_url(self.repo_id, name, revision=self.commit), self.file_sizes[name], self._etags.get(name),
            _auth_headers(self.token), f"{self.label}/{name}", reads or [], self._pool, self._cancelled,
            self.stream_stats, lambda: hub_errors(self.repo_id, self.revision, token=self.token),
        )  # fmt: skip

    @property
    def deletes_released_files(self) -> bool:
        # low_disk reads its inputs in plan order (one write lane), so each stream moves forward.
        return self.low_disk

    def release_file(self, name: str) -> None:
        if not self.low_disk:
            return
        with self._lock:
            future = self._futures.pop(name, None)
        if future is not None and future.done() and future.exception() is None:
            Path(future.result()).unlink(missing_ok=True)

    def cancel(self) -> None:
        """Stop waiting for downloads: every `local_file` call, waiting or later, gives up at once."""
        self._cancelled.set()

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

        if self._cancelled.is_set():  # closed: nothing may be written into the private folder any more
            raise DownloadCancelled(f"{self.label}/{name}")
        with self._lock:
            self.downloads += 1
        local_dir = str(self._download_dir) if self._download_dir is not None else None
        bound_client()
        try:
            path = Path(
                hf_hub_download(
                    self.repo_id,
                    name,
                    revision=self.commit,
                    token=self.token,
                    local_dir=local_dir,
                    etag_timeout=hub_timeout(),
                )
            )
        finally:
            if local_dir is not None and not self._finalizer.alive:
                # Closed while this download ran: what it made again of the folder goes too.
                shutil.rmtree(local_dir, ignore_errors=True)
        self._check_unchanged(name, path)
        return path

    def _check_unchanged(self, name: str, path: Path) -> None:
        """The downloaded file must be the one planned: same size, same tensor table."""
        expected, size = self.file_sizes.get(name), path.stat().st_size
        problem = None
        if expected is not None and size != expected:
            problem = f"{size} bytes downloaded, {expected} planned"
        elif name in self._planned:
            try:
                found = _table(local_tensors(path, name, f"{self.label}/{name}"))
            except LazyMergeError as exc:
                problem = f"its header no longer parses ({exc.message})"
            else:
                if found != self._planned[name]:
                    problem = "its header differs from the one planned"
        if problem is None:
            return
        if self.low_disk:
            path.unlink(missing_ok=True)
        raise HubError(
            f"{self.label}/{name} changed on the Hub since planning ({problem}); rerun",
            hint="a rerun plans from the files as they are now",
        )


def _table(refs: list[TensorRef]) -> frozenset[tuple]:
    return frozenset((r.name, r.dtype, tuple(r.shape), r.offset, r.nbytes) for r in refs)


def _cleanup(pool: DaemonPool, folder: PrivateFolder | None, cancelled: threading.Event) -> None:
    # Waits for nothing: a download still running finds `cancelled` set, and a stalled one is
    # left to its daemon thread (it writes only into an open file the folder no longer lists).
    cancelled.set()
    pool.shutdown()
    if folder is not None:
        folder.remove()


# ---- opening -----------------------------------------------------------------------------------------------


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
        low_disk: stream weight files with HTTP range requests as the merge reads them (no
            weight byte on disk) instead of downloading them into the HF cache; side files go
            to a private temporary folder (under `download_dir` when given).
        token: a Hub token; None uses HF_TOKEN or the stored login, False sends none.

    Raises:
        HubError: the repo, revision or a file cannot be reached (one line, with a hint).
        CheckpointError / HeaderError: the repo holds no loadable model, or a header is corrupt.
        Whatever the error (an interruption included), no private folder is left behind.
    """
    from huggingface_hub import HfApi, constants

    label = label or (repo_id if revision is None else f"{repo_id}@{revision}")
    with hub_errors(repo_id, revision, token=token):
        if constants.HF_HUB_OFFLINE:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(repo_id, revision=revision, token=token, local_files_only=True)
            return open_checkpoint(folder, label=label)
        api = HfApi(token=token)
        info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=hub_timeout())
        commit = info.sha or revision or "main"
        sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
        # What the pinned commit's files are: a streamed range must come from the same bytes.
        etags = {s.rfilename: s.lfs.sha256 if s.lfs else s.blob_id for s in info.siblings or []}
        files, weight_map = _weight_files(repo_id, commit, label, sizes, token)
        headers = _auth_headers(token)
        tables = run_pooled(
            lambda f: remote_tensors(repo_id, commit, f, sizes[f], headers, label), files, THREADS, "lazymerge-headers"
        )
    owner, name = repo_id.split("/", 1)
    snapshot = Path(constants.HF_HUB_CACHE) / f"models--{owner}--{name}" / "snapshots" / commit
    # The index is checked against the headers here, before any download or private folder.
    ckpt = build_checkpoint(HubCheckpoint, label, snapshot, files, tables, {f: sizes[f] for f in files}, weight_map)
    ckpt._setup(
        repo_id=repo_id,
        revision=revision,
        commit=commit,
        token=token,
        low_disk=low_disk,
        download_dir=download_dir,
        planned={f: refs for f, (refs, _) in zip(files, tables, strict=True)},
        etags={f: e for f, e in etags.items() if f in files and e},
    )
    try:
        with hub_errors(repo_id, revision, token=token):
            ckpt._side_paths = _download_side_files(repo_id, commit, sizes, token, ckpt._download_dir)
    except BaseException:
        ckpt.close()  # the private folder goes with the error
        raise
    return ckpt


def _auth_headers(token: str | bool | None) -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    return build_hf_headers(token=token)


def _weight_files(
    repo_id: str, commit: str, label: str, sizes: dict[str, int], token: str | bool | None
) -> tuple[list[str], dict[str, str] | None]:
    import json

    for index_name in (SAFE_INDEX_NAME, BIN_INDEX_NAME):
        if index_name in sizes:
            from huggingface_hub import hf_hub_download

            # Through the HF cache (not a ranged read): a later HF_HUB_OFFLINE run needs it there.
            path = hf_hub_download(repo_id, index_name, revision=commit, token=token, etag_timeout=hub_timeout())
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


def _download_side_files(
    repo_id: str, commit: str, sizes: dict[str, int], token: str | bool | None, folder: Path | None
) -> dict[str, Path]:
    from huggingface_hub import hf_hub_download

    names = [n for n in _SIDE_FILES if n in sizes]

    def fetch(name: str) -> Path:
        local_dir = str(folder) if folder is not None else None
        return Path(
            hf_hub_download(
                repo_id, name, revision=commit, token=token, local_dir=local_dir, etag_timeout=hub_timeout()
            )
        )

    return dict(zip(names, run_pooled(fetch, names, THREADS, "lazymerge-side-files"), strict=True))
