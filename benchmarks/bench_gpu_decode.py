"""Decode throughput and memory on the GPU: the Qwen2-7B shape (DeepSeek-R1-Distill-Qwen-7B) with random
bf16 weights, EOS ignored (throughput and memory do not depend on the weights' values).

    OUT=results/ python benchmarks/bench_gpu_decode.py [--quick]

1. batch-1 decode tokens/s (dense, prompt 512);
2. decode throughput at context 4K / 16K / 32K at the largest batch that fits: our dense path
   (context pages filled with random keys/values instead of a prefill, to save GPU time) and RaaS
   with L = 2048 at steady state (short prompts decoded past L, so every step scores, refreshes and
   evicts; its per-step reads are bounded by L whatever the context), each with its roofline;
3. transformers `generate()` (sdpa) at the same batch and context as our dense path, in the same run;
4. memory: peak GPU memory of an engine sized for one sequence as its decode length goes 1K..32K.
Prints markdown tables; writes bench_gpu_decode.json / .md to $OUT (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

from raas_batch.engine.engine import Engine
from raas_batch.engine.page_pool import PagePool
from raas_batch.engine.sampler import seed_key
from raas_batch.engine.sequence import Sequence
from raas_batch.models.loader import load_model
from raas_batch.policies import make_policy
from raas_batch.sampling_params import SamplingParams

P = 16
GB = 1e9
DEVICE = torch.device("cuda")
BACKEND = "triton"


def qwen2_7b_config(max_positions: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=max_positions,
                       rope_theta=1e6, torch_dtype="bfloat16")


def copy_bandwidth() -> float:
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    del x, y
    return 2 * 2 * 2**30 / times[len(times) // 2]


def random_prompt(model, n: int) -> list[int]:
    return torch.randint(10, model.spec.vocab_size, (n,)).tolist()


def new_seq(prompt: list[int], max_new: int, i: int = 0) -> Sequence:
    params = SamplingParams(max_new_tokens=max_new, temperature=0, ignore_eos=True)
    return Sequence(request_idx=i, sample_idx=0, prompt_token_ids=prompt, params=params, seed_key=seed_key(0, 0),
                    seed=0, max_new_tokens=max_new)


def make_engine(model, policy: str, budget, max_num_seqs: int, num_kv_tokens: int, graphs: bool = True) -> Engine:
    return Engine(model, None, [], make_policy(policy, budget, P), P, max_num_seqs, num_kv_tokens,
                  DEVICE, torch.bfloat16, backend=BACKEND, cuda_graphs=graphs and DEVICE.type == "cuda")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def time_steps(engine: Engine, num_steps: int) -> float:
    """Wall time per decode step over num_steps steps (each ends in the sampling sync)."""
    sync()
    t = time.perf_counter()
    for _ in range(num_steps):
        engine.step()
    sync()
    return (time.perf_counter() - t) / num_steps


SHORT_WINDOW = 8  # steps of the short window that steady_steps subtracts (fewer for short windows)


def steady_steps(engine: Engine, num_steps: int) -> tuple[float, float]:
    """(wall per step over a window of num_steps, steady-state wall per step). A timed window pays once for
    filling the pipeline: its first step's host work runs while the device waits (overlapped decoding
    hides it from the second step on). The steady figure is the slope between a SHORT_WINDOW-step window
    and the num_steps window, each ending in a sync, which cancels that one-off cost."""
    n_short = max(1, min(SHORT_WINDOW, num_steps // 4))
    short = time_steps(engine, n_short)
    window = time_steps(engine, num_steps)
    return window, (window * num_steps - short * n_short) / (num_steps - n_short)


def free_engine(engine) -> None:
    """Drop an engine's memory (its pool, graphs and their private memory pool) before the next."""
    engine.runner.graphs = None
    for holder in (engine.pool, engine.policy):  # the big tensors, whoever else still points at them
        for name, value in list(vars(holder).items()):
            if isinstance(value, torch.Tensor):
                setattr(holder, name, None)
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def kv_bytes_per_token(spec) -> int:
    return spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 2


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


