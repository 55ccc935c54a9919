"""Samples of one prompt (README "Samples of one prompt"): what prefilling once and sharing the
prompt's pages buys, through the product path (`run_job`, as `python -m raas_batch` runs it).

    python benchmarks/bench_shared_prompt.py            # CPU: the embedded model, one 1,500-token row
    python benchmarks/bench_shared_prompt.py --gpu      # GPU: 1.5B shape, 64 prompts of 2K tokens, n = 16

CPU: one row whose prompt is ~1,500 tokens, 4 new tokens, with --n 1, with --n 8 and with --n 8
--no-share-prompts (the old path: eight prefills). Reports the job's wall time (summary.json, the
model load included) and the generation time (the load excluded), the best of --repeats runs.

GPU (--gpu): a local model directory of the 1.5B shape (random bf16 weights, a real tokenizer from
--tokenizer, as benchmarks/bench_job.py builds it), 64 prompts of ~2,048 tokens, n = 16 (1,024
sequences), --max-new-tokens each with EOS ignored, --max-num-seqs 1024, a page pool of --kv-tokens
tokens. For dense, raas L=4096 (the default: prompt not pinned, so each sample copies the prompt) and
raas L=4096 with pin_prompt "auto" (a 2K prompt takes half of the budget: pinned, so shared), with
and without --share-prompts: the most sequences decoded at once (what fits), prompt tokens prefilled,
job tokens/s. Writes bench_shared_prompt[_gpu].json / .md to $OUT (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_job import results_dir, save_results

WORDS = ["the", "train", "leaves", "the", "station", "at", "nine", "and", "travels", "north", "for", "three", "hours", "while", "the", "baker", "counts", "loaves", "in", "crates", "of", "twelve", "and", "a", "gardener", "plants", "rows", "of", "tulips", "along", "the", "river", "path"]


def prompt_text(tokenizer, num_tokens: int) -> str:
    """Text of about `num_tokens` tokens (plain words, so that every row differs only by its prefix)."""
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < num_tokens:
        words += WORDS[:: 1 + len(words) % 3] or WORDS
    text = " ".join(words)
    ids = tokenizer.encode(text, add_special_tokens=False)[:num_tokens]
    return tokenizer.decode(ids)


def run(flags: dict) -> dict:
    from raas_batch.config import resolve
    from raas_batch.runner import run_job

    shutil.rmtree(flags["output"], ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_job(resolve(flags))
    summary["bench_wall_s"] = time.perf_counter() - t0
    return summary


# ------------------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------------------
def cpu(args) -> list[dict]:
    import torch

    from raas_batch.models.loader import load_model

    tok = (load_model(None, torch.float32, torch.device("cpu")).tokenizer if args.tokenizer is None
           else _tokenizer(args.tokenizer))
    data = os.path.join(args.work, "one_row.jsonl")
    os.makedirs(args.work, exist_ok=True)
    with open(data, "w") as f:
        f.write(json.dumps({"id": "r0", "prompt": "Summarise: " + prompt_text(tok, args.prompt_tokens)}) + "\n")
    results = []
    for n, share in ((1, True), (8, True), (8, False)):
        best = None
        for _ in range(args.repeats):
            s = run({"input": data, "output": os.path.join(args.work, "out"), "n": n, "share_prompts": share,
                     "max_new_tokens": 4, "temperature": 0.0, "quiet": True, "device": "cpu"})
            gen = s["wall_time_s"] - (s.get("engine_load_s") or 0.0)
            if best is None or gen < best["generate_s"]:
                best = {"n": n, "share_prompts": share, "job_wall_s": s["wall_time_s"], "generate_s": gen,
                        "engine_load_s": s.get("engine_load_s"), "prompt_tokens": s.get("prompt_tokens")}
        results.append(best)
        print(json.dumps(best), flush=True)
    return results


def cpu_table(results: list[dict]) -> str:
    base = results[0]
    lines = ["| n | share prompts | job wall s | generation s (load excluded) | x n=1 (job) | x n=1 (generation) |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['n']} | {'yes' if r['share_prompts'] else 'no'} | {r['job_wall_s']:.2f} | "
                     f"{r['generate_s']:.2f} | {r['job_wall_s'] / base['job_wall_s']:.2f} | "
                     f"{r['generate_s'] / base['generate_s']:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def gpu(args, out_dir: str) -> list[dict]:
    import bench_job
    import torch
    from bench_job import WatchedLLM, build_model_dir

    class PoolLLM(WatchedLLM):
        """WatchedLLM with a page pool of a fixed size, so that what fits is the same on any GPU."""

        def __init__(self, **kwargs):
            super().__init__(num_kv_tokens=args.kv_tokens, **kwargs)

    bench_job.PoolLLM = PoolLLM
    os.environ["RAAS_BATCH_ENGINE"] = "bench_job:PoolLLM"
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only to check the script (--shape tiny)
    model_dir = build_model_dir(args.shape, args.tokenizer, args.work, device)
    tok = _tokenizer(args.tokenizer)
    data = os.path.join(args.work, "prompts_2k.jsonl")
    base = prompt_text(tok, args.prompt_tokens - 16)
    with open(data, "w") as f:
        f.writelines(json.dumps({"id": f"p{i}", "prompt": f"Case {i}: " + base}) + "\n" for i in range(args.prompts))
    cases = [("dense", None, None), ("raas", args.budget, None), ("raas", args.budget, {"pin_prompt": "auto"}),
             ("raas", args.budget, {"pin_prompt": True})]
    cases = [c for c, name in zip(cases, ("dense", "raas", "raas-auto", "raas-pin")) if name in args.cases.split(",")]
    results = []
    warm = {"input": data, "output": os.path.join(args.work, "warm"), "model": model_dir, "n": args.n,
            "max_new_tokens": 16, "ignore_eos": True, "max_num_seqs": args.max_num_seqs, "quiet": True,
            "limit": 4, "kv_policy": "raas", "kv_budget": args.budget}
    run(warm)
    for policy, budget, options in cases:
        for share in [s == "on" for s in args.share.split(",")]:
            flags = {"input": data, "output": os.path.join(args.work, "out"), "model": model_dir, "n": args.n,
                     "max_new_tokens": args.max_new_tokens, "ignore_eos": True, "temperature": 0.6, "top_p": 0.95,
                     "seed": 0, "max_num_seqs": args.max_num_seqs, "shard_size": args.prompts, "quiet": True,
                     "kv_policy": policy, "share_prompts": share}
            if budget:
                flags["kv_budget"] = budget
            if options:
                flags["kv_policy_options"] = options
            s = run(flags)
            llm = WatchedLLM.last
            decode = [st for st in llm.steps if st.get("kind") == "decode"]
            r = {"policy": policy + (f" L={budget}" if budget else "") + (f" {json.dumps(options)}" if options else ""),
                 "share_prompts": share, "sequences": args.prompts * args.n,
                 "max_running": max((st["rows"] for st in decode), default=0),
                 "mean_running": sum(st["rows"] for st in decode) / max(1, len(decode)),
                 "prefill_tokens": llm.engine.runner.num_prefill_tokens,
                 "prefill_s": sum(st["wall_s"] for st in llm.steps if st.get("kind") == "prefill"),
                 "completion_tokens": s["completion_tokens"], "job_wall_s": s["wall_time_s"],
                 "job_tokens_per_s": s["tokens_per_s"], "decode_steps": len(decode)}
            results.append(r)
            print(json.dumps(r), flush=True)
            save_results(out_dir, "bench_shared_prompt_gpu", results)  # a run cut short keeps its cases
            WatchedLLM.last = None
            del llm
            torch.cuda.empty_cache()
    return results


def gpu_table(results: list[dict]) -> str:
    lines = [("| policy | share prompts | sequences | most running at once | mean running | prompt tokens prefilled | "
              "prefill s | job tok/s | x unshared |"),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    before = {}
    for r in results:
        if not r["share_prompts"]:
            before[r["policy"]] = r["job_tokens_per_s"]
        gain = r["job_tokens_per_s"] / before[r["policy"]] if r["policy"] in before else float("nan")
        lines.append(f"| {r['policy']} | {'yes' if r['share_prompts'] else 'no'} | {r['sequences']} | "
                     f"{r['max_running']} | {r['mean_running']:.0f} | {r['prefill_tokens']} | {r['prefill_s']:.1f} | "
                     f"{r['job_tokens_per_s']:.0f} | {gain:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--work", default="/tmp/raas_bench_shared")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (GPU: required; CPU: the embedded model's)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="CPU 1500, GPU 2048")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--max-new-tokens", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=1024)
    ap.add_argument("--cases", default="dense,raas,raas-auto", help="GPU part: dense, raas, raas-auto, raas-pin (pin_prompt auto / true)")
    ap.add_argument("--share", default="off,on", help="GPU part: off,on / on / off")
    ap.add_argument("--shape", default="1.5b", help="GPU part: model shape of benchmarks/bench_job.py")
    ap.add_argument("--kv-tokens", type=int, default=1 << 20, help="page pool size in tokens (GPU)")
    args = ap.parse_args()
    out_dir = results_dir()
    if args.gpu:
        args.prompt_tokens = args.prompt_tokens or 2048
        results, tag = gpu(args, out_dir), "_gpu"
        text = (f"# Samples of one prompt on the GPU: {args.shape} shape, {args.prompts} prompts of ~{args.prompt_tokens} "
                f"tokens, n = {args.n}, {args.max_new_tokens} new tokens each (EOS ignored), page pool "
                f"{args.kv_tokens} tokens, max_num_seqs {args.max_num_seqs}\n\n" + gpu_table(results))
    else:
        args.prompt_tokens = args.prompt_tokens or 1500
        results, tag = cpu(args), ""
        text = (f"# Samples of one prompt on the CPU: embedded model, one row of ~{args.prompt_tokens} prompt "
                f"tokens, 4 new tokens, best of {args.repeats}\n\n" + cpu_table(results))
    print(text)
    save_results(out_dir, f"bench_shared_prompt{tag}", results, text)


if __name__ == "__main__":
    main()
