"""The batch-invariant product (`kernels/matmul.py`, used by `LLM(batch_invariant=True)`) against cuBLAS
(`F.linear`) at the 1.5B shape's weight products, for a few tile configurations.

    python benchmarks/bench_matmul.py            # GPU: bf16, rows 1 / 64 / 512
    python benchmarks/bench_matmul.py --smoke    # CPU, Triton interpreter, tiny sizes (checks the script)

For each configuration it also checks the invariance the switch promises: rows computed alone, in a
slice across tiles and in the whole batch are bit-identical. Prints and saves bench_matmul.md / .json to
$OUT (default benchmarks/results/). Run 27 measured the default (64, 128, 64) at about half of cuBLAS on
the job's products; this sweep is the next session's first GPU step for issue 15.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_job import results_dir, save_results
from raas_batch.kernels.matmul import matmul

# (name, N, K) of the DeepSeek-R1-Distill-Qwen-1.5B shape's products (hidden 1536, 12 + 2 x 2 heads of 128,
# intermediate 8960, vocabulary 49,152 as with SmolLM2's tokenizer)
SHAPES = [("qkv", 2048, 1536), ("o", 1536, 1536), ("gate_up", 17920, 1536), ("down", 1536, 8960),
          ("lm_head", 49152, 1536)]
CONFIGS = [((64, 128, 64), 4, 3), ((128, 128, 64), 8, 3), ((128, 256, 64), 8, 3), ((64, 256, 64), 8, 4),
           ((128, 128, 128), 8, 2)]


def timed(fn, reps: int, *args, **kwargs) -> float:
    if not torch.cuda.is_available():
        import time

        t = time.perf_counter()
        for _ in range(reps):
            fn(*args, **kwargs)
        return (time.perf_counter() - t) / reps * 1e3
    fn(*args, **kwargs)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn(*args, **kwargs)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def invariant(x, w, **kw) -> bool:
    full = matmul(x, w, **kw)
    M = x.shape[0]
    picks = [[0], [M - 1], list(range(M // 3, M))]
    return all(torch.equal(matmul(x[r], w, **kw), full[r]) for r in picks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rows", default="1,64,512")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    shapes, configs, reps = SHAPES, CONFIGS, args.reps
    if args.smoke:
        shapes, configs, reps = [("tiny", 96, 64)], CONFIGS[:2], 1
    gen = torch.Generator().manual_seed(0)
    results = []
    for name, N, K in shapes:
        w = (torch.randn(N, K, generator=gen) * 0.02).to(dev, dtype)
        for M in [int(m) for m in args.rows.split(",")]:
            x = torch.randn(M, K, generator=gen).to(dev, dtype)
            row = {"product": name, "M": M, "N": N, "K": K,
                   "cublas_ms": timed(torch.nn.functional.linear, reps, x, w)}
            for block, warps, stages in configs:
                key = f"{block[0]}x{block[1]}x{block[2]} w{warps} s{stages}"
                kw = {"block": block, "num_warps": warps, "num_stages": stages}
                try:
                    row[key] = timed(matmul, reps, x, w, **kw)
                    row[key + " invariant"] = invariant(x, w, **kw)
                except Exception as exc:  # noqa: BLE001 - a configuration that does not fit (shared memory)
                    row[key] = f"failed: {type(exc).__name__}"
            results.append(row)
            print(json.dumps(row), flush=True)
    keys = [k for k in results[0] if k not in ("product", "M", "N", "K") and not k.endswith("invariant")]
    lines = ["| product | M | " + " | ".join(f"{k} ms" for k in keys) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in keys) + " |"]
    for r in results:
        cells = []
        for k in keys:
            v = r.get(k)
            ok = r.get(k + " invariant")
            cells.append(v if isinstance(v, str) else f"{v:.3f}" + ("" if ok in (None, True) else " (NOT invariant)"))
        lines.append(f"| {r['product']} | {r['M']} | " + " | ".join(cells) + " |")
    text = f"# Batch-invariant matmul vs cuBLAS ({dev}, {dtype})\n\n" + "\n".join(lines)
    print(text)
    save_results(results_dir(), "bench_matmul" + ("_smoke" if args.smoke else ""), results, text)


if __name__ == "__main__":
    main()
