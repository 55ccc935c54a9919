"""Does a row's output depend on its batch? The issue-15 check as a benchmark, with and without
`batch_invariant`: seeded prompts generated as one batch and in chunks (as shards of another size would
give them), counting the rows whose tokens agree and where the others first part.

    python benchmarks/bench_invariance.py            # GPU: 1.5B shape, random bf16 weights, 256 rows x 256 tokens
    python benchmarks/bench_invariance.py --smoke    # CPU, tiny model (checks the script)

The switch's guarantee is tested (tests/test_batch_invariant.py); this shows what the default path does
on the same job, which the README's "Reproducible rows" reports. Prints and saves bench_invariance.md /
.json to $OUT (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_job import SHAPES, results_dir, save_results


def first_differences(a: list[list[int]], b: list[list[int]]) -> list[int | None]:
    """For each row, the first token index where the two runs differ (a length difference counts, at
    the shorter one's end); None where the rows are identical."""
    out = []
    for x, y in zip(a, b):
        j = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
        out.append(j if j is not None or len(x) == len(y) else min(len(x), len(y)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--shape", default="1.5b", choices=sorted(SHAPES))
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=64, help="rows per generate call in the chunked pass")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--policies", default="dense,raas")
    ap.add_argument("--budget", type=int, default=256)
    args = ap.parse_args()
    from transformers import Qwen2Config

    from raas_batch import LLM, SamplingParams

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.shape, args.rows, args.chunk, args.max_new_tokens, args.budget = "tiny", 6, 2, 8, 32
    cfg = Qwen2Config(vocab_size=49152 if not args.smoke else 512, max_position_embeddings=4096, **SHAPES[args.shape])
    gen = torch.Generator().manual_seed(7)
    prompts = [{"prompt_token_ids": torch.randint(10, cfg.vocab_size, (int(n),), generator=gen).tolist()}
               for n in torch.randint(20, 300, (args.rows,), generator=gen)]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=0.95, seed=11, ignore_eos=True)
    results = []
    for policy in args.policies.split(","):
        for invariant in (False, True):
            t = time.perf_counter()
            llm = LLM(hf_config=cfg, load_format="random", kv_policy=policy,
                      kv_budget=None if policy == "dense" else args.budget, dtype="bf16" if dev == "cuda" else None,
                      device=dev, max_num_seqs=args.rows, num_kv_tokens=args.rows * (args.max_new_tokens + 320),
                      batch_invariant=invariant)
            whole = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            chunked = [o.outputs[0].token_ids for i in range(0, args.rows, args.chunk)
                       for o in llm.generate(prompts[i:i + args.chunk], params)]
            parts = first_differences(whole, chunked)
            differ = [p for p in parts if p is not None]
            row = {"policy": policy, "batch_invariant": invariant, "rows": args.rows, "chunk": args.chunk,
                   "tokens": args.max_new_tokens, "rows_identical": len(parts) - len(differ),
                   "first_difference_median": sorted(differ)[len(differ) // 2] if differ else None,
                   "first_difference_min": min(differ) if differ else None, "wall_s": time.perf_counter() - t}
            results.append(row)
            print(row, flush=True)
            del llm
            if dev == "cuda":
                torch.cuda.empty_cache()
    lines = [(f"# Rows as one batch of {args.rows} vs in chunks of {args.chunk} ({dev}, {args.shape} shape, random "
              f"weights, {args.max_new_tokens} sampled tokens)\n"),
             "| policy | batch_invariant | rows identical | first differing token (median, min) |",
             "| --- | --- | ---: | --- |"]
    for r in results:
        name = r["policy"] + ("" if r["policy"] == "dense" else f" L={args.budget}")
        first = "-" if r["first_difference_median"] is None else f"{r['first_difference_median']}, {r['first_difference_min']}"
        lines.append(f"| {name} | {r['batch_invariant']} | {r['rows_identical']} / {r['rows']} | {first} |")
    text = "\n".join(lines)
    print(text)
    save_results(results_dir(), "bench_invariance" + ("_smoke" if args.smoke else ""), results, text)


if __name__ == "__main__":
    main()
