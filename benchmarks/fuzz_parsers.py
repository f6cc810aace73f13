"""The long fuzz run (not a test): the properties of tests/test_fuzz.py with many more examples.

Each target (the safetensors header parser on random bytes, mutated valid headers and random
JSON; the allocation bound; the index loader; the `.bin` tensor-table reader; pickle bombs and
YAML alias bombs against their budgets; tensor names with terminal escapes) runs with
`--examples` examples (default 10,000) and a fresh random seed; the script prints how many
examples each target actually ran and any failure (hypothesis shrinks it and prints the input).
Exit code 1 when a property failed.

    nice -n 19 python benchmarks/fuzz_parsers.py --examples 10000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TARGETS = [
    ("parse_header: random bytes", "test_parse_header_random_bytes", "parse_header"),
    ("parse_header: random length prefix", "test_parse_header_random_length_prefix", "parse_header"),
    ("parse_header: mutated valid headers", "test_parse_header_mutated", "parse_header"),
    ("parse_header: random JSON structures", "test_parse_header_random_json", "parse_header"),
    (
        "parse_header: allocation bound (tracemalloc)",
        "test_parse_header_allocation_is_bounded_by_the_input",
        "parse_header",
    ),
    ("index loader (open_checkpoint)", "test_index_loader_fuzzed", "index loader"),
    (".bin tensor table (read_bin_tensors)", "test_bin_reader_fuzzed", "bin reader"),
    (".bin pickle bombs (budget, tracemalloc)", "test_bin_reader_pickle_bombs", "pickle bomb"),
    ("YAML recipe alias bombs (budget)", "test_yaml_recipe_alias_bombs", "yaml recipe"),
    ("names with terminal escapes (inspect)", "test_printed_names_are_escaped", "escaped names"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=10_000, help="examples per target (default 10000)")
    parser.add_argument("--only", default="", help="comma-separated substrings of target names to run")
    args = parser.parse_args()
    # The test module reads these when it builds its settings.
    os.environ["LAZYMERGE_FUZZ_EXAMPLES"] = str(args.examples)
    os.environ["LAZYMERGE_FUZZ_RANDOM"] = "1"
    sys.path[:0] = [str(REPO / "tests"), str(REPO)]
    import test_fuzz
    from hypothesis import settings

    failures = 0
    total = 0
    print(f"fuzzing with up to {args.examples} examples per target (hypothesis, random seed)")
    for label, name, counter in TARGETS:
        if args.only and not any(s in label for s in args.only.split(",")):
            continue
        test = getattr(test_fuzz, name)
        # No example database: every run explores afresh instead of replaying saved examples.
        test._hypothesis_internal_use_settings = settings(test._hypothesis_internal_use_settings, database=None)
        before = test_fuzz.COUNTS[counter]
        start = time.perf_counter()
        status = "ok"
        try:
            test()
        except Exception:
            failures += 1
            status = "FAILED"
            traceback.print_exc()
        ran = test_fuzz.COUNTS[counter] - before
        total += ran
        print(f"{status:6} {label:48} {ran:7d} examples  {time.perf_counter() - start:6.1f} s", flush=True)
    root = test_fuzz._MODEL_CACHE.pop("root", None)
    if root is not None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    print(f"total: {total} examples, {failures} failing target(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
