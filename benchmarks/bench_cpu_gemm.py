"""The weight products of one decode step on the CPU: F.linear against the transposed small-row form
(raas_batch/layers/linear.py), on the real weights of the embedded SmolLM2 (fp32), for several batch
sizes. This is what sets CPU decode speed, and it is how SMALL_ROWS was chosen.

    python benchmarks/bench_cpu_gemm.py [--rows 1 2 4 8 12 16 32] [--repeats 5]

Prints a markdown table and saves it (and JSON) under benchmarks/results/cpu_gemm.*.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import torch.nn.functional as F

from raas_batch import LLM
from raas_batch.layers.linear import SMALL_ROWS, Linear, small_rows_linear


def step_time(layers: list[Linear], rows: int, form, repeats: int) -> float:
    """Best-of-`repeats` seconds for one pass over every product of a step (layer order, as decode runs)."""
    xs = {n: torch.randn(rows, n) for n in {m.in_features for m in layers}}
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first pass warms up
            t = time.perf_counter()
            for m in layers:
                form(xs[m.in_features], m.weight, m.bias)
            best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 32])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()

    model = LLM(device="cpu", dtype="fp32", max_num_seqs=1).model
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    weight_bytes = sum(m.weight.numel() * 4 for m in layers)
    rows_out = []
    for rows in args.rows:
        plain = step_time(layers, rows, F.linear, args.repeats)
        small = step_time(layers, rows, small_rows_linear, args.repeats)
        rows_out.append({"rows": rows, "f_linear_ms": plain * 1e3, "transposed_ms": small * 1e3,
                         "f_linear_gb_s": weight_bytes / plain / 1e9, "transposed_gb_s": weight_bytes / small / 1e9,
                         "speedup": plain / small, "engine_uses": "transposed" if rows <= SMALL_ROWS else "F.linear"})
        print(rows_out[-1], flush=True)
    header = ("| rows | F.linear ms | transposed ms | F.linear GB/s | transposed GB/s | speedup | engine uses |\n"
              "| --- | --- | --- | --- | --- | --- | --- |\n")
    table = header + "".join(f"| {r['rows']} | {r['f_linear_ms']:.1f} | {r['transposed_ms']:.1f} | "
                             f"{r['f_linear_gb_s']:.1f} | {r['transposed_gb_s']:.1f} | {r['speedup']:.2f}x | "
                             f"{r['engine_uses']} |\n" for r in rows_out)
    print(table)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "weight_mb": weight_bytes / 1e6, "date": time.strftime("%Y-%m-%d %H:%M")}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu_gemm.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows_out}, f, indent=2)
    with open(os.path.join(args.out, "cpu_gemm.md"), "w") as f:
        f.write(f"`python benchmarks/bench_cpu_gemm.py` ({meta['date']}, {meta['threads']} threads, torch "
                f"{meta['torch']}; all {len(layers)} weight products of a SmolLM2 decode step, "
                f"{meta['weight_mb']:.0f} MB fp32)\n\n")
        f.write(table)


if __name__ == "__main__":
    main()