PROFILE_DIR: str | None = None  # set by --profile: kernel-time tables of a few steps are written here


def profile_steps(engine: Engine, name: str, num_steps: int = 3) -> None:
    """Kernel-level time table (CUDA time, top 30) of a few decode steps, to see where a step goes."""
    if PROFILE_DIR is None or DEVICE.type != "cuda":
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(num_steps):
            engine.step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
    with open(os.path.join(PROFILE_DIR, f"profile_{name}.txt"), "w") as f:
        f.write(f"{num_steps} decode steps\n{table}\n")
    # where the steps leave the GPU idle (trace_gaps.py): the timeline, not only the kernels' sums
    import tempfile

    from trace_gaps import load_trace, summarize

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        gaps = summarize(load_trace(path), num_steps=num_steps)
    with open(os.path.join(PROFILE_DIR, f"gaps_{name}.txt"), "w") as f:
        f.write(f"{num_steps} decode steps (benchmarks/trace_gaps.py)\n{gaps}")


def bench_batch1(model, prompt_len: int, steps: int) -> dict:
    eng = make_engine(model, "dense", None, 1, prompt_len + steps + 64)
    eng.add(new_seq(random_prompt(model, prompt_len), steps + 32))
    eng.step()  # prefill
    for _ in range(8):  # graph capture + warm-up
        eng.step()
    step_s = time_steps(eng, steps)
    profile_steps(eng, "batch1_dense")
    free_engine(eng)
    return {"batch": 1, "prompt": prompt_len, "step_ms": step_s * 1e3, "tokens_per_s": 1 / step_s}


def fake_context(eng: Engine, seqs: list[Sequence]) -> None:
    """Admit sequences whose prompt is taken as already in the cache: their context pages hold random
    keys/values (the pool was filled with random data) and count as full."""
    admitted = []
    while eng.scheduler.waiting:
        kind, new = eng.scheduler.schedule()
        assert kind == "prefill", "pool too small for the batch"
        admitted += new
    for seq in admitted:
        eng.runner.set_slot_pages(seq.slot, seq.pages)
        n_ctx = len(seq.prompt_token_ids) // P
        idx = torch.tensor(seq.pages[:n_ctx], device=DEVICE)
        eng.pool.fill[:, idx] = P
        seq.append(7, set(), None)


def bench_dense_context(model, ctx: int, batch: int, steps: int) -> dict:
    gen = steps + SHORT_WINDOW + 16
    eng = make_engine(model, "dense", None, batch, batch * (ctx + gen + P))
    eng.pool.k_cache.normal_(0, 1)
    eng.pool.v_cache.normal_(0, 1)
    seqs = [new_seq([5] * ctx, gen, i) for i in range(batch)]
    for s in seqs:
        eng.add(s)
    fake_context(eng, seqs)
    for _ in range(3):
        eng.step()
    step_s, steady_s = steady_steps(eng, steps)
    free_engine(eng)
    return {"policy": "dense", "context": ctx, "batch": batch, "step_ms": step_s * 1e3, "tokens_per_s": batch / step_s,
            "steady_step_ms": steady_s * 1e3, "steady_tokens_per_s": batch / steady_s}


