"""Shard checksums that several cores compute at once: sha256 over per-block XXH3-128 digests.

A plain sha256 of a file is one sequential stream: about 1-2 GB/s on one core, which capped the
whole merge on a machine whose GPU and page cache go several times faster (measured on an H200
host: the writer thread, hashing and writing in turn, held a 7B DogeRM merge to ~1.8 GB/s of
input). Here the file is cut into fixed 16 MiB blocks from offset 0; each block is hashed on
its own (by a thread pool: both hashes release the GIL on large inputs), and the shard's digest
is the sha256 of the concatenated block digests. Fixed blocks keep the digest a property of the
file's bytes alone, whatever the chunk size, worker count or device of the run that wrote it.

Blocks are hashed with XXH3-128, not sha256: the checksums guard `--resume` and `verify`
against torn, truncated or corrupted shards, not against an adversary, and on a 2-core machine
sha256 (1.2-1.3 GB/s a core) cost 10-11 s of CPU per 13.5 GB output, a third of a 7B merge's
user time, against 1.2-1.5 s for XXH3 (9-12 GB/s; `benchmarks/bench_digest.py`). The Hub
computes its own sha256 on upload.

A Hub push also needs the plain sha256 of each shard (the LFS object id), before its upload
starts. `OrderedSha256` computes it while the shard is written, from the same blocks, in file
order on one thread of its own (sha256 is one sequential stream), so the upload never reads the
file a second time to hash it. It costs ~1 s of one core per 1.3 GB, which is why only a run that
pushes asks for it.

Blocks are hashed from a read-only mapping of the file just written (still in the page cache),
so the digest covers exactly what is on disk, including ranges that `copy_file_range` moved
without passing through Python; each block's pages are unmapped right after hashing, so the
mapping never adds more than a few blocks to the resident set.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import xxhash

from lazymerge._platform import can_drop_mapped_pages, drop_mapped_pages, map_readonly, pread, usable_cpu_count

__all__ = [
    "ALGORITHM",
    "BLOCK_BYTES",
    "BLOCK_HASHES",
    "BlockHasher",
    "OrderedSha256",
    "block_digest",
    "file_digest",
    "hash_pool",
    "known_algorithm",
]

BLOCK_BYTES = 16 << 20
# Stored next to the digest in the manifest, so a future change of scheme is never mistaken
# for a corrupted shard (it just makes resume redo the shard).
ALGORITHM = "sha256-of-16MiB-block-xxh3-128"
# Block hashes by scheme name: what this version writes, and what earlier versions wrote, so
# their manifests still verify and resume.
BLOCK_HASHES = {
    ALGORITHM: xxhash.xxh3_128_digest,
    "sha256-of-16MiB-block-sha256": lambda block: hashlib.sha256(block).digest(),
}


def known_algorithm(name: object) -> bool:
    return name in BLOCK_HASHES


def hash_pool(workers: int | None = None) -> ThreadPoolExecutor:
    """A thread pool for block hashing: a few threads are enough to outrun one disk or writer."""
    n = workers or max(1, min(8, usable_cpu_count()))
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="lazymerge-hash")


class OrderedSha256:
    """The plain sha256 of a file, fed its blocks in file order on a thread of its own.

    `feed(view_of_block)` queues one block (the caller keeps its memory valid until the returned
    future is done); `hexdigest()` waits for every block."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lazymerge-sha256")

    def feed(self, read: Callable[[], memoryview], after: Callable[[], None] | None = None) -> Future[None]:
        """Hash the block `read()` gives (called on the hashing thread), then call `after`."""
        return self._pool.submit(self._update, read, after)

    def _update(self, read: Callable[[], memoryview], after: Callable[[], None] | None) -> None:
        view = read()
        try:
            self._hash.update(view)
        finally:
            view.release()
        if after is not None:
            after()

    def hexdigest(self) -> str:
        self._pool.shutdown(wait=True)
        return self._hash.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class BlockHasher:
    """Hashes a file's blocks in the background as the bytes before them are written.

    The owner calls `advance(n)` once bytes [0, n) of the file are written, and `digest()` at
    the end; `close()` releases the mapping early (on abort).
    """

    def __init__(
        self, fd: int, size: int, pool: ThreadPoolExecutor, algorithm: str = ALGORITHM, sha256: bool = False
    ) -> None:
        self.size = size
        self.sha256 = OrderedSha256() if sha256 else None  # the plain sha256 too (a Hub push)
        self.sha256_hex: str | None = None  # set by digest()
        self._pool = pool
        self._hash = BLOCK_HASHES[algorithm]
        # The file is already reserved at its final size (fallocate / ftruncate), so mapping it
        # whole is valid; only written ranges are ever touched. Where hashed pages cannot be
        # dropped from the map (Windows), blocks are read into memory instead, so the resident
        # set still does not grow with the file.
        self._fd = fd
        self._map = map_readonly(fd, size) if size and can_drop_mapped_pages() else None
        self._futures: list[Future[bytes]] = []
        self._submitted = 0  # bytes handed to the pool

    def advance(self, written: int) -> None:
        """Bytes [0, written) are in the file: hash every whole block among them."""
        while self._submitted + BLOCK_BYTES <= written:
            self._submit(self._submitted, BLOCK_BYTES)

    def digest(self) -> str:
        """The file's digest; every byte must have been written. Closes the hasher."""
        try:
            if self._submitted < self.size:
                self._submit(self._submitted, self.size - self._submitted)
            result = combine([f.result() for f in self._futures])
            if self.sha256 is not None:
                self.sha256_hex = self.sha256.hexdigest()
            return result
        finally:
            self.close()

    def close(self) -> None:
        for f in self._futures:
            f.cancel()
        for f in self._futures:
            if not f.cancelled():
                f.exception()  # wait: a running hash still reads the mapping
        self._futures = []
        if self.sha256 is not None:
            self.sha256.close()  # waits: a running update still reads the mapping
        if self._map is not None:
            self._map.close()
            self._map = None

    def _submit(self, start: int, n: int) -> None:
        if self._map is None:
            # No map (Windows): the block is read, by each hash that needs it (from the page cache).
            fd, block_hash = self._fd, self._hash
            if self.sha256 is not None:
                self.sha256.feed(lambda: memoryview(_read_block(fd, start, n)))
            self._futures.append(self._pool.submit(_hash_read, fd, start, n, block_hash))
        elif self.sha256 is not None:
            # The plain sha256 reads the same block first (in file order); the block hash, which
            # drops the block's pages from the mapping, starts once it has.
            mapped, block_hash = self._map, self._hash
            done = self.sha256.feed(lambda: memoryview(mapped)[start : start + n])
            self._futures.append(self._pool.submit(_after, done, _hash_mapped, mapped, start, n, block_hash))
        else:
            self._futures.append(self._pool.submit(_hash_mapped, self._map, start, n, self._hash))
        self._submitted = start + n


