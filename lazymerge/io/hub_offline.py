"""What a Hub repo opened once leaves behind so that it opens again with HF_HUB_OFFLINE=1.

lazymerge downloads by commit sha (so every file of a run comes from one commit), and
huggingface_hub records a branch -> commit ref only for downloads made by branch name: without
`refs/<branch>`, an offline `owner/name` (or `@branch`) finds nothing. `write_ref` writes the ref
as huggingface_hub does. Planning reads each weight file's header by ranged requests and keeps no
copy; offline, a shard the plan never reads (a dropped `lm_head`) was never downloaded, so opening
the snapshot folder would demand it. `save_tables` keeps the headers' tensor tables (names,
dtypes, shapes, offsets: a few KB) per commit under `<HF_HOME>/lazymerge/headers`, and an offline
open (`open_offline`) plans from them, asking the cache only for the files the run reads.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from lazymerge.io.checkpoint import Checkpoint, TensorRef, open_checkpoint
from lazymerge.io.hub_checkpoint import SIDE_FILES, HubCheckpoint
from lazymerge.io.hub_ranged import Tables

__all__ = ["load_tables", "open_offline", "save_tables", "write_ref"]
_SHA = re.compile(r"[0-9a-f]{40}")
_FORMAT = 1


def _repo_folder(repo_id: str) -> str:
    owner, name = repo_id.split("/", 1)
    return f"models--{owner}--{name}"


def write_ref(repo_id: str, revision: str | None, commit: str) -> None:
    """Record `revision` (default main) -> `commit` in the HF cache, unless `revision` is a sha."""
    from huggingface_hub import constants

    rev = revision or "main"
    if _SHA.fullmatch(rev) or not _SHA.fullmatch(commit) or ".." in rev.split("/"):
        return
    ref = Path(constants.HF_HUB_CACHE) / _repo_folder(repo_id) / "refs" / rev
    try:
        if ref.is_file() and ref.read_text().strip() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(ref, commit)
    except OSError:
        pass  # a read-only cache only costs the offline reuse


def open_offline(repo_id: str, revision: str | None, *, token: str | bool | None, label: str) -> Checkpoint:
    """The cached snapshot of `repo_id` at `revision` (a branch through `refs/`, or a sha).

    With the tensor tables an online open kept (`save_tables`), the checkpoint plans from them
    and reads from the cache only the files the run needs; without (a repo another tool
    downloaded), the snapshot folder is opened as a local model and must hold every weight file.
    Weight files are never deleted from the cache, so `low_disk` does not apply."""
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo_id, revision=revision, token=token, local_files_only=True))
    commit = folder.name
    cached = load_tables(repo_id, commit)
    if cached is None:
        return open_checkpoint(folder, label=label)
    files, tables, sizes, weight_map = cached
    ckpt = HubCheckpoint.planned(
        label, folder, files, tables, sizes, weight_map, repo_id=repo_id, revision=revision, commit=commit, token=token
    )
    ckpt._side_paths = {n: folder / n for n in SIDE_FILES if (folder / n).is_file()}
    return ckpt


def _tables_path(repo_id: str, commit: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "lazymerge" / "headers" / _repo_folder(repo_id) / f"{commit}.json"


def save_tables(
    repo_id: str,
    commit: str,
    files: list[str],
    tables: Tables,
    sizes: dict[str, int],
    weight_map: dict[str, str] | None,
) -> None:
    """Keep the tensor tables of `repo_id` at `commit` (immutable: a commit's files never change)."""
    if not _SHA.fullmatch(commit):
        return
    doc = {
        "format": _FORMAT,
        "files": files,
        "sizes": {f: sizes[f] for f in files},
        "weight_map": weight_map,
        "tables": [
            {
                "tensors": [[r.name, r.dtype, list(r.shape), r.file, r.offset, r.nbytes] for r in refs],
                "metadata": metadata,
            }
            for refs, metadata in tables
        ],
    }
    path = _tables_path(repo_id, commit)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, json.dumps(doc))
    except OSError:
        pass  # only the offline reuse is lost


def load_tables(repo_id: str, commit: str) -> tuple[list[str], Tables, dict[str, int], dict[str, str] | None] | None:
    """(files, tables, sizes, weight_map) kept by `save_tables`, or None when there are none."""
    try:
        doc = json.loads(_tables_path(repo_id, commit).read_text(encoding="utf-8"))
        if doc.get("format") != _FORMAT:
            return None
        files = [str(f) for f in doc["files"]]
        tables: Tables = [
            (
                [
                    TensorRef(str(n), str(d), tuple(int(x) for x in s), str(f), int(o), int(b))
                    for n, d, s, f, o, b in t["tensors"]
                ],
                {str(k): str(v) for k, v in t["metadata"].items()},
            )
            for t in doc["tables"]
        ]
        sizes = {str(k): int(v) for k, v in doc["sizes"].items()}
        weight_map = doc["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # absent or damaged: the caller opens the snapshot folder instead
    if len(tables) != len(files) or not (weight_map is None or isinstance(weight_map, dict)):
        return None
    return files, tables, sizes, weight_map


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
