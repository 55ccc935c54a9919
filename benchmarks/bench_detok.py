"""Decoding the texts of long rows: what the request core (`raas_batch.llm_engine`) pays for it, on the
host, when every row of a fixed-length job finishes in the same step.

    python benchmarks/bench_detok.py [--rows 512] [--tokens 6144] [--tokenizer DIR] [--smoke]

Random token ids (the embedded SmolLM2 tokenizer unless --tokenizer), grown one token a row per
simulated step. Measured:
- at the finish, every text decoded whole: one by one (`tokenizer.decode`), and in one parallel batch
  (`decode_texts` on rows that never had their texts extended);
- decoded while the rows run (`advance_texts` on 1/TEXT_PERIOD_STEPS of the rows a step): the host's
  time per step when it runs on the step loop itself, and when the request core hands it to its
  worker thread (`LLMEngine._advance_some_texts`, each step followed by --step-ms of sleep standing
  for the device's step); then what is left to decode at the finish. Every text is checked against
  `tokenizer.decode`;
- whether `decode_batch` releases the GIL: a pure-Python loop's time alone and beside a thread that
  runs decode_batch (the worker thread's premise).
Prints and saves bench_detok.md / .json to $OUT (default benchmarks/results/). Batch figures scale
with the machine's cores: on the H200 machine (16 cores) `decode_batch` of a few rows took ~1 ms a
step on the step loop (docs/gpu-notes.md, run 57), more than on this 2-core one.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_job import results_dir, save_results

from raas_batch.engine.sequence import Sequence
from raas_batch.llm_engine import TEXT_PERIOD_STEPS, LLMEngine, advance_texts, decode_texts, text_backend
from raas_batch.sampling_params import SamplingParams


def new_rows(n: int) -> list[Sequence]:
    return [Sequence(request_idx=i, sample_idx=0, prompt_token_ids=[1], params=SamplingParams(), seed_key=0, seed=0,
                     max_new_tokens=10**9) for i in range(n)]


def grow(rows: list[Sequence], ids: list[list[int]], step_fn, step_s: float) -> tuple[float, float]:
    """Append token t to every row, then call step_fn (timed), for every t -> (mean, max) seconds of step_fn."""
    total = worst = 0.0
    for t in range(len(ids[0])):
        for s, row in zip(rows, ids):
            s.output_token_ids.append(row[t])
        t0 = time.perf_counter()
        step_fn()
        dt = time.perf_counter() - t0
        total, worst = total + dt, max(worst, dt)
        if step_s:
            time.sleep(step_s)
    return total / len(ids[0]), worst


def python_loop(n: int = 2_000_000) -> float:
    t = time.perf_counter()
    x = 0
    for i in range(n):
        x += i
    return time.perf_counter() - t


def load_tokenizer(path: str | None):
    """The tokenizer saved in `path`, or the embedded SmolLM2's (from its GGUF file) when None."""
    from transformers import AutoTokenizer

    if path:
        return AutoTokenizer.from_pretrained(path)
    from raas_batch.models.loader import embedded_gguf_path

    gguf = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=6144)
    ap.add_argument("--step-ms", type=float, default=0.5, help="sleep after each simulated step (worker mode)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--smoke", action="store_true", help="16 rows x 400 tokens")
    args = ap.parse_args()
    if args.smoke:
        args.rows, args.tokens = 16, 400
    tok = load_tokenizer(args.tokenizer)
    rng = random.Random(0)
    ids = [[rng.randrange(len(tok)) for _ in range(args.tokens)] for _ in range(args.rows)]
    want = [tok.decode(row, skip_special_tokens=True) for row in ids[:1]]  # warm the tokenizer

    # at the finish, whole
    t = time.perf_counter()
    want = [tok.decode(row, skip_special_tokens=True) for row in ids]
    one_s = time.perf_counter() - t
    rows = new_rows(args.rows)
    for s, row in zip(rows, ids):
        s.output_token_ids = list(row)
    t = time.perf_counter()
    texts = decode_texts(tok, rows)
    batch_s = time.perf_counter() - t
    assert [texts[id(s)] for s in rows] == want

    # while running: on the step loop, then on the request core's worker thread
    backend = text_backend(tok)
    rows = new_rows(args.rows)
    cursor = [0]

    def on_loop():
        count = -(-len(rows) // TEXT_PERIOD_STEPS)
        start = cursor[0] % len(rows)
        cursor[0] = start + count
        advance_texts(backend, (rows[start:] + rows[:start])[:count])

    loop_mean, loop_max = grow(rows, ids, on_loop, 0.0)
    t = time.perf_counter()
    texts = decode_texts(tok, rows)
    loop_finish_s = time.perf_counter() - t
    assert [texts[id(s)] for s in rows] == want
    rows = new_rows(args.rows)
    core = LLMEngine(SimpleNamespace(scheduler=SimpleNamespace(running=rows, waiting=[])), tok,
                     max_model_len=10**9, seed_key=lambda seed, j: 0)
    worker_mean, worker_max = grow(rows, ids, core._advance_some_texts, args.step_ms / 1e3)
    if core._text_job is not None:
        core._text_job.result()
    left = max(len(s.output_token_ids) - s.text_upto for s in rows)
    t = time.perf_counter()
    texts = decode_texts(tok, rows)
    worker_finish_s = time.perf_counter() - t
    assert [texts[id(s)] for s in rows] == want

    # the GIL: a Python loop alone, then beside a decode_batch thread
    alone = python_loop()
    th = threading.Thread(target=lambda: backend.decode_batch(ids, skip_special_tokens=True))
    th.start()
    beside = python_loop()
    th.join()

    res = {"rows": args.rows, "tokens": args.tokens, "cores": os.cpu_count(), "one_by_one_s": one_s,
           "batch_s": batch_s, "on_loop_ms_per_step": loop_mean * 1e3, "on_loop_max_ms": loop_max * 1e3,
           "on_loop_finish_s": loop_finish_s, "worker_ms_per_step": worker_mean * 1e3,
           "worker_max_ms": worker_max * 1e3, "worker_finish_s": worker_finish_s, "tokens_left_at_finish": left,
           "python_loop_alone_s": alone, "python_loop_beside_decode_batch_s": beside}
    text = (f"# Decoding {args.rows} rows x {args.tokens} tokens ({os.cpu_count()} cores)\n\n"
            "At the finish, every text whole:\n\n| one by one s | one batch s |\n| ---: | ---: |\n"
            f"| {one_s:.3f} | {batch_s:.3f} |\n\n"
            f"While the rows run (1/{TEXT_PERIOD_STEPS} of them a step), host time per step and what is left "
            "at the finish:\n\n| where | mean ms a step | max ms | finish s | tokens left a row |\n"
            "| --- | ---: | ---: | ---: | ---: |\n"
            f"| on the step loop | {loop_mean * 1e3:.3f} | {loop_max * 1e3:.2f} | {loop_finish_s:.3f} | |\n"
            f"| worker thread (step {args.step_ms} ms) | {worker_mean * 1e3:.3f} | {worker_max * 1e3:.2f} | "
            f"{worker_finish_s:.3f} | {left} |\n\n"
            f"A Python loop alone {alone:.3f} s, beside a decode_batch thread {beside:.3f} s "
            "(about equal: decode_batch releases the GIL).")
    print(text)
    save_results(results_dir(), "bench_detok_smoke" if args.smoke else "bench_detok", res, text)


if __name__ == "__main__":
    main()
