"""Where the executor's reads of an input file get their bytes: a local file, or a Hub file over HTTP.

`RangeSource` is the one interface the reader (`lazymerge.io.reader`) and the writer's copies use:
`read_into(offset, view)` fills `view` with the file's bytes at `offset`, `consumed` says a range
is done with (a local file drops it from the page cache; a remote one frees its read-ahead), and
`fd` is the local descriptor when there is one (copies then use `copy_file_range`). A local
file is `LocalRangeSource` (positional reads); a Hub file streamed with HTTP range requests is
`lazymerge.io.hub_stream.HttpRangeSource`. The pipeline does not know which it reads.
"""

from __future__ import annotations

import os
from pathlib import Path

from lazymerge._platform import advise_sequential, drop_cached, open_flags, pread_into
from lazymerge.errors import HeaderError

__all__ = ["LocalRangeSource", "RangeSource"]

# Linux drops only whole page-cache folios inside an advised range, and reads ahead into folios of
# up to 2 MiB (large folios, Linux 6.x): the exact range of a 1 MiB chunk leaves the folios at both
# of its ends, which is nearly all of them (measured on this machine's 6.18 kernel: 12.5 of 13.5 GB
# read in 1 MiB chunks stayed cached; the 7B merge then spent 35 s of system time reclaiming, and
# took twice as long as inside a 256 MB memory cgroup). The dropped range starts at the folio
# boundary at or before the chunk (reads go forward: the previous chunk consumed what is before)
# and ends at the last boundary inside it (the rest goes with the next chunk).
_FOLIO = 2 << 20


class RangeSource:
    """The bytes of one input file, read at positions. Subclasses implement `read_into`."""

    fd: int | None = None  # a local descriptor (copy_file_range), or None for a remote file
    name: object = "input"  # for errors: the file's path or label

    def read_into(self, offset: int, view: memoryview, consume: bool = True) -> None:
        """Fill `view` with the file's bytes [offset, offset + len(view)).

        `consume`: the range will not be read again by the run (its buffers may go).

        Raises:
            HeaderError: the file ends before the range (truncated since planning).
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release the file (and, remote, its read-ahead)."""


class LocalRangeSource(RangeSource):
    """A local file read with `preadv`; consumed pages leave the page cache."""

    def __init__(self, path: Path) -> None:
        self.name = path
        self.fd = os.open(path, open_flags(os.O_RDONLY))
        advise_sequential(self.fd)

    def read_into(self, offset: int, view: memoryview, consume: bool = True) -> None:
        assert self.fd is not None
        done = 0
        while done < len(view):
            n = pread_into(self.fd, view[done:], offset + done)
            if n == 0:
                raise HeaderError(self.name, "file ends before the tensor data its header promises: truncated?")
            done += n
        if consume:
            # Consumed input pages leave the page cache, so a merge does not evict everything else.
            start, stop = offset - offset % _FOLIO, (offset + len(view)) // _FOLIO * _FOLIO
            if stop > start:
                drop_cached(self.fd, start, stop - start)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
