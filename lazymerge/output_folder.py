"""The output-folder contract: what lazymerge may write, replace and remove in `--output`.

lazymerge writes only into a missing or empty folder, a folder holding an earlier lazymerge
output (its manifest says so), or, with `--overwrite`, any folder. Files it did not write (per
the manifest) are never replaced without `--overwrite`; `--overwrite` removes the earlier output
(the shards named by its manifest or index, the index, the manifest, `model.safetensors`, their
`.partial` files) before writing, and nothing else: entries are unlinked, never followed, and a
folder is never removed. `--resume` does not imply `--overwrite`: it continues only a run whose
manifest matches the plan. No input, resolved through every symlink, is the output folder or a
file in it.

Two steps: `check_output_folder` at plan time (reads only, so `--dry-run` reports every refusal)
and `prepare_output_folder` at run time, under the folder's lock (checks again, race-free, then
clears the earlier output and writes the new manifest before any other file, so an interrupted
run always leaves a folder lazymerge recognises as its own).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lazymerge.constants import PARTIAL_SUFFIX, SAFE_INDEX_NAME, SAFE_SINGLE_NAME
from lazymerge.errors import DiskSpaceError, OutputError
from lazymerge.lock import LOCK_NAMES, lock_holder
from lazymerge.manifest import MANIFEST_NAME, Manifest, plan_fingerprint

if TYPE_CHECKING:
    from lazymerge.io.checkpoint import Checkpoint
    from lazymerge.plan import MergePlan

__all__ = [
    "DIRECT_PROBE_NAME",
    "PART_MANIFEST_PREFIX",
    "STAGED_SIDE_FILES",
    "check_output_folder",
    "check_plan_output",
    "checkpoint_paths",
    "folder_entries",
    "free_space",
    "is_part_file",
    "is_part_lock",
    "plan_writes",
    "prepare_output_folder",
    "reusable_bytes",
]

DIRECT_PROBE_NAME = ".lazymerge-direct-probe" + PARTIAL_SUFFIX
# Entries a run creates before its manifest exists (or while it replaces it): never the user's.
_OWN_NAMES = frozenset({*LOCK_NAMES, DIRECT_PROBE_NAME, MANIFEST_NAME + PARTIAL_SUFFIX})
_MODEL_SUFFIXES = (".safetensors", ".bin", ".index.json")
_TEMPLATE_FIELD = re.compile(r"\{[^{}]*\}")
PART_MANIFEST_PREFIX = "lazymerge_manifest.part-"
STAGED_SIDE_FILES = "lazymerge_side_files.json"
_PART_LOCK = re.compile(r"^\.lazymerge\.part-\d+-of-\d+\.lock(\.os)?$")  # pid file, OS lock file
_PART_FILE = re.compile(r"^(lazymerge_manifest\.part-\d+-of-\d+\.json|lazymerge_side_files\.json)(\.partial)?$")


def plan_writes(plan: MergePlan) -> list[str]:
    """The names a run of `plan` writes in its folder: shards, side files (index included), manifest."""
    return [*(s.name for s in plan.shards), *plan.side_files, MANIFEST_NAME]


def checkpoint_paths(checkpoints: Iterable[Checkpoint]) -> list[Path]:
    """Each input's folder and weight files, as `check_output_folder` wants them."""
    paths: list[Path] = []
    for c in checkpoints:
        paths.append(Path(c.root))
        paths.extend(Path(c.root) / f for f in c.files)
    return paths


def check_plan_output(
    plan: MergePlan, checkpoints: Sequence[Checkpoint], *, resume: bool, check_disk: bool = True
) -> None:
    """The planning step after `build_plan` (which touches no file): the output-folder contract
    for this plan, with `plan.overwrite` and `resume`, and its free space. Reads only.

    Raises:
        OutputError: see `check_output_folder`.
        DiskSpaceError: the destination has less free space than the output still needs (shards a
            resumed run keeps and files an overwrite removes count as free).
    """
    overwrite = plan.overwrite
    check_output_folder(
        plan.output_dir, checkpoint_paths(checkpoints), overwrite=overwrite, resume=resume, writes=plan_writes(plan)
    )
    if check_disk:
        plan.free_bytes = free_space(plan.output_dir)
        needed = plan.bytes_on_disk - reusable_bytes(plan, overwrite=overwrite, resume=resume)
        if plan.free_bytes < needed:
            raise DiskSpaceError(
                f"{plan.output_dir} has {_gb(plan.free_bytes)} free but the merged model needs {_gb(needed)}"
            )


