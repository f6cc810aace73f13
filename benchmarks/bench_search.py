"""Benchmark: a DogeRM weight search merged in memory against "write each merge, load it, score it".

Both arms run in this one process on the same synthetic pair (`synthetic.py`, LLaMA-shaped RM +
SFT), the same weights and the same preference pairs (random words of the synthetic tokenizer):

- in memory: `lazymerge.load` once (build the model on the meta device, allocate, first merge;
  with `--resident`, every input byte the weights need read into memory once, `preload`), then per
  weight `MergedModel.remerge` (refills the same parameters) and scoring;
- written: per weight `lazymerge.dogerm` to a folder (merge + write), transformers'
  `from_pretrained` (load) and scoring; the folder is deleted after each weight. Before each
  weight the inputs are read into the page cache, untimed (a merge drops the input pages it used).

Per weight it records merge, load and scoring seconds, and checks that both arms give identical
scores (same bytes in, same model). The baseline reads its written model back from the page cache
(nothing is dropped), which favours it. Peak RSS is the process's high-water mark after each arm.
On the CPU it first measures a memory floor: one pass that reads two 16-bit inputs and writes a
16-bit output of the model's size (an integer add, no arithmetic worth the name) on every core,
the least any re-merge could cost on this machine, set against write + load.

    python benchmarks/bench_search.py --size 1b --weights 0:1:0.25 --pairs 200
    python benchmarks/bench_search.py --size tiny --pairs 20      # a quick check of the harness

Writes `results/<name>.json` (default name `<size>-search`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import synthetic  # noqa: E402  (a sibling script, not a package)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _pairs(n: int, words: int, vocab: int, seed: int = 0) -> list:
    from lazymerge.pairs import Pair

    rng = random.Random(seed)

    def text() -> str:
        return " ".join(f"tok{rng.randrange(300, vocab)}" for _ in range(words))

    return [Pair(text(), text(), text(), subset=("math", "code")[i % 2]) for i in range(n)]


def memory_floor(numel: int, workers: int, repeat: int = 3) -> float:
    """Seconds for the least work any CPU re-merge of two 16-bit inputs into a 16-bit model must do
    here: read both inputs and write the output once, at memory speed (an integer add of the raw
    16-bit words, no widening, no rounding), on `workers` threads (numpy releases the GIL). Best of
    `repeat`; pages are touched before timing."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    a, b, c = (np.ones(numel, dtype=np.uint16) for _ in range(3))
    piece = 1 << 20
    starts = range(0, numel, piece)

    def work(i: int) -> None:
        np.add(a[i : i + piece], b[i : i + piece], out=c[i : i + piece])

    best = float("inf")
    with ThreadPoolExecutor(workers) as pool:
        for _ in range(repeat):
            t0 = time.perf_counter()
            list(pool.map(work, starts))
            best = min(best, time.perf_counter() - t0)
    return best


def in_memory_arm(recipe: dict, weights: list[float], encoded, batch: int, resident: bool, device: str) -> dict:
    import torch

    import lazymerge
    from lazymerge.scoring import score_texts

    began = time.perf_counter()
    merged = lazymerge.load(recipe, device=device, resident=resident or None)
    # Resident inputs: every byte the weights need read once now (as `search_weights` does), so
    # that each re-merge below is the steady per-weight cost.
    preload_bytes = merged.preload(weights)
    build = time.perf_counter() - began
    first_merge = merged.stats.seconds
    rows, scores = [], {}
    for i, w in enumerate(weights):
        t0 = time.perf_counter()
        if i:
            merged.remerge(w)
            if device == "cuda":
                torch.cuda.synchronize()
        t1 = time.perf_counter()
        s = score_texts(merged.model, encoded.ids, batch)
        t2 = time.perf_counter()
        scores[w] = s
        merge = (t1 - t0) if i else first_merge
        rows.append({"weight": w, "merge_s": merge, "load_s": 0.0, "score_s": t2 - t1})
        print(f"  in memory  w={w:<5g} merge {merge:7.2f} s  score {t2 - t1:7.2f} s", flush=True)
    result = {
        "build_and_first_merge_s": build,
        "build_s": build - first_merge,
        "preload_bytes": preload_bytes,
        "rows": rows,
        "peak_rss_bytes": _peak_rss(),
        "resident": merged.resident,
        "device": device,
        "merge_device": merged.stats.device,
    }
    del merged
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return result | {"_scores": scores}


