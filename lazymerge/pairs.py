"""Preference pairs for a reward-model weight search: (prompt, chosen, rejected[, subset]) rows.

From a local JSON file (a list of objects, or an object of equal-length column lists), JSON Lines,
Parquet (with pyarrow), or a Hub dataset repo (`owner/name`, read with huggingface_hub: the data
files of one split, e.g. RewardBench's `data/filtered-*.parquet`). The columns are RewardBench's:
`prompt`, `chosen`, `rejected`, and optionally `subset`. Pure data: no torch, no transformers.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazymerge.errors import EvalDataError, HubError, MissingExtraError

__all__ = ["Pair", "hub_data_files", "load_pairs"]

_COLUMNS = ("prompt", "chosen", "rejected")
_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Pair:
    """One preference pair; `subset` is "" when the data has no subset column."""

    prompt: str
    chosen: str
    rejected: str
    subset: str = ""


def load_pairs(
    source: str | os.PathLike[str],
    *,
    split: str | None = None,
    subsets: Sequence[str] | None = None,
    max_pairs: int | None = None,
    token: str | bool | None = None,
) -> list[Pair]:
    """The pairs of a local file or a Hub dataset repo, in file order.

    Args:
        source: a `.json`, `.jsonl` or `.parquet` file, or a Hub dataset repo id (`owner/name`,
            `owner/name@revision`) when no such local path exists.
        split: the Hub dataset split whose files are read (default: the only split there is).
        subsets: keep only the pairs whose `subset` is one of these.
        max_pairs: keep the first N pairs (after the subset filter).
        token: Hub token for a private dataset.

    Raises:
        EvalDataError: a missing file or column, a value that is not text, no pair left.
        MissingExtraError: a Parquet file without pyarrow installed.
        HubError: the Hub dataset cannot be listed or downloaded.
    """
    path = Path(source)
    if path.exists():
        if path.is_dir():
            raise EvalDataError(f"{path} is a folder; give one JSON, JSONL or Parquet file")
        rows = _read_file(path)
    elif str(source).count("/") == 1 and not str(source).startswith((".", "/")) and Path(str(source)).suffix == "":
        rows = [r for f in hub_data_files(str(source), split, token=token) for r in _read_file(f)]
    else:
        raise EvalDataError(f"{source}: no such file (nor a Hub dataset id owner/name)")
    pairs = _pairs(rows, str(source))
    if subsets:
        wanted = set(subsets)
        pairs = [p for p in pairs if p.subset in wanted]
        if not pairs:
            raise EvalDataError(f"{source}: no pair has a subset among {', '.join(sorted(wanted))}")
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    if not pairs:
        raise EvalDataError(f"{source}: no preference pairs")
    return pairs


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return _read_parquet(path)
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalDataError(f"cannot read {path}: {exc}") from None
    try:
        if suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"{path} is not valid JSON{' Lines' if suffix == '.jsonl' else ''}: {exc}") from None
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) > 1:
            raise EvalDataError(f"{path}: the columns have different lengths")
        return [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
    if isinstance(data, list):
        return data
    raise EvalDataError(f"{path}: expected a list of objects or an object of columns")


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtraError("reading Parquet pairs needs pyarrow, which is not installed") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow's errors have no common base class worth naming
        raise EvalDataError(f"cannot read {path} as Parquet: {exc}") from None


def _pairs(rows: Iterable[Any], source: str) -> list[Pair]:
    pairs = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise EvalDataError(f"{source}: row {i} is not an object")
        missing = [c for c in _COLUMNS if c not in row]
        if missing:
            raise EvalDataError(f"{source}: row {i} has no {', '.join(missing)} column")
        values = [row[c] for c in _COLUMNS]
        subset = row.get("subset") or ""
        if not all(isinstance(v, str) for v in [*values, subset]):
            raise EvalDataError(f"{source}: row {i}: prompt, chosen, rejected and subset must be text")
        pairs.append(Pair(*values, subset=subset))
    return pairs


def _split_of(name: str) -> str:
    """The split a data file belongs to, by the Hub's conventions: `data/train-00000-of-00001.parquet`,
    `train.jsonl`, `train/part-0.parquet` -> "train"."""
    parts = name.split("/")
    if len(parts) >= 2 and parts[-2] not in ("data", "") and not re.match(r".+-\d{5}-of-\d{5}", parts[-1]):
        return parts[-2]
    stem = parts[-1]
    for suffix in _SUFFIXES:
        stem = stem.removesuffix(suffix)
    return re.sub(r"-\d{5}-of-\d{5}$", "", stem).split(".")[0]


def hub_data_files(repo: str, split: str | None, *, token: str | bool | None = None) -> list[Path]:
    """Download the data files of one split of a Hub dataset repo; returns local paths.

    Raises:
        EvalDataError: no data file, or several splits and no `split` chosen.
        HubError: the repo cannot be listed or a file downloaded.
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    repo_id, _, revision = repo.partition("@")
    try:
        files = HfApi().list_repo_files(repo_id, repo_type="dataset", revision=revision or None, token=token)
    except (HfHubHTTPError, OSError) as exc:
        raise HubError(f"cannot list the dataset {repo}: {exc}") from None
    data = sorted(f for f in files if f.endswith(_SUFFIXES) and not f.rsplit("/", 1)[-1].startswith("."))
    splits = sorted({_split_of(f) for f in data})
    if not data:
        raise EvalDataError(f"the dataset {repo} has no JSON, JSONL or Parquet file")
    if split is None:
        if len(splits) > 1:
            raise EvalDataError(
                f"the dataset {repo} has several splits ({', '.join(splits)})", hint="choose one with --eval-split"
            )
        split = splits[0]
    chosen = [f for f in data if _split_of(f) == split]
    if not chosen:
        raise EvalDataError(f"the dataset {repo} has no split {split!r} (it has {', '.join(splits)})")
    try:
        return [
            Path(hf_hub_download(repo_id, f, repo_type="dataset", revision=revision or None, token=token))
            for f in chosen
        ]
    except (HfHubHTTPError, OSError) as exc:
        raise HubError(f"cannot download the dataset {repo}: {exc}") from None
