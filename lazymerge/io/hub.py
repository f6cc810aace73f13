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
huggingface_hub error becomes a one-line `HubError` with a hint (io/hub_errors.py). This module
resolves and opens; the index and headers are read by io/hub_ranged.py, the checkpoint (downloads,
streams, the private folder) is io/hub_checkpoint.py, and an offline open is io/hub_offline.py.

Every request has a connect/read timeout (io/hub_http.py). Downloads run on daemon threads and
a run's interruption (`cancel`) or `close` stops every wait for them at once, so Ctrl-C never
waits on a stalled download. A downloaded weight file is checked against the plan (its size and
its tensor table): a file that changed on the Hub since planning is refused, never merged.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lazymerge.errors import CheckpointError, HubError
from lazymerge.io.checkpoint import Checkpoint, open_checkpoint
from lazymerge.io.hub_checkpoint import SIDE_FILES, HubCheckpoint
from lazymerge.io.hub_errors import hub_errors
from lazymerge.io.hub_http import hub_timeout, run_pooled
from lazymerge.io.hub_offline import open_offline, save_tables, write_ref
from lazymerge.io.hub_ranged import THREADS, remote_tables

__all__ = ["HubCheckpoint", "is_repo_id", "open_any", "open_hub_checkpoint", "split_repo_id"]

# The Hub's rules: letters, digits, '-', '_', '.'; no '--' or '..'; at most 96 characters.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_REPO_RE = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[^\s@]+))?")


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
        try:
            return open_hub_checkpoint(
                repo_id, revision, low_disk=low_disk, token=token, label=label or model, download_dir=download_dir
            )
        except HubError as exc:
            # `owner/name` is also a relative path: a typo in a local folder name lands here.
            # The Hub's reason first, then the other reading (as transformers names both).
            near = _near_local(model)
            local = (
                f"did you mean the local folder {near!r}?" if near else "if you meant a local folder, check the path"
            )
            raise HubError(
                f"{exc.message}; no local folder {model!r} either", hint=f"{local}; else: {exc.hint}"
            ) from None
    return open_checkpoint(model, label=label or str(model))


def _near_local(text: str) -> str | None:
    """The existing local path closest to `text` (a folder name typed wrong), if one is close."""
    import difflib

    parent, name = os.path.split(text.split("@", 1)[0])
    try:
        entries = os.listdir(parent or ".")
    except OSError:
        return None
    close = difflib.get_close_matches(name, entries, n=1, cutoff=0.75)
    return os.path.join(parent, close[0]) if close else None


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
            return open_offline(repo_id, revision, token=token, label=label)
        api = HfApi(token=token)
        info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=hub_timeout())
        commit = info.sha or revision or "main"
        sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
        # What the pinned commit's files are: a streamed range must come from the same bytes.
        etags = {s.rfilename: s.lfs.sha256 if s.lfs else s.blob_id for s in info.siblings or []}
        files, tables, weight_map = remote_tables(repo_id, commit, label, sizes, token)
    owner, name = repo_id.split("/", 1)
    snapshot = Path(constants.HF_HUB_CACHE) / f"models--{owner}--{name}" / "snapshots" / commit
    # The index is checked against the headers here, before any download or private folder.
    ckpt = HubCheckpoint.planned(
        label, snapshot, files, tables, sizes, weight_map, repo_id=repo_id, revision=revision, commit=commit,
        token=token, low_disk=low_disk, download_dir=download_dir, etags=etags,
    )  # fmt: skip
    try:
        with hub_errors(repo_id, revision, token=token):
            ckpt._side_paths = _download_side_files(repo_id, commit, sizes, token, ckpt._download_dir)
    except BaseException:
        ckpt.close()  # the private folder goes with the error
        raise
    # For a later HF_HUB_OFFLINE run: the branch -> commit ref, and the headers it plans from.
    write_ref(repo_id, revision, commit)
    save_tables(repo_id, commit, files, tables, {f: sizes[f] for f in files}, weight_map)
    return ckpt


def _download_side_files(
    repo_id: str, commit: str, sizes: dict[str, int], token: str | bool | None, folder: Path | None
) -> dict[str, Path]:
    from huggingface_hub import hf_hub_download

    names = [n for n in SIDE_FILES if n in sizes]

    def fetch(name: str) -> Path:
        local_dir = str(folder) if folder is not None else None
        return Path(
            hf_hub_download(
                repo_id, name, revision=commit, token=token, local_dir=local_dir, etag_timeout=hub_timeout()
            )
        )

    return dict(zip(names, run_pooled(fetch, names, THREADS, "lazymerge-side-files"), strict=True))
