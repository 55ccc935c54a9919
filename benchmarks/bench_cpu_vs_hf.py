"""Our engine against transformers' generate() on the CPU: SmolLM2-135M-Instruct (the embedded model,
real weights, fp32), greedy, EOS ignored, batch 1 and 8, 256 new tokens, both in one run.

    python benchmarks/bench_cpu_vs_hf.py [--new-tokens 256] [--batches 1 8] [--repeats 1]

Prints a markdown table and saves it (and JSON) under benchmarks/results/. The table also says how many
rows' greedy tokens are identical to transformers' and the shortest common prefix over the rows (both
fp32; the matrix products round differently: transformers pads the batch, we run small-row products
transposed, raas_batch/layers/linear.py, so a near-tie could flip late in a long generation).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import torch

from raas_batch import LLM, SamplingParams
from raas_batch.models.loader import embedded_gguf_path

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did she sell altogether?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. She has half of the money. How much more does she need?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
    "Mark has a garden with flowers. He planted plants of three different colors in it. How many flowers are there?",
    "Albert is wondering how much pizza he can eat in one day. He buys 2 large pizzas and 2 small pizzas.",
    "Ken created a care package to send to his brother, who was away at boarding school. What did it weigh?",
    "Alexis is applying for a new job and bought a new set of business clothes. How much did she spend?",
]


def prompts_for(tokenizer, batch: int) -> list[list[int]]:
    chats = [[{"role": "user", "content": q + " Think step by step."}] for q in QUESTIONS[:batch]]
    return [tokenizer.encode(tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False) for c in chats]


def run_ours(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return time.perf_counter() - t, [o.outputs[0].token_ids for o in outs]


def run_hf(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> tuple[float, list[list[int]]]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = copy.deepcopy(model.generation_config)
    # EOS off as in our run (ignore_eos): an id outside the vocabulary, never generated (None falls back
    # to the model's EOS). Not min_new_tokens: it masks EOS out of the logits, which changes the greedy
    # choice wherever EOS would win.
    config.eos_token_id = model.config.vocab_size
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad_id, generation_config=config)
    assert out.shape[1] - width == new_tokens, f"transformers stopped early: {out.shape[1] - width} of {new_tokens} tokens"
    return time.perf_counter() - t, out[:, width:].tolist()


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[int, int]:
    """(rows whose greedy tokens are identical, shortest common prefix over the rows)."""
    prefixes = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                for x, y in zip(ours, theirs)]
    return sum(x == y for x, y in zip(ours, theirs)), min(prefixes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    llm = LLM(device="cpu", dtype="fp32", max_num_seqs=max(args.batches))
    path = embedded_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else 0
    run_ours(llm, prompts_for(llm.tokenizer, 1), 4)  # warm-up
    run_hf(hf, prompts_for(llm.tokenizer, 1), 4, pad)
    rows = []
    for batch in args.batches:
        prompts = prompts_for(llm.tokenizer, batch)
        best = {"ours": float("inf"), "hf": float("inf")}
        tokens = {}
        runners = {"ours": lambda p=prompts: run_ours(llm, p, args.new_tokens),
                   "hf": lambda p=prompts: run_hf(hf, p, args.new_tokens, pad)}
        for _ in range(args.repeats):  # alternate so that background load hits both alike
            for name, fn in runners.items():
                seconds, tokens[name] = fn()
                best[name] = min(best[name], seconds)
        n = {name: sum(len(t) for t in toks) for name, toks in tokens.items()}
        same, prefix = agreement(tokens["ours"], tokens["hf"])
        rows.append({"batch": batch, "new_tokens": args.new_tokens,
                     "ours_tok_s": n["ours"] / best["ours"], "hf_tok_s": n["hf"] / best["hf"],
                     "ours_s": best["ours"], "hf_s": best["hf"], "identical_rows": same, "common_prefix": prefix})
        rows[-1]["speedup"] = rows[-1]["ours_tok_s"] / rows[-1]["hf_tok_s"]
        print(rows[-1], flush=True)
    header = ("| batch | new tokens | raas_batch tok/s | transformers tok/s | ratio | identical greedy rows "
              "| shortest common prefix |\n| --- | --- | --- | --- | --- | --- | --- |\n")
    table = header + "".join(f"| {r['batch']} | {r['new_tokens']} | {r['ours_tok_s']:.1f} | {r['hf_tok_s']:.1f} | "
                             f"{r['speedup']:.2f}x | {r['identical_rows']}/{r['batch']} | {r['common_prefix']} |\n"
                             for r in rows)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor(),
            "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    with open(os.path.join(args.out, "cpu_vs_hf.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    with open(os.path.join(args.out, "cpu_vs_hf.md"), "w") as f:
        f.write(f"`python benchmarks/bench_cpu_vs_hf.py --new-tokens {args.new_tokens} --repeats {args.repeats}` ({meta['date']}, {meta['threads']} threads, torch {meta['torch']})\n\n")
        f.write(table)


if __name__ == "__main__":
    main()