def check_output_folder(
    output_dir: str | os.PathLike[str],
    input_paths: Iterable[str | os.PathLike[str]],
    *,
    overwrite: bool,
    resume: bool,
    writes: Iterable[str] = (),
) -> None:
    """Refuse an output folder lazymerge must not write into; reads only, changes nothing.

    Call it once the plan is made and before anything is written (it is what `--dry-run`
    reports); `prepare_output_folder` runs the same checks again under the lock.

    Args:
        output_dir: the output folder (it may not exist yet).
        input_paths: every input folder and weight file (`checkpoint_paths`); each is resolved
            through every symlink.
        overwrite: `--overwrite`: a folder holding anything may be written; the earlier output
            is removed at run time.
        resume: `--resume`: a folder holding a lazymerge output (its manifest) may be continued.
        writes: the file names the plan writes (`plan_writes`); a file of the user's at one of
            these names is refused without `overwrite`.

    Raises:
        OutputError: the folder is another run's, an input's, not a folder, a sweep template,
            or holds files lazymerge did not write.
    """
    out = Path(output_dir)
    real = Path(os.path.realpath(out))
    if real.is_dir() and (holder := lock_holder(real)) is not None:  # say so before "holds a model"
        raise OutputError(
            f"{out} is being written by another lazymerge run (pid {holder})",
            hint="wait for it to finish, or choose another --output",
        )
    _check(out, input_paths, overwrite=overwrite, resume=resume, writes=writes)


def _check(
    out: Path, input_paths: Iterable[str | os.PathLike[str]], *, overwrite: bool, resume: bool, writes: Iterable[str]
) -> Manifest | None:
    """The checks of `check_output_folder` but the lock; returns the earlier run's manifest."""
    writes = tuple(writes)
    entries = folder_entries(out, input_paths)
    if entries is None:
        return None
    real = Path(os.path.realpath(out))
    manifest = Manifest.load(real) if MANIFEST_NAME in entries else None
    if manifest is None and not overwrite and (parts := [n for n in entries if is_part_file(n)]):
        raise OutputError(
            f"{out} holds the parts of a split merge ({parts[0]})",
            hint=f"finish it with `lazymerge finalize {out}`, or choose an empty --output",
        )
    if overwrite:
        return manifest
    if manifest is None:
        if entries:
            models = [n for n in entries if n.endswith(_MODEL_SUFFIXES)]
            if models:
                raise OutputError(
                    f"{out} already holds a model ({models[0]})",
                    hint="choose an empty --output folder or pass --overwrite",
                )
            raise OutputError(
                f"{out} is not empty and holds no lazymerge output ({entries[0]})",
                hint="choose an empty --output folder, or pass --overwrite to write lazymerge's files into it",
            )
        return None
    ours = _recorded(manifest, writes)
    if not resume:
        models = [n for n in entries if n.endswith(_MODEL_SUFFIXES)]
        if models:
            unfinished = [n for n in manifest.files or [] if n not in entries] or [
                n for n in entries if n.endswith(PARTIAL_SUFFIX)
            ]
            held = "part of an earlier lazymerge run" if unfinished else "a model"
            raise OutputError(
                f"{out} already holds {held} ({models[0]})",
                hint="pass --resume to continue that run, --overwrite to replace it, or choose an empty folder",
            )
    theirs = [n for n in entries if n not in ours]
    wanted = {*writes, *(n + PARTIAL_SUFFIX for n in writes)}
    clash = [n for n in theirs if n in wanted or n.endswith(_MODEL_SUFFIXES)]
    if clash:
        raise OutputError(
            f"{out} holds {clash[0]}, which the earlier lazymerge run did not write",
            hint="move it out of the folder, or pass --overwrite to replace it",
        )
    return manifest


