"""Names, sizes and defaults shared by every module. Torch-free: the plan uses these."""

from __future__ import annotations

import os

# safetensors dtype name -> bytes per element.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

# The dtypes lazymerge does arithmetic on; every other dtype is copied from one input as bytes.
MERGEABLE_DTYPES = frozenset({"F32", "F16", "BF16"})

# User-facing dtype names (CLI, mergekit YAML, config.json) -> safetensors names.
DTYPE_ALIASES: dict[str, str] = {
    "float32": "F32",
    "fp32": "F32",
    "float": "F32",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
}
# safetensors name -> the name transformers writes into config.json.
CONFIG_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

SAFETENSORS_MAX_HEADER = 100_000_000  # the reference implementation's cap
SAFE_INDEX_NAME = "model.safetensors.index.json"
SAFE_SINGLE_NAME = "model.safetensors"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_SINGLE_NAME = "pytorch_model.bin"
PARTIAL_SUFFIX = ".partial"

DEFAULT_MAX_SHARD_SIZE = 5_000_000_000  # transformers' "5GB"
# Elements per chunk: bounds peak memory independently of tensor size (2 Mi elements = 8 MiB in fp32).
DEFAULT_CHUNK_ELEMENTS = 2 * 1024 * 1024

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
# Extra files a model folder commonly carries that a merge result should keep (from the first model).
CARRIED_FILES = ("generation_config.json",)

ENV_DEBUG = "LAZYMERGE_DEBUG"


def debug_enabled() -> bool:
    """True when LAZYMERGE_DEBUG asks for tracebacks instead of one-line errors."""
    return os.environ.get(ENV_DEBUG, "") not in ("", "0", "false", "False")


def hub_timeout() -> float:
    """Seconds a Hub connection or read may stall: LAZYMERGE_HUB_TIMEOUT (a positive number), else 10."""
    text = os.environ.get("LAZYMERGE_HUB_TIMEOUT", "").strip()
    try:
        value = float(text) if text else 10.0
    except ValueError:
        value = 0.0
    return value if 0 < value < float("inf") else 10.0


def parse_size(text: str | int) -> int:
    """Parse a size like '5GB', '500MB', '2GiB' or an integer number of bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    units = {
        "KIB": 1024,
        "MIB": 1024**2,
        "GIB": 1024**3,
        "TIB": 1024**4,
        "KB": 1000,
        "MB": 1000**2,
        "GB": 1000**3,
        "TB": 1000**4,
        "B": 1,
    }
    unit = next((u for u in units if s.endswith(u)), "")
    number, factor = (s[: -len(unit)], units[unit]) if unit else (s, 1)
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (try 5GB, 500MB or a number of bytes)") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return int(value * factor)
