"""The batch-invariant product (`kernels/matmul.py`, used by `LLM(batch_invariant=True)`) against cuBLAS
(`F.linear`) on the weight products of the 1.5B and 7B shapes, for its per-shape choice
(`config_for(M, N, K)`, "auto") and a sweep of tile and split configurations.

    python benchmarks/bench_matmul.py            # GPU: bf16, rows 1 / 64 / 512 (the sweep at 512)
    python benchmarks/bench_matmul.py --smoke    # CPU, Triton interpreter, tiny sizes (checks the script)

Every product is timed as a CUDA graph of 10 launches (the engine's decode runs in graphs, so launch
overhead is not the product's). Every configuration is checked for the invariance the switch promises
(rows computed alone, in a slice across tiles and in the whole batch are bit-identical), and at 512 rows
against the auto configuration ("same bits as auto": run 29 found that tile shapes, warps and stages never
change the result when BLOCK_K and the split are equal, which lets the tiles follow M). Prints and saves bench_matmul.md / .json to $OUT (default
benchmarks/results/).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_job import results_dir, save_results
from raas_batch.kernels.matmul import Config, config_for, matmul

# (name, N, K, uses per decode step) at the DeepSeek-R1-Distill-Qwen-1.5B shape (hidden 1536, 12 + 2 x 2
# heads of 128, intermediate 8960, 28 layers, vocabulary 49,152 as with SmolLM2's tokenizer) and the
# Qwen2-7B shape (hidden 3584, 28 + 2 x 4 heads, intermediate 18944, 28 layers)
SHAPES = {"1.5b": [("qkv", 2048, 1536, 28), ("o", 1536, 1536, 28), ("gate_up", 17920, 1536, 28),
                   ("down", 1536, 8960, 28), ("lm_head", 49152, 1536, 1)],
          "7b": [("qkv", 4608, 3584, 28), ("o", 3584, 3584, 28), ("gate_up", 37888, 3584, 28),
                 ("down", 3584, 18944, 28), ("lm_head", 49152, 3584, 1)]}
TILES = [(64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 3),
         (128, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)]
SPLITS = [1, 2, 4, 8]


def timed(reps: int, fn, *args, **kwargs) -> float:
    """ms per fn(*args, **kwargs): a CUDA graph of 10 calls replayed `reps` times (wall clock on the CPU)."""
    fn = functools.partial(fn, *args, **kwargs)
    fn()
    if not torch.cuda.is_available():
        import time

        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e3
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps / 10


def invariant(x, w, full, cfg) -> bool:
    M = x.shape[0]
    picks = [[0], [M - 1], list(range(M // 3, M))]
    return all(torch.equal(matmul(x[r], w, config=cfg), full[r]) for r in picks)


def name(cfg: Config) -> str:
    return f"{cfg.bm}x{cfg.bn}x{cfg.bk} w{cfg.warps} s{cfg.stages} split{cfg.split}"


def bits_check(results: list[dict]) -> str:
    """What decides a product's bits: of the swept configurations with the auto configuration's split,
    how many gave its bits exactly (tiles, warps and stages differ); of those with another split, how
    many gave other bits. The kernel's claim (kernels/matmul.py) is that the first count is all of them."""
    same = [v["same_bits_as_auto"] for r in results for k, v in r.get("sweep", {}).items()
            if "error" not in v and k.split("split")[1] == r["auto"].split("split")[1]]
    other = [not v["same_bits_as_auto"] for r in results for k, v in r.get("sweep", {}).items()
             if "error" not in v and k.split("split")[1] != r["auto"].split("split")[1]]
    return (f"Bits: {sum(same)} of {len(same)} swept configurations with the auto split gave the auto "
            f"configuration's bits; {sum(other)} of {len(other)} with another split gave other bits.")


FORMS = ["F.linear (x W^T)", "x @ W^T stored (N-major copy)", "cuBLASLt: F.linear", "cuBLASLt: x @ W^T stored",
         "no reduced-precision split: F.linear", "two products, N halves", "two products, M halves"]


