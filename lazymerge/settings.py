"""Every environment variable lazymerge reads, read here and nowhere else.

Each is read when asked (not at import), so that a user or a test may set one between runs. The
knobs below are for measuring and debugging; the options a user normally sets are `RunOptions`
and `HubOptions` (lazymerge.options). Hub variables (HF_TOKEN, HF_ENDPOINT...) belong to
huggingface_hub, which reads them itself.
"""

from __future__ import annotations

import os

__all__ = [
    "CUDA_SYNC_ENV",
    "DEBUG_ENV",
    "DIRECT_WRITE_ENV",
    "HUB_TIMEOUT_ENV",
    "PREFETCH_ENV",
    "PROFILE_ENV",
    "READ_THREADS_ENV",
    "WRITE_LANES_ENV",
    "cuda_sync",
    "debug_enabled",
    "direct_write",
    "hub_download_timeout_set",
    "hub_timeout",
    "hub_token_values",
    "prefetch_enabled",
    "profile_enabled",
    "quiet_hub_logging",
    "read_threads",
    "write_lanes",
]

DEBUG_ENV = "LAZYMERGE_DEBUG"  # tracebacks instead of one-line errors
PREFETCH_ENV = "LAZYMERGE_PREFETCH"  # 0: no start-up prefetch
READ_THREADS_ENV = "LAZYMERGE_READ_THREADS"  # threads that read a chunk's inputs at once
DIRECT_WRITE_ENV = "LAZYMERGE_DIRECT_WRITE"  # 0: never O_DIRECT; 1: on the GPU path too
WRITE_LANES_ENV = "LAZYMERGE_WRITE_LANES"  # output shards written at once, when no count is asked
PROFILE_ENV = "LAZYMERGE_PROFILE"  # 1: print where a run's time went
HUB_TIMEOUT_ENV = "LAZYMERGE_HUB_TIMEOUT"  # seconds a Hub connection or read may stall
CUDA_SYNC_ENV = "LAZYMERGE_CUDA_SYNC"  # 1: no pipelining on the GPU path (one chunk at a time)


def debug_enabled() -> bool:
    """True when LAZYMERGE_DEBUG asks for tracebacks instead of one-line errors."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "False")


def prefetch_enabled() -> bool:
    return os.environ.get(PREFETCH_ENV, "1") != "0"


def read_threads() -> int | None:
    """LAZYMERGE_READ_THREADS as a count, or None (unset or not a number: the default)."""
    return _count(READ_THREADS_ENV)


def write_lanes() -> int | None:
    """LAZYMERGE_WRITE_LANES as a count, or None (unset or not a number: the default)."""
    return _count(WRITE_LANES_ENV)


def direct_write() -> bool | None:
    """LAZYMERGE_DIRECT_WRITE: False for "0", True for "1", None (the default rule) otherwise."""
    return {"0": False, "1": True}.get(os.environ.get(DIRECT_WRITE_ENV, ""))


def profile_enabled() -> bool:
    return os.environ.get(PROFILE_ENV) == "1"


def cuda_sync() -> bool:
    return os.environ.get(CUDA_SYNC_ENV) == "1"


def quiet_hub_logging() -> None:
    """huggingface_hub logs every retry of a failed download on stderr (an "Error while
    downloading ... Trying to resume download..." pair each time): 12 lines before our one-line
    error. Its logger shows errors only, then, unless the user set HF_HUB_VERBOSITY or
    LAZYMERGE_DEBUG=1. The variable is what huggingface_hub reads when first imported; the
    level covers an import that happened already."""
    import logging

    if debug_enabled() or "HF_HUB_VERBOSITY" in os.environ:
        return
    os.environ["HF_HUB_VERBOSITY"] = "error"
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def _count(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def hub_timeout() -> float:
    """Seconds a Hub connection or read may stall: LAZYMERGE_HUB_TIMEOUT (a positive number), else 10."""
    text = os.environ.get(HUB_TIMEOUT_ENV, "").strip()
    try:
        value = float(text) if text else 10.0
    except ValueError:
        value = 0.0
    return value if 0 < value < float("inf") else 10.0


def hub_download_timeout_set() -> bool:
    """True when the user chose huggingface_hub's HF_HUB_DOWNLOAD_TIMEOUT (then it is not replaced by ours)."""
    return "HF_HUB_DOWNLOAD_TIMEOUT" in os.environ


def hub_token_values() -> list[str]:
    """The Hub tokens set in the environment (HF_TOKEN, HUGGING_FACE_HUB_TOKEN): only to mask them in messages."""
    return [v for v in (os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")) if v]


def ray_address() -> str | None:
    """RAY_ADDRESS: the Ray cluster `--ray` joins (unset: a local one is started)."""
    return os.environ.get("RAY_ADDRESS", "").strip() or None
