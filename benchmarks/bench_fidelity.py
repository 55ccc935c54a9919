"""Fidelity of the sparse KV policies against dense decoding (CPU, SmolLM2-135M-Instruct, real weights).

1. Dense: greedy decoding of GSM8K-style prompts (examples/gsm8k_mini.jsonl, chat template) for
   --max-new-tokens tokens with EOS ignored; the trajectory and the top-K log-probabilities of every
   step are cached (--cache-dir) and reused by later runs.
2. For every policy (and option variant) and budget, in as few engine runs as possible (a
   PolicyMixture carries all policies, per-sequence budgets all budgets, and teacher-forced and
   free-running sequences share the run):
   - teacher-forced replay of the dense trajectory through the sparse cache: agreement of the
     greedy next token with the dense one, and mean KL(dense || sparse) of the next-token
     distribution. KL is computed on the dense top-K tokens plus one bucket for the rest (a lower
     bound of the exact KL, exact when the tail mass is 0; the dense tail mass is reported);
   - free-running greedy decoding with EOS honoured (cap --max-new-tokens): tokens until the first
     divergence from dense, and the generation length (until EOS within the cap) minus dense's.
Results: benchmarks/results/fidelity.{json,csv,png}. Finished (variant, budget) cells are kept in
the JSON and skipped on a rerun with the same prompts and length, so the grid can be run in pieces.

    .venv/bin/python benchmarks/bench_fidelity.py --num-prompts 2 --max-new-tokens 1024

The full grid (README "Fidelity against dense") runs in two processes, each saving every 50 engine steps,
and benchmarks/fidelity_report.py makes the table and plot from both (at equal step counts):

    bench_fidelity.py --num-prompts 8 --max-new-tokens 1024 --threads 1 --out-dir benchmarks/results/fidelity_grid \
        --policies raas,streaming,h2o --variants raas-nopin --free-variants
    bench_fidelity.py --num-prompts 8 --max-new-tokens 1024 --threads 1 --out-dir benchmarks/results/fidelity_grid_b \
        --policies quest,raas-paper,raas-mass --variants raas+recent2,raas+alpha
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from raas_batch import LLM
from raas_batch.engine.engine import Engine
from raas_batch.engine.scoring import ScoreRequest, run_scored
from raas_batch.policies import PolicyMixture, make_policy

POLICIES = ["raas", "raas-mass", "raas-paper", "quest", "h2o", "streaming"]
BUDGETS = [64, 128, 256, 512]
# Option variants run for the evidence behind the defaults: name -> (policy, options, budgets)
VARIANTS = {
    "raas-nopin": ("raas", {"pin_prompt": False}, BUDGETS),
    "raas+recent2": ("raas", {"recent_pages": 2}, [256, 512]),
    "raas+alpha": ("raas", {"refresh_rule": "alpha", "alpha": 0.001}, [256, 512]),
    "raas+alpha=0.01": ("raas", {"refresh_rule": "alpha", "alpha": 0.01}, [256, 512]),
    "raas+refresh_pinned": ("raas", {"refresh_pinned": True}, [256, 512]),
    "raas-mass-nopin": ("raas-mass", {"pin_prompt": False}, [256, 512]),
    "raas-mass+alpha=0.01": ("raas-mass", {"alpha": 0.01}, [256, 512]),
    "raas+dense2": ("raas", {"dense_layers": 2}, [256]),
}
DEFAULT_VARIANTS = list(VARIANTS)


def load_prompts(llm: LLM, path: str, num: int, indices: list[int] | None = None) -> list[list[int]]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [rows[i] for i in indices] if indices else rows[:num]
    out = []
    for row in rows:
        _, ids, err = llm._prepare(row["messages"])
        if err:
            raise ValueError(f"{path}: row {row.get('id')}: {err}")
        out.append(ids)
    return out


def trimmed_ops():
    """The CPU backend's ops (kernels/cpu.py, tested equal to the references), with decode attention run
    per group of rows of similar page-list width.

    A mixed run pads every row's page list to the widest one (512-token budgets next to 64-token
    ones); gathering the padding too dominates CPU time. Rows are bucketed by their last listed page
    and each bucket attends over its own width: the same softmax over the same tokens per row (-1
    entries contribute nothing), so results are those of the plain op. Benchmark-only (it syncs with
    the host)."""
    from types import SimpleNamespace

    from raas_batch.kernels.ops import get_ops
    from raas_batch.kernels.reference import _limit_pages

    base = get_ops("cpu")

    def attention(q, k_cache, v_cache, page_ids, fill, scale, return_mass=False, num_pages=None):
        page_ids = _limit_pages(page_ids, num_pages)
        B, Hkv, S = page_ids.shape
        cols = torch.arange(1, S + 1).view(1, 1, S)
        width = torch.where(page_ids >= 0, cols, 0).amax(dim=(1, 2))  # [B] columns in use
        buckets = torch.clamp((width + 7) // 8 * 8, max=S)
        out = torch.empty_like(q)
        mass = torch.zeros(B, Hkv, S) if return_mass else None
        for w in buckets.unique().tolist():
            rows = (buckets == w).nonzero().squeeze(1)
            res = base.paged_decode_attention(q[rows], k_cache, v_cache, page_ids[rows, :, :w].contiguous(), fill,
                                              scale, return_mass=return_mass)
            if return_mass:
                out[rows], mass[rows, :, :w] = res
            else:
                out[rows] = res
        return (out, mass) if return_mass else out

    return SimpleNamespace(**{**vars(base), "backend": "cpu-trimmed", "paged_decode_attention": attention})


def make_engine(llm: LLM, policy, max_num_seqs: int, num_kv_tokens: int) -> Engine:
    engine = Engine(llm.model, llm.tokenizer, llm.eos_token_ids, policy, policy.page_size, max_num_seqs,
                    num_kv_tokens, llm.device, llm.dtype, "cpu")
    engine.runner.ops = trimmed_ops()
    policy.use_ops(engine.runner.ops)
    return engine


def cached_reference(prompts: list[list[int]], max_new: int, topk: int, cache_dir: str) -> dict | None:
    """A cached dense reference for these prompts (or a prefix of a larger cached set), else None."""
    if not os.path.isdir(cache_dir):
        return None
    for fname in sorted(os.listdir(cache_dir)):
        if not fname.startswith("dense_") or not fname.endswith(f"_n{max_new}_k{topk}.pt"):
            continue
        ref = torch.load(os.path.join(cache_dir, fname))
        if all(p in ref["prompts"] for p in prompts):
            idx = [ref["prompts"].index(p) for p in prompts]
            print(f"dense reference: cached {fname}, rows {idx}", flush=True)
            return {**ref, "prompts": prompts, "tokens": [ref["tokens"][i] for i in idx], "top_lp": ref["top_lp"][idx],
                    "top_id": ref["top_id"][idx], "eos_lengths": [ref["eos_lengths"][i] for i in idx]}
    return None


def dense_reference(llm: LLM, prompts: list[list[int]], max_new: int, topk: int, cache: str) -> dict:
    ref = cached_reference(prompts, max_new, topk, os.path.dirname(cache))
    if ref is not None:
        return ref
    n = len(prompts)
    top_lp = torch.zeros(n, max_new, topk)
    top_id = torch.zeros(n, max_new, topk, dtype=torch.int64)

    def keep(rows, steps, logprobs):
        if steps[0] % 100 == 0:
            print(f"  dense step {steps[0]}: {time.time() - t0:.0f} s", flush=True)
        v, i = logprobs.topk(topk, dim=-1)
        for b, (r, t) in enumerate(zip(rows, steps)):
            top_lp[r, t], top_id[r, t] = v[b], i[b]

    pages = sum(math.ceil((len(p) + max_new) / 16) for p in prompts)
    engine = make_engine(llm, make_policy("dense"), n, pages * 16)
    t0 = time.time()
    res = run_scored(engine, [ScoreRequest(p, max_new_tokens=max_new, ignore_eos=True) for p in prompts], keep)
    tokens = [r.token_ids for r in res]
    eos = set(llm.eos_token_ids)
    lengths = [next((t + 1 for t, tok in enumerate(seq) if tok in eos), max_new) for seq in tokens]
    ref = {"prompts": prompts, "max_new": max_new, "topk": topk, "tokens": tokens, "top_lp": top_lp,
           "top_id": top_id, "eos_lengths": lengths, "seconds": time.time() - t0}
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    torch.save(ref, cache)
    print(f"dense reference: {n} x {max_new} tokens in {ref['seconds']:.0f} s; lengths to EOS {lengths}", flush=True)
    return ref


def cell_plan(policies, budgets, variants) -> list[tuple[str, str, dict, int]]:
    cells = [(p, p, {}, b) for p in policies for b in budgets]
    for name in variants:
        pol, opts, vb = VARIANTS[name]
        cells += [(name, pol, opts, b) for b in vb]
    return cells


def run_cells(llm: LLM, ref: dict, cells, max_new: int, free_variants: bool = False, checkpoint=None) -> dict:
    """One engine run for all `cells` -> metrics per cell. Every prompt is replayed teacher-forced;
    it is also decoded freely for the main policies (and for option variants if free_variants)."""
    prompts, tokens = ref["prompts"], ref["tokens"]
    members = {}
    for name, pol, opts, _ in cells:
        if name not in members:  # kv_budget = the member's largest (fixes quest's top-k width)
            top = max(b for n, _, _, b in cells if n == name)
            members[name] = make_policy(pol, top, 16, **opts)
    mixture = PolicyMixture(members, page_size=16)
    requests, meta = [], []
    for ci, (name, _, _, budget) in enumerate(cells):
        modes = ("tf", "free") if name not in VARIANTS or free_variants else ("tf",)
        for pi, prompt in enumerate(prompts):
            requests.append(ScoreRequest(prompt, continuation_ids=tokens[pi], kv_override=(name, budget)))
            meta.append((ci, pi, "tf"))
            if "free" in modes:
                requests.append(ScoreRequest(prompt, max_new_tokens=max_new, kv_override=(name, budget)))
                meta.append((ci, pi, "free"))
    pages = sum(mixture.quota_pages(len(r.prompt_token_ids), max_new, r.kv_override) for r in requests)
    engine = make_engine(llm, mixture, len(requests), pages * 16)
    n = len(requests)
    agree = torch.zeros(n)
    kl = torch.zeros(n)
    steps_seen = torch.zeros(n)
    top_lp, top_id = ref["top_lp"], ref["top_id"]
    ref_tok = torch.tensor([t + [0] * (max_new - len(t)) for t in tokens])  # [P, max_new]
    tf_rows = {i for i, m in enumerate(meta) if m[2] == "tf"}
    t0 = time.time()
    count = [0]

    free_tokens: dict[int, list[int]] = {i: [] for i, m in enumerate(meta) if m[2] == "free"}

    def on_step(rows, steps, logprobs):
        sel = [b for b, r in enumerate(rows) if r in tf_rows]
        count[0] += 1
        greedy = logprobs.argmax(-1).tolist()
        for b, r in enumerate(rows):
            if r in free_tokens:
                free_tokens[r].append(greedy[b])
        if count[0] % 50 == 0:
            print(f"  step {count[0]}: batch {len(rows)}, {time.time() - t0:.0f} s", flush=True)
            if checkpoint is not None:
                try:
                    checkpoint(summarize())
                except Exception as exc:  # noqa: BLE001  (a failed partial save must not end a long run)
                    print(f"  checkpoint failed: {exc!r}", flush=True)
        if not sel:
            return
        r_idx = torch.tensor([rows[b] for b in sel])
        p_idx = torch.tensor([meta[rows[b]][1] for b in sel])
        t_idx = torch.tensor([steps[b] for b in sel])
        lp = logprobs[sel]  # [b, V]
        d_lp, d_id = top_lp[p_idx, t_idx], top_id[p_idx, t_idx]  # [b, K]
        s_lp = lp.gather(1, d_id)
        d_p = d_lp.exp()
        tail_d = (1 - d_p.sum(-1)).clamp(min=1e-12)
        tail_s = (1 - s_lp.exp().sum(-1)).clamp(min=1e-12)
        k = (d_p * (d_lp - s_lp)).sum(-1) + tail_d * (tail_d.log() - tail_s.log())
        agree[r_idx] += (lp.argmax(-1) == ref_tok[p_idx, t_idx]).float()
        kl[r_idx] += k.clamp(min=0)
        steps_seen[r_idx] += 1

    def summarize(res=None) -> dict:
        """Metrics per cell; while running (res None) over the steps done so far (marked partial)."""
        out = {}
        for ci, (name, pol, opts, budget) in enumerate(cells):
            rows = [i for i, m in enumerate(meta) if m[0] == ci]
            per_prompt = []
            for pi in range(len(prompts)):
                tf = next(i for i in rows if meta[i][1] == pi and meta[i][2] == "tf")
                fr = next((i for i in rows if meta[i][1] == pi and meta[i][2] == "free"), None)
                gen = None if fr is None else (res[fr].token_ids if res is not None else free_tokens[fr])
                diverge = None if gen is None else next(
                    (t for t, (a, b) in enumerate(zip(gen, tokens[pi])) if a != b), min(len(gen), max_new))
                seen = max(float(steps_seen[tf]), 1.0)
                per_prompt.append({
                    "agreement": float(agree[tf]) / seen, "kl": float(kl[tf]) / seen, "tf_steps": int(steps_seen[tf]),
                    "first_divergence": diverge, "free_length": None if gen is None else len(gen),
                    "dense_length": ref["eos_lengths"][pi],
                    "peak_kv_tokens": None if res is None else
                    max(res[i].peak_kv_tokens for i in (tf, fr) if i is not None),
                    "evicted_pages": None if res is None else res[tf].evicted_pages,
                    "kv_over_budget": mixture.over_budget(len(prompts[pi]), max_new, (name, budget)),
                })
            mean = {k: None if per_prompt[0][k] is None else sum(p[k] for p in per_prompt) / len(per_prompt)
                    for k in ("agreement", "kl", "first_divergence", "free_length", "dense_length", "peak_kv_tokens")}
            out[f"{name}@{budget}"] = {
                "variant": name, "policy": pol, "options": opts, "budget": budget, **mean,
                "length_change": None if mean["free_length"] is None else mean["free_length"] - mean["dense_length"],
                "max_peak_kv_tokens": None if res is None else max(p["peak_kv_tokens"] for p in per_prompt),
                "over_budget_prompts": sum(p["kv_over_budget"] for p in per_prompt),
                "partial_steps": None if res is not None else count[0],
                "per_prompt": per_prompt,
            }
        return out

    res = run_scored(engine, requests, on_step)
    seconds = time.time() - t0
    print(f"  {len(cells)} cells, {n} sequences: {seconds:.0f} s", flush=True)
    return summarize(res)


def save(results: dict, header: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "fidelity.json"), "w") as f:
        json.dump({**header, "cells": results}, f, indent=1)
    cols = ["variant", "policy", "budget", "agreement", "kl", "first_divergence", "free_length", "dense_length",
            "length_change", "max_peak_kv_tokens", "over_budget_prompts"]
    rows = sorted(results.values(), key=lambda c: (c["variant"], c["budget"]))
    with open(os.path.join(out_dir, "fidelity.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for c in rows:
            w.writerow([c[k] if not isinstance(c[k], float) else f"{c[k]:.6g}" for k in cols])
    from fidelity_report import plot

    plot(results, f"SmolLM2-135M-Instruct, {header['num_prompts']} GSM8K-style prompts x {header['max_new_tokens']} "
         "dense tokens, page 16", os.path.join(out_dir, "fidelity.png"), main=POLICIES, labels={})


def markdown(results: dict) -> str:
    lines = ["| policy | budget | agreement % | mean KL | tokens to 1st divergence | length change | peak KV tokens |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in sorted(results.values(), key=lambda c: (c["variant"] not in POLICIES, c["variant"], c["budget"])):
        over = " *" if c["over_budget_prompts"] else ""
        peak = "-" if c["max_peak_kv_tokens"] is None else c["max_peak_kv_tokens"]
        div = "-" if c["first_divergence"] is None else f"{c['first_divergence']:.0f}"
        dlen = "-" if c["length_change"] is None else f"{c['length_change']:+.0f}"
        lines.append(f"| {c['variant']} | {c['budget']}{over} | {100 * c['agreement']:.1f} | {c['kl']:.4f} | "
                     f"{div} | {dlen} | {peak} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--prompt-indices", default="", help="rows of --data to use (e.g. 2,3); default the first N")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="option variants ('' for none)")
    ap.add_argument("--max-cells-per-run", type=int, default=64, help="cells per engine run (saved after each)")
    ap.add_argument("--topk", type=int, default=256, help="dense tokens kept per step for the KL")
    ap.add_argument("--data", default=os.path.join(ROOT, "examples", "gsm8k_mini.jsonl"))
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--cache-dir", default=os.path.join(ROOT, "out", "fidelity_cache"))
    ap.add_argument("--dense-only", action="store_true", help="only build the dense reference")
    ap.add_argument("--free-variants", action="store_true", help="also decode option variants freely")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0 = torch's default); 1 is much faster on cores shared with other jobs")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    llm = LLM(device="cpu", dtype="fp32", max_num_seqs=1)
    indices = [int(i) for i in args.prompt_indices.split(",") if i]
    prompts = load_prompts(llm, args.data, args.num_prompts, indices)
    cache = os.path.join(args.cache_dir, f"dense_p{len(prompts)}_n{args.max_new_tokens}_k{args.topk}.pt")
    ref = dense_reference(llm, prompts, args.max_new_tokens, args.topk, cache)
    if args.dense_only:
        return
    header = {"model": llm.model_name, "num_prompts": len(prompts), "prompt_indices": indices or None,
              "max_new_tokens": args.max_new_tokens,
              "prompt_tokens": [len(p) for p in prompts], "dense_eos_lengths": ref["eos_lengths"],
              "dense_tail_mass_mean": float((1 - ref["top_lp"].exp().sum(-1)).mean()), "page_size": 16,
              "command": " ".join(["benchmarks/bench_fidelity.py"] + sys.argv[1:])}
    path = os.path.join(args.out_dir, "fidelity.json")
    results = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if all(old.get(k) == header[k] for k in ("num_prompts", "prompt_indices", "max_new_tokens")):
            results = {k: c for k, c in old["cells"].items() if not c.get("partial_steps")}
    variants = [v for v in args.variants.split(",") if v]
    cells = cell_plan([p for p in args.policies.split(",") if p], [int(b) for b in args.budgets.split(",")], variants)
    todo = [c for c in cells if f"{c[0]}@{c[3]}" not in results]
    print(f"{len(cells)} cells, {len(todo)} to run", flush=True)
    for start in range(0, len(todo), args.max_cells_per_run):
        chunk = todo[start:start + args.max_cells_per_run]
        done = dict(results)
        results.update(run_cells(llm, ref, chunk, args.max_new_tokens, args.free_variants,
                                 checkpoint=lambda partial, done=done: save({**done, **partial}, header, args.out_dir)))
        save(results, header, args.out_dir)
    save(results, header, args.out_dir)
    print(markdown(results))


if __name__ == "__main__":
    main()
