"""What `--json` prints: one JSON document on stdout, for scripts (`lazymerge ... --json | jq`).

Each document is built from the same `to_dict()` the Python API offers (`MergePlan`, `MergeStats`,
`VerifyReport`), inside a small envelope that says what it is:

    {"version": 1, "lazymerge": "0.4.0", "kind": "plan" | "merge" | "verify" | "error", "ok": true, ...}

- "plan" (`--dry-run --json`): `outputs`, one `MergePlan.to_dict()` per output, plus its `label`
  (the sweep value, or null) and `push_to_hub` (the repo, or null).
- "merge" (a run with `--json`): `outputs`, one `MergeStats.to_dict()` per output.
- "verify": `folder`, `ok` and `checks` (`VerifyReport.to_dict()`).
- "error": `error` = {`type`, `message`, `hint`, `exit_code`}; the one-line message is on stderr
  too and the exit code is the same as without `--json`.

`version` changes only when a key is removed or changes meaning; keys may be added.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lazymerge._version import __version__

if TYPE_CHECKING:
    from lazymerge.events import MergeStats
    from lazymerge.plan import MergePlan
    from lazymerge.verify import VerifyReport

__all__ = ["SCHEMA_VERSION", "error_document", "plan_document", "print_document", "results_document", "verify_document"]

SCHEMA_VERSION = 1


def _envelope(kind: str, ok: bool, **body: Any) -> dict[str, Any]:
    return {"version": SCHEMA_VERSION, "lazymerge": __version__, "kind": kind, "ok": ok, **body}


def plan_document(plans: Sequence[MergePlan], labels: Sequence[str] = (), repos: Sequence[str] = ()) -> dict[str, Any]:
    """`--dry-run --json`: each output's plan, with its sweep label and Hub repo (or null)."""
    outputs = []
    for k, plan in enumerate(plans):
        entry = plan.to_dict()
        entry["label"] = labels[k] if labels else None
        entry["push_to_hub"] = repos[k] if repos else None
        outputs.append(entry)
    return _envelope("plan", True, outputs=outputs)


def results_document(stats: Sequence[MergeStats]) -> dict[str, Any]:
    """A finished run: each output's stats (and where it was pushed)."""
    return _envelope("merge", True, outputs=[s.to_dict() for s in stats])


def verify_document(report: VerifyReport) -> dict[str, Any]:
    """`verify --json`: each check, and whether all passed."""
    body = report.to_dict()
    return _envelope("verify", body.pop("ok"), **body)


def error_document(kind: str, message: str, hint: str | None, exit_code: int) -> dict[str, Any]:
    """A failed command: what failed (`kind`: the error's class name), the message, the hint."""
    return _envelope("error", False, error={"type": kind, "message": message, "hint": hint, "exit_code": exit_code})


def print_document(document: dict[str, Any]) -> None:
    """The document on stdout, alone, and flushed. Non-ASCII and control characters (names from
    strangers) are written as JSON escapes, so nothing reaches a terminal raw."""
    sys.stdout.write(json.dumps(document, indent=2, allow_nan=False, default=str) + "\n")
    sys.stdout.flush()
