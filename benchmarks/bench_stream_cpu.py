"""Do shard boundaries drain the batch? The same batch job with one-row shards and with one shard, on
the CPU (the embedded SmolLM2-135M-Instruct, fp32, one engine loaded once), plus the old runner's
way for reference: one `LLM.generate` call per shard, each waiting for its slowest row.

    python benchmarks/bench_stream_cpu.py [--rows 8] [--max-num-seqs 8] [--max-new-tokens 128] [--repeats 3]

Every configuration runs the same rows with the same per-row seeds (temperature 0.6, EOS honoured,
so lengths differ as a reasoning job's do) and so generates the same tokens; tokens/s is the job's
completion tokens over its wall time (`summary.json`'s `tokens_per_s`). Runs alternate between the
configurations and the table gives the median of `--repeats` runs of each. On a shared CPU wall time
moves with the neighbours' load, so the table also gives the engine steps (exact: the same tokens in
fewer steps means fuller batches) and tokens per CPU-second of this process.
Prints a markdown table and saves it (and JSON) as benchmarks/results/bench_stream_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from raas_batch import LLM, SamplingParams
from raas_batch.config import resolve
from raas_batch.runner import run_job
from raas_batch.shards import derive_row_seed

INPUT = os.path.join(ROOT, "examples", "gsm8k_mini.jsonl")


class StepCounter:
    """Counts the engine's steps (a figure the shared CPU cannot blur: same tokens in fewer steps means
    fuller batches)."""

    def __init__(self, llm):
        self.steps, self._step = 0, llm.engine.step
        llm.engine.step = self

    def __call__(self):
        self.steps += 1
        return self._step()


def job(llm, args, shard_size: int, out: str) -> dict:
    cfg = resolve({"input": INPUT, "output": out, "limit": args.rows, "shard_size": shard_size,
                   "max_num_seqs": args.max_num_seqs, "max_new_tokens": args.max_new_tokens, "temperature": 0.6,
                   "top_p": 0.95, "seed": 0, "device": "cpu", "quiet": True, "overwrite": True})
    steps0, cpu0 = llm.engine.step.steps, time.process_time()
    s = run_job(cfg, engine=llm)
    return {"tokens": s["completion_tokens"], "tokens_per_s": s["tokens_per_s"],
            "wall_s": s["completion_tokens"] / s["tokens_per_s"], "cpu_s": time.process_time() - cpu0,
            "steps": llm.engine.step.steps - steps0}


def generate_per_shard(llm, args, shard_size: int) -> dict:
    """The runner before streaming: one generate call per shard, waiting for its last row."""
    with open(INPUT, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:args.rows]
    t0, cpu0, steps0, tokens = time.perf_counter(), time.process_time(), llm.engine.step.steps, 0
    for start in range(0, len(rows), shard_size):
        shard = rows[start:start + shard_size]
        params = [SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.6, top_p=0.95,
                                 seed=derive_row_seed(0, r["id"])) for r in shard]
        outs = llm.generate([r["messages"] for r in shard], params)
        tokens += sum(o.outputs[0].num_tokens for o in outs)
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "tokens_per_s": tokens / wall, "wall_s": wall, "cpu_s": time.process_time() - cpu0,
            "steps": llm.engine.step.steps - steps0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(device="cpu", dtype="fp32", max_num_seqs=args.max_num_seqs)
    StepCounter(llm)
    configs = {
        "job, one shard of all rows": lambda d: job(llm, args, args.rows, os.path.join(d, "one")),
        "job, one-row shards (streaming runner)": lambda d: job(llm, args, 1, os.path.join(d, "rows")),
        "generate per one-row shard (the old runner)": lambda d: generate_per_shard(llm, args, 1),
    }
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        configs["job, one shard of all rows"](tmp)  # warm-up (first-call allocations)
        for r in range(args.repeats):
            for name, fn in configs.items():
                runs[name].append(fn(tmp))
                print(f"repeat {r}: {name}: {runs[name][-1]}", flush=True)
    base = statistics.median(x["tokens_per_s"] for x in runs["job, one shard of all rows"])
    header = (f"Same job, {args.rows} rows of `examples/gsm8k_mini.jsonl`, `--max-num-seqs {args.max_num_seqs}`, "
              f"`--max-new-tokens {args.max_new_tokens}`, temperature 0.6, top-p 0.95, `--seed 0` (EOS honoured), "
              f"embedded SmolLM2-135M-Instruct fp32 on the CPU ({platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} torch threads), median of {args.repeats} alternating runs.")
    base_cpu = statistics.median(x["tokens"] / x["cpu_s"] for x in runs["job, one shard of all rows"])
    columns = ("| configuration | tokens | engine steps | tokens/s (median) | runs | vs one shard "
               "| tokens per CPU-s (median) | vs one shard |")
    lines = [header, "", columns, "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for name, xs in runs.items():
        med = statistics.median(x["tokens_per_s"] for x in xs)
        med_cpu = statistics.median(x["tokens"] / x["cpu_s"] for x in xs)
        every = ", ".join(f"{x['tokens_per_s']:.1f}" for x in xs)
        lines.append(f"| {name} | {xs[0]['tokens']} | {xs[0]['steps']} | {med:.1f} | {every} | {med / base:.2f}x "
                     f"| {med_cpu:.1f} | {med_cpu / base_cpu:.2f}x |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "bench_stream_cpu.md"), "w", encoding="utf-8") as f:
        f.write(f"# Streaming jobs on the CPU (`python benchmarks/bench_stream_cpu.py`)\n\n{table}\n")
    with open(os.path.join(args.out_dir, "bench_stream_cpu.json"), "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
