"""The decode step's own kernels at the job benchmark's shape, timed as a step runs them.

bench_job.py says how a step's time splits by kernel; this script tries the alternatives of the two
kernels a change touches, side by side in one run (a ratio between runs on different H200s moves by a
few percent, run 32 vs run 35):
- decode attention of a 1.5B-shape step (Hq 12, Hkv 2, D 128, pages of 16, batch 512): RaaS at
  kv_budget 1024 (66 pages a row, Quest bounds returned) with the bounds computed in a pass after the
  main loop (the default) or inside it, and a few launch settings; dense at 3,100 tokens (the fixed
  job's mean context);
- the sampler over a [512, 49152] logits row block (temperature 0.6, top-p 0.95): bf16 in, fp32 in.
Each variant runs as a CUDA graph of one call per layer over 28 layers' own caches (so L2 holds no
layer's pages for the next), replayed 20 times; the table gives ms per call and per step (x 28 for
attention, x 1 for the sampler), and the share of copy bandwidth the attention reaches on the bytes
it must read (K, V and, with bounds, kmin / kmax of the listed pages).

    python benchmarks/bench_step_kernels.py            # writes bench_step_kernels.{json,md} to $OUT
    python benchmarks/bench_step_kernels.py --smoke    # tiny sizes; on a CPU in the Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU: Triton interpreter)")
    ap.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/results)")
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.smoke and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

try:
    from raas_batch.kernels import decode_attention as dec
    from raas_batch.kernels import ops as kops
except ImportError:  # editable install without the raas_batch.kernels mapping: use the source tree
    sys.path.insert(0, str(ROOT))
    from kernels import decode_attention as dec
    from kernels import ops as kops

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
FULL = {"layers": 28, "B": 512, "Hq": 12, "Hkv": 2, "D": 128, "P": 16, "raas_pages": 66, "dense_tokens": 3100,
        "V": 49152, "reps": 20}
SMOKE = {"layers": 2, "B": 3, "Hq": 12, "Hkv": 2, "D": 32, "P": 16, "raas_pages": 5, "dense_tokens": 100,
         "V": 3000, "reps": 1}
ATTN_VARIANTS = [  # (name, launch keywords); run 37 measured these with bounds_in_loop on as the default
    ("default (bounds after the loop)", {}),
    ("bounds in the main loop", {"bounds_in_loop": True}),
    ("8 pages a tile", {"pages_per_iter": 8}),
    ("3 stages", {"num_stages": 3}),
    ("8 warps", {"num_warps": 8}),
]


def timed(fn, reps: int) -> float:
    """ms per replay of fn, captured in a CUDA graph (CPU: one eager call on a wall clock)."""
    if not CUDA:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device copy, timed as bench_kernels.py does
    (triton.testing.do_bench; run 37 timed it as a graph replay and read 2.74 TB/s, not the 4.2 of
    every other measure, so its pct_copy column is high by about 1.5x)."""
    if not CUDA:
        return float("nan")
    import triton.testing

    x = torch.empty(1 << 30, dtype=torch.bfloat16, device=DEV).normal_()
    y = torch.empty_like(x)
    ms = float(triton.testing.do_bench(lambda: y.copy_(x), warmup=10, rep=40, return_mode="median"))
    return 2 * x.numel() * 2 / (ms * 1e-3)


def layer_caches(cfg, pages_per_row: int, seed: int):
    """One layer's pool holding B rows of `pages_per_row` full pages, scattered; -> (k, v, kmin, kmax,
    fill, ids [B, Hkv, S])."""
    B, Hkv, D, P = cfg["B"], cfg["Hkv"], cfg["D"], cfg["P"]
    g = torch.Generator(device=DEV).manual_seed(seed)
    N = B * pages_per_row + 1
    k = torch.randn((N, Hkv, P, D), generator=g, device=DEV, dtype=torch.bfloat16)
    v = torch.randn((N, Hkv, P, D), generator=g, device=DEV, dtype=torch.bfloat16)
    kmin, kmax = k.amin(2), k.amax(2)
    fill = torch.full((N, Hkv), P, dtype=torch.int32, device=DEV)
    ids = torch.randperm(N, generator=g, device=DEV)[:B * pages_per_row].view(B, 1, -1)
    return k, v, kmin, kmax, fill, ids.expand(B, Hkv, -1).to(torch.int32)


