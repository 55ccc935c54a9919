"""The job benchmark: the product path (`run_job`: reader, shards, manifest, the shard stream) on a local
model directory, per KV policy: tokens/s, ms per decode step, the step's roofline and where a step's
time goes.

    python benchmarks/bench_job.py --shape 1.5b --policies dense,raas --rows 512 --max-new-tokens 6144
    python benchmarks/bench_job.py --shape 1.5b --regime realistic --policies dense,raas --shard-size 512,128

What it builds (under --work, default /tmp/raas_bench): a model directory of the shape with random bf16
weights saved as safetensors beside a real tokenizer (--tokenizer, e.g. SmolLM2's saved with
save_pretrained; the config's vocabulary is set to the tokenizer's), and a JSONL file of chat rows
(GSM8K-style word problems from a fixed template). Then, for every policy, `run_job` on it exactly as
`python -m raas_batch` would run it, with sampling as an R1 user would set it (temperature 0.6,
top-p 0.95, seed 0). Two length regimes:
- fixed: EOS ignored, every row writes --max-new-tokens tokens;
- realistic: --num-stop-ids token ids stop a row (random weights sample near-uniform tokens, so lengths
  are roughly geometric with mean vocab / num_stop_ids), capped at --max-new-tokens.

Before each measured job a short warm-up job (the same settings, rows stopping after ~12 tokens)
compiles the Triton kernels, as a machine's first job does once (kernels are cached on disk after);
`--no-warmup` measures a cold start. Measured, through an `LLM` subclass that the job builds in place of `LLM` (RAAS_BATCH_ENGINE) and that
only watches the engine:
- job tokens/s (summary.json: completion tokens over the run's wall time) and decode tokens/s;
- ms per decode step: the mean wall time of the engine's decode steps (with overlapped decoding a
  step's wall time is the device's step period plus whatever the host could not hide);
- roofline of each decode step: (weight bytes + KV bytes the policy reads) / copy bandwidth measured in
  the same run. KV bytes read: every token held for dense; min(tokens, quota) for the bounded policies,
  plus the pages' key bounds for those that score pages (raas, raas-paper): every step, or, with RaaS's
  refresh once a page (kernels/window_refresh.py), once a page (1/P of them a step) plus the ring of
  queries it keeps (each row's query written every step and read back once). Logits and activations are
  left out (small at these shapes);
- a profile of a window of decode steps (torch.profiler, CUDA kernel time by category: attention,
  GEMMs, policy, sampler, norm/rotary/append, other) and the host gap (window wall time minus kernel
  time, per step);
- the decode-graph captures and every Triton kernel variant the job built (`kernel_builds`: kernel,
  seconds, its signature, constexprs and pointer alignments, through Triton's JIT hooks), and what the
  warm-up job built (`warm_up`), so a compile inside the measured job shows with its cause.
Writes bench_job[_<tag>].json / .md to $OUT (default benchmarks/results/). `--smoke` runs a tiny model
on the CPU through the same path (numbers meaningless) to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from raas_batch.llm import LLM

SHAPES = {  # Qwen2 family (DeepSeek-R1-Distill-Qwen): hidden, layers, q heads, kv heads, intermediate
    "1.5b": {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
             "intermediate_size": 8960, "tie_word_embeddings": False},
    "7b": {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
           "intermediate_size": 18944, "tie_word_embeddings": False},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "tie_word_embeddings": False},
}
MATMUL_FLOPS = 770e12  # bf16 matrix ceiling measured on the H200 (docs/gpu-notes.md)
CATEGORIES = [  # (category, regex on the kernel name), first match wins
    ("attention", r"_decode_stage|_prefill|flash|fmha|attention"),
    ("policy", r"_bounded_write|_bounded_update|_page_scores"),
    ("sampler", r"_sample_kernel"),
    ("norm_rotary_append", r"_rms|_rotary|_kv_append|norm|_silu_mul"),
    ("gemm", r"gemm|nvjet|sm90_xmma|cutlass|cublas|matmul|_gemv|splitK"),
]


# ------------------------------------------------------------------------------------------------
# Where the job's edges go: the product's functions that run before the first and after the last step
# ------------------------------------------------------------------------------------------------
# (module, attribute): wrapped for the benchmark's process only, to time each call
EDGE_FUNCTIONS = [
    ("raas_batch.runner", "load_engine"), ("raas_batch.shard_stream", "plan_shard"),
    ("raas_batch.llm_engine", "LLMEngine.prepare_many"), ("raas_batch.llm_engine", "decode_texts"),
    ("raas_batch.llm_engine", "fill_completion"), ("raas_batch.shard_stream", "write_shard_file"),
    ("raas_batch.shards", "write_shard"), ("raas_batch.data.writer", "rows_to_table"),
    ("raas_batch.data.writer", "pq.write_table"), ("raas_batch.data.writer", "file_sha256"),
    ("raas_batch.data.writer", "os.fsync"), ("raas_batch.runner", "write_summary"),
    # for the tail's timeline (`tail_timeline`): where the time after the last step goes between these
    ("raas_batch.shard_stream", "ShardStream._hand_back"), ("raas_batch.runner", "_LocalRun._write"),
    ("raas_batch.data.manifest", "Manifest.save"), ("raas_batch.runner", "JobProgress.close"),
    ("raas_batch.runner", "ThreadPoolExecutor.shutdown"), ("raas_batch.shards", "shard_stats"),
]
# watched over the whole job: a decode graph's capture (its eager warm-up step, which compiles any kernel
# the new shape needs, then the capture itself), whenever a step meets a new (batch bucket, table width)
# shape
CAPTURE_FUNCTIONS = [("raas_batch.engine.cuda_graph", "DecodeGraphs._capture"),
                     ("raas_batch.engine.cuda_graph", "DecodeGraphs._warm_up_once")]
EDGE_CALLS: list[tuple[str, float, float]] = []  # (name, start, end), perf_counter
GC_CALLS: list[tuple[int, float, float]] = []  # (generation, start, end) of every garbage collection, perf_counter
_GC_START: list[float] = []


def _gc_callback(phase: str, info: dict) -> None:
    if phase == "start":
        _GC_START[:] = [time.perf_counter()]
    elif _GC_START:
        GC_CALLS.append((info.get("generation", -1), _GC_START[0], time.perf_counter()))


def watch_gc() -> None:
    """Record every garbage collection (its generation and span) in GC_CALLS, once per process."""
    import gc

    if _gc_callback not in gc.callbacks:
        gc.callbacks.append(_gc_callback)


def gc_times(t_start: float, t_end: float) -> dict:
    """The collections between t_start and t_end: count and seconds by generation."""
    out: dict[str, list] = {}
    for gen, t0, t1 in GC_CALLS:
        if t_start <= t0 and t1 <= t_end:
            c = out.setdefault(f"gen{gen}", [0, 0.0])
            c[0] += 1
            c[1] += t1 - t0
    return {k: {"count": n, "s": round(sec, 4)} for k, (n, sec) in out.items()}


def tail_timeline(t_last: float, t_end: float) -> list:
    """The watched calls and the garbage collections of more than 1 ms after the last step, in order:
    [name, start, end] in seconds from the last step's end (what the edges' sums cannot show: the time
    between the calls)."""
    rows = [(t0 - t_last, t1 - t_last, name) for name, t0, t1 in EDGE_CALLS if t0 >= t_last]
    rows += [(t0 - t_last, t1 - t_last, f"gc gen{gen}") for gen, t0, t1 in GC_CALLS
             if t0 >= t_last and t1 - t0 > 1e-3]
    rows.append((t_end - t_last, t_end - t_last, "run_job returned"))
    return [[name, round(a, 4), round(b, 4)] for a, b, name in sorted(rows)]


def watch_edges() -> None:
    """Wrap EDGE_FUNCTIONS (once) so that every call appends (name, start, end) to EDGE_CALLS."""
    import functools
    import importlib

    for module, attr in EDGE_FUNCTIONS + (CAPTURE_FUNCTIONS if torch.cuda.is_available() else []):
        owner = importlib.import_module(module)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        fn = getattr(owner, name)
        if getattr(fn, "_edge_timed", False):
            continue

        label = f"{module.rsplit('.', 1)[-1]}.{attr}"

        def timed(*a, _fn=fn, _label=label, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                EDGE_CALLS.append((_label, t, time.perf_counter()))

        timed._edge_timed = True
        functools.update_wrapper(timed, fn)
        setattr(owner, name, timed)


def capture_times(t_start: float, t_end: float) -> dict:
    """The job's decode-graph captures between t_start and t_end: their count and seconds, and the seconds
    of their warm-up steps (each compiles what its new shape needs)."""
    caps = [(t0, t1) for name, t0, t1 in EDGE_CALLS if name.endswith("_capture") and t_start <= t0 and t1 <= t_end]
    warm = [t1 - t0 for name, t0, t1 in EDGE_CALLS if name.endswith("_warm_up_once") and t_start <= t0 and t1 <= t_end]
    return {"count": len(caps), "s": round(sum(t1 - t0 for t0, t1 in caps), 4),
            "max_s": round(max((t1 - t0 for t0, t1 in caps), default=0.0), 4),
            "warm_up_s": round(sum(warm), 4)}


COMPILES: list[tuple[str, float, float, str]] = []  # (kernel, start, end, what Triton shows of its arguments)
_COMPILE_HOOKS: list = []  # the (before, after) pair watch_compiles installed, once per process


def watch_compiles() -> None:
    """Record every Triton kernel variant the process builds (a miss of the kernel's in-memory cache:
    compiled, or loaded from the on-disk cache when that holds it), through Triton's JIT hooks (triton
    >= 3.4; older ones record nothing)."""
    import triton

    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_post_compile_hook") or _COMPILE_HOOKS:
        return
    started: dict[str, float] = {}

    def before(*, key, **_):
        started[str(key)] = time.perf_counter()

    def after(*, key, fn, compile=None, **_):
        t0 = started.pop(str(key), None)
        if t0 is not None:
            what = {k: str((compile or {}).get(k))[:3000] for k in ("signature", "constants", "configs")}
            COMPILES.append((getattr(fn, "name", "?"), t0, time.perf_counter(), json.dumps(what)))

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = before, after
    _COMPILE_HOOKS[:] = [before, after]


def compile_times(t_start: float, t_end: float) -> dict:
    """The kernel variants built between t_start and t_end: count, seconds, and each one's kernel and
    seconds (over ~0.1 s: compiled; under: loaded from Triton's on-disk cache)."""
    got = [(name, t1 - t0, what) for name, t0, t1, what in COMPILES if t_start <= t0 and t1 <= t_end]
    return {"count": len(got), "s": round(sum(s for _, s, _ in got), 4),
            "variants": [{"kernel": name, "s": round(s, 4), "args": what} for name, s, what in got]}


def edge_times(t_first: float, t_last: float) -> dict:
    """Seconds spent in each watched function before the first step starts and after the last ends."""
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    for name, t0, t1 in EDGE_CALLS:
        if t1 <= t_first:
            before[name] = before.get(name, 0.0) + t1 - t0
        elif t0 >= t_last:
            after[name] = after.get(name, 0.0) + t1 - t0
    return {"before_first_step": {k: round(v, 4) for k, v in before.items()},
            "after_last_step": {k: round(v, 4) for k, v in after.items()}}


# ------------------------------------------------------------------------------------------------
# The watcher: an LLM whose engine records every step (the job builds it through RAAS_BATCH_ENGINE)
# ------------------------------------------------------------------------------------------------
class WatchedLLM(LLM):
    """`LLM` plus a record of each engine step; the last one built is `WatchedLLM.last`."""

    last: WatchedLLM | None = None
    profile_at: int | None = None  # decode step at which a profiled window of `profile_steps` starts
    profile_steps: int = 8
    profile_first: str | None = None  # a path: the job's first engine step (a prefill) profiled, its tables there

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        WatchedLLM.last = self
        self.steps: list[dict] = []
        self.profile: dict | None = None
        engine, runner = self.engine, self.engine.runner
        policy = engine.policy
        quota_tokens = getattr(policy, "kv_budget", None)
        self._bounded = hasattr(policy, "sparse_pages")
        self._bounds = policy.name in ("raas", "raas-paper") and getattr(policy, "refresh_rule", "") != "mass"
        # the refresh once a page (kernels/window_refresh.py): the key bounds read once a page, the queries kept
        self._window = runner.window is not None
        self._budget = quota_tokens
        self._current: dict = {}
        self._last_end: float | None = None
        launch, prefill, step = runner.launch_decode, runner.prefill, engine.step

        def watched_launch(seqs, positions):
            held = [p + 1 for p in positions]  # tokens in the KV cache once this step appends
            if self._bounded:
                held = [min(h, max(self._budget, (len(s.prompt_token_ids) // policy.page_size + 2) * policy.page_size))
                        for h, s in zip(held, seqs)]
            self._current.update(kind="decode", rows=len(seqs), kv_tokens=sum(held))
            return launch(seqs, positions)

        def watched_prefill(seqs):
            self._current.update(kind="prefill", rows=len(seqs), prompt_tokens=sum(len(s.prompt_token_ids) for s in seqs))
            return prefill(seqs)

        def watched_step():
            decode_index = sum(1 for s in self.steps if s.get("kind") == "decode")
            if (self.profile is None and WatchedLLM.profile_at is not None and decode_index >= WatchedLLM.profile_at
                    and self.steps and self.steps[-1].get("kind") == "decode"):
                finished = self._profile_window(step)  # these steps are not in self.steps
                if finished:
                    return finished, 0
            self._current = {}
            first = not self.steps and WatchedLLM.profile_first
            t0 = time.perf_counter()
            out = step() if not first else self._profiled_first(step)
            t1 = time.perf_counter()
            # gap_s: host time between the previous step's return and this step's call (the runner loop,
            # the LLM engine's output handling); with overlapped decode the GPU runs meanwhile
            self._current.update(wall_s=t1 - t0, recorded=out[1], t_start=t0, t_end=t1,
                                 gap_s=t0 - self._last_end if self._last_end else 0.0)
            self._last_end = t1
            self.steps.append(self._current)
            return out

        engine.step = watched_step
        runner.launch_decode = watched_launch
        runner.prefill = watched_prefill

    def _profiled_first(self, step):
        """The job's first step (a prefill: admission, the prompts' forward, the first tokens) under torch.profiler,
        CPU and CUDA; its ops by device time and by host time go to `profile_first` (its wall counts the
        profiler's overhead: a diagnostic, not a figure)."""
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts) as prof:
            out = step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        table = prof.key_averages()
        device_key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        with open(WatchedLLM.profile_first, "w") as f:
            f.write(f"# the first step: {self._current}\n\n## by device time\n")
            f.write(table.table(sort_by=device_key, row_limit=40, max_name_column_width=70))
            f.write("\n\n## by host time (self)\n")
            f.write(table.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))
        return out

    def _profile_window(self, step) -> list:
        """Run `profile_steps` engine steps under torch.profiler; keep kernel time by category.
        -> the sequences that finished in them (the caller hands them on as one step's)."""
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        t_window = time.perf_counter()  # the profiler's own set-up and analysis count against the job
        sync()
        t0 = time.perf_counter()
        n = WatchedLLM.profile_steps
        finished = []
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                finished += step()[0]
            sync()
        wall = time.perf_counter() - t0
        self._current = {}
        cats: dict[str, float] = {c: 0.0 for c, _ in CATEGORIES}
        cats["other"] = 0.0
        kernels = []
        for ev in prof.key_averages():
            if cuda:
                t_us = getattr(ev, "self_device_time_total", None)
                if t_us is None:
                    t_us = getattr(ev, "self_cuda_time_total", 0.0)
            else:  # CPU (the smoke run): op time, to exercise this code
                t_us = ev.self_cpu_time_total
            if not t_us:
                continue
            name = ev.key
            cat = next((c for c, rx in CATEGORIES if re.search(rx, name, re.IGNORECASE)), "other")
            cats[cat] += t_us / 1e3
            kernels.append((t_us / 1e3, name[:90], cat, ev.count))
        kernel_ms = sum(cats.values())
        kernels.sort(reverse=True)
        # the profiler slows the host down: compare the kernels with the unprofiled steps just before
        before = sorted(s["wall_s"] for s in self.steps[-16:] if s.get("kind") == "decode") or [wall / n]
        step_ms = before[len(before) // 2] * 1e3
        self.profile = {
            "steps": n, "wall_ms_per_step": wall * 1e3 / n, "kernel_ms_per_step": kernel_ms / n,
            "unprofiled_step_ms": step_ms, "host_gap_ms_per_step": step_ms - kernel_ms / n,
            "by_category_ms_per_step": {c: v / n for c, v in cats.items()},
            "top_kernels": [{"ms_per_step": t / n, "name": nm, "category": c, "calls": k} for t, nm, c, k in kernels[:25]],
            "window_wall_s": time.perf_counter() - t_window,
        }
        if cuda:  # where the window left the GPU idle (trace_gaps.py)
            import tempfile

            from trace_gaps import load_trace, summarize

            with tempfile.TemporaryDirectory() as tmp:
                prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
                self.profile["gaps"] = summarize(load_trace(os.path.join(tmp, "trace.json")), num_steps=n)
            self.profile["window_wall_s"] = time.perf_counter() - t_window
        self._last_end = time.perf_counter()  # the next step's gap is the host's, not the window's
        return finished


# ------------------------------------------------------------------------------------------------
# Inputs: the model directory and the dataset
# ------------------------------------------------------------------------------------------------
def build_model_dir(shape: str, tokenizer_dir: str, work: str, device: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    path = os.path.join(work, f"model-{shape}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Qwen2Config(vocab_size=len(tok), max_position_embeddings=32768, rope_theta=1e6, torch_dtype="bfloat16",
                      initializer_range=0.02, **SHAPES[shape])
    cfg.eos_token_id = tok.eos_token_id
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jon"]
THINGS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards"]


def write_dataset(path: str, rows: int, seed: int = 0) -> None:
    """GSM8K-style chat rows (id, messages, answer) from a fixed template: prompts of ~60-90 tokens."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(rows):
            a, b, c = rng.randint(3, 90), rng.randint(2, 40), rng.randint(2, 9)
            n1, n2 = rng.sample(NAMES, 2)
            thing = rng.choice(THINGS)
            q = (f"{n1} has {a} {thing}. {n2} gives {n1} {b} more, and then {n1} shares them equally among "
                 f"{c} friends, keeping the remainder. How many {thing} does each friend get, and how many "
                 f"does {n1} keep? Think step by step and give the final answer in a box.")
            total = a + b
            f.write(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": q}],
                                "answer": f"{total // c} each, {total % c} kept"}) + "\n")


# ------------------------------------------------------------------------------------------------
# One job
# ------------------------------------------------------------------------------------------------
def copy_bandwidth(device: str) -> float:
    if device != "cuda":
        return 1e10
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del x, y
    torch.cuda.empty_cache()
    return 2 * 2 * 2**30 / sorted(times)[len(times) // 2]


def run_one(args, model_dir: str, data: str, policy: str, shard_size: int, bw: float, warmup: bool = False) -> dict:
    """One job; warmup: the same job with rows stopping after ~12 tokens, so that Triton compiles the
    kernels (same batch, same table widths) before the measured job, which then times decoding only."""
    from raas_batch.config import resolve
    from raas_batch.runner import run_job

    out = os.path.join(args.work, f"out-{policy}-{args.regime}-{shard_size}" + ("-warmup" if warmup else ""))
    shutil.rmtree(out, ignore_errors=True)
    flags = {"input": data, "output": out, "model": model_dir, "kv_policy": policy,
             "max_num_seqs": int(args.max_num_seqs) if args.max_num_seqs.isdigit() else args.max_num_seqs, "shard_size": shard_size, "max_new_tokens": args.max_new_tokens,
             "temperature": 0.6, "top_p": 0.95, "seed": 0, "quiet": True, "device": args.device,
             "batch_invariant": args.batch_invariant}
    if policy != "dense":
        flags["kv_budget"] = args.budget
    if warmup:
        flags["ignore_eos"] = True
        flags["stop_token_ids"] = random.Random(2).sample(range(1000, args.vocab), args.vocab // 12)
    elif args.regime == "fixed":
        flags["ignore_eos"] = True
    else:
        rng = random.Random(1)
        flags["stop_token_ids"] = rng.sample(range(1000, args.vocab), args.num_stop_ids)
        flags["ignore_eos"] = True  # the model's own EOS is one more random id: keep the mean as set
    cfg = resolve(flags)
    WatchedLLM.profile_at = None if warmup or args.profile_at < 0 else args.profile_at
    WatchedLLM.profile_first = (None if warmup or not args.profile_first
                                else os.path.join(results_dir(args.work if args.smoke else None), f"profile_first_step_{policy}.txt"))
    os.environ["RAAS_BATCH_ENGINE"] = "bench_job:WatchedLLM"
    watch_edges()
    watch_compiles()
    watch_gc()
    EDGE_CALLS.clear()
    GC_CALLS.clear()
    prof = None
    if args.cprofile and not warmup:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    summary = run_job(cfg)
    wall = time.perf_counter() - t0
    if prof is not None:
        prof.disable()
        save_cprofile(prof, os.path.join(results_dir(args.work if args.smoke else None), f"cprofile_{policy}.txt"))
    llm = WatchedLLM.last
    engine = llm.engine
    spec = engine.runner.model.spec
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    kv_per_token = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 2
    bounds_per_token = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 2 / engine.pool.page_size
    decode = [s for s in llm.steps if s.get("kind") == "decode"]
    prefill = [s for s in llm.steps if s.get("kind") == "prefill"]
    # the key bounds (1/P of K and V) every step, or with the refresh once a page a row's once a page (1/P of
    # the rows a step on average) plus its ring of queries (each row's query stored, and read back once)
    if llm._window:
        ring_per_row = spec.num_layers * spec.num_heads * spec.head_dim * 2 * 2
        kv_read = [s["kv_tokens"] * (kv_per_token + bounds_per_token / engine.pool.page_size)
                   + s["rows"] * ring_per_row for s in decode]
    else:
        kv_read = [s["kv_tokens"] * (kv_per_token + (bounds_per_token if llm._bounds else 0)) for s in decode]
    roof = [(weight_bytes + b) / bw for b in kv_read]
    # serial floor: attention at copy bandwidth, then the weight products at the larger of their bytes
    # and their FLOPs (2 per weight and row) at the matrix ceiling: GEMMs at batch 512 are FLOP-bound
    floor = [b / bw + max(weight_bytes / bw, 2 * (weight_bytes / 2) * s["rows"] / MATMUL_FLOPS)
             for b, s in zip(kv_read, decode)]
    times = sorted(s["wall_s"] for s in decode) or [0.0]
    median = times[len(times) // 2]
    slow = [t for t in times if t > 3 * median]
    dec_wall = sum(s["wall_s"] for s in decode)
    dec_tokens = sum(s["rows"] for s in decode)
    # the profiled window is the benchmark's, not the product's: the job's time without it counts its
    # steps at the median unprofiled step
    prof = llm.profile or {}
    window = prof.get("window_wall_s", 0.0)
    run_s = summary["completion_tokens"] / summary["tokens_per_s"] if summary.get("tokens_per_s") else wall
    unprofiled_s = run_s - window + prof.get("steps", 0) * median  # the job's own generation time, as its summary
    steps_s = sum(s["wall_s"] for s in llm.steps)
    gaps = sorted(s.get("gap_s", 0.0) for s in decode) or [0.0]
    res = {
        "policy": policy, "budget": args.budget if policy != "dense" else None, "regime": args.regime,
        "shard_size": shard_size, "rows": args.rows, "max_new_tokens": args.max_new_tokens,
        "max_num_seqs": engine.scheduler.max_num_seqs,
        "completion_tokens": summary["completion_tokens"], "job_wall_s": wall,
        "job_tokens_per_s": summary["tokens_per_s"], "summary_wall_s": summary["wall_time_s"],
        "profiler_window_s": window, "job_tokens_per_s_unprofiled": summary["completion_tokens"] / unprofiled_s,
        # the job's time outside engine steps and the profiled window: engine load, reading and
        # tokenising the rows, the writer's last shard and the manifest
        "outside_steps_s": wall - steps_s - window,
        "gaps_before_decode_steps_s": sum(gaps), "median_gap_ms": gaps[len(gaps) // 2] * 1e3,
        "max_gap_ms": gaps[-1] * 1e3,
        # the job's edges: from run_job's call to the first engine step (engine load, reading and
        # tokenising rows), and from the last step's return to run_job's (the last rows' outputs, the
        # shard file, the manifest and summary)
        "before_first_step_s": llm.steps[0]["t_start"] - t0 if llm.steps else None,
        "after_last_step_s": t0 + wall - llm.steps[-1]["t_end"] if llm.steps else None,
        "engine_load_s": summary.get("engine_load_s"),
        # the watched functions' time inside those edges (EDGE_FUNCTIONS; nested calls count in each)
        "edges": edge_times(llm.steps[0]["t_start"], llm.steps[-1]["t_end"]) if llm.steps else None,
        "tail_timeline": tail_timeline(llm.steps[-1]["t_end"], t0 + wall) if llm.steps else None,
        "gc": {"job": gc_times(t0, t0 + wall),
               **({"before_first_step": gc_times(t0, llm.steps[0]["t_start"]),
                   "steps": gc_times(llm.steps[0]["t_start"], llm.steps[-1]["t_end"]),
                   "after_last_step": gc_times(llm.steps[-1]["t_end"], t0 + wall)} if llm.steps else {})},
        "graph_captures": capture_times(t0, t0 + wall),
        "kernel_builds": compile_times(t0, t0 + wall),
        "decode_steps": len(decode), "prefill_steps": len(prefill),
        "prefill_s": sum(s["wall_s"] for s in prefill),
        # A decode step's period is its call's wall plus the host's gap before it: the engine launches
        # step n+1 and then waits for step n, so the runner's host work between two calls runs while the
        # device computes and the next call waits that much less. The call's wall alone under-counts the
        # device's time by the gaps (run 41: 0.33 ms a step); tokens/s and the ratios use the period.
        "ms_per_decode_step_wall": dec_wall / max(1, len(decode)) * 1e3,
        "decode_tokens_per_s": dec_tokens / (dec_wall + sum(gaps)) if dec_wall else 0.0,
        "mean_rows_per_decode_step": dec_tokens / max(1, len(decode)),
        "max_rows_per_decode_step": max((s["rows"] for s in decode), default=0),
        "ms_per_decode_step": (dec_wall + sum(gaps)) / max(1, len(decode)) * 1e3,
        "roofline_ms_per_decode_step": sum(roof) / max(1, len(roof)) * 1e3,
        "step_over_roofline": (dec_wall + sum(gaps)) / sum(roof) if roof else None,
        "serial_floor_ms_per_decode_step": sum(floor) / max(1, len(floor)) * 1e3,
        "step_over_serial_floor": (dec_wall + sum(gaps)) / sum(floor) if floor else None,
        "median_ms_per_decode_step": median * 1e3, "p90_ms_per_decode_step": times[int(len(times) * 0.9)] * 1e3,
        "slow_steps": len(slow), "slow_steps_s": sum(slow),
        "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_per_token, "copy_bandwidth_Bps": bw,
        "finish_reasons": summary.get("finish_reasons"), "profile": llm.profile,
        "refresh_placement": {"side": engine.runner.side is not None, "window": engine.runner.window is not None},
    }
    res["by_rows"] = by_rows(decode, roof)
    del llm, engine
    WatchedLLM.last = None
    import gc

    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    shutil.rmtree(out, ignore_errors=True)
    return res


ROW_BANDS = (64, 128, 256, 384, 512)  # a band holds the steps of more rows than the band before and at most this many


def by_rows(decode: list[dict], roof: list[float]) -> list[dict]:
    """Decode steps grouped by the rows they ran: how much of the decode time each band took and how far its steps
    were from their roofline. A realistic job's batch drains to its longest rows at the end; this says what the
    drain costs against the full batch."""
    total = sum(s["wall_s"] + s.get("gap_s", 0.0) for s in decode) or 1.0
    bands, lo = [], 0
    for hi in ROW_BANDS + (max((s["rows"] for s in decode), default=0),):
        if hi <= lo:
            continue
        idx = [i for i, s in enumerate(decode) if lo < s["rows"] <= hi]
        if idx:
            period = sum(decode[i]["wall_s"] + decode[i].get("gap_s", 0.0) for i in idx)
            gap = sum(decode[i].get("gap_s", 0.0) for i in idx)
            rows = sum(decode[i]["rows"] for i in idx)
            r = sum(roof[i] for i in idx)
            bands.append({"rows": f"{lo + 1}-{hi}", "steps": len(idx), "tokens": rows,
                          "share_of_decode_time": period / total, "mean_rows": rows / len(idx),
                          "ms_per_step": period / len(idx) * 1e3, "gap_ms_per_step": gap / len(idx) * 1e3,
                          "roofline_ms_per_step": r / len(idx) * 1e3, "step_over_roofline": period / r if r else None,
                          "tokens_per_s": rows / period if period else 0.0})
        lo = hi
    return bands


def rows_table(results: list[dict]) -> str:
    header = ("| policy | rows in the step | steps | tokens | share of decode time | ms a step (period) | of it, host gap ms | "
              "roofline ms | step/roof | tokens/s |")
    lines = [header, "| --- | --- |" + " ---: |" * 8]
    for r in results:
        name = r["policy"] + (f" L={r['budget']}" if r["budget"] else "") + (f" ({r['setting']})" if r.get("setting") else "")
        for b in r.get("by_rows") or []:
            lines.append(f"| {name} | {b['rows']} | {b['steps']} | {b['tokens']} | {100 * b['share_of_decode_time']:.1f}% | "
                         f"{b['ms_per_step']:.2f} | {b['gap_ms_per_step']:.2f} | {b['roofline_ms_per_step']:.2f} | "
                         f"{_f(b['step_over_roofline'])} | {b['tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def save_cprofile(prof, path: str, limit: int = 80) -> None:
    """The product's functions (raas_batch, kernels, pyarrow, tokenizers) by cumulative time, from a cProfile run."""
    import pstats

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository's files by their own path
    rows = [(ct, tt, nc, f"{f.split('site-packages/')[-1] if 'site-packages/' in f else os.path.relpath(f, root)}:{line}({name})")
            for (f, line, name), (_, nc, tt, ct, _) in pstats.Stats(prof).stats.items()
            if any(k in f for k in ("raas_batch", "kernels", "pyarrow", "tokenizers", "transformers"))]
    with open(path, "w") as f:
        f.write("cumulative_s  self_s  calls  function\n")
        f.writelines(f"{ct:10.3f} {tt:8.3f} {nc:7d}  {name}\n" for ct, tt, nc, name in sorted(rows, reverse=True)[:limit])


def results_dir(default: str | None = None) -> str:
    """Where a benchmark writes its tables: $OUT, else `default`, else benchmarks/results (created)."""
    out = os.environ.get("OUT") or default or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    return out


def save_results(out_dir: str, stem: str, payload, text: str | None = None) -> None:
    """`stem`.json (payload), and `stem`.md when `text` is given. Benchmarks call it after every case, so a
    run cut short by its time limit keeps what it measured."""
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(payload, f, indent=1)
    if text is not None:
        with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
            f.write(text + "\n")


def _f(value, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def table(results: list[dict]) -> str:
    header = ("| policy | regime | shards of | batch | tokens | job tok/s | job tok/s w/o profiler | decode tok/s | "
              "ms/step period (median call) | "
              "roofline ms | step/roof | serial floor ms | step/floor | attn | gemm | policy | sampler | "
              "norm+rot+app+act | other | host |")
    lines = [header, "| --- | --- |" + " ---: |" * 18]
    for r in results:
        name = r["policy"] + (f" L={r['budget']}" if r["budget"] else "") + (f" ({r['setting']})" if r.get("setting") else "")
        p = r.get("profile") or {}
        cat = p.get("by_category_ms_per_step", {})
        prof = " | ".join(f"{cat.get(c, 0):.2f}" for c in ("attention", "gemm", "policy", "sampler",
                                                          "norm_rotary_append", "other"))
        # host: what the unprofiled steps before the window take beyond the window's kernels per step
        gap = f"{p['host_gap_ms_per_step']:.2f}" if p else "-"
        if not p:
            prof = " | ".join(["-"] * 6)
        # the batch: max_num_seqs, and the most rows a step ran when the pages held fewer (dense at long lengths)
        batch = str(r["max_num_seqs"])
        if 0 < r.get("max_rows_per_decode_step", r["max_num_seqs"]) < r["max_num_seqs"]:
            batch += f" ({r['max_rows_per_decode_step']} ran)"
        lines.append(f"| {name} | {r['regime']} | {r['shard_size']} | {batch} | {r['completion_tokens']} | "
                     f"{r['job_tokens_per_s']:.0f} | {_f(r.get('job_tokens_per_s_unprofiled'), '.0f')} | {r['decode_tokens_per_s']:.0f} | {r['ms_per_decode_step']:.2f} "
                     f"({r['median_ms_per_decode_step']:.2f}) | {r['roofline_ms_per_decode_step']:.2f} | "
                     f"{_f(r['step_over_roofline'])} | {r['serial_floor_ms_per_decode_step']:.2f} | "
                     f"{_f(r['step_over_serial_floor'])} | {prof} | {gap} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.modules.setdefault("bench_job", sys.modules[__name__])  # RAAS_BATCH_ENGINE imports this very module
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1.5b", choices=sorted(SHAPES))
    ap.add_argument("--policies", default="dense,raas", help="comma list; an entry POLICY+NAME=VALUE runs that "
                    "policy's jobs with that environment setting (an A/B in one run)")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=6144)
    ap.add_argument("--regime", default="fixed", choices=["fixed", "realistic"])
    ap.add_argument("--num-stop-ids", type=int, default=16)
    ap.add_argument("--shard-size", default="512", help="comma list: one job per shard size")
    ap.add_argument("--max-num-seqs", default="512")
    ap.add_argument("--profile-at", type=int, default=600, help="decode step where the profiled window starts "
                    "(-1: none, so job tokens/s is the product's alone, without the window's correction; the "
                    "table's kernel columns are then empty)")
    ap.add_argument("--profile-first", action="store_true", help="profile each measured job's first step (a "
                    "prefill) with torch.profiler: profile_first_step_<policy>.txt in the results folder")
    ap.add_argument("--cprofile", action="store_true", help="each measured job under cProfile: the product's "
                    "functions by cumulative time in cprofile_<policy>.txt (a diagnostic: it slows the host)")
    ap.add_argument("--tokenizer", default=".gpu_assets/tok")
    ap.add_argument("--work", default="/tmp/raas_bench")
    ap.add_argument("--tag", default="")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few rows, on the CPU")
    ap.add_argument("--batch-invariant", action="store_true", help="the jobs run with --batch-invariant")
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="before each measured job, a short one that compiles the Triton kernels")
    args = ap.parse_args()
    if args.smoke:
        args.shape, args.rows, args.max_new_tokens, args.device = "tiny", 6, 24, "cpu"
        args.budget, args.work = 64, args.work + "-smoke"
        args.profile_at = 3 if args.profile_at >= 0 else -1
        WatchedLLM.profile_steps = 3
    os.makedirs(args.work, exist_ok=True)
    out_dir = results_dir(args.work if args.smoke else None)
    bw = copy_bandwidth(args.device)
    model_dir = build_model_dir(args.shape, args.tokenizer, args.work, args.device)
    from transformers import AutoConfig

    args.vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    data = os.path.join(args.work, f"rows-{args.rows}.jsonl")
    write_dataset(data, args.rows)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; model {model_dir}; {args.rows} rows", flush=True)
    results = []
    stem = "bench_job" + (f"_{args.tag}" if args.tag else "")
    for entry in args.policies.split(","):
        # "raas+NAME=VALUE": the policy's jobs (warm-up included) with that environment setting, e.g. an A/B of
        # RAAS_BATCH_REFRESH_WINDOW inside one run
        policy, _, setting = entry.partition("+")
        env_name, _, env_value = setting.partition("=")
        saved = os.environ.get(env_name) if env_name else None
        if env_name:
            os.environ[env_name] = env_value
        for shard_size in (int(s) for s in args.shard_size.split(",")):
            w = None
            if args.warmup:
                t = time.perf_counter()
                w = run_one(args, model_dir, data, policy, shard_size, bw, warmup=True)
                print(f"warm-up job ({policy}): {time.perf_counter() - t:.1f} s, largest decode batch "
                      f"{w['max_rows_per_decode_step']}, {w['kernel_builds']['count']} kernel variants built in "
                      f"{w['kernel_builds']['s']:.1f} s", flush=True)
            r = run_one(args, model_dir, data, policy, shard_size, bw)
            r["setting"] = setting or None
            if w is not None:  # what the warm-up built, to compare with what the measured job still had to
                r["warm_up"] = {"max_rows_per_decode_step": w["max_rows_per_decode_step"],
                                "kernel_builds": w["kernel_builds"]}
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "profile"}), flush=True)
            print("edges", json.dumps(r.get("edges")), flush=True)
            print("graph captures", json.dumps(r.get("graph_captures")), flush=True)
            print("gc", json.dumps(r.get("gc")), flush=True)
            print("tail", json.dumps(r.get("tail_timeline")), flush=True)
            builds = r.get("kernel_builds") or {}
            print("kernel builds", builds.get("count"), builds.get("s"),
                  [(v["kernel"], v["s"]) for v in builds.get("variants", [])], flush=True)
            if r.get("profile"):
                print(json.dumps(r["profile"]["by_category_ms_per_step"]), "host gap",
                      round(r["profile"]["host_gap_ms_per_step"], 3), flush=True)
            save_results(out_dir, stem, {"shape": args.shape, "args": vars(args), "results": results})
        if env_name and saved is None:
            del os.environ[env_name]
        elif env_name:
            os.environ[env_name] = saved
    text = (f"# Job benchmark: {args.shape} shape, {args.rows} rows, {args.regime} lengths (max {args.max_new_tokens}), "
            f"copy bandwidth {bw / 1e12:.2f} TB/s\n\n" + table(results)
            + "\n## Decode steps by the rows they ran (a step's period: its call plus the host's gap before it)\n\n"
            + rows_table(results))
    print(text)
    save_results(out_dir, stem, {"shape": args.shape, "args": vars(args), "results": results}, text)


if __name__ == "__main__":
    main()
