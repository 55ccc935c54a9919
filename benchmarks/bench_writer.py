"""Writing an output shard: what the job pays for its Parquet file after its rows' last step.

    python benchmarks/bench_writer.py [--rows 512] [--tokens 6144] [--tokenizer DIR] [--smoke]

A fixed-length job's rows all finish in the same step, so its last shard's write is on the job's clock
(the job benchmark's "after the last step", docs/gpu-notes.md). Two kinds of rows, each a shard of the
product's output schema (`raas_batch.data.writer.rows_to_table`):
- random tokens: --rows completions of --tokens random token ids decoded (the embedded SmolLM2
  tokenizer unless --tokenizer), what the job benchmark's random-weight models write;
- prose: completions cut from this repository's own Markdown (README.md, docs/), each as long as a random
  row, standing for a real model's English (the cuts overlap, so it compresses more than real outputs).
For each, `pyarrow.parquet.write_table` with: the options before this benchmark (zstd at pyarrow's default
level, dictionary encoding on every column), the product's (`parquet_write_options`: zstd level 1, the long
text columns without dictionary) and, for scale, no compression. Best of --repeats writes to memory, and
the file's size. Prints and saves bench_writer.md / .json to $OUT (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pyarrow.parquet as pq
from bench_detok import load_tokenizer
from bench_job import results_dir, save_results

from raas_batch.data.writer import OUTPUT_SCHEMA, parquet_write_options, rows_to_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = {
    "before (zstd default level, dictionary everywhere)": {"compression": "zstd"},
    "product (parquet_write_options)": parquet_write_options(OUTPUT_SCHEMA),
    "no compression (scale)": {**parquet_write_options(OUTPUT_SCHEMA), "compression": "none", "compression_level": None},
}


def output_rows(texts: list[str], tokens: int) -> list[dict]:
    """The rows a job writes for these completions: without a think block, the answer is the whole text
    (`raas_batch.reasoning.split_reasoning`), so the shard holds every text twice."""
    return [{"id": f"q{i}", "row_idx": i, "sample_idx": 0, "prompt": f"Question {i}: how many apples are left?",
             "completion": text, "reasoning": "", "answer": text.strip(), "finish_reason": "length",
             "num_prompt_tokens": 80, "num_completion_tokens": tokens, "num_reasoning_tokens": 0,
             "thinking_budget_hit": False, "kv_policy": "raas", "kv_budget": 1024, "peak_kv_tokens": 1024,
             "evicted_pages": tokens // 16, "kv_over_budget": False, "ttft_s": 0.4, "e2e_s": 44.0, "seed": i,
             "model": "bench"} for i, text in enumerate(texts)]


def prose(count: int, length: int) -> list[str]:
    """`count` texts of `length` characters cut, at varying offsets, from the repository's Markdown."""
    corpus = "\n\n".join(Path(p).read_text(encoding="utf-8")
                         for p in sorted([os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md"))]))
    while len(corpus) < 2 * length:
        corpus += corpus
    rng = random.Random(1)
    return [corpus[(start := rng.randrange(len(corpus) - length)):start + length] for _ in range(count)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=6144)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--smoke", action="store_true", help="16 rows x 256 tokens, one write each")
    args = ap.parse_args()
    if args.smoke:
        args.rows, args.tokens, args.repeats = 16, 256, 1
    tok = load_tokenizer(args.tokenizer)
    rng = random.Random(0)
    ids = [[rng.randrange(1000, len(tok)) for _ in range(args.tokens)] for _ in range(args.rows)]
    random_texts = tok.batch_decode(ids, skip_special_tokens=True)
    mean_chars = sum(map(len, random_texts)) // len(random_texts)
    kinds = {"random tokens": random_texts, "prose": prose(args.rows, mean_chars)}
    rows, lines = [], ["| rows | options | write s (best) | file MB | text MB |", "| --- | --- | ---: | ---: | ---: |"]
    for kind, texts in kinds.items():
        table = rows_to_table(output_rows(texts, args.tokens))
        text_mb = sum(len(t.encode()) for t in texts) / 1e6
        for name, options in OPTIONS.items():
            best, size = float("inf"), 0
            for _ in range(args.repeats):
                buf = io.BytesIO()
                t = time.perf_counter()
                pq.write_table(table, buf, **options)
                best = min(best, time.perf_counter() - t)
                size = buf.tell()
            back = pq.read_table(io.BytesIO(buf.getvalue()))
            assert back.column("completion").to_pylist() == texts, name  # the file holds the texts
            rows.append({"rows": kind, "options": name, "write_s": best, "file_mb": size / 1e6, "text_mb": text_mb})
            lines.append(f"| {kind} | {name} | {best:.3f} | {size / 1e6:.1f} | {text_mb:.1f} |")
    text = (f"# Writing a shard: {args.rows} rows x {args.tokens} tokens ({os.cpu_count()} CPU cores)\n\n"
            + "\n".join(lines) + "\n")
    print(text)
    save_results(results_dir(), "bench_writer" + ("_smoke" if args.smoke else ""),
                 {"args": vars(args), "rows": rows}, text)


if __name__ == "__main__":
    main()