def fake_bounded_state(eng: Engine, budget: int, prompt_len: int) -> int:
    """Admit the waiting sequences and give each the state of one that has decoded past its budget:
    every quota slot holds a full page (prompt pages pinned, decode pages with the logical indices just
    below the next position, stamped when written), the pool holds random keys/values, and the next
    position opens a page, so the very first steps evict as in the steady state. -> that position."""
    admitted = []
    while eng.scheduler.waiting:
        kind, new = eng.scheduler.schedule()
        assert kind == "prefill", "pool too small for the batch"
        admitted += new
    pol, pool = eng.policy, eng.pool
    pos0 = (budget // P + 4) * P
    n_prompt = -(-prompt_len // P)
    eng.runner._admit(admitted)
    for seq in admitted:
        q = int(pol.sparse_pages[seq.slot])
        logical = list(range(n_prompt)) + list(range(pos0 // P - (q - n_prompt), pos0 // P))
        idx = torch.tensor(seq.pages[:q], device=DEVICE)
        lg = torch.tensor(logical, device=DEVICE)
        pool.fill[:, idx] = P
        pool.logical[:, idx] = lg.view(1, -1, 1).to(torch.int32)
        pool.stamp[:, idx] = (lg * P + P - 1).view(1, -1, 1)
        pool.pinned[:, idx] = (lg < n_prompt).view(1, -1, 1) & pol.pin_prompt
        pol.cur[:, seq.slot] = seq.pages[q - 1]
        pol.held[:, seq.slot] = q * P
        pol.peak[:, seq.slot] = q * P
        seq.output_token_ids = [7] * (pos0 + 1 - len(seq.prompt_token_ids))
    return pos0


def bench_raas_steady(model, budget: int, batch: int, prompt_len: int, steps: int) -> dict:
    gen = budget + 4 * P + 2 * steps + 64
    eng = make_engine(model, "raas", budget, batch, batch * (budget + 2 * P))
    for k in (eng.pool.k_cache, eng.pool.v_cache, eng.pool.kmin, eng.pool.kmax):
        k.normal_(0, 1)
    eng.pool.kmax.abs_()
    eng.pool.kmin.copy_(-eng.pool.kmax)
    for i in range(batch):
        eng.add(new_seq(random_prompt(model, prompt_len), gen, i))
    pos0 = fake_bounded_state(eng, budget, prompt_len)
    t0 = time.perf_counter()
    for _ in range(2 * P):  # graph capture, compile, two evictions per sequence
        eng.step()
    fill_s = time.perf_counter() - t0
    stamps = [time.strftime("%H:%M:%S")]  # wall-clock marks, to line the phases up with a clock log
    step_s, steady_s = steady_steps(eng, steps)
    stamps.append(time.strftime("%H:%M:%S"))
    profile_steps(eng, f"raas_b{batch}")
    stamps.append(time.strftime("%H:%M:%S"))
    print(f"raas b{batch}: {steps} timed steps {stamps[0]}-{stamps[1]}, profiled steps to {stamps[2]}", flush=True)
    peak = int(eng.pool.fill.sum(dim=1).max().item())  # tokens held by the busiest (layer, head) pool-wide
    evicted = int(eng.policy.evicted.max().item())
    free_engine(eng)
    return {"policy": "raas", "budget": budget, "batch": batch, "step_ms": step_s * 1e3, "tokens_per_s": batch / step_s,
            "steady_step_ms": steady_s * 1e3, "steady_tokens_per_s": batch / steady_s,
            "position_at_timing": pos0 + 2 * P, "warm_up_s": fill_s, "pool_tokens_held_max": peak,
            "evictions_per_seq_head": evicted}


def bench_hf(cfg, ctx: int, batch: int, steps: int) -> dict:
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ids = torch.randint(100, 150000, (batch, ctx), device="cuda")

    def timed(model, new: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    # An untimed call first (a shape's first generate() loads and picks its kernels), then the best of 3 of each timed
    # call. One timing of each gave transformers 84.5 and 57.4 ms a step at 4K x 32 without the untimed call (runs 88
    # and 109) and 68.0 after it (run 110); the best of 3, 30.5 (run 111). Our dense: 4,477-4,525 tokens/s in all four.
    # (Inferred: generate() grows its cache by concatenation, new tensor sizes every step, so a call's time depends on
    # what the allocator already holds; a batch job calling generate() again and again sees the warm figure.)
    timed(hf, 2)
    one = min(timed(hf, 1) for _ in range(3))
    many = min(timed(hf, 1 + steps) for _ in range(3))
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    step_s = (many - one) / steps
    return {"policy": "transformers", "context": ctx, "batch": batch, "step_ms": step_s * 1e3, "tokens_per_s": batch / step_s}


def bench_memory(model, lengths: list[int], budget: int, prompt_len: int = 128) -> list[dict]:
    rows = []
    for policy, b in (("dense", None), ("raas", budget)):
        for n in lengths:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            pol = make_policy(policy, b, P)
            tokens = pol.quota_pages(prompt_len, n) * P
            eng = make_engine(model, policy, b, 1, tokens, graphs=False)
            eng.add(new_seq(random_prompt(model, prompt_len), n))
            for _ in range(33):
                eng.step()
            peak = torch.cuda.max_memory_allocated() - base
            rows.append({"policy": policy, "decode_len": n, "kv_pool_tokens": tokens,
                         "peak_gpu_bytes_above_weights": peak, "peak_gb": peak / GB})
            free_engine(eng)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--raas-batch", type=int, default=None,
                    help="RaaS batch besides 512 (default: the largest that fits)")
    ap.add_argument("--dense-contexts", type=int, nargs="*", default=[4096, 16384, 32768])
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: checks the script runs")
    ap.add_argument("--profile", action="store_true", help="write kernel-time tables of batch 1 and RaaS")
    ap.add_argument("--only", nargs="*", default=None, help="sections: batch1 dense raas hf memory")
    args = ap.parse_args()
    if args.smoke:
        return smoke()
    global PROFILE_DIR
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    PROFILE_DIR = out_dir if args.profile else None
    sections = set(args.only or ["batch1", "dense", "raas", "hf", "memory"])
    stem = "bench_gpu_decode" + ("" if args.only is None else "_" + "_".join(sorted(sections)))
    steps = 8 if args.quick else 32
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "sections": sorted(sections)}
    bw = copy_bandwidth()
    results["copy_bandwidth_Bps"] = bw
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    cfg = qwen2_7b_config(32768 + 1024)
    t = time.perf_counter()
    model = load_model(None, torch.bfloat16, torch.device("cuda"), load_format="random", hf_config=cfg).model
    spec = model.spec
    wbytes, kvtok = weight_bytes(model), kv_bytes_per_token(spec)
    results.update(weight_bytes=wbytes, kv_bytes_per_token=kvtok, model_init_s=time.perf_counter() - t)
    print(f"model: {wbytes / GB:.1f} GB weights, {kvtok} KV bytes/token", flush=True)
    lines = [f"# GPU decode ({results['device']}, copy {bw / 1e12:.2f} TB/s)", ""]

    if "batch1" in sections:
        b1 = results["batch1"] = bench_batch1(model, 512, 64 if args.quick else 256)
        print("batch 1:", b1, flush=True)
        lines += [(f"batch 1, dense, prompt 512: {b1['tokens_per_s']:.0f} tokens/s ({b1['step_ms']:.2f} ms/step; "
                  f"weights-only floor {wbytes / bw * 1e3:.2f} ms)"), ""]

    free, _ = torch.cuda.mem_get_info()
    usable = free - 8 * 2**30  # activations, logits, graphs
    per_page = PagePool.bytes_per_page(spec.num_layers, spec.num_kv_heads, P, spec.head_dim, torch.bfloat16)
    rows = []
    if "dense" in sections:
        for ctx in args.dense_contexts:
            batch = max(1, min(512, int(usable // (per_page * ((ctx + steps + 16) // P + 2)))))
            r = bench_dense_context(model, ctx, batch, steps)
            r["roofline_ms"] = (wbytes + batch * ctx * kvtok) / bw * 1e3
            rows.append(r)
            print(r, flush=True)
    if "raas" in sections:
        from raas_batch.engine.cuda_graph import BATCH_BUCKETS
        from raas_batch.engine.model_runner import window_ring_bytes

        # a row's pages at the budget, and its ring of queries for the refresh once a page (3.2 MB a row at the
        # 7B shape; before run 95 the ring came out of the 8 GB kept for activations)
        ring = window_ring_bytes(spec, P, torch.bfloat16)
        largest = min(BATCH_BUCKETS[-1], int((usable - ring) // (per_page * (args.budget // P + 2) + ring)))
        for raas_batch_size in sorted({min(512, largest), args.raas_batch or largest}):
            r = bench_raas_steady(model, args.budget, raas_batch_size, 128, steps)
            flops = 2 * wbytes / 2 * raas_batch_size
            r["roofline_ms"] = max((wbytes + raas_batch_size * args.budget * kvtok) / bw, flops / 770e12) * 1e3
            r["bytes_roofline_ms"] = (wbytes + raas_batch_size * args.budget * kvtok) / bw * 1e3
            rows.append(r)
            print(r, flush=True)
    if "hf" in sections and not args.skip_hf:
        for ctx, batch in ((4096, 32), (16384, 8)):
            h = bench_hf(cfg, ctx, batch, 16 if args.quick else 32)
            ours = bench_dense_context(model, ctx, batch, steps)
            h["ours_dense_tokens_per_s"] = ours["tokens_per_s"]
            h["ours_over_hf"] = ours["tokens_per_s"] / h["tokens_per_s"]
            rows.append(h)
            print(h, flush=True)
    results["throughput"] = rows
    if rows:
        # step ms: a 32-step window's wall per step (its first step's host work included); steady: the
        # slope between an 8-step and that window (steady_steps), what a long job pays a step
        lines += [("| path | context | batch | step ms | tokens/s | steady step ms | steady tokens/s | roofline ms | "
                   "step / roofline | steady / roofline |"), "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        roof = r.get("roofline_ms")
        steady = (f"{r['steady_step_ms']:.2f} | {r['steady_tokens_per_s']:.0f}" if "steady_step_ms" in r else "- | -")
        steady_roof = f"{r['steady_step_ms'] / roof:.3f}" if roof and "steady_step_ms" in r else "-"
        lines.append(f"| {r['policy']} | {r.get('context', 'any >= L')} | {r['batch']} | {r['step_ms']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {steady} | {roof:.2f} | {r['step_ms'] / roof:.3f} | {steady_roof} |" if roof else
                     f"| {r['policy']} | {r['context']} | {r['batch']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{steady} | ours dense {r['ours_dense_tokens_per_s']:.0f} tok/s = {r['ours_over_hf']:.1f}x | | |")
    if "memory" in sections:
        results["memory"] = bench_memory(model, [1024, 2048, 4096, 8192, 16384, 32768], args.budget)
        lines += ["", "| policy | decode length | KV pool tokens | peak GB above weights |", "| --- | --- | --- | --- |"]
        lines += [f"| {m['policy']} | {m['decode_len']} | {m['kv_pool_tokens']} | {m['peak_gb']:.3f} |"
                  for m in results["memory"]]
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(results, f, indent=2)
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(text)


def smoke() -> None:
    """Exercise every section with a tiny model on the CPU (no timings worth reading)."""
    global DEVICE, BACKEND
    from transformers import Qwen2Config

    DEVICE, BACKEND = torch.device("cpu"), "torch"
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    model = load_model(None, torch.bfloat16, DEVICE, load_format="random", hf_config=cfg).model
    print(bench_batch1(model, 32, 4))
    print(bench_dense_context(model, 256, 3, 2))
    r = bench_raas_steady(model, 64, 3, 16, 2)
    assert r["pool_tokens_held_max"] <= 3 * (64 + 2 * P) and r["evictions_per_seq_head"] >= 2, r
    print(r)
    print(bench_hf(cfg, 64, 2, 2) if False else "hf skipped on cpu")


if __name__ == "__main__":
    main()