def folder_entries(out: Path, input_paths: Iterable[str | os.PathLike[str]]) -> list[str] | None:
    """The checks every run makes of its destination (not a sweep template, no input in it, a
    folder), then the entries it holds but lazymerge's own lock and temporary files; None when
    the folder does not exist yet."""
    if field := next(filter(None, (_TEMPLATE_FIELD.search(part) for part in out.parts)), None):
        raise OutputError(
            f"the output folder {out} contains {field.group()}, a sweep template, but this is a single merge",
            hint="give several values to sweep (--weight 0.1,0.2 or --sweep KEY=V1,V2), or name the folder",
        )
    real = Path(os.path.realpath(out))
    _check_inputs(out, real, input_paths)
    if os.path.lexists(real) and not real.is_dir():
        raise OutputError(f"{out} exists and is not a folder")
    if not real.is_dir():
        return None
    try:
        return sorted(name for name in os.listdir(real) if name not in _OWN_NAMES and not is_part_lock(name))
    except OSError as exc:
        raise OutputError(f"cannot list {out}: {exc.strerror}") from exc


def is_part_lock(name: str) -> bool:
    """A part's lock files (`.lazymerge.part-3-of-16.lock`, and `.lock.os` its OS lock's)."""
    return _PART_LOCK.match(name) is not None


def is_part_file(name: str) -> bool:
    """A part's manifest, or the side files a split merge keeps for `finalize` (or their `.partial`)."""
    return _PART_FILE.match(name) is not None


def _check_inputs(out: Path, real: Path, input_paths: Iterable[str | os.PathLike[str]]) -> None:
    for path in input_paths:
        resolved = Path(os.path.realpath(path))
        if resolved == real:
            raise OutputError(f"the output folder {out} is an input folder")
        if not resolved.is_dir() and resolved.parent == real:
            raise OutputError(
                f"the output folder {out} holds an input file ({path} is {resolved})",
                hint="choose another --output folder; lazymerge would replace or remove that file",
            )


def _recorded(manifest: Manifest, writes: Iterable[str]) -> set[str]:
    """Names the earlier run wrote. A manifest from before lazymerge recorded its side files
    (`files` is None) vouches for the names this plan writes too."""
    names = {MANIFEST_NAME, *manifest.shards, *(manifest.files if manifest.files is not None else writes)}
    return names | {n + PARTIAL_SUFFIX for n in names}


def _previous_output(real: Path, manifest: Manifest | None, *, overwrite: bool, writes: Sequence[str]) -> set[str]:
    """Names of the earlier output to remove: what its manifest records, and with `overwrite` a
    model's index, the shards it names and `model.safetensors`; the `.partial` of each and of
    every name this run writes."""
    names = set(manifest.shards) | set(manifest.files or ()) if manifest is not None else set()
    if overwrite:
        names |= {SAFE_INDEX_NAME, SAFE_SINGLE_NAME, *_index_shards(real / SAFE_INDEX_NAME), *_part_files(real)}
    names |= {n + PARTIAL_SUFFIX for n in {*names, *writes}}
    return {n for n in names if _plain_name(n)}


