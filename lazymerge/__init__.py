"""lazymerge: merge large checkpoints while streaming, tensor by tensor, in bounded memory."""

from __future__ import annotations

__version__ = "0.1.0"

from lazymerge.api import dogerm, merge, open_model, plan
from lazymerge.errors import LazyMergeError
from lazymerge.sweep import sweep

__all__ = ["LazyMergeError", "__version__", "dogerm", "merge", "open_model", "plan", "sweep"]
