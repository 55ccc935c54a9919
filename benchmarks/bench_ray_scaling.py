"""Ray scaling on one machine: the same batch job on 1 GPU worker, then on 2 (one actor per GPU), through
the real distributed runner (driver, GenerationWorker actors, shards, manifest), in one call.

The model is the Qwen2-7B shape (DeepSeek-R1-Distill-Qwen-7B: hidden 3584, 28 layers, 28 query / 4 KV
heads, intermediate 18944, vocab 152064) with random bf16 weights, built in each actor
(`LLM(hf_config=..., load_format="random")`); prompts are random token ids in a Parquet file this
script writes; every sample decodes exactly --gen-len tokens (EOS ignored): throughput does not
depend on the weights' values. Target: 2 workers >= 1.8x the tokens/s of 1.

On the GPU machine (Ray and datasets come from the bundle, see /work/shared/docs/gpu.md):
    mkdir -p /tmp/site && tar xJf .devbundle/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
    python benchmarks/bench_ray_scaling.py [--workers 1,2] [--num-prompts 1024] [--gen-len 512] [--quick]
Prints a table and writes bench_ray_scaling.json / .md to $OUT (default benchmarks/results/).

tokens/s is the job's completion tokens over the time from "every worker ready" to the end (engine
loads are excluded, and each actor warms its kernels and CUDA graphs before it reports ready); the
per-worker figures are each worker's tokens over its busy time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))


def _importable() -> None:
    """raas_batch (and raas_batch.kernels, which maps ../kernels) importable here and in the actors."""
    link = os.path.join(ROOT, "raas_batch", "kernels")
    if not os.path.exists(link):
        try:
            import raas_batch.kernels  # noqa: F401  (an installed package maps it)
        except ImportError:
            os.symlink(os.path.join("..", "kernels"), link)  # as benchmarks/gpu_session.sh does
    paths = [ROOT, HERE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))  # the actors inherit it
    for p in (HERE, ROOT):
        if p not in sys.path:
            sys.path.insert(0, p)


_importable()

from raas_batch.llm import LLM
from raas_batch.sampling_params import SamplingParams


def qwen2_7b_config(max_positions: int = 32768):
    from transformers import Qwen2Config

    if os.environ.get("RAAS_BENCH_TINY"):  # --cpu-smoke: the same script path on a model of 2 tiny layers
        return Qwen2Config(vocab_size=152064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=max_positions,
                       rope_theta=1e6, torch_dtype="bfloat16")


class RandomQwen7B(LLM):
    """The engine each actor builds (RAAS_BATCH_ENGINE=bench_ray_scaling:RandomQwen7B): LLM's job-facing
    constructor, with the 7B shape and random weights instead of a checkpoint. Warms up (Triton JIT,
    CUDA graphs of the full batch) before the actor reports ready."""

    def __init__(self, model=None, kv_policy="dense", kv_budget=None, page_size=16, max_num_seqs=64, dtype=None,
                 device=None, chat_template_kwargs=None):
        num_kv_tokens = int(os.environ.get("RAAS_BENCH_KV_TOKENS", "0")) or None
        super().__init__(hf_config=qwen2_7b_config(), load_format="random", kv_policy=kv_policy,
                         kv_budget=kv_budget, page_size=page_size, max_num_seqs=max_num_seqs,
                         dtype=dtype, device=device, num_kv_tokens=num_kv_tokens)
        warm = [{"prompt_token_ids": list(range(100, 164))}] * max_num_seqs
        self.generate(warm, SamplingParams(max_new_tokens=int(os.environ.get("RAAS_BENCH_WARM_TOKENS", "48")),
                                           temperature=0, ignore_eos=True))


def write_prompts(path: str, num: int, prompt_len: int, seed: int = 0) -> str:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 150000, size=(num, prompt_len)).tolist()
    table = pa.table({"id": [f"p{i:05d}" for i in range(num)], "prompt": ids})
    pq.write_table(table, path, row_group_size=64)
    return path


def run(workers: int, args, src: str, out_root: str) -> dict:
    from raas_batch.config import resolve
    from raas_batch.distributed.driver import run_job_ray

    cfg = resolve({"input": src, "output": os.path.join(out_root, f"w{workers}"), "shard_size": args.shard_size,
                   "max_new_tokens": args.gen_len, "ignore_eos": True, "temperature": 0.0, "seed": 0,
                   "max_num_seqs": args.max_num_seqs, "kv_policy": args.kv_policy, "kv_budget": args.kv_budget,
                   "dtype": None if args.cpu_smoke else "bfloat16", "device": "cpu" if args.cpu_smoke else None,
                   "ray": True, "num_workers": workers, "overwrite": True, "quiet": False})
    t0 = time.monotonic()
    s = run_job_ray(cfg, wait_for_all_workers=True)
    wall = time.monotonic() - t0
    window = s["completion_tokens"] / s["tokens_per_s"] if s["tokens_per_s"] else float("nan")
    return {"workers": workers, "complete": s["complete"], "rows": s["rows"], "tokens": s["completion_tokens"],
            "tokens_per_s": s["tokens_per_s"], "window_s": round(window, 2), "wall_s": round(wall, 2),
            "per_worker": [{k: w[k] for k in ("worker", "gpu", "shards_done", "completion_tokens", "busy_s",
                                              "tokens_per_s", "load_s", "failures")} for w in s["workers"]]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2", help="worker counts to run, in order (default 1,2)")
    p.add_argument("--num-prompts", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=512)
    p.add_argument("--shard-size", type=int, default=128, help="rows per shard (a worker holds 2 shards)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--kv-policy", default="dense")
    p.add_argument("--kv-budget", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="a 2-minute smoke run: 256 prompts x 128 tokens")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU: CPU actors, a tiny model of the same family, 16 prompts (checks the script)")
    args = p.parse_args()
    if args.quick:
        args.num_prompts, args.gen_len, args.shard_size, args.max_num_seqs = 256, 128, 32, 64
    if args.cpu_smoke:
        args.num_prompts, args.prompt_len, args.gen_len, args.shard_size, args.max_num_seqs = 16, 8, 8, 4, 8
        os.environ.update(RAAS_BENCH_TINY="1", RAAS_BENCH_WARM_TOKENS="2")
        # A throwaway cluster on a shared development machine: loopback only, and no token written to
        # ~/.ray (Ray's default for a new local cluster), which other clusters there would then require.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    counts = [int(x) for x in args.workers.split(",")]
    os.environ["RAAS_BATCH_ENGINE"] = "bench_ray_scaling:RandomQwen7B"
    os.environ.setdefault("RAAS_BENCH_KV_TOKENS", str(args.max_num_seqs * (args.prompt_len + args.gen_len + 32)))
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

    import logging

    import ray

    # A cluster of this machine's own (RAY_ADDRESS, if set, names an existing one instead).
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", logging_level=logging.WARNING, include_dashboard=False,
             **({"num_cpus": 2} if args.cpu_smoke else {}))
    num_gpus = int(ray.cluster_resources().get("GPU", 0))
    print(f"cluster: {num_gpus} GPU(s); {args.num_prompts} prompts x {args.prompt_len} tokens, {args.gen_len} "
          f"generated each, shards of {args.shard_size}, max_num_seqs {args.max_num_seqs}, {args.kv_policy}",
          flush=True)
    runnable = counts if args.cpu_smoke else [c for c in counts if c <= num_gpus]
    if len(runnable) < len(counts):
        print(f"skipping {sorted(set(counts) - set(runnable))} workers: only {num_gpus} GPU(s)", flush=True)
    out_root = tempfile.mkdtemp(prefix="bench_ray_")
    src = write_prompts(os.path.join(out_root, "prompts.parquet"), args.num_prompts, args.prompt_len)
    results = []
    try:
        for c in runnable:
            print(f"\n== {c} worker(s)", flush=True)
            results.append(run(c, args, src, out_root))
            print(json.dumps(results[-1]), flush=True)
    finally:
        ray.shutdown()
    base = next((r["tokens_per_s"] for r in results if r["workers"] == 1), None)
    for r in results:
        r["ratio_vs_1"] = round(r["tokens_per_s"] / base, 3) if base else None
    setup = (f"{args.num_prompts} prompts x {args.prompt_len} tokens, {args.gen_len} generated each (EOS "
             f"ignored), shards of {args.shard_size}, max_num_seqs {args.max_num_seqs}, kv_policy {args.kv_policy}")
    lines = ["# Ray scaling (random-weight Qwen2-7B shape, one actor per GPU)", "", setup, "",
             "| workers | tokens | window s | tokens/s | ratio vs 1 | per worker tokens/s (busy) | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        per = ", ".join(f"{w['tokens_per_s']:.0f}" for w in r["per_worker"])
        lines.append(f"| {r['workers']} | {r['tokens']} | {r['window_s']} | {r['tokens_per_s']:.0f} | "
                     f"{r['ratio_vs_1']} | {per} | {r['wall_s']} |")
    table = "\n".join(lines)
    print("\n" + table)
    out = os.environ.get("OUT") or os.path.join(HERE, "results")
    if args.cpu_smoke:
        out = os.path.join(out_root, "results")  # not a measurement: keep it out of benchmarks/results
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench_ray_scaling.json"), "w") as f:
        json.dump({"args": vars(args), "gpus": num_gpus, "results": results}, f, indent=2)
    with open(os.path.join(out, "bench_ray_scaling.md"), "w") as f:
        f.write(table + "\n")
    return 0 if results and all(r["complete"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
