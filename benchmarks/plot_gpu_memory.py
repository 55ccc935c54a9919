"""Plot peak GPU memory of one sequence against decode length, dense vs RaaS, from the memory section
of bench_gpu_decode.json (measured on the GPU machine).

    python benchmarks/plot_gpu_memory.py [benchmarks/results/bench_gpu_decode.json]
Writes benchmarks/results/memory_vs_decode_length.png.
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "results", "bench_gpu_decode.json")
    with open(path) as f:
        rows = json.load(f)["memory"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, style in (("dense", "o-"), ("raas", "s-")):
        pts = [(r["decode_len"], r["peak_gb"]) for r in rows if r["policy"] == policy]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=policy if policy == "dense" else "raas (L=2048)")
    ax.set_xlabel("decode length (tokens)")
    ax.set_ylabel("peak GPU memory above weights (GB)")
    ax.set_title("One sequence, Qwen2-7B shape, bf16, H200")
    ax.grid(True, alpha=0.3)
    ax.legend()
    out = os.path.join(os.path.dirname(path), "memory_vs_decode_length.png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main()
