"""A Hub weight file's tensor table, read with HTTP range requests: no weight byte is downloaded.

`RangedFile` is a seekable, read-only file object over one file of a Hub repo that fetches
what a parser reads with `Range` requests (through huggingface_hub's session, so HF_TOKEN,
HF_ENDPOINT and proxies apply), caching every block it fetched. `remote_tensors` reads a
safetensors header through one (usually a single 64 KiB request), or a `.bin` archive's zip
directory, data.pkl and the 30-byte local header of each storage (fetched in parallel), and
returns the file's tensors as `TensorRef`s, exactly as a local file would give them. Every
request has the connect/read timeout of io/hub_http.py; `local_tensors` reads the same table
from a downloaded file, to check it is the file that was planned. `remote_tables` plans a whole
repo at a commit this way: its weight files (the index, through the HF cache), then every header.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

from lazymerge.constants import BIN_INDEX_NAME, BIN_SINGLE_NAME, SAFE_INDEX_NAME, SAFE_SINGLE_NAME
from lazymerge.errors import CheckpointError, HeaderError
from lazymerge.io.checkpoint import TensorRef, validate_weight_map
from lazymerge.io.header import parse_header, read_header
from lazymerge.io.hub_http import hub_timeout, run_pooled

__all__ = ["THREADS", "RangedFile", "Tables", "auth_headers", "local_tensors", "remote_tables", "remote_tensors"]

THREADS = 8  # requests to the Hub at a time (ranged reads, headers of several files, side files)
_HEADER_PROBE = 64 * 1024  # one ranged read covers the header of most shards

Tables = list[tuple[list[TensorRef], dict[str, str]]]  # per weight file: (tensors, metadata)


class RangedFile(io.RawIOBase):
    """A seekable, read-only file object over one Hub file, reading with HTTP Range requests.

    Every request fetches at least `block_size` bytes (fewer at the end of the file) and is
    cached, so a parser's small reads cost few round trips; `prefetch` fetches many exact ranges
    in parallel (the local zip headers of a `.bin`). `bytes_fetched` counts content bytes."""

    def __init__(self, url: str, size: int, headers: dict[str, str], name: str, block_size: int = 64 * 1024):
        super().__init__()
        self.url, self.size, self.headers, self.name, self.block_size = url, size, headers, name, block_size
        self.bytes_fetched = 0
        self.error: BaseException | None = None  # the last network error, for callers that catch broadly
        self._pos = 0
        self._blocks: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        n = min(len(view), max(0, self.size - self._pos))
        done = 0
        while done < n:
            data = self._cached(self._pos + done, n - done)
            if data is None:
                want = max(n - done, self.block_size)
                start = self._pos + done
                if start + want > self.size:  # near the end (the zip directory): read backwards
                    start = max(0, min(start, self.size - want))
                self._fetch(start, min(self.size, start + want))
                continue
            view[done : done + len(data)] = data
            done += len(data)
        self._pos += n
        return n

    def _cached(self, pos: int, n: int) -> bytes | None:
        with self._lock:
            for start, block in self._blocks.items():
                if start <= pos < start + len(block):
                    return block[pos - start : pos - start + n]
        return None

    def _fetch(self, start: int, end: int) -> bytes:
        from huggingface_hub.utils import get_session, hf_raise_for_status

        if end <= start:
            return b""
        try:
            response = get_session().get(
                self.url, headers={**self.headers, "Range": f"bytes={start}-{end - 1}"}, timeout=hub_timeout()
            )
            hf_raise_for_status(response)
        except Exception as exc:
            self.error = exc
            raise
        data = response.content
        if response.status_code == 200 and len(data) == self.size:  # the server ignored the range
            data = data[start:end]
        if len(data) != end - start:
            self.error = HeaderError(self.name, f"asked the Hub for {end - start} bytes, got {len(data)}")
            raise self.error
        with self._lock:
            self._blocks[start] = data
            self.bytes_fetched += len(data)
        return data

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """Fetch the (start, end) ranges not already cached, several at a time."""
        todo = sorted({(a, min(b, self.size)) for a, b in ranges})
        todo = [(a, b) for a, b in todo if b > a and not self._covered(a, b)]
        if not todo:
            return
        run_pooled(lambda r: self._fetch(*r), todo, THREADS, "lazymerge-ranged")

    def _covered(self, a: int, b: int) -> bool:
        with self._lock:
            return any(s <= a and b <= s + len(blk) for s, blk in self._blocks.items())


def remote_tables(
    repo_id: str, commit: str, label: str, sizes: dict[str, int], token: str | bool | None
) -> tuple[list[str], Tables, dict[str, str] | None]:
    """(weight files, their tables, the index's weight_map or None) of `repo_id` at `commit`.

    `sizes` are the repo's files and sizes at `commit`; the headers are read in parallel.

    Raises:
        CheckpointError: no weight file, or an index that is not valid or names a missing shard.
        HeaderError: a corrupt header. huggingface_hub / network exceptions (wrap in `hub_errors`).
    """
    files, weight_map = _weight_files(repo_id, commit, label, sizes, token)
    headers = auth_headers(token)
    tables = run_pooled(
        lambda f: remote_tensors(repo_id, commit, f, sizes[f], headers, label), files, THREADS, "lazymerge-headers"
    )
    return files, tables, weight_map


def remote_tensors(
    repo_id: str, commit: str, file: str, size: int, headers: dict[str, str], label: str
) -> tuple[list[TensorRef], dict[str, str]]:
    """(tensors, metadata) of `file` (`size` bytes) at `commit`, from ranged reads sent with `headers`.

    Raises:
        HeaderError: the header is corrupt, or the file is neither safetensors nor a `.bin` archive.
        huggingface_hub / network exceptions, as raised (wrap the call in `hub_errors`).
    """
    from huggingface_hub import hf_hub_url

    url = hf_hub_url(repo_id, file, revision=commit)
    source = f"{label}/{file}"
    reader = RangedFile(url, size, headers, source)
    if file.endswith(".safetensors"):
        if size < 8:
            raise HeaderError(source, f"file is {size} bytes, too short for a safetensors header")
        probe = reader.read(min(size, _HEADER_PROBE))
        n = int.from_bytes(probe[:8], "little")
        if 8 + n > len(probe) and 8 + n <= size and n <= 100_000_000:
            probe += reader.read(8 + n - len(probe))
        header = parse_header(probe, file_size=size, source=source)
        refs = [
            TensorRef(e.name, e.dtype, e.shape, file, header.data_start + e.begin, e.nbytes)
            for e in header.tensors.values()
        ]
        return refs, header.metadata
    if file.endswith((".bin", ".pt")):
        return _remote_bin_tensors(reader, file, source), {}
    raise HeaderError(source, "unknown weight file type (expected .safetensors or .bin)")


def _remote_bin_tensors(reader: RangedFile, file: str, source: str) -> list[TensorRef]:
    import zipfile

    from lazymerge.io.torchbin import read_bin_tensors

    # Warm the cache with everything the parser will read: the zip directory (the last block),
    # data.pkl and byteorder whole, and the fixed 30-byte local header of every storage.
    try:
        with zipfile.ZipFile(reader) as zf:
            infos = zf.infolist()
        ranges = []
        for info in infos:
            if info.filename.endswith(("/data.pkl", "/byteorder", "/version")) and info.file_size < 256 << 20:
                end = info.header_offset + 30 + 2 * len(info.filename) + 1024 + info.compress_size
                ranges.append((info.header_offset, end))
            else:
                ranges.append((info.header_offset, info.header_offset + 30))
        reader.prefetch(ranges)
    except Exception:
        if reader.error is not None:
            raise reader.error from None
        # not a zip: the parser below says so in its own words
    try:
        found = read_bin_tensors(reader, name=source)
    except HeaderError:
        if reader.error is not None:
            raise reader.error from None
        raise
    return [TensorRef(t.name, t.dtype, t.shape, file, t.offset, t.nbytes) for t in found]


def local_tensors(path: Path, file: str, source: str) -> list[TensorRef]:
    """The tensors of a downloaded copy of `file`, as `remote_tensors` gives them from the Hub."""
    if file.endswith((".bin", ".pt")):
        from lazymerge.io.torchbin import read_bin_tensors

        return [
            TensorRef(t.name, t.dtype, t.shape, file, t.offset, t.nbytes) for t in read_bin_tensors(path, name=source)
        ]
    header = read_header(path)
    return [
        TensorRef(e.name, e.dtype, e.shape, file, header.data_start + e.begin, e.nbytes)
        for e in header.tensors.values()
    ]


def auth_headers(token: str | bool | None) -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    return build_hf_headers(token=token)


def _weight_files(
    repo_id: str, commit: str, label: str, sizes: dict[str, int], token: str | bool | None
) -> tuple[list[str], dict[str, str] | None]:
    import json

    for index_name in (SAFE_INDEX_NAME, BIN_INDEX_NAME):
        if index_name in sizes:
            from huggingface_hub import hf_hub_download

            # Through the HF cache (not a ranged read): a later HF_HUB_OFFLINE run needs it there.
            path = hf_hub_download(repo_id, index_name, revision=commit, token=token, etag_timeout=hub_timeout())
            try:
                obj = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError) as exc:
                raise CheckpointError(f"{label}: {index_name} is not valid JSON ({exc})") from None
            weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{label}: {index_name} has no weight_map")
            validate_weight_map(label, index_name, weight_map)
            files = list(dict.fromkeys(weight_map.values()))
            for file in files:
                if file not in sizes:
                    raise CheckpointError(
                        f"{label}: shard {file} is listed in the index but missing from the repo",
                        hint="the upload is incomplete; ask the repo's owner",
                    )
            return files, weight_map
    for single in (SAFE_SINGLE_NAME, BIN_SINGLE_NAME):
        if single in sizes:
            return [single], None
    top = [f for f in sizes if "/" not in f]
    singles = sorted(f for f in top if f.endswith(".safetensors")) or sorted(
        f for f in top if f.startswith("pytorch_model") and f.endswith(".bin")
    )
    if len(singles) == 1:
        return singles, None
    raise CheckpointError(
        f"{label}: no model.safetensors, pytorch_model.bin or index file in this Hub repo",
        hint="check the repo id; a model repo holds config.json and the weight files",
    )
