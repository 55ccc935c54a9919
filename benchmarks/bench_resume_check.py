"""What a resume's check of the done shards costs: the cheap check (size + Parquet footer: metadata, columns,
row count) that every `--resume` runs, against the full one (sha256 of every byte + the (row_idx,
sample_idx) pairs) of `--resume --verify` and `--verify`.

    python benchmarks/bench_resume_check.py [--shards 1000] [--rows 64] [--completion-chars 2000]

Writes `--shards` shard files of `--rows` rows each (completions of random words, zstd as a job writes
them) to a temporary folder, then times both checks over all of them (`integrity.done_shard_problem`,
the function a resume calls per shard) and extrapolates to 10,000 shards. The files were just written,
so they are in the page cache: this is the CPU side; on cold network storage the full check also pays
reading every byte, the cheap one a few KiB per file.
Prints a markdown table and saves it (and JSON) as benchmarks/results/bench_resume_check.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from raas_batch.data.manifest import Manifest
from raas_batch.data.writer import OUTPUT_SCHEMA, shard_file_name, write_shard
from raas_batch.integrity import done_shard_problem


def _rows(index: int, num_rows: int, chars: int, rng: random.Random) -> list[dict]:
    words = [f"w{rng.randrange(5000)}" for _ in range(chars // 5)]
    return [{"id": str(index * num_rows + k), "row_idx": index * num_rows + k, "sample_idx": 0, "prompt": "p",
             "completion": " ".join(rng.sample(words, len(words) // 2)), "finish_reason": "stop",
             "num_prompt_tokens": 10, "num_completion_tokens": chars // 5, "num_reasoning_tokens": 0,
             "thinking_budget_hit": False, "kv_policy": "dense", "peak_kv_tokens": 10, "evicted_pages": 0,
             "kv_over_budget": False} for k in range(num_rows)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--completion-chars", type=int, default=2000)
    args = ap.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as out:
        os.makedirs(os.path.join(out, "shards"))
        fp = {"input": {}, "settings": {"n": 1}}
        m = Manifest.plan(args.shards * args.rows, args.rows, fp)
        for rec in m.shards:
            meta = {"index": rec.index, "start": rec.start, "end": rec.end, "n": 1, "fingerprint": m.fingerprint_hash}
            path = os.path.join(out, "shards", shard_file_name(rec.index))
            digest = write_shard(path, _rows(rec.index, args.rows, args.completion_chars, rng), meta)
            m.finish(rec.index, os.path.join("shards", shard_file_name(rec.index)), args.rows, digest,
                     size=os.path.getsize(path))
        total_mb = sum(s.size for s in m.shards) / 1e6
        result = {"shards": args.shards, "rows_per_shard": args.rows, "mb_total": round(total_mb, 1)}
        for name, full in (("cheap (every --resume)", False), ("full (--resume --verify, --verify)", True)):
            t0 = time.perf_counter()
            for rec in m.shards:
                meta = {"index": rec.index, "start": rec.start, "end": rec.end, "n": 1,
                        "fingerprint": m.fingerprint_hash}
                assert done_shard_problem(out, rec, meta, OUTPUT_SCHEMA, full) is None
            seconds = time.perf_counter() - t0
            result[name] = {"ms_per_shard": round(1000 * seconds / args.shards, 3),
                            "s_per_10000_shards": round(10000 * seconds / args.shards, 1)}
    lines = [(f"{args.shards} shards of {args.rows} rows ({result['mb_total']} MB, "
              f"{result['mb_total'] / args.shards:.3f} MB a shard), page cache warm"),
             "", "| check | ms per shard | s per 10,000 shards |", "| --- | ---: | ---: |"]
    for name in ("cheap (every --resume)", "full (--resume --verify, --verify)"):
        lines.append(f"| {name} | {result[name]['ms_per_shard']} | {result[name]['s_per_10000_shards']} |")
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "bench_resume_check.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(ROOT, "benchmarks", "results", "bench_resume_check.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
