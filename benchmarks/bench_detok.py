"""Decoding the texts of rows that finish in the same step: one by one (`tokenizer.decode`) against one
parallel batch (`raas_batch.llm_engine.decode_texts`, the fast tokenizer's `decode_batch`), which the request
core now uses. A fixed-length job finishes every row in its last step.

    python benchmarks/bench_detok.py [--rows 128] [--tokens 6144] [--tokenizer DIR]

Random token ids (the embedded SmolLM2 tokenizer unless --tokenizer). Prints and saves bench_detok.md /
.json to $OUT (default benchmarks/results/). The speedup scales with the machine's cores.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_job import results_dir, save_results

from raas_batch.llm_engine import decode_texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=6144)
    ap.add_argument("--tokenizer", default=None)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    if args.tokenizer:
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from raas_batch.models.loader import embedded_gguf_path

        path = embedded_gguf_path()
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    rng = random.Random(0)
    seqs = [SimpleNamespace(output_token_ids=[rng.randrange(len(tok)) for _ in range(args.tokens)])
            for _ in range(args.rows)]
    t = time.perf_counter()
    one = [tok.decode(s.output_token_ids, skip_special_tokens=True) for s in seqs]
    one_s = time.perf_counter() - t
    t = time.perf_counter()
    batch = decode_texts(tok, seqs)
    batch_s = time.perf_counter() - t
    assert [batch[id(s)] for s in seqs] == one
    res = {"rows": args.rows, "tokens": args.tokens, "cores": os.cpu_count(), "one_by_one_s": one_s,
           "batch_s": batch_s}
    text = (f"# Detokenising {args.rows} rows x {args.tokens} tokens ({os.cpu_count()} cores)\n\n"
            "| one by one s | one batch s | speedup |\n| ---: | ---: | ---: |\n"
            f"| {one_s:.3f} | {batch_s:.3f} | {one_s / batch_s:.2f}x |")
    print(text)
    save_results(results_dir(), "bench_detok", res, text)


if __name__ == "__main__":
    main()