def _warm(folders: list[Path]) -> None:
    """Read every weight file of `folders` into the page cache. A merge drops the input pages it
    consumed (so that it does not evict the rest of the machine's cache), so without this each
    weight of the baseline would read its inputs from the disk, which would favour the in-memory arm."""
    buf = bytearray(16 << 20)
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.suffix in (".safetensors", ".bin"):
                with open(path, "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass


def written_arm(
    rm: Path, sft: Path, weights: list[float], dtype: str, encoded, batch: int, work: Path, device: str
) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"

    import lazymerge
    from lazymerge.scoring import score_texts

    rows, scores = [], {}
    for w in weights:
        out = work / f"w{w:g}"
        _warm([rm, sft])  # untimed: the baseline merges from the page cache, as the resident arm
        t0 = time.perf_counter()
        lazymerge.dogerm(rm, sft, w, out, dtype=dtype, overwrite=True)
        t1 = time.perf_counter()
        model = (
            AutoModelForSequenceClassification.from_pretrained(out, **{dtype_key: getattr(torch, dtype)})
            .eval()
            .to(device)
        )
        t2 = time.perf_counter()
        s = score_texts(model, encoded.ids, batch)
        t3 = time.perf_counter()
        scores[w] = s
        rows.append({"weight": w, "merge_s": t1 - t0, "load_s": t2 - t1, "score_s": t3 - t2})
        print(f"  written    w={w:<5g} merge+write {t1 - t0:7.2f} s  load {t2 - t1:7.2f} s  score {t3 - t2:7.2f} s")
        del model
        gc.collect()
        shutil.rmtree(out)
    return {"rows": rows, "peak_rss_bytes": _peak_rss(), "_scores": scores}


def main(argv: list[str] | None = None) -> int:
    from lazymerge.sweep import parse_values

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(synthetic.SIZES), default="1b")
    ap.add_argument("--weights", default="0:1:0.25", help="a list or a:b:step range (default 5 weights)")
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--words", type=int, default=8, help="tokens per prompt and per response")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--resident", action="store_true", help="in-memory arm re-merges from resident inputs")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the models live and score")
    ap.add_argument("--no-baseline", action="store_true", help="in-memory arm only (the GPU re-merge check)")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)

    weights = parse_values(args.weights)
    root, rm, sft = synthetic.pair_paths(args.size, "fp16", "dogerm", args.cache)
    if not synthetic.is_complete(args.size, "fp16", "dogerm", args.cache):
        synthetic.make_pair(args.size, "fp16", "dogerm", args.cache)
    import torch

    from lazymerge.scoring import encode_pairs

    recipe = {
        "merge_method": "dogerm", "reward_model": str(rm), "domain_model": str(sft), "weight": weights[0],
        "dtype": args.dtype,
    }  # fmt: skip
    pairs = _pairs(args.pairs, args.words, synthetic.SIZES[args.size].vocab)
    load_avg = os.getloadavg()
    print(f"{args.size} pair ({synthetic.model_bytes(rm) / 1e9:.2f} + {synthetic.model_bytes(sft) / 1e9:.2f} GB), "
          f"{len(weights)} weights, {len(pairs)} pairs x {args.words} words, {args.dtype}, "
          f"{os.cpu_count()} cores, load average {load_avg[0]:.1f}")  # fmt: skip
    # The tokenizer comes with the in-memory model; both arms score the same token ids.
    from lazymerge.in_memory import _config_and_tokenizer, import_transformers
    from lazymerge.job import plan_memory_job
    from lazymerge.options import HubOptions, RunOptions

    plan = plan_memory_job(recipe, RunOptions(), HubOptions()).plans[0]
    _, tok = _config_and_tokenizer(import_transformers(), plan)
    encoded = encode_pairs(tok, pairs)

    numel = sum(t.numel for t in plan.tensors)
    floor_s = memory_floor(numel, os.cpu_count() or 1) if args.device == "cpu" else None
    if floor_s is not None:
        print(f"memory floor (read both inputs + write the model once, {numel / 1e9:.2f} G elements): {floor_s:.2f} s")
    mem = in_memory_arm(recipe, weights, encoded, args.batch_size, args.resident, args.device)
    if args.no_baseline:
        rows = mem["rows"][1:] or mem["rows"]
        print(
            f"re-merge per weight: {statistics.mean(r['merge_s'] for r in rows) * 1e3:.1f} ms ({mem['merge_device']})"
        )
        out = BENCH_DIR / "results" / f"{args.name or args.size + '-remerge'}.json"
        out.write_text(json.dumps({k: v for k, v in mem.items() if not k.startswith("_")}, indent=2) + "\n")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-search-", dir=root.parent) as work:
        disk = written_arm(rm, sft, weights, args.dtype, encoded, args.batch_size, Path(work), args.device)
    identical = all(torch.equal(mem["_scores"][w], disk["_scores"][w]) for w in weights)

    def mean(rows: list[dict], key: str, skip_first: bool = False) -> float:
        return statistics.mean(r[key] for r in (rows[1:] if skip_first and len(rows) > 1 else rows))

    remerge = mean(mem["rows"], "merge_s", skip_first=True)
    write_load = mean(disk["rows"], "merge_s") + mean(disk["rows"], "load_s")
    summary = {
        "in_memory_total_s": mem["build_and_first_merge_s"] + sum(r["merge_s"] + r["score_s"] for r in mem["rows"][1:])
        + mem["rows"][0]["score_s"],
        "written_total_s": sum(r["merge_s"] + r["load_s"] + r["score_s"] for r in disk["rows"]),
        "remerge_per_weight_s": remerge,
        "write_plus_load_per_weight_s": write_load,
        "remerge_over_write_plus_load": remerge / write_load,
        "memory_floor_s": floor_s,
        "memory_floor_over_write_plus_load": floor_s / write_load if floor_s is not None else None,
        "identical_scores": identical,
    }  # fmt: skip
    print(f"in memory: {summary['in_memory_total_s']:.1f} s total, re-merge {remerge:.2f} s per weight")
    print(f"written:   {summary['written_total_s']:.1f} s total, merge+write+load {write_load:.2f} s per weight")
    print(
        f"re-merge / (merge+write+load) = {summary['remerge_over_write_plus_load']:.2f}; identical scores: {identical}"
    )
    if floor_s is not None:
        print(f"memory floor / (merge+write+load) = {floor_s / write_load:.2f} (the least any CPU re-merge costs here)")
    result = {
        "benchmark": "bench_search",
        "size": args.size,
        "dtype": args.dtype,
        "weights": weights,
        "pairs": len(pairs),
        "words": args.words,
        "batch_size": args.batch_size,
        "machine": {"cpus": os.cpu_count(), "load_average": load_avg, "platform": platform.platform()},
        "note": "measured on a shared, loaded machine unless stated otherwise",
        "in_memory": {k: v for k, v in mem.items() if not k.startswith("_")},
        "written": {k: v for k, v in disk.items() if not k.startswith("_")},
        "summary": summary,
    }
    out = BENCH_DIR / "results" / f"{args.name or args.size + '-search'}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
