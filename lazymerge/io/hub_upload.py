"""Upload a merge to the Hugging Face Hub while it runs: each shard uploads the moment it closes.

The upload side of the Hub (the download side is `lazymerge.io.hub`).

The executor reports a "shard" event (from its writer thread) when an output shard is renamed to
its final name; `HubPusher.wrap` turns that into an LFS upload on a background thread, so shard k
goes up while shard k+1 is merged. Two upload threads overlap one shard's requests with the
previous shard's body, which keeps the upload direction busy (`lazymerge.io.lfs_transfer`).
Nothing is visible in the repo until `HubPusher.commit` makes ONE commit with every shard plus
the index, config, tokenizer and model card: the repo never shows half a model. The LFS protocol
skips objects the server already holds, so a killed push that is run again does not upload
finished shards again (the output is deterministic: a re-merged shard has the same sha256).

The LFS upload needs each shard's sha256 before it starts: the writer computes it while writing
the shard and records it in the manifest (`lazymerge.io.digest.OrderedSha256`), and the upload
takes it from there, so the shard is read once, by the upload itself. A shard without one (kept
by --resume from a run that did not push) is hashed by huggingface_hub, as before.

`delete_after_upload` deletes each local shard once uploaded. The merge does not wait for that
upload: it writes the next shard meanwhile, and only when that one closes does it wait for the
previous upload to finish. At most two output shards are on local disk (one uploading, one
being written), and the merge runs while the network works. A `--resume` after a kill keeps the
shards the Hub already holds (`held_on_hub`, asked of the LFS batch endpoint with the sha256 the
manifest recorded): they are committed as they are, never merged or uploaded again.

The executor knows nothing of this: the pusher only wraps its progress callback.
`lazymerge.io.hub_pushes.Pushes` holds the pushers of one run (K for a sweep, one per output
folder and repo).
"""

from __future__ import annotations

import fnmatch
import functools
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lazymerge.errors import HubError, LazyMergeError
from lazymerge.io.hub_errors import hub_errors, scrub
from lazymerge.io.lfs_transfer import ShardReader, Wire, lfs_batch, upload_lfs

if TYPE_CHECKING:
    from lazymerge.events import ProgressEvent
    from lazymerge.plan import MergePlan

__all__ = ["HubPusher", "PushResult", "UploadCallback"]

UploadCallback = Callable[[int, int], None]  # (bytes uploaded so far, bytes to upload)

# Shards in flight at once: one sending its body, the next one asking where to send (lfs_transfer).
_UPLOADERS = 2

