"""The Hub pushes of one run: one `HubPusher` per output (K for a sweep, one for a single merge).

The executor's progress callback is routed to the pusher of the folder each shard was written to;
the progress bar sees one upload total; each repo gets its one commit at the end.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lazymerge.io.hub_upload import HubPusher, PushResult, UploadCallback

if TYPE_CHECKING:
    from lazymerge.events import ProgressEvent
    from lazymerge.options import HubOptions
    from lazymerge.plan import MergePlan

__all__ = ["Pushes"]


class Pushes:
    """The pushers of a run, one per output (a single merge has one): the executor's progress
    callback routes each finished shard to the pusher of the folder it was written to; one
    upload total for the progress bar; one commit per repo at the end.

    Creating them creates the repos (a bad token fails here, before any byte is merged); none is
    left running if one fails.
    """

    def __init__(self, plans: Sequence[MergePlan], repo_ids: Sequence[str], hub: HubOptions) -> None:
        self.plans = list(plans)
        self.pushers: list[HubPusher] = []
        try:
            for repo_id in repo_ids:
                self.pushers.append(
                    HubPusher(
                        repo_id, private=hub.private, revision=hub.revision, commit_message=hub.commit_message,
                        delete_after_upload=hub.delete_after_upload, token=hub.token,
                    )
                )  # fmt: skip
        except BaseException:
            self.close()
            raise
        self._by_folder = {
            p.output_dir.resolve(): pusher.wrap(None, p) for p, pusher in zip(self.plans, self.pushers, strict=True)
        }

    @property
    def delete_after_upload(self) -> bool:
        return any(pusher.delete_after_upload for pusher in self.pushers)

    def wrap(self, progress: Callable[[ProgressEvent], None] | None) -> Callable[[ProgressEvent], None]:
        """The executor's callback: `progress` first, then hand each finished shard to its pusher."""

        def route(event: ProgressEvent) -> None:
            if progress is not None:
                progress(event)
            if event.path is not None:
                self._by_folder[Path(event.path).parent.resolve()](event)

        return route

    def report_uploads(self, report: UploadCallback) -> None:
        """Call `report(done, total)` with the bytes uploaded by all pushers together (each
        pusher calls from its own thread)."""
        total = sum(s.size for p in self.plans for s in p.shards)
        done, lock = [0] * len(self.pushers), threading.Lock()

        def on_upload(v: int, n: int) -> None:
            with lock:
                done[v] = n
                now = sum(done)
            report(now, total)

        for v, pusher in enumerate(self.pushers):
            pusher.on_upload = lambda n, _total, v=v: on_upload(v, n)

    def held_checks(self) -> list[Callable[[str, dict], bool]]:
        """For `--resume`, per output: whether a shard its manifest records (with a sha256) but
        that is gone locally is held by the Hub already (`HubPusher.held_on_hub`)."""

        def check(pusher: HubPusher) -> Callable[[str, dict], bool]:
            return lambda name, entry: pusher.held_on_hub(name, int(entry["size"]), str(entry["sha256"]))

        return [check(pusher) for pusher in self.pushers]

    def commit(self) -> list[PushResult]:
        """Wait for every upload, then one commit per repo."""
        return [pusher.commit(p) for p, pusher in zip(self.plans, self.pushers, strict=True)]

    def close(self) -> None:
        for pusher in self.pushers:
            pusher.close()
