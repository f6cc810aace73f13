"""`lazymerge verify OUT`: check a merged model folder without trusting anything in it.

Every shard header is parsed and validated (sizes exact, offsets tile the file), the index must
agree with the shards both ways and report the right total_size, the manifest's checksums must
match the files, and optionally N sampled tensors are recomputed from the inputs named in the
recipe and compared byte for byte. A folder without a readable manifest fails: nothing else
vouches for the shards' bytes.

With `hub=REPO`, the shards on the Hub are checked too, without downloading them: the sha256
the merge computed while writing each shard (in the manifest of a pushed run) must be the LFS
object id the Hub holds for it, with the same size, and the repo must hold no other shard.
Shards deleted locally once uploaded (--delete-after-upload) are then vouched for by the Hub.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lazymerge.constants import SAFE_INDEX_NAME
from lazymerge.errors import LazyMergeError
from lazymerge.io.digest import known_algorithm
from lazymerge.io.header import read_header
from lazymerge.manifest import MANIFEST_NAME, Manifest

__all__ = ["Check", "VerifyReport", "verify"]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class VerifyReport:
    folder: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (what `lazymerge verify --json` prints): `folder`, `ok`
        and `checks`, each `{"name", "ok", "detail"}`."""
        return {"folder": str(self.folder), "ok": self.ok, "checks": [dataclasses.asdict(c) for c in self.checks]}

    def to_json(self, indent: int | None = 2) -> str:
        """`to_dict()` as a JSON document."""
        return json.dumps(self.to_dict(), indent=indent)


def verify(
    folder: str | Path, *, recompute: int = 0, seed: int = 0, hub: str | None = None, token: str | bool | None = None
) -> VerifyReport:
    """Check a merged model folder; never raises for a problem in the folder, reports it.

    Args:
        hub: `owner/name[@revision]` the folder was pushed to: compare its shards' LFS ids with
            the manifest's sha256 (the shards themselves may be gone from the folder).
        token: for a private repo (default HF_TOKEN or the stored login)."""
    folder = Path(folder)
    report = VerifyReport(folder)
    shards = sorted(folder.glob("*.safetensors"))
    if hub is not None:
        _check_hub(folder, hub, token, report)
        if not shards:  # deleted once uploaded: the Hub check vouches for them
            return report
    if not shards:
        report.add("shards", False, "no .safetensors file in the folder")
        return report
    headers = {}
    for path in shards:
        try:
            header = read_header(path)
        except LazyMergeError as exc:
            report.add(f"header {path.name}", False, exc.message)
            continue
        headers[path.name] = header
        fmt = header.metadata.get("format")
        report.add(
            f"header {path.name}",
            fmt == "pt",
            f"{len(header.tensors)} tensors, size exact" + ("" if fmt == "pt" else f"; format is {fmt!r}, not 'pt'"),
        )
    _check_index(folder, headers, report)
    _check_manifest(folder, shards, report)
    if recompute:
        _recompute(folder, headers, recompute, seed, report)
    return report


