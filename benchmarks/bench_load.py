"""Loading a model directory: what a job pays before its first step (the job benchmark's engine load).

    python benchmarks/bench_load.py [--shape 1.5b] [--tokenizer DIR] [--repeats 3] [--smoke]

Writes a random-weight Qwen2 directory of --shape (bf16 safetensors and the tokenizer of --tokenizer, by
default the embedded SmolLM2's; benchmarks/bench_job.py's `build_model_dir`), then times
`raas_batch.models.loader.load_model` on it, alternating (best of --repeats each, the files in the page cache
after the first read):
- the product: the tokenizer loaded on a thread beside the weights, the weights sent through pinned buffers
  by LOAD_THREADS threads (`copy_weights`);
- one at a time (RAAS_BATCH_LOAD_THREADS=0: each tensor copied from the memory-mapped file, as up to run 98);
- the tokenizer alone, and the weights' bytes over the time, for scale.
Both ways must load the same parameters (checked first; on the CPU both copy one tensor at a time).
Prints and saves bench_load.md / .json to $OUT (default benchmarks/results/). --smoke: the tiny shape on the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from bench_job import build_model_dir, results_dir, save_results

from raas_batch.models import loader


def timed_load(model_dir: str, device: torch.device, threads: int | None, keep: bool = False):
    """One load_model call with RAAS_BATCH_LOAD_THREADS=threads (None: the default) -> (seconds, the weights' bytes,
    the model when keep)."""
    saved = os.environ.pop("RAAS_BATCH_LOAD_THREADS", None)
    if threads is not None:
        os.environ["RAAS_BATCH_LOAD_THREADS"] = str(threads)
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        net = loader.load_model(model_dir, torch.bfloat16, device).model
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
    finally:
        os.environ.pop("RAAS_BATCH_LOAD_THREADS", None)
        if saved is not None:
            os.environ["RAAS_BATCH_LOAD_THREADS"] = saved
    size = sum(p.numel() * p.element_size() for p in net.parameters())
    if keep:
        return dt, size, net
    del net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dt, size, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1.5b")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: the embedded SmolLM2's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=None, help="where the model directory goes (default: a temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="the tiny shape on the CPU")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    shape = "tiny" if args.smoke else args.shape
    work = args.work or tempfile.mkdtemp(prefix="raas-bench-load-")
    tok_dir = args.tokenizer
    if tok_dir is None:
        from bench_detok import load_tokenizer

        tok_dir = os.path.join(work, "tok")
        load_tokenizer(None).save_pretrained(tok_dir)
    model_dir = build_model_dir(shape, tok_dir, work, device.type)
    from transformers import AutoTokenizer

    variants = {"product (tokenizer beside, staged weights)": None, "one at a time (RAAS_BATCH_LOAD_THREADS=0)": 0}
    best = {name: float("inf") for name in variants}
    size = 0
    # first reads (the files into the page cache, CUDA's context): both ways must give the same parameters
    _, _, product = timed_load(model_dir, device, None, keep=True)
    _, _, plain = timed_load(model_dir, device, 0, keep=True)
    theirs = dict(plain.named_parameters())
    same = all(torch.equal(p, theirs[n]) for n, p in product.named_parameters())
    assert same, "the staged load gave other weights than the one-at-a-time load"
    del product, plain, theirs
    for _ in range(args.repeats):
        for name, threads in variants.items():
            dt, size, _ = timed_load(model_dir, device, threads)
            best[name] = min(best[name], dt)
    tok_s = float("inf")
    for _ in range(args.repeats):
        t = time.perf_counter()
        AutoTokenizer.from_pretrained(model_dir)
        tok_s = min(tok_s, time.perf_counter() - t)
    rows = [{"variant": name, "s": s, "weights_GB_per_s": size / s / 1e9} for name, s in best.items()]
    rows.append({"variant": "the tokenizer alone", "s": tok_s, "weights_GB_per_s": float("nan")})
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    text = (f"# Loading a {shape} model directory ({size / 1e9:.2f} GB of bf16 weights) onto {name}\n\n"
            f"`python benchmarks/bench_load.py{' --smoke' if args.smoke else ''}`: load_model, best of {args.repeats}, "
            f"the files in the page cache; LOAD_THREADS={loader.LOAD_THREADS}, "
            f"{loader.STAGE_BYTES >> 20} MiB buffers.\n\n| variant | s | weights GB/s |\n| --- | ---: | ---: |\n")
    text += "".join(f"| {r['variant']} | {r['s']:.3f} | {r['weights_GB_per_s']:.1f} |\n" for r in rows)
    print(text, flush=True)
    save_results(results_dir(), "bench_load" + ("_smoke" if args.smoke else ""),
                 {"shape": shape, "device": name, "weight_bytes": size, "same_weights": same, "rows": rows}, text)


if __name__ == "__main__":
    main()