def _after(first: Future[None], fn: Callable[..., bytes], *args: object) -> bytes:
    first.result()
    return fn(*args)


def _hash_mapped(mapped: mmap.mmap, start: int, n: int, block_hash: Callable[[memoryview], bytes]) -> bytes:
    view = memoryview(mapped)[start : start + n]
    try:
        digest = block_hash(view)
    finally:
        view.release()  # the mapping can only be closed once no view of it is left
    # Drop the pages from this process's mapping (the page cache keeps them): the resident set
    # must not grow with the shard.
    drop_mapped_pages(mapped, start, n)
    return digest


def _read_block(fd: int, start: int, n: int) -> bytes:
    data = pread(fd, n, start)
    if len(data) != n:
        raise OSError(errno.EIO, f"file ended at {start + len(data)} while hashing a block of {n} bytes at {start}")
    return data


def _hash_read(fd: int, start: int, n: int, block_hash: Callable[[memoryview], bytes]) -> bytes:
    return block_hash(memoryview(_read_block(fd, start, n)))


def block_digest(block: memoryview | bytes) -> bytes:
    """One block's digest (XXH3-128: see the module's docstring for why not sha256)."""
    return BLOCK_HASHES[ALGORITHM](block)


def combine(block_digests: list[bytes]) -> str:
    return hashlib.sha256(b"".join(block_digests)).hexdigest()


def file_digest(path: Path, pool: ThreadPoolExecutor | None = None, algorithm: str = ALGORITHM) -> str:
    """The digest of a whole file, as the writer computes it (blocks hashed in parallel), by
    this version's scheme or an earlier one's (`known_algorithm`)."""
    own = pool is None
    pool = pool or hash_pool()
    try:
        with open(path, "rb") as f:
            hasher = BlockHasher(f.fileno(), os.fstat(f.fileno()).st_size, pool, algorithm)
            hasher.advance(hasher.size)
            return hasher.digest()
    finally:
        if own:
            pool.shutdown()
