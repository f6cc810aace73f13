"""The output-folder contract for the parts of a split merge (`--part I/N`), which share one folder.

Each part holds its own lock (`.lazymerge.part-I-of-N.lock`) and writes, before any other file, its
own manifest (`lazymerge_manifest.part-I-of-N.json`: the plan's fingerprint, the shards it will
write with their sizes, those finished with their checksums, and a digest of every side file).
Part 0 also stages the side files (config, tokenizer, model card, index) in
`lazymerge_side_files.json`. Until `lazymerge finalize` (`lazymerge.finalize`) the folder holds
no index, no config and no `lazymerge_manifest.json`: it never looks like a finished model.

A part may write into a missing or empty folder, or one holding only parts of the same plan split
the same way (the same fingerprint and N); its own earlier manifest only with `--resume` (finished
shards are kept, checksums verified). It never removes or replaces a file another part recorded or
a file of the user's. `--overwrite` does not combine with `--part` (`RunOptions` says so).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lazymerge.constants import PARTIAL_SUFFIX
from lazymerge.errors import DiskSpaceError, OutputError
from lazymerge.io.writer import write_side_file
from lazymerge.lock import LOCK_NAME, lock_holder
from lazymerge.manifest import MANIFEST_NAME, Manifest, load_json_object, plan_fingerprint
from lazymerge.output_folder import (
    PART_MANIFEST_PREFIX,
    STAGED_SIDE_FILES,
    checkpoint_paths,
    folder_entries,
    free_space,
    is_part_file,
)
from lazymerge.parts import Part

if TYPE_CHECKING:
    from lazymerge.io.checkpoint import Checkpoint
    from lazymerge.plan import MergePlan

__all__ = [
    "PartManifest",
    "check_part_output",
    "part_lock_name",
    "part_manifest_name",
    "prepare_part_folder",
    "read_part_manifests",
    "read_staged_side_files",
    "side_file_digests",
    "stage_side_files",
]

_MODEL_SUFFIXES = (".safetensors", ".bin", ".index.json")


def part_manifest_name(part: Part) -> str:
    return f"{PART_MANIFEST_PREFIX}{part.index}-of-{part.count}.json"


def part_lock_name(part: Part) -> str:
    return f".lazymerge.{part.tag}.lock"


def side_file_digests(plan: MergePlan) -> dict[str, str]:
    """sha256 of each side file the plan writes (index included): every part records them, so
    `finalize` knows the staged copy is this plan's."""
    return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(plan.side_files.items())}


@dataclass
class PartManifest(Manifest):
    """A part's manifest: `Manifest`'s fields (`shards`: those finished; `files`: what the part
    writes) and the part (`index` of `count`), the shards it writes with their sizes (`planned`),
    the number of shards of the whole plan and the digest of every side file."""

    index: int = 0
    count: int = 1
    planned: dict[str, int] = field(default_factory=dict)
    shard_count: int = 0
    side_files: dict[str, str] = field(default_factory=dict)

    @property
    def file_name(self) -> str:
        return part_manifest_name(Part(self.index, self.count))

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    def body(self) -> dict:
        return {
            **super().body(),
            "part": [self.index, self.count],
            "planned": dict(sorted(self.planned.items())),
            "shard_count": self.shard_count,
            "side_files": self.side_files,
        }

    @classmethod
    def parse(cls, text: str) -> PartManifest:
        base = Manifest.parse(text)
        obj = load_json_object(text)
        part, planned, count, side = obj.get("part"), obj.get("planned"), obj.get("shard_count"), obj.get("side_files")
        if not (isinstance(part, list) and len(part) == 2 and all(type(x) is int for x in part)):
            raise ValueError("no part [index, count]")
        if not (isinstance(planned, dict) and all(type(v) is int for v in planned.values())):
            raise ValueError("no planned shards")
        if type(count) is not int or not (isinstance(side, dict) and all(isinstance(v, str) for v in side.values())):
            raise ValueError("no shard count or side-file digests")
        return cls(base.fingerprint, base.shards, base.files, part[0], part[1], planned, count, side)


