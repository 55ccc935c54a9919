"""RaaS's per-layer scoring cost on the GPU: decode attention alone, attention that also returns the
pages' Quest bounds (key_bounds), and attention followed by the separate page_scores kernel.

Shape: the 1.5B job's decode step (batch 512, 12 query / 2 KV heads, head dim 128, pages of 16, a
1,024-token budget = 64 pages per row, bf16). Prints and saves a table (benchmarks/results/bench_bounds.md).
    python benchmarks/bench_bounds.py [--batch 512 --pages 64 --hq 12 --hkv 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--pages", type=int, default=64)
    ap.add_argument("--hq", type=int, default=12)
    ap.add_argument("--hkv", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    import triton.testing

    from kernels.decode_attention import paged_decode_attention
    from kernels.page_scores import page_scores

    B, S, Hq, Hkv, D, P = args.batch, args.pages, args.hq, args.hkv, 128, 16
    dev, dt = "cuda", torch.bfloat16
    N = B * S + 8
    k = torch.randn(N, Hkv, P, D, device=dev, dtype=dt)
    v = torch.randn_like(k)
    kmin, kmax = k.amin(2), k.amax(2)
    fill = torch.full((N, Hkv), P, dtype=torch.int32, device=dev)
    ids = torch.randperm(N - 8, device=dev)[: B * S].view(B, 1, S).to(torch.int32).expand(B, Hkv, S).contiguous()
    q = torch.randn(B, Hq, D, device=dev, dtype=dt)
    scale = D ** -0.5
    fused = paged_decode_attention(q, k, v, ids, fill, scale, key_bounds=(kmin, kmax))[1]
    assert torch.allclose(fused, page_scores(q, kmin, kmax, ids), rtol=1e-4, atol=1e-2)
    runs = {
        "attention": lambda: paged_decode_attention(q, k, v, ids, fill, scale),
        "attention + bounds (one kernel)": lambda: paged_decode_attention(q, k, v, ids, fill, scale,
                                                                           key_bounds=(kmin, kmax)),
        "attention, then page_scores": lambda: (paged_decode_attention(q, k, v, ids, fill, scale),
                                                page_scores(q, kmin, kmax, ids)),
        "page_scores alone": lambda: page_scores(q, kmin, kmax, ids),
    }
    kv_bytes = B * Hkv * S * P * D * 2 * 2
    rows = []
    for name, fn in runs.items():
        us = triton.testing.do_bench(fn, warmup=50, rep=300) * 1e3
        rows.append({"case": name, "us_per_layer": round(us, 1), "kv_TBps": round(kv_bytes / us / 1e6, 2)})
    lines = [f"# Quest bounds cost per layer: batch {B}, {S} pages of {P}, {Hq}/{Hkv} heads, head dim {D}, bf16", "",
             "| case | us per layer | K+V bytes / time (TB/s) |", "| --- | ---: | ---: |"]
    lines += [f"| {r['case']} | {r['us_per_layer']} | {r['kv_TBps']} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_bounds.md").write_text(text + "\n")
    (out / "bench_bounds.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