def _part_files(real: Path) -> set[str]:
    """The files of an unfinished split merge: the parts' manifests, what they record, the staged side files."""
    try:
        found = {n for n in os.listdir(real) if is_part_file(n)}
    except OSError:
        return set()
    names = set(found)
    for name in found:
        if name.startswith(PART_MANIFEST_PREFIX) and name.endswith(".json"):
            try:
                part = Manifest.parse((real / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # unreadable: its shards stay (named by the index, they go anyway)
            names |= set(part.shards) | set(part.files or ())
    return names


def _index_shards(index: Path) -> list[str]:
    try:
        if index.is_symlink() or not index.is_file():
            return []
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        return [str(f) for f in weight_map.values()] if isinstance(weight_map, dict) else []
    except (OSError, ValueError, AttributeError, RecursionError):
        return []  # not an index we can read: no shards of it are removed


def _plain_name(name: str) -> bool:
    """A name of an entry directly in the folder (an index comes from a stranger)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def reusable_bytes(plan: MergePlan, *, overwrite: bool, resume: bool) -> int:
    """Bytes already in the output folder that the run frees or keeps: shards a resumed run keeps
    (the manifest's, for this plan, with the planned size), and with `overwrite` the earlier
    output's files, removed before writing. The free-space check needs only the rest."""
    real = Path(os.path.realpath(plan.output_dir))
    if not real.is_dir():
        return 0
    manifest = Manifest.load(real)
    kept: set[str] = set()
    if resume and manifest is not None and manifest.fingerprint == plan_fingerprint(plan):
        for shard in plan.shards:
            size = manifest.shards.get(shard.name, {}).get("size")
            if size == shard.size and _file_size(real / shard.name) == size:
                kept.add(shard.name)
    freed = _previous_output(real, manifest, overwrite=overwrite, writes=plan_writes(plan)) if overwrite else set()
    return sum(_file_size(real / n) for n in kept | freed)


def _file_size(path: Path) -> int:
    try:
        st = path.lstat()
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def prepare_output_folder(
    plan: MergePlan,
    input_paths: Iterable[str | os.PathLike[str]],
    *,
    resume: bool,
    uploaded: Callable[[str, dict], bool] | None = None,
) -> tuple[Manifest, set[int]]:
    """Make `plan.output_dir` ready for the run; call it holding the folder's lock, before any write.

    Checks the folder again (`check_output_folder`, with the plan's `overwrite`), clears the
    earlier output (see the module docstring), then writes the new manifest, which records every
    file this run will write and, with `resume`, the shards kept from the earlier run of the
    same plan.

    `uploaded(name, entry)`: with `resume` and a Hub push, whether a shard recorded with its
    sha256 but deleted locally (--delete-after-upload) is held by the Hub: then it is kept too.

    Returns:
        The run's manifest and the indexes of the shards kept (checksums verified, or held by the Hub).

    Raises:
        OutputError: the folder may not be written, or (`resume`) holds a different merge.
    """
    out = plan.output_dir
    real = Path(os.path.realpath(out))
    writes = plan_writes(plan)
    overwrite = bool(getattr(plan, "overwrite", False))
    previous = _check(out, input_paths, overwrite=overwrite, resume=resume, writes=writes)
    fingerprint = plan_fingerprint(plan)
    done: set[int] = set()
    kept: dict[str, dict] = {}
    if resume and previous is not None and (previous.fingerprint == fingerprint or not overwrite):
        if previous.fingerprint != fingerprint:
            raise OutputError(
                f"{out} holds shards of a different merge (other inputs, recipe or shard size)",
                hint="run the same command as before with --resume, or choose an empty --output",
            )
        done = {k for k, s in enumerate(plan.shards) if previous.finished(real, s.name, s.size)}
        if uploaded is not None:
            for k, s in enumerate(plan.shards):
                entry = previous.shards.get(s.name)
                if k in done or entry is None or entry.get("size") != s.size or not entry.get("sha256"):
                    continue
                if not os.path.lexists(real / s.name) and uploaded(s.name, entry):
                    done.add(k)
        kept = {plan.shards[k].name: previous.shards[plan.shards[k].name] for k in done}
    for name in sorted(_previous_output(real, previous, overwrite=overwrite, writes=writes) - set(kept)):
        _remove_entry(real / name)
    manifest = Manifest(fingerprint, kept, files=sorted(n for n in writes if n != MANIFEST_NAME))
    manifest.save(real)
    return manifest, done


def _remove_entry(path: Path) -> None:
    """Unlink a file or a symlink (never its target); leave a folder alone."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot remove {path} of the earlier output: {exc.strerror}") from exc


def free_space(path: Path) -> int:
    """Free bytes on the file system that `path` (or its nearest existing parent) is on."""
    probe = path.resolve()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