def _check_index(folder: Path, headers: dict, report: VerifyReport) -> None:
    index_path = folder / SAFE_INDEX_NAME
    if not index_path.is_file():
        ok = len(headers) == 1 and "model.safetensors" in headers
        report.add("index", ok, "single model.safetensors, no index needed" if ok else "index missing")
        return
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        total = index["metadata"]["total_size"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        report.add("index", False, f"unreadable: {exc}")
        return
    problems = []
    in_shards = {name: file for file, h in headers.items() for name in h.tensors}
    for name, file in weight_map.items():
        if in_shards.get(name) != file:
            problems.append(f"{name} -> {file} but it is in {in_shards.get(name, 'no shard')}")
    for name, file in in_shards.items():
        if name not in weight_map:
            problems.append(f"{name} in {file} is not in the index")
    actual = sum(t.nbytes for h in headers.values() for t in h.tensors.values())
    if total != actual:
        problems.append(f"total_size {total} but the tensors hold {actual} bytes")
    listed = set(weight_map.values())
    missing = sorted(listed - set(headers))
    if missing:
        problems.append(f"shards missing: {', '.join(missing)}")
    report.add("index", not problems, "; ".join(problems[:5]) or f"{len(weight_map)} tensors, total_size {total}")


def _check_manifest(folder: Path, shards: list[Path], report: VerifyReport) -> None:
    # Without a manifest nothing vouches for the shards' bytes: that is a failure, not a pass.
    try:
        manifest = Manifest.read(folder)
    except FileNotFoundError:
        report.add("checksums", False, f"no {MANIFEST_NAME}: the shards' checksums cannot be checked")
        return
    except (OSError, ValueError) as exc:
        report.add("checksums", False, f"{MANIFEST_NAME} is damaged: {exc}")
        return
    bad, unknown = [], []
    for name, entry in sorted(manifest.shards.items()):
        if not known_algorithm(entry.get("algorithm")):
            unknown.append(f"{name} ({entry.get('algorithm')})")
        elif not manifest.matches(folder / name, entry):
            bad.append(name)
    problems = []
    if bad:
        problems.append(f"mismatch: {', '.join(bad)}")
    unrecorded = [p.name for p in shards if p.name not in manifest.shards]
    if unrecorded:
        problems.append(f"not in the manifest: {', '.join(unrecorded)}")
    if unknown:
        problems.append(
            f"recorded by a checksum scheme this version does not know (update lazymerge): {', '.join(unknown)}"
        )
    report.add("checksums", not problems, "; ".join(problems) or f"{len(manifest.shards)} shards match")


def _recompute(folder: Path, headers: dict, n: int, seed: int, report: VerifyReport) -> None:
    from lazymerge.config import plan_recipe
    from lazymerge.recompute import tensor_bytes

    recipe_json = next((h.metadata.get("lazymerge_recipe") for h in headers.values()), None)
    if not recipe_json:
        report.add("recompute", False, "no lazymerge_recipe in the shard metadata")
        return
    try:
        plan, checkpoints = plan_recipe(json.loads(recipe_json), folder, overwrite=True)
    except LazyMergeError as exc:
        report.add("recompute", False, f"cannot re-plan from the recipe: {exc.message}")
        return
    where = {name: (file, t) for file, h in headers.items() for name, t in h.tensors.items()}
    names = sorted(t.name for t in plan.tensors)
    sample = random.Random(seed).sample(names, min(n, len(names)))
    bad = []
    for name in sample:
        tensor = next(t for t in plan.tensors if t.name == name)
        if name not in where:
            bad.append(f"{name} missing")
            continue
        file, entry = where[name]
        with open(folder / file, "rb") as f:
            f.seek(headers[file].data_start + entry.begin)
            stored = f.read(entry.nbytes)
        if tensor_bytes(plan, checkpoints, tensor) != stored:
            bad.append(name)
    report.add("recompute", not bad, f"differ: {', '.join(bad)}" if bad else f"{len(sample)} tensors recomputed, equal")


def _check_hub(folder: Path, repo: str, token: str | bool | None, report: VerifyReport) -> None:
    from lazymerge.io.hub import split_repo_id
    from lazymerge.io.hub_errors import hub_errors
    from lazymerge.io.hub_http import hub_timeout

    try:
        manifest = Manifest.read(folder)
    except (OSError, ValueError) as exc:
        report.add("hub", False, f"no readable {MANIFEST_NAME} to compare with the Hub ({exc})")
        return
    try:
        from huggingface_hub import HfApi

        repo_id, revision = split_repo_id(repo)
        with hub_errors(repo_id, revision, token=token):
            info = HfApi(token=token).model_info(repo_id, revision=revision, files_metadata=True, timeout=hub_timeout())
    except LazyMergeError as exc:
        report.add("hub", False, exc.message)
        return
    held = {s.rfilename: s for s in info.siblings or [] if s.rfilename.endswith(".safetensors")}
    problems = []
    for name, entry in sorted(manifest.shards.items()):
        sibling, sha = held.get(name), entry.get("sha256")
        if sibling is None:
            problems.append(f"{name} is not on the Hub")
        elif not sha:
            problems.append(f"{name}: no sha256 in the manifest (this run did not push)")
        elif sibling.lfs is None or sibling.lfs.sha256 != sha or sibling.size != entry.get("size"):
            problems.append(f"{name} differs on the Hub")
    extra = sorted(set(held) - set(manifest.shards))
    if extra:
        problems.append(f"on the Hub but not in the manifest: {', '.join(extra)}")
    detail = "; ".join(problems[:5]) or f"{len(manifest.shards)} shards match their LFS ids at {info.sha}"
    report.add("hub", not problems, detail)
