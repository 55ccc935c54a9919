"""What a small prefill step costs on the GPU, and where its time goes (a probe for the refill rule's cost).

A prefill step stops every running row (raas_batch/engine/scheduler.py, `prefill_cost_steps`). This times
`ModelRunner.prefill` alone (admission, the eager forward, the first tokens' sampler and their copy to the
host) for groups of 1, 4, 27 and 128 rows of the job benchmark's chat prompts (`bench_job.write_dataset`), on
its random-weight model directory (a group over max_prefill_tokens runs as several steps: `steps_per_call`), then profiles one 1-row prefill with torch.profiler (host time by
op and the device's kernel time). Nothing else runs: a job's prefill step also waits for the decode step in
flight.

    python benchmarks/profile_prefill.py [--shape 1.5b] [--policy raas]   # writes profile_prefill.{json,md,txt}
    python benchmarks/profile_prefill.py --smoke                           # tiny model on the CPU (checks the script)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_job import build_model_dir, results_dir, save_results, write_dataset

from raas_batch import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1.5b")
    ap.add_argument("--policy", default="raas")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--tokenizer", default=".gpu_assets/tok")
    ap.add_argument("--work", default="/tmp/raas_bench")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    shape = "tiny" if args.smoke else args.shape
    groups = (1, 4) if args.smoke else (1, 4, 27, 128)
    model_dir = build_model_dir(shape, args.tokenizer, args.work, device)
    data = os.path.join(args.work, "prefill-rows.jsonl")
    write_dataset(data, max(groups) + args.repeats)
    with open(data) as f:
        chats = [json.loads(line)["messages"] for line in f]
    budget = None if args.policy == "dense" else args.budget
    llm = LLM(model=model_dir, kv_policy=args.policy, kv_budget=budget, max_num_seqs=max(groups),
              device=device, dtype="bf16" if device == "cuda" else None)
    runner = llm.engine.runner
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    timed: list[float] = []
    real = runner.prefill

    def prefill(seqs):
        sync()
        t = time.perf_counter()
        out = real(seqs)  # ends with the first tokens copied to the host: the device is done
        timed.append(time.perf_counter() - t)
        return out

    runner.prefill = prefill
    params = SamplingParams(max_new_tokens=1, temperature=0.6, top_p=0.95, seed=0)
    rows = []
    for group in groups:
        llm.generate(chats[:group], params)  # warm-up: kernel variants, allocator
        timed.clear()
        for r in range(args.repeats):
            llm.generate(chats[r:r + group], params)
        ms = statistics.median(timed) * 1e3
        steps = len(timed) / args.repeats
        rows.append({"rows": group, "steps_per_call": steps, "prefill_ms_median": ms, "runs": len(timed)})
        print(f"{group} rows ({steps:g} steps a call): {ms:.2f} ms a prefill step (median of {len(timed)})", flush=True)
    runner.prefill = real
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        llm.generate(chats[:1], params)
        sync()
    sort = "self_cpu_time_total"
    table_cpu = prof.key_averages().table(sort_by=sort, row_limit=30)
    table_dev = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15) if device == "cuda" else ""
    out = results_dir()
    with open(os.path.join(out, "profile_prefill.txt"), "w") as f:
        f.write(f"# one 1-row prefill ({shape}, {args.policy}), by self CPU time\n{table_cpu}\n")
        f.write(f"# by device time\n{table_dev}\n")
    print(table_cpu[:6000])
    md = ["# A prefill step alone (`ModelRunner.prefill`: admission, eager forward, sampler, tokens to the host)", "",
          f"{shape} shape, {args.policy}, {device}; the job benchmark's chat prompts; median of {args.repeats} calls", "",
          "| rows a call | prefill steps a call | ms a prefill step |", "| ---: | ---: | ---: |"]
    md += [f"| {r['rows']} | {r['steps_per_call']:g} | {r['prefill_ms_median']:.2f} |" for r in rows]
    save_results(out, "profile_prefill" + ("_smoke" if args.smoke else ""),
                 {"shape": shape, "policy": args.policy, "device": device, "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