def form_calls(form: str, x, w, wt):
    """(the call timed, a call giving the whole [M, N] product) of one form. The split forms are what a
    layer could run instead of one product: N halves as two outputs (gate and up apart, for a two-input
    SiLU-multiply), M halves written into the two row halves of one output (no copy)."""
    if form == "two products, N halves":
        n = w.shape[0] // 2
        halves = (w[:n], w[n:])
        def split():
            return [torch.nn.functional.linear(x, h) for h in halves]
        return split, lambda: torch.cat(split(), dim=1)
    if form == "two products, M halves":
        m = x.shape[0] // 2
        out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)

        def rows():
            torch.mm(x[:m], w.t(), out=out[:m])
            torch.mm(x[m:], w.t(), out=out[m:])
            return out
        return rows, rows
    fn = (functools.partial(torch.matmul, x, wt) if "stored" in form
          else functools.partial(torch.nn.functional.linear, x, w))
    return fn, fn


def cublas_forms(shapes, M: int, reps: int, dev, dtype) -> str:
    """The decode step's products at M rows through the cuBLAS call forms torch offers (layout of the
    weight, cuBLAS or cuBLASLt, bf16 reduced-precision reductions allowed or not): which kernel a form
    gets decides its speed at these small-K shapes. -> a markdown table (ms per product, x uses per step)."""
    back = torch.backends.cuda
    gen = torch.Generator().manual_seed(0)
    lines = ["| model | product | M | " + " | ".join(FORMS) + " |", "| --- | --- | ---: |" + " ---: |" * len(FORMS)]
    step = {}  # (model, form) -> ms of one decode step's products
    for model, prod, N, K, uses in shapes:
        w = (torch.randn(N, K, generator=gen) * 0.02).to(dev, dtype)
        wt = w.t().contiguous()  # [K, N]
        x = torch.randn(M, K, generator=gen).to(dev, dtype)
        ref = torch.nn.functional.linear(x, w).float()
        cells = []
        for form in FORMS:
            lib = back.preferred_blas_library()
            red = back.matmul.allow_bf16_reduced_precision_reduction
            try:
                if form.startswith("cuBLASLt"):
                    back.preferred_blas_library("cublaslt")
                if form.startswith("no reduced"):
                    back.matmul.allow_bf16_reduced_precision_reduction = False
                fn, whole = form_calls(form, x, w, wt)
                err = float((whole().float() - ref).abs().max() / ref.abs().max())
                ms = timed(reps, fn)
                cells.append(f"{ms * 1e3:.1f} us" + ("" if err < 2e-2 else f" (err {err:.2g})"))
                step[model, form] = step.get((model, form), 0.0) + ms * uses
            except Exception as exc:  # noqa: BLE001 - a form this torch build lacks
                cells.append(f"n/a ({type(exc).__name__})")
            finally:
                back.preferred_blas_library(lib)
                back.matmul.allow_bf16_reduced_precision_reduction = red
        lines.append(f"| {model} | {prod} | {M} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    for model in dict.fromkeys(m for m, *_ in shapes):
        lines.append(f"| {model}: one step's products | | {M} | "
                     + " | ".join(f"{step.get((model, f), float('nan')):.3f} ms" for f in FORMS) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--forms", action="store_true", help="only the cuBLAS call forms of the products, at --rows")
    ap.add_argument("--rows", default="1,64,512")
    ap.add_argument("--shapes", default="1.5b,7b")
    ap.add_argument("--sweep-rows", default="512", help="comma list of row counts to sweep at")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    shapes = [(s, *p) for s in args.shapes.split(",") for p in SHAPES[s]]
    tiles, splits, reps, rows = TILES, SPLITS, args.reps, [int(m) for m in args.rows.split(",")]
    if args.smoke:
        shapes, tiles, splits, reps, rows = [("tiny", "p", 96, 256, 1)], TILES[:1], [1, 2], 1, [5, 40]
        args.sweep_rows = "40"
    sweep_rows = {int(m) for m in args.sweep_rows.split(",")}
    if args.forms:
        text = "\n\n".join(cublas_forms(shapes, M, reps, dev, dtype) for M in rows)
        text = f"# The step's products through cuBLAS call forms ({dev}, {dtype}; CUDA graphs of 10 launches)\n\n{text}"
        print(text)
        save_results(results_dir(), "bench_matmul_forms" + ("_smoke" if args.smoke else ""), {"text": text}, text)
        return
    gen = torch.Generator().manual_seed(0)
    results, summary = [], []
    for model, prod, N, K, uses in shapes:
        w = (torch.randn(N, K, generator=gen) * 0.02).to(dev, dtype)
        for M in rows:
            auto = config_for(M, N, K)
            x = torch.randn(M, K, generator=gen).to(dev, dtype)
            ref = matmul(x, w, config=auto)
            row = {"model": model, "product": prod, "M": M, "N": N, "K": K, "uses": uses,
                   "cublas_ms": timed(reps, torch.nn.functional.linear, x, w),
                   "auto": name(auto), "auto_ms": timed(reps, matmul, x, w, config=auto),
                   "auto_invariant": invariant(x, w, ref, auto),
                   "auto_close": bool(torch.allclose(ref.float(), torch.nn.functional.linear(x, w).float(),
                                                     rtol=2e-2, atol=2e-2))}
            if M in sweep_rows:
                sweep = {}
                for bm, bn, bk, warps, stages in tiles:
                    for split in splits:
                        if split > 1 and K // split < 512:
                            continue
                        cfg = Config(bm, bn, bk, warps, stages, split)
                        try:
                            out = matmul(x, w, config=cfg)
                            sweep[name(cfg)] = {"ms": timed(reps, matmul, x, w, config=cfg),
                                                "invariant": invariant(x, w, out, cfg),
                                                "same_bits_as_auto": bool(torch.equal(out, ref))}
                        except Exception as exc:  # noqa: BLE001 - a configuration that does not fit (shared memory)
                            sweep[name(cfg)] = {"error": f"{type(exc).__name__}: {str(exc)[:80]}"}
                ok = {k: v for k, v in sweep.items() if v.get("invariant")}
                best = min(ok, key=lambda k: ok[k]["ms"]) if ok else None
                row.update(sweep=sweep, best=best, best_ms=ok[best]["ms"] if best else None)
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "sweep"}), flush=True)
    lines = ["| model | product | M | cuBLAS ms | auto config | auto ms | auto / cuBLAS | invariant | best of sweep | best ms |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | --- | --- | ---: |"]
    for r in results:
        lines.append(f"| {r['model']} | {r['product']} | {r['M']} | {r['cublas_ms']:.4f} | {r['auto']} | "
                     f"{r['auto_ms']:.4f} | {r['auto_ms'] / r['cublas_ms']:.2f} | {r['auto_invariant']} | "
                     f"{r.get('best') or ''} | {r['best_ms']:.4f} |" if r.get("best_ms") else
                     f"| {r['model']} | {r['product']} | {r['M']} | {r['cublas_ms']:.4f} | {r['auto']} | "
                     f"{r['auto_ms']:.4f} | {r['auto_ms'] / r['cublas_ms']:.2f} | {r['auto_invariant']} | | |")
    for model in {r["model"] for r in results}:  # one decode step's products
        for M in rows:
            rs = [r for r in results if r["model"] == model and r["M"] == M]
            cub = sum(r["cublas_ms"] * r["uses"] for r in rs)
            auto = sum(r["auto_ms"] * r["uses"] for r in rs)
            best = sum((r.get("best_ms") or r["auto_ms"]) * r["uses"] for r in rs)
            summary.append(f"- {model}, {M} rows, one step's products: cuBLAS {cub:.3f} ms, auto {auto:.3f} ms "
                           f"({auto / cub:.2f}x), best of sweep {best:.3f} ms ({best / cub:.2f}x)")
    text = (f"# Batch-invariant matmul vs cuBLAS ({dev}, {dtype}; CUDA graphs of 10 launches)\n\n" + "\n".join(lines)
            + "\n\n" + "\n".join(summary) + "\n\n" + bits_check(results))
    print(text)
    save_results(results_dir(), "bench_matmul" + ("_smoke" if args.smoke else ""), results, text)


if __name__ == "__main__":
    main()
