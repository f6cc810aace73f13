"""The two options objects every way of running a merge takes, checked once when built.

`RunOptions` says how to run (shard size, chunk size, output folder policy, device, threads,
progress); `HubOptions` says what to do with the Hub (where to push, the commit, how to read Hub
inputs, the token). The CLI builds them from its flags, a Python user builds them (or passes their
fields as keywords to `lazymerge.merge`/`dogerm`); both reach the same run path, so a rule such as
"delete_after_upload needs push_to_hub" is checked in one place, `__post_init__`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lazymerge.constants import DEFAULT_MAX_SHARD_SIZE, parse_size
from lazymerge.errors import RecipeError
from lazymerge.parts import Part

if TYPE_CHECKING:
    from lazymerge.events import ProgressEvent
    from lazymerge.sweep import Sweep

__all__ = ["DEVICES", "HubOptions", "ProgressCallback", "RunOptions", "split_settings"]

ProgressCallback = Callable[["ProgressEvent"], None]
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RunOptions:
    """How a merge (or a sweep) runs.

    Args:
        max_shard_size: output shard cap, bytes or a string like "5GB" (stored as bytes).
        chunk_elements: elements per chunk (bounds memory); default 2 Mi on CPU, 8 Mi on CUDA.
        overwrite: allow an output folder that already holds a model.
        resume: keep the shards a killed run of the same merge finished (checksums verified),
            redo the rest. Independent of `overwrite`: a resumed folder is not overwritten.
        device: "auto" (CUDA when a GPU and Triton are usable), "cpu" or "cuda".
        workers: CPU merge threads (default: the cores this process may use).
        write_lanes: output shards written at once (default 3 on CUDA, 1 on CPU).
        progress: True to show progress on stderr (a bar in a terminal or a notebook; plain
            lines, flushed as they happen, in a file, a pipe or a batch log), or a callback that
            receives each `ProgressEvent`; False for none.
        progress_interval: seconds between the plain status lines of a log (0: only a line per
            shard closed and at the start and end). The bar ignores it.
        part: run one part of a split merge, `"I/N"` or a `Part` (0 <= I < N): its whole output
            shards only, balanced by bytes; `lazymerge.finalize` assembles the N parts.
        parts: the number of parts `ray` splits the merge into (default: one per Ray node, or
            per group of CPUs); `--dry-run` shows what each reads and writes.
        ray: run the parts as Ray tasks (cluster from RAY_ADDRESS, else a local one) and
            finalize on the driver (`pip install lazymerge[ray]`).

    Raises:
        RecipeError: a value out of range (the message gives the range).
    """

    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    chunk_elements: int | None = None
    overwrite: bool = False
    resume: bool = False
    device: str = "auto"
    workers: int | None = None
    write_lanes: int | None = None
    progress: bool | ProgressCallback = False
    progress_interval: float = 10.0
    part: Part | str | None = None
    parts: int | None = None
    ray: bool = False

    def __post_init__(self) -> None:
        if self.part is not None:
            object.__setattr__(self, "part", Part.parse(self.part))
            if self.overwrite:
                raise RecipeError(
                    "--overwrite does not combine with --part: the parts share the output folder",
                    hint="give the parts an empty folder (or --resume to continue them)",
                )
            if self.ray:
                raise RecipeError("--part runs one part here; --ray runs them all", hint="use one of them")
        if self.ray and self.overwrite:
            raise RecipeError(
                "--overwrite does not combine with --ray: the parts share the output folder",
                hint="give the parts an empty folder (or --resume to continue them)",
            )
        _at_least_one("parts", self.parts)
        object.__setattr__(self, "max_shard_size", parse_size(self.max_shard_size, "max_shard_size"))
        for name in ("chunk_elements", "workers", "write_lanes"):
            _at_least_one(name, getattr(self, name))
        if self.device not in DEVICES:
            raise RecipeError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not (isinstance(self.progress, bool) or callable(self.progress)):
            raise RecipeError(f"progress must be True, False or a callback, got {self.progress!r}")
        interval = self.progress_interval
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 <= interval < float("inf"):
            raise RecipeError(f"progress_interval must be a number of seconds >= 0, got {interval!r}")


@dataclass(frozen=True)
class HubOptions:
    """Hub inputs and the optional push of the result.

    Args:
        push_to_hub: a repo id (`owner/name`, or `name` in the token's namespace) to upload each
            shard to as it is written, with one commit at the end; for a sweep a template such as
            `owner/name-{weight}` (one repo and one commit per output).
        private: create the pushed repo private. revision: the branch to commit to.
        commit_message: for the one commit.
        delete_after_upload: delete each local shard once uploaded (at most two output shards on
            disk: one uploads while the next merges). Needs `push_to_hub`.
        low_disk: Hub inputs are streamed with HTTP range requests into the merge (no input
            weight byte on disk; nothing cached for a later run).
        token: Hub token (default HF_TOKEN or the stored login); never shown in a repr or a log.

    Raises:
        RecipeError: `delete_after_upload` without `push_to_hub`.
    """

    push_to_hub: str | None = None
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    delete_after_upload: bool = False
    low_disk: bool = False
    token: str | bool | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.delete_after_upload and self.push_to_hub is None:
            raise RecipeError(
                "--delete-after-upload needs --push-to-hub (delete_after_upload needs push_to_hub)",
                hint="add --push-to-hub OWNER/NAME, or drop --delete-after-upload",
            )

    def repo_ids(self, sweep: Sweep | None = None) -> list[str] | None:
        """The repo of each output (`push_to_hub`, or its template filled for each value of
        `sweep`), or None when nothing is pushed."""
        if self.push_to_hub is None:
            return None
        return [self.push_to_hub] if sweep is None else sweep.repos(self.push_to_hub)


def _at_least_one(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(f"{name} must be a whole number >= 1 (or unset for the default), got {value!r}")


_RUN_FIELDS = frozenset(f.name for f in dataclasses.fields(RunOptions))
_HUB_FIELDS = frozenset(f.name for f in dataclasses.fields(HubOptions))


def split_settings(
    options: RunOptions | None, hub: HubOptions | None, settings: Mapping[str, Any]
) -> tuple[RunOptions, HubOptions]:
    """The options objects with `settings` (keywords named like their fields) applied on top.

    `lazymerge.merge(cfg, out, device="cpu")` is `merge(cfg, out, options=RunOptions(device="cpu"))`:
    a shortcut, checked by the same `__post_init__`."""
    unknown = sorted(set(settings) - _RUN_FIELDS - _HUB_FIELDS)
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s): {', '.join(unknown)} "
            f"(RunOptions: {', '.join(sorted(_RUN_FIELDS))}; HubOptions: {', '.join(sorted(_HUB_FIELDS))})"
        )
    run = {k: v for k, v in settings.items() if k in _RUN_FIELDS}
    pushing = {k: v for k, v in settings.items() if k in _HUB_FIELDS}
    options = dataclasses.replace(options, **run) if options is not None else RunOptions(**run)
    hub = dataclasses.replace(hub, **pushing) if hub is not None else HubOptions(**pushing)
    return options, hub
