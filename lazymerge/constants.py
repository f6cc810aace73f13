"""Names, sizes and defaults shared by every module. Torch-free: the plan uses these."""

from __future__ import annotations

import math

from lazymerge.errors import RecipeError

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
# Extra files a model folder commonly carries that a merge result should keep (from the first
# model): generation settings, the chat template (transformers >= 4.43 may write it apart from
# tokenizer_config.json; reward benchmarks format their input with it), and the licence and notice
# files a derivative must ship (Llama 2/3: LICENSE and USE_POLICY.md).
CARRIED_FILES = (
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "LICENSE",
    "LICENSE.txt",
    "LICENSE.md",
    "USE_POLICY.md",
    "NOTICE",
    "NOTICE.txt",
    "NOTICE.md",
)

# The largest shard size: a file offset must fit a signed 64-bit integer.
MAX_SIZE_BYTES = (1 << 63) - 1


def parse_size(text: str | int, what: str = "size") -> int:
    """Parse a size like '5GB', '500MB', '2GiB' or an integer number of bytes.

    Raises:
        RecipeError (a ValueError): not a size, or not a whole number of bytes from 1 B to
            MAX_SIZE_BYTES (`0.5`, `1e-9GB`, `inf`, `1e400` are refused, not rounded or overflowed).
    """
    limits = f"from 1 byte to {MAX_SIZE_BYTES} bytes (try 5GB, 500MB or a number of bytes)"
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise RecipeError(f"{what} must be a size {limits}, got {text!r}")
    if isinstance(text, int):
        value: float = text
        factor = 1
    else:
        s = text.strip().upper().replace(" ", "")
        unit = next((u for u in _SIZE_UNITS if s.endswith(u)), "")
        number, factor = (s[: -len(unit)], _SIZE_UNITS[unit]) if unit else (s, 1)
        try:
            value = float(number)
        except ValueError:
            raise RecipeError(f"{what}: not a size: {text!r}", hint=limits) from None
    if not math.isfinite(value) or value * factor < 1 or value * factor > MAX_SIZE_BYTES:
        raise RecipeError(f"{what} must be {limits}, got {text!r}")
    return int(value * factor)


_SIZE_UNITS = {
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
