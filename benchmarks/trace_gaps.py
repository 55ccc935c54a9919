"""Where a profiled window leaves the GPU idle: the gaps between consecutive kernels of a torch-profiler
chrome trace, with the kernels around each gap and the host (CUDA runtime) calls made during it.

A step's kernel times can sum to less than its period (run 48: the 7B RaaS step's kernels took 26.16 of
its 26.91 ms); this says whether the rest is spread thinly between every pair of kernels (launch
latency) or sits in a few places (a host synchronisation, a copy, a graph launch arriving late).

    python benchmarks/trace_gaps.py trace.json[.gz] [--top 15]   # prints the summary

`bench_gpu_decode.py --profile` writes the summary of its profiled steps beside their kernel tables.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys


def load_trace(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def summarize(trace: dict, top: int = 15, num_steps: int | None = None) -> str:
    """The idle time between kernels (all streams merged: a gap is time when no kernel runs), its largest
    gaps with their neighbours, and the runtime calls that overlap those gaps. -> text."""
    events = trace.get("traceEvents", trace if isinstance(trace, list) else [])
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                     key=lambda e: e["ts"])
    runtime = [e for e in events if e.get("cat") == "cuda_runtime" and "dur" in e]
    if not kernels:
        return "no kernels in the trace\n"
    gaps, busy, end, last = [], 0.0, kernels[0]["ts"], kernels[0]
    for k in kernels:
        start, stop = k["ts"], k["ts"] + k["dur"]
        if start > end:
            gaps.append((start - end, end, last["name"], k["name"]))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, last = stop, k
    span = end - kernels[0]["ts"]
    idle = sum(g[0] for g in gaps)
    per = f" ({idle / num_steps / 1e3:.3f} ms a step over {num_steps} steps)" if num_steps else ""
    lines = [(f"{len(kernels)} kernels / copies / memsets over {span / 1e3:.3f} ms: busy {busy / 1e3:.3f} ms, "
              f"idle {idle / 1e3:.3f} ms{per} in {len(gaps)} gaps"),
             "gaps by size: " + ", ".join(f"> {t} us: {sum(g[0] for g in gaps if g[0] > t) / 1e3:.3f} ms "
                                          f"({sum(1 for g in gaps if g[0] > t)})" for t in (1, 5, 20, 100)),
             "", f"largest {top} gaps (us, after -> before, runtime calls during the gap):"]
    for size, at, before, after in sorted(gaps, reverse=True)[:top]:
        calls = sorted({r["name"] for r in runtime if r["ts"] < at + size and r["ts"] + r["dur"] > at})
        lines.append(f"{size:9.1f}  {before[:50]} -> {after[:50]}  [{', '.join(calls)[:120]}]")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--steps", type=int, default=None, help="steps in the window (for a per-step figure)")
    args = ap.parse_args()
    print(summarize(load_trace(args.trace), args.top, args.steps), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
