"""The resume manifest: which output shards are finished, with their sizes and checksums.

Written atomically when a run starts, before any other file (it marks the folder as a lazymerge
output, see `lazymerge.output_folder`), and again as each shard closes. `--resume` keeps a shard only if the manifest was made
by the same plan (a fingerprint of the recipe, the inputs' tensor layout and every output header)
and the file on disk still has the recorded size and digest; everything else is redone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lazymerge.io.digest import ALGORITHM, file_digest, known_algorithm
from lazymerge.io.writer import write_side_file
from lazymerge.methods import get as get_method

if TYPE_CHECKING:  # the plan imports the output-folder checks, which read manifests
    from lazymerge.plan import MergePlan

__all__ = ["MANIFEST_NAME", "Manifest", "load_json_object", "plan_fingerprint"]

MANIFEST_NAME = "lazymerge_manifest.json"


def plan_fingerprint(plan: MergePlan) -> str:
    """A digest of everything that determines the output bytes (not the output folder)."""
    h = hashlib.sha256()
    h.update(json.dumps(plan.recipe, sort_keys=True).encode())
    for t in plan.tensors:
        h.update(f"{t.name}|{t.dtype}|{t.shape}|{t.divisor}|{t.shard}|{t.offset}".encode())
        if t.params:  # a method with per-tensor parameters (a weighted sum has none)
            h.update(f"{t.method}|{json.dumps(t.params, sort_keys=True, default=str)}".encode())
        if get_method(t.method).accumulation != "rounded":
            # Other arithmetic, other bytes: a run started by a version that rounded `linear`'s
            # products apart is not continued by one that fuses them (and the other way round).
            h.update(f"accumulation={get_method(t.method).accumulation}".encode())
        for seg in t.segments:
            for s in seg.sources:
                h.update(f"{seg.start}|{seg.count}|{s.checkpoint}|{s.file}|{s.offset}|{s.dtype}|{s.weight!r}".encode())
                if s.derived:
                    h.update(f"{s.derived}|{[(p.checkpoint, p.file, p.offset, p.dtype) for p in s.parts]}".encode())
    for shard in plan.shards:
        h.update(shard.name.encode())
        h.update(shard.header)
    return h.hexdigest()


def load_json_object(text: str) -> dict:
    """A JSON object from `text`.

    Raises:
        ValueError: not JSON, or not an object.
    """
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj


@dataclass
class Manifest:
    """`{"fingerprint": ..., "shards": {name: {"size": n, "digest": hex, "algorithm": ..., "sha256": hex}},
    "files": [side file names]}`; `sha256` (the plain one, the Hub's LFS id) only for pushed runs.

    The digest is `lazymerge.io.digest`'s block digest (sha256 of parallel XXH3-128 block
    digests), not a plain sha256. `files` lists every file the run writes (shards, config,
    tokenizer, card, index): the output-folder contract replaces those, and no other file,
    without --overwrite. It is None in manifests written before it existed."""

    fingerprint: str
    shards: dict[str, dict] = field(default_factory=dict)
    files: list[str] | None = None

    @classmethod
    def load(cls, directory: Path) -> Manifest | None:
        """The manifest in `directory`, or None when it is absent or damaged."""
        try:
            return cls.read(directory)
        except (OSError, ValueError):
            return None  # absent or damaged: nothing can be trusted, redo everything

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """The manifest in `directory`.

        Raises:
            OSError: it is absent or unreadable. ValueError: it is not a manifest (the message says why).
        """
        return cls.parse((directory / MANIFEST_NAME).read_text(encoding="utf-8"))

    @classmethod
    def parse(cls, text: str) -> Manifest:
        """A manifest from its JSON text.

        Raises:
            ValueError: it is not a manifest (the message says why).
        """
        obj = load_json_object(text)
        if not isinstance(obj.get("fingerprint"), str):
            raise ValueError("no fingerprint")
        shards, files = obj.get("shards"), obj.get("files")
        if not isinstance(shards, dict) or not all(isinstance(v, dict) for v in shards.values()):
            raise ValueError("no shards table")
        if files is not None and not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
            raise ValueError("files is not a list of names")
        return cls(obj["fingerprint"], {str(k): dict(v) for k, v in shards.items()}, files)

    @property
    def file_name(self) -> str:
        """The name the manifest is saved under (a part of a split merge has its own)."""
        return MANIFEST_NAME

    def body(self) -> dict:
        """The JSON object saved."""
        body: dict = {"fingerprint": self.fingerprint, "shards": dict(sorted(self.shards.items()))}
        if self.files is not None:
            body["files"] = sorted(self.files)
        return body

    def save(self, directory: Path) -> None:
        data = (json.dumps(self.body(), indent=2, sort_keys=True) + "\n").encode()
        write_side_file(directory, self.file_name, data)

    def record(self, name: str, size: int, digest: str, sha256: str | None = None) -> None:
        """A finished shard; `sha256`: its plain sha256 (the Hub's LFS object id), when computed."""
        entry = {"size": size, "digest": digest, "algorithm": ALGORITHM}
        if sha256 is not None:
            entry["sha256"] = sha256
        self.shards[name] = entry

    def matches(self, path: Path, entry: dict) -> bool:
        """Whether the file at `path` has the size and digest recorded in `entry`."""
        algorithm = entry.get("algorithm")
        if not known_algorithm(algorithm) or not path.is_file() or path.stat().st_size != entry.get("size"):
            return False
        return file_digest(path, algorithm=str(algorithm)) == entry.get("digest")

    def finished(self, directory: Path, name: str, expected_size: int) -> bool:
        """True when `name` is recorded and the file on disk still matches size and checksum."""
        entry = self.shards.get(name)
        path = directory / name
        if entry is None or entry.get("size") != expected_size or not path.is_file():
            return False
        return self.matches(path, entry)