# Weight files of an earlier, different model in the target repo: replaced, never left mixed in.
_STALE_WEIGHTS = (
    "model*.safetensors",
    "pytorch_model*.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


@dataclass
class PushResult:
    """What a push did: the repo, the commit, and which shards the server already held."""

    repo_id: str
    revision: str
    commit_url: str
    uploaded: list[str] = field(default_factory=list)  # shards whose bytes went over the wire
    reused: list[str] = field(default_factory=list)  # shards the server already held (not re-sent)


@dataclass
class _Job:
    name: str
    path: Path
    size: int
    ticket: int  # its turn on the wire (lfs_transfer.Wire)
    done: threading.Event = field(default_factory=threading.Event)


class HubPusher:
    """Creates (or reuses) the target repo, uploads shards in the background, commits once.

    Args:
        repo_id: `owner/name`, or `name` for the token's own namespace.
        private: create the repo private (an existing repo keeps its visibility).
        revision: the branch to commit to (created from main when missing); default main.
        commit_message: default names lazymerge, the method and the inputs.
        delete_after_upload: delete each local shard once uploaded; a closed shard waits for
            the upload of the one before it (at most two output shards on disk).
        token: a Hub token with write access; None uses HF_TOKEN or the stored login.

    Raises:
        HubError: the token is refused or lacks write access, the repo id is invalid.
    """

    def __init__(
        self,
        repo_id: str,
        *,
        private: bool = False,
        revision: str | None = None,
        commit_message: str | None = None,
        delete_after_upload: bool = False,
        token: str | bool | None = None,
    ) -> None:
        from huggingface_hub import HfApi

        self.token = token
        self.revision = revision or "main"
        self.commit_message = commit_message
        self.delete_after_upload = delete_after_upload
        self.api = HfApi(token=token)
        self.on_upload: UploadCallback | None = None
        self.uploaded_bytes = 0
        self.total_bytes = 0
        self._ops: dict[str, Any] = {}
        self._uploaded: list[str] = []
        self._reused: list[str] = []
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._wire = Wire()
        self._previous: _Job | None = None  # delete_after_upload: the upload a closed shard waits for
        self._remote: set[str] = set()  # shards the server already held at --resume: committed by sha256
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        with hub_errors(repo_id, token=token, writing=True):
            self.repo_id = self.api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if self.revision != "main":
                self.api.create_branch(self.repo_id, branch=self.revision, exist_ok=True)
        self._threads = [
            threading.Thread(target=self._work, name=f"lazymerge-upload-{i}", daemon=True) for i in range(_UPLOADERS)
        ]
        for thread in self._threads:
            thread.start()

    # ---- feeding -------------------------------------------------------------------------------------------
    def wrap(
        self, progress: Callable[[ProgressEvent], None] | None, plan: MergePlan | None = None
    ) -> Callable[[ProgressEvent], None]:
        """The executor's progress callback: `progress` first, then queue each finished shard."""
        if plan is not None:
            self.total_bytes = sum(s.size for s in plan.shards)
        sizes = {s.name: s.size for s in plan.shards} if plan is not None else {}

        def callback(event: ProgressEvent) -> None:
            if progress is not None:
                progress(event)
            if event.shard in self._remote:  # kept by --resume from the Hub: nothing local to send
                return
            if event.kind in ("shard", "skip") and event.path is not None:
                self.submit(event.shard, Path(event.path), sizes.get(event.shard))

        return callback

    def submit(self, name: str, path: Path, size: int | None = None) -> None:
        """Queue one finished shard for upload. With delete_after_upload, wait until the shard
        before it is uploaded (and deleted): this one uploads while the next is written."""
        self._raise_if_failed()
        with self._lock:  # tickets in queue order, whichever writer thread closed the shard
            job = _Job(name, path, size if size is not None else path.stat().st_size, self._wire.ticket())
            self._jobs.put(job)
            previous, self._previous = self._previous, job
        if self.delete_after_upload and previous is not None:
            while not previous.done.wait(0.05):
                if self._cancel.is_set():
                    break
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error = self._error
            if isinstance(error, LazyMergeError):
                raise error
            raise HubError(scrub(f"upload to {self.repo_id} failed: {error}", self.token))

    def held_on_hub(self, name: str, size: int, sha256: str) -> bool:
        """Whether the server already holds this shard's bytes (uploaded by an earlier run, then
        deleted locally): it is then committed from its recorded sha256, and neither merged nor
        uploaded again. Asks the LFS batch endpoint, which answers without upload actions for an
        object it has."""
        from huggingface_hub import CommitOperationAdd
        from huggingface_hub.lfs import UploadInfo

        info = UploadInfo(size=size, sample=b"", sha256=bytes.fromhex(sha256))
        with hub_errors(self.repo_id, self.revision, token=self.token, writing=True):
            answer = lfs_batch(self.api, self.repo_id, self.revision, info, self.token)
        if "error" in answer or "actions" in answer or answer.get("oid") != sha256:
            return False
        op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=b"")
        op.upload_info = info
        op._upload_mode, op._should_ignore, op._is_uploaded = "lfs", False, True
        with self._lock:
            self._ops[name] = op
            self._reused.append(name)
            self._remote.add(name)
        self._advance(size)
        return True

    # ---- the upload thread ---------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if self._error is None and not self._cancel.is_set():
                    self._upload(job)
            except BaseException as exc:
                if self._error is None:  # the first failure is the one to report
                    self._error = exc
            finally:
                self._wire.done(job.ticket)  # never hold up the shards queued after this one
                job.done.set()

    def _upload(self, job: _Job) -> None:
        from huggingface_hub import CommitOperationAdd

        sent = 0

        def count(n: int) -> None:
            nonlocal sent
            step = max(0, min(n, job.size - sent))  # a retried request reads the file again
            sent += step
            self._advance(step)

        # Built from the path, huggingface_hub reads 512 bytes and hashes the file only when asked
        # for its sha256: the one computed while the shard was written is given instead.
        op = CommitOperationAdd(path_in_repo=job.name, path_or_fileobj=str(job.path))
        sha256 = _recorded_sha256(job.path, job.size)
        if sha256 is not None:
            op.upload_info.sha256 = bytes.fromhex(sha256)
        _ = op.upload_info.sha256  # (else hashed here, before the upload's reads are counted)
        reader = ShardReader(job.path, job.size)
        reader.on_read = count
        op.path_or_fileobj = reader
        try:
            with hub_errors(self.repo_id, token=self.token, writing=True):
                if job.name.endswith(".safetensors"):
                    # LFS, as the Hub's default .gitattributes says: no upload-mode query (one round
                    # trip a shard in which the upload direction would idle)
                    op._upload_mode, op._should_ignore = "lfs", False
                    turn = functools.partial(self._wire.turn, job.ticket, reader, self._stopping)
                    upload_lfs(self.api, self.repo_id, self.revision, op, self.token, turn)
                    op._is_uploaded, op.path_or_fileobj = True, b""
                else:
                    self.api.preupload_lfs_files(self.repo_id, [op], revision=self.revision)
            if op._upload_mode != "lfs":  # a small file the server stores in git: commit its bytes
                op.path_or_fileobj = job.path.read_bytes()
        finally:
            reader.close()
        self._advance(job.size - sent)  # a shard the server already held counts as done
        with self._lock:
            self._ops[job.name] = op
            (self._uploaded if sent else self._reused).append(job.name)
        if self.delete_after_upload:
            job.path.unlink(missing_ok=True)

    def _stopping(self) -> bool:
        return self._cancel.is_set() or self._error is not None

    def _advance(self, n: int) -> None:
        with self._lock:  # reported under the lock: two upload threads never report out of order
            self.uploaded_bytes += n
            if self.on_upload is not None and n:
                self.on_upload(self.uploaded_bytes, self.total_bytes)

    # ---- the commit ----------------------------------------------------------------------------------------
    def commit(self, plan: MergePlan) -> PushResult:
        """Wait for the uploads, then make the one commit: shards + index, config, tokenizer, card."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        self._stop_workers()
        self._raise_if_failed()
        missing = [s.name for s in plan.shards if s.name not in self._ops]
        if missing:
            raise HubError(f"{self.repo_id}: shard(s) never uploaded: {', '.join(missing)}")
        operations: list[Any] = [self._ops[s.name] for s in plan.shards]
        names = {s.name for s in plan.shards}
        for name, data in sorted(plan.side_files.items()):  # what the folder holds, also where it is not local
            operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=data))
            names.add(name)
        message = self.commit_message or _default_message(plan)
        with hub_errors(self.repo_id, self.revision, token=self.token, writing=True):
            existing = self.api.list_repo_files(self.repo_id, revision=self.revision)
            stale = [
                f
                for f in existing
                if f not in names and "/" not in f and any(fnmatch.fnmatch(f, p) for p in _STALE_WEIGHTS)
            ]
            operations += [CommitOperationDelete(path_in_repo=f) for f in stale]
            info = self.api.create_commit(self.repo_id, operations, commit_message=message, revision=self.revision)
        uploaded, reused = set(self._uploaded), set(self._reused)  # finished in any order by the two threads
        return PushResult(
            self.repo_id, self.revision, str(info.commit_url),
            [s.name for s in plan.shards if s.name in uploaded], [s.name for s in plan.shards if s.name in reused],
        )  # fmt: skip

    def uploads(self) -> tuple[dict[str, Any], list[str], list[str]]:
        """Wait for the queued uploads and hand them over for a commit made elsewhere (a Ray
        driver, `adopt`): the operations (picklable: an LFS object's commit entry is its sha256,
        not its bytes), the shards uploaded and those the server already held."""
        self._stop_workers()
        self._raise_if_failed()
        for op in self._ops.values():
            if not isinstance(op.path_or_fileobj, bytes):
                op.path_or_fileobj = b""  # the closed reader of an uploaded LFS object
        return dict(self._ops), list(self._uploaded), list(self._reused)

    def adopt(self, ops: dict[str, Any], uploaded: Sequence[str], reused: Sequence[str]) -> None:
        """Shards another process uploaded (`uploads`), to go in this pusher's commit."""
        with self._lock:
            self._ops.update(ops)
            self._uploaded += uploaded
            self._reused += reused

    def close(self) -> None:
        """Stop the upload thread without committing (after a failed merge); never blocks long."""
        self._cancel.set()
        self._stop_workers(timeout=1.0)

    def _stop_workers(self, timeout: float | None = None) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout)


def _recorded_sha256(path: Path, size: int) -> str | None:
    """The shard's sha256 from the output folder's manifest, when its writer computed one."""
    from lazymerge.manifest import Manifest

    manifest = Manifest.load(path.parent)
    entry = manifest.shards.get(path.name) if manifest is not None else None
    sha = entry.get("sha256") if entry is not None and entry.get("size") == size else None
    return sha if isinstance(sha, str) and len(sha) == 64 else None


def _default_message(plan: MergePlan) -> str:
    from lazymerge._version import __version__

    method = plan.recipe.get("merge_method", "merge")
    return f"Upload {method} merge of {', '.join(plan.inputs)} (lazymerge {__version__})"[:500]