def attention_rows(cfg, copy_bw) -> list[dict]:
    B, Hq, Hkv, D, P, L = cfg["B"], cfg["Hq"], cfg["Hkv"], cfg["D"], cfg["P"], cfg["layers"]
    q = torch.randn((B, Hq, D), device=DEV, dtype=torch.bfloat16)
    rows = []
    for policy, pages, bounds in (("raas L=1024", cfg["raas_pages"], True),
                                  ("dense", -(-cfg["dense_tokens"] // P), False)):
        layers = [layer_caches(cfg, pages, seed) for seed in range(L)]
        nbytes = B * Hkv * pages * (2 * P * D * 2 + (2 * D * 2 if bounds else 0))
        variants = ATTN_VARIANTS if bounds else [("default", {})] + ATTN_VARIANTS[2:]
        for name, kw in variants:
            def step(kw=kw, layers=layers, bounds=bounds):
                for k, v, kmin, kmax, fill, ids in layers:
                    dec.paged_decode_attention_impl(q, k, v, ids, fill, D ** -0.5,
                                                    key_bounds=(kmin, kmax) if bounds else None, **kw)
            try:
                ms = timed(step, cfg["reps"]) / L
                err = ""
            except Exception as e:  # noqa: BLE001  (a variant that does not compile, e.g. out of shared memory)
                ms, err = float("nan"), f"{type(e).__name__}: {str(e)[:80]}"
            rows.append({"kernel": "decode attention", "policy": policy, "variant": name, "ms_per_call": ms,
                         "ms_per_step": ms * L, "pct_copy": 100 * nbytes / (ms * 1e-3) / copy_bw, "error": err})
            print(f"  {policy:12s} {name:28s} {ms * 1e3:8.1f} us/call  {ms * L:6.3f} ms/step  "
                  f"{rows[-1]['pct_copy']:5.1f}% of copy {err}", flush=True)
        layers.clear()  # free this policy's caches before the next one's
    return rows


def sampler_rows(cfg) -> list[dict]:
    B, V = cfg["B"], cfg["V"]
    tri = kops.get_ops("triton")
    g = torch.Generator(device=DEV).manual_seed(5)
    logits = (torch.randn((B, V), generator=g, device=DEV) * 3).to(torch.bfloat16)
    temperature = torch.full((B,), 0.6, device=DEV)
    top_p = torch.full((B,), 0.95, device=DEV)
    top_k = torch.zeros(B, dtype=torch.int64, device=DEV)
    keys = torch.arange(B, dtype=torch.int64, device=DEV) * 7919
    steps = torch.full((B,), 1000, dtype=torch.int64, device=DEV)
    rows = []
    for name, x in (("bf16 logits (decode)", logits), ("fp32 logits", logits.float())):
        ms = timed(lambda x=x: tri.sample_tokens(x, temperature, top_p, top_k, keys, steps), cfg["reps"])
        rows.append({"kernel": "sampler", "policy": "", "variant": name, "ms_per_call": ms, "ms_per_step": ms,
                     "pct_copy": float("nan"), "error": ""})
        print(f"  sampler {name:28s} {ms * 1e3:8.1f} us", flush=True)
    return rows


def main():
    args = ARGS or _parse()
    cfg = SMOKE if args.smoke else FULL
    if not CUDA and not args.smoke:
        sys.exit("bench_step_kernels.py needs a CUDA device (use --smoke on a CPU machine)")
    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_bw = copy_bandwidth()
    print(f"# decode-step kernels, {torch.cuda.get_device_name() if CUDA else 'cpu'}; copy {copy_bw / 1e12:.2f} TB/s",
          flush=True)
    rows = attention_rows(cfg, copy_bw) + sampler_rows(cfg)
    stem = "bench_step_kernels_smoke" if args.smoke else "bench_step_kernels"
    (out_dir / f"{stem}.json").write_text(json.dumps({"config": cfg, "copy_TBps": copy_bw / 1e12, "rows": rows},
                                                     indent=1))
    cols = ["kernel", "policy", "variant", "ms_per_call", "ms_per_step", "pct_copy", "error"]
    lines = [f"# Decode-step kernels at the 1.5B job shape (copy bandwidth {copy_bw / 1e12:.2f} TB/s)", "",
             "`python benchmarks/bench_step_kernels.py`: CUDA graphs of one call per layer over 28 layers' caches.",
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