def read_part_manifests(real: Path, entries: Iterable[str]) -> dict[str, PartManifest]:
    """The part manifests among `entries` of the folder `real`, by file name.

    Raises:
        OutputError: one is unreadable or damaged.
    """
    found: dict[str, PartManifest] = {}
    for name in entries:
        if not (name.startswith(PART_MANIFEST_PREFIX) and name.endswith(".json")):
            continue
        try:
            found[name] = PartManifest.parse((real / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise OutputError(
                f"{real / name} is damaged: {exc}", hint="rerun that part with --resume, or start in an empty folder"
            ) from None
    return found


def check_part_output(
    plan: MergePlan, part: Part, shards: Sequence[int], checkpoints: Sequence[Checkpoint], *, resume: bool
) -> None:
    """The planning checks of part `part` (the shards `shards` of `plan`): the folder contract
    above and the free space the part's shards need. Reads only.

    Raises:
        OutputError: the folder holds another merge, a finished model, a file of the user's at a
            name the part writes, or this part already (without `resume`); a run holds it.
        DiskSpaceError: less free space than the part's shards need.
    """
    real = Path(os.path.realpath(plan.output_dir))
    if real.is_dir():
        for name, who in ((part_lock_name(part), f"part {part.label}"), (LOCK_NAME, "another lazymerge run")):
            if (holder := lock_holder(real, name)) is not None:
                raise OutputError(
                    f"{plan.output_dir} is being written by {who} (pid {holder})",
                    hint="wait for it to finish, or choose another --output",
                )
    _check(plan, part, shards, checkpoint_paths(checkpoints), resume=resume)
    plan.free_bytes = free_space(plan.output_dir)
    needed = sum(plan.shards[k].size for k in shards)
    if plan.free_bytes < needed:
        raise DiskSpaceError(
            f"{plan.output_dir} has {plan.free_bytes / 1e9:.2f} GB free but part {part.label} needs {needed / 1e9:.2f} GB"
        )


def _check(
    plan: MergePlan, part: Part, shards: Sequence[int], input_paths: Iterable[str | os.PathLike[str]], *, resume: bool
) -> PartManifest | None:
    """The checks of `check_part_output` but the locks; returns this part's earlier manifest."""
    out = plan.output_dir
    real = Path(os.path.realpath(out))
    entries = folder_entries(out, input_paths)
    if entries is None:
        return None
    if MANIFEST_NAME in entries:
        raise OutputError(
            f"{out} already holds a finished merge ({MANIFEST_NAME})",
            hint="choose an empty --output for a split merge (or `lazymerge verify` it)",
        )
    fingerprint = plan_fingerprint(plan)
    manifests = read_part_manifests(real, entries)
    recorded: set[str] = set()
    for name, m in manifests.items():
        if m.fingerprint != fingerprint or m.count != part.count:
            what = "a different merge" if m.fingerprint != fingerprint else f"the same merge split into {m.count} parts"
            raise OutputError(
                f"{out} holds part {m.label} of {what} ({name})",
                hint="give every part the same command and the same N, or choose an empty --output",
            )
        recorded |= {*m.shards, *(m.files or ())}
    own = manifests.get(part_manifest_name(part))
    if own is not None and not resume:
        raise OutputError(
            f"{out} already holds part {part.label} of this merge",
            hint="pass --resume to keep its finished shards and redo the rest, or choose an empty --output",
        )
    recorded |= {n + PARTIAL_SUFFIX for n in recorded}
    theirs = [n for n in entries if n not in recorded and not is_part_file(n)]
    if theirs and not manifests:
        raise OutputError(
            f"{out} is not empty and holds no part of a split merge ({theirs[0]})",
            hint="choose an empty --output folder for a split merge",
        )
    writes = {plan.shards[k].name for k in shards} | {part_manifest_name(part), STAGED_SIDE_FILES}
    clash = [n for n in theirs if n.removesuffix(PARTIAL_SUFFIX) in writes or n.endswith(_MODEL_SUFFIXES)]
    if clash:
        raise OutputError(
            f"{out} holds {clash[0]}, which no part of this merge wrote",
            hint="move it out of the folder, or choose an empty --output",
        )
    return own


def prepare_part_folder(
    plan: MergePlan, part: Part, shards: Sequence[int], input_paths: Iterable[str | os.PathLike[str]], *, resume: bool
) -> tuple[PartManifest, set[int]]:
    """Make the folder ready for part `part`; call it holding the part's lock, before any write.

    Checks again (`check_part_output`), removes this part's own `.partial` files, writes the part's
    manifest (with `resume`, the shards its earlier run finished, checksums verified).

    Returns:
        The part's manifest and the indexes of the shards kept.
    """
    own = _check(plan, part, shards, input_paths, resume=resume)
    real = Path(os.path.realpath(plan.output_dir))
    planned = {plan.shards[k].name: plan.shards[k].size for k in shards}
    done = {k for k in shards if own is not None and own.finished(real, plan.shards[k].name, plan.shards[k].size)}
    kept = {plan.shards[k].name: own.shards[plan.shards[k].name] for k in done} if own is not None else {}
    for name in [*planned, STAGED_SIDE_FILES if part.index == 0 else None]:
        if name is not None:
            (real / (name + PARTIAL_SUFFIX)).unlink(missing_ok=True)  # a killed run's, of this part's own
    files = sorted(planned) + ([STAGED_SIDE_FILES] if part.index == 0 else [])
    manifest = PartManifest(
        plan_fingerprint(plan), kept, files, part.index, part.count, planned, len(plan.shards), side_file_digests(plan)
    )
    manifest.save(real)
    return manifest, done


def stage_side_files(plan: MergePlan) -> None:
    """Part 0 keeps the side files (index included) for `finalize`, which writes them."""
    body = {name: base64.b64encode(data).decode("ascii") for name, data in sorted(plan.side_files.items())}
    write_side_file(plan.output_dir, STAGED_SIDE_FILES, (json.dumps(body, indent=1) + "\n").encode())


def read_staged_side_files(real: Path) -> dict[str, bytes]:
    """The side files part 0 staged.

    Raises:
        OSError: absent or unreadable. ValueError: damaged.
    """
    obj = load_json_object((real / STAGED_SIDE_FILES).read_text(encoding="utf-8"))
    try:
        return {str(name): base64.b64decode(data, validate=True) for name, data in obj.items()}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not base64 ({exc})") from None
