"""`lazymerge finalize OUT`: assemble the parts of a split merge into the finished model folder.

Every part (`--part I/N`) wrote its shards and its own manifest into OUT. Finalize checks that all
N parts are there, of the same plan, and complete (each planned shard present with the recorded
size and checksum), then writes what a single run writes around the shards: the merged manifest
first (it claims every file), the side files part 0 staged (config, tokenizer, model card), the
index last (it is what makes a folder look like a finished model), and removes the part files.
The folder is then byte for byte what one process would have written; `lazymerge verify` passes.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lazymerge.constants import PARTIAL_SUFFIX
from lazymerge.errors import OutputError
from lazymerge.io.writer import write_side_file
from lazymerge.lock import OutputLock, lock_holder
from lazymerge.manifest import MANIFEST_NAME, Manifest
from lazymerge.output_folder import STAGED_SIDE_FILES, is_part_file, is_part_lock
from lazymerge.part_folder import PartManifest, read_part_manifests, read_staged_side_files
from lazymerge.plan import shard_file_name

__all__ = ["FinalizeResult", "finalize"]

_PLAIN = re.compile(r"^[^/\\\0]+$")


@dataclass(frozen=True)
class FinalizeResult:
    """What `finalize` assembled: the folder, its N parts, its shards and their bytes."""

    output_dir: Path
    parts: int
    shards: int
    bytes: int
    seconds: float


def finalize(
    folder: str | os.PathLike[str], *, checksums: bool = True, progress: Callable[[str], None] | None = None
) -> FinalizeResult:
    """Check that every part of the split merge in `folder` is complete, then write the index,
    the side files and the merged manifest.

    Args:
        folder: the output folder the parts (`--part I/N`) wrote into.
        checksums: verify every shard's checksum (reads every shard once); False checks sizes only.
        progress: called with each shard's name as it is checked.

    Returns:
        FinalizeResult.

    Raises:
        OutputError: a part is missing, still running or incomplete; parts of different merges;
            the folder holds no parts (or is already finalized).
    """
    start = time.perf_counter()
    out = Path(folder)
    real = Path(os.path.realpath(out))
    if not real.is_dir():
        raise OutputError(f"{out} is not a folder", hint="give the --output folder the parts wrote into")
    with OutputLock(real):
        entries = sorted(os.listdir(real))
        for name in filter(is_part_lock, entries):
            if (holder := lock_holder(real, name)) is not None:
                raise OutputError(
                    f"{out}: {name[len('.lazymerge.') : -len('.lock')]} is still running (pid {holder})",
                    hint="wait for every part to finish, then finalize",
                )
        manifests = read_part_manifests(real, entries)
        if not manifests:
            done = (real / MANIFEST_NAME).is_file()
            raise OutputError(
                f"{out} holds no part of a split merge" + (" (it is already finalized)" if done else ""),
                hint=f"`lazymerge verify {out}` checks it" if done else "run the parts (--part I/N) into it first",
            )
        parts = _check_parts(out, list(manifests.values()))
        shards: dict[str, dict] = {}
        for m in parts:
            for name, size in sorted(m.planned.items()):
                if progress is not None:
                    progress(name)
                entry = m.shards.get(name)
                path = real / name
                ok = entry is not None and entry.get("size") == size and path.is_file()
                ok = ok and (m.matches(path, entry) if checksums else path.stat().st_size == size)  # type: ignore[arg-type]
                if not ok:
                    raise OutputError(
                        f"{out}: part {m.label} is not complete ({name} is missing, unfinished or changed)",
                        hint=f"rerun it with --part {m.label} --resume, then finalize again",
                    )
                shards[name] = entry  # type: ignore[assignment]
        side = _side_files(out, real, parts[0])
        merged = Manifest(parts[0].fingerprint, shards, files=sorted({*shards, *side}))
        merged.save(real)  # first: from here on the folder is a lazymerge output that records every file
        for name, data in side.items():
            if not name.endswith(".index.json"):
                write_side_file(real, name, data)
        for name, data in side.items():
            if name.endswith(".index.json"):
                write_side_file(real, name, data)
        for name in entries:
            if is_part_file(name):
                (real / name).unlink(missing_ok=True)
    total = sum(int(e["size"]) for e in shards.values())
    return FinalizeResult(out, parts[0].count, len(shards), total, time.perf_counter() - start)


def _check_parts(out: Path, found: list[PartManifest]) -> list[PartManifest]:
    """All N parts of one plan, in order, their shards covering the plan's exactly once."""
    first = found[0]
    for m in found:
        if m.fingerprint != first.fingerprint or m.count != first.count or m.shard_count != first.shard_count:
            raise OutputError(
                f"{out} holds parts of different merges (part {first.label} and part {m.label})",
                hint="rerun every part with the same command and N into an empty folder",
            )
    by_index = {m.index: m for m in found}
    missing = [f"{i}/{first.count}" for i in range(first.count) if i not in by_index]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise OutputError(
            f"{out}: part {shown} missing ({len(by_index)} of {first.count} parts present)",
            hint=f"run the missing parts (--part I/{first.count}), then finalize again",
        )
    parts = [by_index[i] for i in range(first.count)]
    names = [n for m in parts for n in m.planned]
    expected = {shard_file_name(k, first.shard_count) for k in range(first.shard_count)}
    if len(names) != len(set(names)) or set(names) != expected:
        raise OutputError(
            f"{out}: the parts' shards do not make up the whole model", hint="rerun every part into an empty folder"
        )
    for m in parts[1:]:
        if m.side_files != first.side_files:
            raise OutputError(f"{out}: parts {first.label} and {m.label} disagree on the side files")
    return parts


def _side_files(out: Path, real: Path, first: PartManifest) -> dict[str, bytes]:
    """The side files part 0 staged, checked against the digests every part recorded."""
    try:
        side = read_staged_side_files(real)
    except (OSError, ValueError) as exc:
        raise OutputError(
            f"{out}: the side files part 0 staged ({STAGED_SIDE_FILES}) are missing or damaged: {exc}",
            hint=f"rerun part 0/{first.count} with --resume, then finalize again",
        ) from None
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(side.items())}
    bad = [n for n in side if not _PLAIN.match(n) or n.endswith(PARTIAL_SUFFIX) or is_part_file(n)]
    if digests != first.side_files or bad or MANIFEST_NAME in side:
        raise OutputError(
            f"{out}: {STAGED_SIDE_FILES} is not the side files of this merge",
            hint=f"rerun part 0/{first.count} with --resume, then finalize again",
        )
    return side
