"""A shard writer that bypasses the page cache (O_DIRECT), checksumming from its own buffers.

Why: a buffered write costs the kernel a copy into the page cache, page allocation, dirty
accounting and writeback. Measured on the 2-core CI machine with dd, 2.1 GB written:
4.1 s of system CPU buffered against 0.55 s with O_DIRECT, for the same disk time. A CPU merge
on few cores is bounded by exactly that CPU, so the CPU path writes its shards this way.

How: the shard's bytes (header, merged chunks, copied tensors) are assembled in order into
page-aligned buffers that each hold one 16 MiB hash block of the file (`lazymerge.io.digest`'s
fixed blocks, so the digest is the same as the buffered writer's). A full block is handed to a
thread pool that hashes it from memory and writes it with O_DIRECT at its aligned offset; a
small ring of buffers bounds memory. The last block's unaligned tail (under 4 KiB) goes through
the page cache, so the file is never longer than the shard. Where the file system refuses
O_DIRECT, the same blocks go through the page cache instead.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from lazymerge._platform import open_direct, pread_into, pwrite
from lazymerge.errors import OutputError
from lazymerge.io.digest import BLOCK_BYTES, OrderedSha256, block_digest, combine
from lazymerge.io.writer import ShardWriter, _input_ended, create_new
from lazymerge.output_folder import DIRECT_PROBE_NAME
from lazymerge.plan import MergePlan, OutputShard
from lazymerge.settings import direct_write

if TYPE_CHECKING:
    from lazymerge.kernels.base import Backend

__all__ = ["RING", "DirectShardWriter", "direct_io_supported", "use_direct_writes"]

_ALIGN = 4096  # O_DIRECT offset, length and address alignment that every common device accepts
# Block buffers per writer: one filling, the others being hashed and written, each by its own
# thread of the pool the executor passes (RING - 1 threads). At 7B on the CI machine, 6 against 3
# (on the 2 hash threads) took the writer stage from ~40 s busy to ~9 s and the merge from 59.7-73.1
# to 53.0-62.4 s in 3 back-to-back pairs; it costs 96 MB of buffers instead of 48. 4 (64 MB) keeps
# a CPU merge without torch under 160 MB peak RSS; on the 1B pair (2 loaded cores) 4 and 6 took the
# same time within noise (15.2 and 34.2 s against 20.0 and 31.7 s, back to back). 7B not re-measured.
RING = 4


def direct_io_supported(directory: Path) -> bool:
    """Whether files in `directory` can be opened with O_DIRECT (not on tmpfs of older kernels)."""
    probe = directory / DIRECT_PROBE_NAME
    try:
        os.close(create_new(probe))
        fd = open_direct(probe)
    except OSError:
        fd = None
    finally:
        if fd is not None:
            os.close(fd)  # before the unlink: Windows cannot delete an open file
        probe.unlink(missing_ok=True)
    return fd is not None


def use_direct_writes(backend: Backend, plans: list[MergePlan]) -> bool:
    """Whether shards bypass the page cache (DirectShardWriter): on the CPU path, where the
    kernel's buffered-write work competes with the merge for the cores, for a single output (a
    sweep's outputs copy shared ranges from the first output's cached file), where the file
    system allows it. LAZYMERGE_DIRECT_WRITE=0 turns it off, =1 on for the GPU path too."""
    env = direct_write()
    if env is False or len(plans) != 1 or (backend.name != "cpu" and env is not True):
        return False
    return direct_io_supported(plans[0].output_dir)


class DirectShardWriter(ShardWriter):
    """ShardWriter's interface (write, copy_from, digest, finish, abort) with writes in file
    order only; see the module docstring."""

    def __init__(self, directory: Path, shard: OutputShard, pool: ThreadPoolExecutor, sha256: bool = False) -> None:
        """`pool`: RING - 1 threads, which hash and write the blocks (each write blocks its
        thread until the disk has the data). `sha256`: also compute the plain sha256 of the
        file (for a Hub upload) from the same buffers, in file order."""
        self._pool = pool
        self._sha = OrderedSha256() if sha256 else None
        self._sha_hex: str | None = None
        self._buffers = [mmap.mmap(-1, BLOCK_BYTES) for _ in range(RING)]  # page-aligned, anonymous
        self._pending: list[Future[bytes] | None] = [None] * RING
        self._digests: list[Future[bytes]] = []
        self._block = 0  # index of the block being filled (file offset = block * BLOCK_BYTES)
        self._fill = 0  # bytes of it filled
        self.dfd = -1
        super().__init__(directory, shard)  # creates, reserves, and writes the header through us
        direct = open_direct(self.partial_path)
        self.dfd = -1 if direct is None else direct  # -1: no O_DIRECT, the blocks go through the page cache

    # ShardWriter calls _pwrite for the header; everything goes through the block buffers.
    def _pwrite(self, data: memoryview | bytes, offset: int) -> None:
        self._append(memoryview(data).cast("B"), offset)

    def write(self, data: memoryview | bytes, offset: int) -> None:
        self._append(memoryview(data).cast("B"), offset)
        self.bytes_written += len(data)

    def copy_from(self, src_fd: int, src_offset: int, nbytes: int, offset: int, source: object = "input") -> None:
        """Read the bytes straight into the block buffers (one copy, no conversion)."""
        self._check_order(offset)
        done = 0
        while done < nbytes:
            buf = self._current()
            n = min(nbytes - done, BLOCK_BYTES - self._fill)
            got = pread_into(src_fd, memoryview(buf)[self._fill : self._fill + n], src_offset + done)
            if got == 0:
                raise _input_ended(source)
            self._filled(got)
            done += got
        self.bytes_written += nbytes

    def digest(self) -> str:
        """Write the last block, wait for every block, cut the file to size; the shard's digest."""
        if self._fill:
            self._submit(self._fill)
        digests = [f.result() for f in self._digests]
        self._digests = []
        if self._sha is not None:
            self._sha_hex = self._sha.hexdigest()
        return combine(digests)

    def sha256(self) -> str | None:
        return self._sha_hex

    def finish(self) -> Path:
        self._close_direct()
        return super().finish()

    def abort(self) -> None:
        for f in self._digests:
            f.cancel()
        for f in self._digests:
            if not f.cancelled():
                f.exception()  # a running block write still uses its buffer
        self._digests = []
        if self._sha is not None:
            self._sha.close()  # waits: a running update still reads its buffer
        self._close_direct()
        super().abort()

    # -- assembling blocks ----------------------------------------------------------------------
    def _check_order(self, offset: int) -> None:
        expected = self._block * BLOCK_BYTES + self._fill
        if offset != expected:
            raise RuntimeError(f"out-of-order write at {offset} (expected {expected}) in {self.shard.name}")

    def _append(self, view: memoryview, offset: int) -> None:
        self._check_order(offset)
        while view:
            buf = self._current()
            n = min(len(view), BLOCK_BYTES - self._fill)
            _copy(buf, self._fill, view[:n])
            self._filled(n)
            view = view[n:]

    def _current(self) -> mmap.mmap:
        slot = self._block % RING
        if self._fill == 0 and self._pending[slot] is not None:
            self._pending[slot].result()  # the buffer's previous block is written: reuse it
            self._pending[slot] = None
        return self._buffers[slot]

    def _filled(self, n: int) -> None:
        self._fill += n
        if self._fill == BLOCK_BYTES:
            self._submit(BLOCK_BYTES)

    def _submit(self, length: int) -> None:
        slot = self._block % RING
        buf = self._buffers[slot]
        if self._sha is not None:
            # The buffer is reused only once its write is done, and its write starts after the
            # plain sha256 (one thread, file order) has read it.
            hashed = self._sha.feed(lambda: memoryview(buf)[:length])
            future = self._pool.submit(self._after, hashed, buf, length, self._block * BLOCK_BYTES)
        else:
            future = self._pool.submit(self._write_block, buf, length, self._block * BLOCK_BYTES)
        self._pending[slot] = future
        self._digests.append(future)
        self._block += 1
        self._fill = 0

    def _after(self, hashed: Future[None], buf: mmap.mmap, length: int, offset: int) -> bytes:
        hashed.result()
        return self._write_block(buf, length, offset)

    def _write_block(self, buf: mmap.mmap, length: int, offset: int) -> bytes:
        view = memoryview(buf)
        try:
            digest = block_digest(view[:length])
            head = length - length % _ALIGN if self.dfd >= 0 else 0
            if head:
                try:
                    self._write_all(self.dfd, view[:head], offset)
                except _Unaligned:
                    head = 0  # the device wants a larger alignment: through the page cache, then
            # The unaligned tail of the last block goes through the page cache: padding it for
            # O_DIRECT would make the file briefly longer than the shard it will be.
            self._write_all(self.fd, view[head:length], offset + head)
            return digest
        finally:
            view.release()

    def _write_all(self, fd: int, view: memoryview, offset: int) -> None:
        try:
            while view:
                n = pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._disk_full() from None
            if exc.errno == errno.EINVAL and fd == self.dfd:
                raise _Unaligned from None
            raise OutputError(f"cannot write {self.partial_path}: {exc.strerror}") from exc

    def _close_direct(self) -> None:
        if self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1
        for buf in self._buffers:
            try:
                buf.close()
            except BufferError:
                pass  # a failed block's traceback still holds a view: freed with it
        self._buffers = []


class _Unaligned(Exception):
    """O_DIRECT refused the block's alignment (EINVAL)."""


def _copy(buf: mmap.mmap, at: int, src: memoryview) -> None:
    """buf[at:at + len(src)] = src, with the GIL released for large copies (ctypes.memmove
    drops it), so the merge workers' Python code keeps running while megabytes move."""
    n = len(src)
    if n < (1 << 16) or src.readonly:
        buf[at : at + n] = src
        return
    dst = (ctypes.c_char * n).from_buffer(buf, at)
    source = (ctypes.c_char * n).from_buffer(src)
    try:
        ctypes.memmove(dst, source, n)
    finally:
        del dst, source  # release the buffer exports, or the mmap cannot be closed
