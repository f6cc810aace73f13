"""lazymerge: merge large checkpoints while streaming, tensor by tensor, in bounded memory.

The public surface is `__all__` (tested in tests/test_exported_members.py); everything else is
reached through its module.
"""

from __future__ import annotations

from lazymerge._version import __version__
from lazymerge.api import dogerm, finalize, merge, open_model, plan_merge
from lazymerge.errors import LazyMergeError, PlanWarning
from lazymerge.events import MergeStats, ProgressEvent
from lazymerge.options import HubOptions, RunOptions
from lazymerge.plan import MergePlan
from lazymerge.sweep import Sweep

__all__ = [
    "HubOptions",
    "LazyMergeError",
    "MergePlan",
    "MergeStats",
    "PlanWarning",
    "ProgressEvent",
    "RunOptions",
    "Sweep",
    "__version__",
    "dogerm",
    "finalize",
    "merge",
    "open_model",
    "plan_merge",
]
