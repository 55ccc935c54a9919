"""Check and time the Triton kernel ops on a GPU (H200): one run, results kept as files.

What it does, in order (about 1-2 minutes on an H200):
1. Device copy bandwidth: a large device-to-device copy, bytes read + written / time (the ceiling).
2. Correctness at real sizes (bf16): every Triton op against its torch reference (relative error
   ||out - ref|| / ||ref||, per-page mass too; page_scores also by top-k score sums; kv_append
   bit-exact), and paged_decode_attention captured in a CUDA graph and replayed (proves no host sync).
3. paged_decode_attention timing (triton.testing.do_bench, median, L2 flushed between calls) for
   batch x budget in {64,128,256} x {512,1024,2048,4096} tokens, Hq=28, Hkv=4, D=128, P=16, pages
   scattered at random in a large pool; with and without the mass output. Achieved bandwidth over the
   bytes the op must move (K+V of the listed pages + q + out), as a share of copy bandwidth; torch
   SDPA dense decode over the same number of contiguous tokens for comparison (same GQA shape: the
   G query heads of a KV head are SDPA's query rows, so nothing is expanded).
4. A small sweep of the decode launch parameters (num_splits, warps / stages / pages per tile).
5. page_scores and kv_append timing.
Prints markdown tables and writes bench_kernels.{json,csv,md} to $OUT, else benchmarks/results/.

`--smoke`: tiny sizes; without CUDA it runs the kernels in the Triton interpreter and times with a
CPU clock, to check on a CPU machine that the script and its checking code work.

Papers: FlashDecoding (https://crfm.stanford.edu/2023/10/12/flashdecoding.html), Quest
(arXiv 2406.10774), RaaS (arXiv 2502.11147).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU: Triton interpreter)")
    ap.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/results)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the launch-parameter sweep")
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.smoke and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import triton
import triton.testing

try:
    from raas_batch.kernels import ops as kops
    from raas_batch.kernels import reference as ref
except ImportError:  # editable install without the raas_batch.kernels mapping: use the source tree
    sys.path.insert(0, str(ROOT))
    from kernels import ops as kops
    from kernels import reference as ref

TRI = kops.get_ops("triton")
DEC = sys.modules[TRI.paged_decode_attention.__module__]
CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")

# relative-error tolerances of the checks (same figures as tests/test_kernels.py)
TOL = {
    torch.bfloat16: {"attn": 2e-2, "mass": 1e-4, "scores": 1e-5},
    torch.float16: {"attn": 4e-3, "mass": 1e-4, "scores": 1e-5},
    torch.float32: {"attn": 2e-5, "mass": 2e-5, "scores": 1e-5},
}

FULL = {
    "Hq": 28, "Hkv": 4, "D": 128, "P": 16, "dtype": torch.bfloat16,
    "batches": (64, 128, 256), "budgets": (512, 1024, 2048, 4096),
    "check_B": 64, "check_S": 256, "append_B": 256, "prefill_lens": (1000, 17, 2048, 333),
    "copy_bytes": 2 << 30, "score_pages": (256, 2048), "sweep": ((64, 4096), (256, 1024)),
}
SMOKE = {
    "Hq": 14, "Hkv": 2, "D": 32, "P": 16, "dtype": torch.bfloat16,
    "batches": (2,), "budgets": (64,),
    "check_B": 2, "check_S": 5, "append_B": 3, "prefill_lens": (7, 20),
    "copy_bytes": 1 << 20, "score_pages": (8,), "sweep": ((2, 64),),
}


def rel(out: torch.Tensor, want: torch.Tensor) -> float:
    out, want = out.double(), want.double()
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).item()


def bench_ms(fn, *args, **kwargs) -> float:
    """Median milliseconds of fn(*args, **kwargs): triton.testing.do_bench on CUDA (L2 flushed
    between calls), a CPU clock otherwise (smoke)."""
    call = functools.partial(fn, *args, **kwargs)
    if CUDA:
        return float(triton.testing.do_bench(call, warmup=10, rep=40, return_mode="median"))
    call()
    ts = []
    for _ in range(2):
        t = time.perf_counter()
        call()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def _reset_then(fill, fill0, op, *args):
    """fill.copy_(fill0), then op(*args): lets an in-place append be timed repeatedly."""
    fill.copy_(fill0)
    op(*args)


def sync():
    if CUDA:
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------


def make_pool(N, Hkv, P, D, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    k = torch.randn((N, Hkv, P, D), generator=g, device=DEV, dtype=dtype)
    v = torch.randn((N, Hkv, P, D), generator=g, device=DEV, dtype=dtype)
    return k, v


def scattered_ids(B, Hkv, S, N, seed, holes=0.0):
    """[B, Hkv, S] int32: each sequence owns S random pages of the pool; each head lists them in its
    own random order; a `holes` share of the entries is -1 (never a whole row)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    own = torch.randperm(N, generator=g, device=DEV)[: B * S].view(B, 1, S).expand(B, Hkv, S)
    order = torch.rand((B, Hkv, S), generator=g, device=DEV).argsort(-1)
    ids = own.gather(-1, order).to(torch.int32)
    if holes > 0:
        drop = torch.rand((B, Hkv, S), generator=g, device=DEV) < holes
        drop[..., 0] = False
        ids = ids.masked_fill(drop, -1)
    return ids.contiguous()


# ----------------------------------------------------------------------------------------------
# 1. copy bandwidth
# ----------------------------------------------------------------------------------------------


def copy_bandwidth(nbytes: int) -> float:
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEV).normal_()
    y = torch.empty_like(x)
    ms = bench_ms(y.copy_, x)
    return 2 * nbytes / (ms * 1e-3)


# ----------------------------------------------------------------------------------------------
# 2. checks
# ----------------------------------------------------------------------------------------------


def run_checks(cfg) -> list[dict]:
    Hq, Hkv, D, P, dt = cfg["Hq"], cfg["Hkv"], cfg["D"], cfg["P"], cfg["dtype"]
    tol = TOL[dt]
    rows = []

    def add(name, err, limit, extra=""):
        rows.append({"check": name, "rel_err": err, "tol": limit, "ok": bool(err <= limit), "note": extra})

    # decode: partial fills, -1 holes, scattered pages
    B, S = cfg["check_B"], cfg["check_S"]
    N = B * S * 2 + 7
    kc, vc = make_pool(N, Hkv, P, D, dt, seed=1)
    g = torch.Generator(device=DEV).manual_seed(2)
    fill = torch.full((N, Hkv), P, dtype=torch.int32, device=DEV)
    part = torch.rand((N, Hkv), generator=g, device=DEV) < 0.3
    fill = torch.where(part, torch.randint(1, P + 1, (N, Hkv), generator=g, device=DEV, dtype=torch.int32), fill)
    ids = scattered_ids(B, Hkv, S, N, seed=3, holes=0.05)
    q = torch.randn((B, Hq, D), generator=g, device=DEV, dtype=dt)
    scale = D ** -0.5
    want, want_mass = ref.paged_decode_attention(q, kc, vc, ids, fill, scale, return_mass=True)
    out, mass = TRI.paged_decode_attention(q, kc, vc, ids, fill, scale, return_mass=True)
    ns = DEC.choose_num_splits(B, Hkv, S, P, DEV)
    add(f"decode out B={B} S*P={S * P}", rel(out, want), tol["attn"], f"num_splits={ns}")
    add(f"decode mass B={B} S*P={S * P}", rel(mass, want_mass), tol["mass"])
    for n in sorted({1, 3, max(1, S // 2)}):
        o, m = DEC.paged_decode_attention_impl(q, kc, vc, ids, fill, scale, True, num_splits=n)
        add(f"decode out/mass num_splits={n}", max(rel(o, want), rel(m, want_mass) * tol["attn"] / tol["mass"]),
            tol["attn"], "max of out err and scaled mass err")

    # CUDA graph: capture once, replay on new q (no host sync inside the op)
    if CUDA:
        static_q = q.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            TRI.paged_decode_attention(static_q, kc, vc, ids, fill, scale, return_mass=True)  # warm-up
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            g_out, g_mass = TRI.paged_decode_attention(static_q, kc, vc, ids, fill, scale, return_mass=True)
        q2 = torch.randn_like(q)
        static_q.copy_(q2)
        graph.replay()
        sync()
        w2, wm2 = ref.paged_decode_attention(q2, kc, vc, ids, fill, scale, return_mass=True)
        add("decode in CUDA graph (replay, new q)", max(rel(g_out, w2), rel(g_mass, wm2) * tol["attn"] / tol["mass"]),
            tol["attn"])
    del kc, vc

    # page scores (+ top-k sums)
    S2 = cfg["score_pages"][0]
    kmin = torch.randn((N, Hkv, D), generator=g, device=DEV, dtype=dt)
    kmax = (kmin.float() + torch.rand((N, Hkv, D), generator=g, device=DEV)).to(dt)
    ids2 = scattered_ids(B, Hkv, S2, N, seed=4, holes=0.1)
    ws = ref.page_scores(q, kmin, kmax, ids2)
    os_ = TRI.page_scores(q, kmin, kmax, ids2)
    ok = ids2 >= 0
    same_inf = bool(torch.equal(torch.isneginf(os_), ~ok))
    add(f"page_scores B={B} S={S2}", rel(os_[ok], ws[ok]) if same_inf else float("inf"), tol["scores"])
    k = max(1, min(8, S2 // 4))
    best = ws.topk(k, -1).values.sum(-1)
    picked = ws.gather(-1, os_.topk(k, -1).indices).sum(-1)
    add(f"page_scores top-{k} sums", rel(picked, best), 1e-5)

    # kv_append: bit-exact against the reference
    Ba = cfg["append_B"]
    Na = Ba * 2 + 5
    kca, vca = make_pool(Na, Hkv, P, D, dt, seed=5)
    fa = torch.randint(0, P, (Na, Hkv), generator=g, device=DEV, dtype=torch.int32)
    kmin_a = torch.randn((Na, Hkv, D), generator=g, device=DEV, dtype=dt)
    kmax_a = torch.randn((Na, Hkv, D), generator=g, device=DEV, dtype=dt)
    wp = torch.stack([torch.randperm(Na, generator=g, device=DEV)[:Ba] for _ in range(Hkv)], 1).to(torch.int32)
    ka = torch.randn((Ba, Hkv, D), generator=g, device=DEV, dtype=dt)
    va = torch.randn((Ba, Hkv, D), generator=g, device=DEV, dtype=dt)
    st_ref = [t.clone() for t in (kca, vca, kmin_a, kmax_a, fa)]
    st_tri = [t.clone() for t in (kca, vca, kmin_a, kmax_a, fa)]
    ref.kv_append(ka, va, *st_ref, wp)
    TRI.kv_append(ka, va, *st_tri, wp)
    mism = sum(int((a != b).sum()) for a, b in zip(st_ref, st_tri))
    add(f"kv_append B={Ba} (mismatching elements)", float(mism), 0.0)
    del kca, vca, st_ref, st_tri

    # prefill
    lens = list(cfg["prefill_lens"])
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    T = sum(lens)
    qp = torch.randn((T, Hq, D), generator=g, device=DEV, dtype=dt)
    kp = torch.randn((T, Hkv, D), generator=g, device=DEV, dtype=dt)
    vp = torch.randn((T, Hkv, D), generator=g, device=DEV, dtype=dt)
    wp_ = ref.prefill_attention(qp, kp, vp, cu, scale)
    add(f"prefill lens={lens}", rel(TRI.prefill_attention(qp, kp, vp, cu, scale), wp_), tol["attn"])
    sync()
    return rows


# ----------------------------------------------------------------------------------------------
# 3.-5. timing
# ----------------------------------------------------------------------------------------------


def time_decode(cfg, copy_bw) -> list[dict]:
    Hq, Hkv, D, P, dt = cfg["Hq"], cfg["Hkv"], cfg["D"], cfg["P"], cfg["dtype"]
    G = Hq // Hkv
    esize = torch.tensor([], dtype=dt).element_size()
    max_pages = max(cfg["batches"]) * max(cfg["budgets"]) // P
    N = int(max_pages * 1.25) + 1  # the pool: every config's pages are scattered in it
    kc, vc = make_pool(N, Hkv, P, D, dt, seed=11)
    fill = torch.full((N, Hkv), P, dtype=torch.int32, device=DEV)
    scale = D ** -0.5
    rows = []
    for B in cfg["batches"]:
        for budget in cfg["budgets"]:
            S = budget // P
            ids = scattered_ids(B, Hkv, S, N, seed=B * 100003 + budget)
            q = torch.randn((B, Hq, D), device=DEV, dtype=dt)
            kv_bytes = 2 * B * Hkv * S * P * D * esize
            io_bytes = kv_bytes + 2 * B * Hq * D * esize  # + q + out
            ns = DEC.choose_num_splits(B, Hkv, S, P, DEV)
            t_tri = bench_ms(TRI.paged_decode_attention, q, kc, vc, ids, fill, scale)
            t_mass = bench_ms(TRI.paged_decode_attention, q, kc, vc, ids, fill, scale, return_mass=True)
            # dense SDPA over `budget` contiguous tokens, q rows = the G heads of each KV head
            kd = torch.randn((B, Hkv, budget, D), device=DEV, dtype=dt)
            vd = torch.randn((B, Hkv, budget, D), device=DEV, dtype=dt)
            qd = q.view(B, Hkv, G, D)
            t_sdpa = bench_ms(torch.nn.functional.scaled_dot_product_attention, qd, kd, vd, scale=scale)
            kd = vd = None
            row = {
                "B": B, "budget": budget, "S": S, "num_splits": ns, "bytes_MB": io_bytes / 1e6,
                "triton_ms": t_tri, "triton_mass_ms": t_mass, "sdpa_ms": t_sdpa,
                "triton_TBps": io_bytes / (t_tri * 1e-3) / 1e12,
                "triton_mass_TBps": io_bytes / (t_mass * 1e-3) / 1e12,
                "sdpa_TBps": io_bytes / (t_sdpa * 1e-3) / 1e12,
            }
            row["triton_pct_copy"] = 100 * row["triton_TBps"] * 1e12 / copy_bw
            row["sdpa_pct_copy"] = 100 * row["sdpa_TBps"] * 1e12 / copy_bw
            rows.append(row)
            print(f"  decode B={B:4d} budget={budget:5d}: triton {t_tri * 1e3:8.1f} us "
                  f"({row['triton_TBps']:.2f} TB/s, {row['triton_pct_copy']:.0f}% of copy), "
                  f"+mass {t_mass * 1e3:8.1f} us, sdpa {t_sdpa * 1e3:8.1f} us ({row['sdpa_TBps']:.2f} TB/s)",
                  flush=True)
    del kc, vc
    return rows


def sweep_decode(cfg, copy_bw) -> list[dict]:
    Hq, Hkv, D, P, dt = cfg["Hq"], cfg["Hkv"], cfg["D"], cfg["P"], cfg["dtype"]
    esize = torch.tensor([], dtype=dt).element_size()
    rows = []
    for B, budget in cfg["sweep"]:
        S = budget // P
        N = int(B * S * 1.25) + 1
        kc, vc = make_pool(N, Hkv, P, D, dt, seed=21)
        fill = torch.full((N, Hkv), P, dtype=torch.int32, device=DEV)
        ids = scattered_ids(B, Hkv, S, N, seed=22)
        q = torch.randn((B, Hq, D), device=DEV, dtype=dt)
        io_bytes = 2 * B * Hkv * S * P * D * esize + 2 * B * Hq * D * esize
        default_ns = DEC.choose_num_splits(B, Hkv, S, P, DEV)
        variants = [{"num_splits": n} for n in (1, 2, 4, 8, 16, 32) if n <= S]
        variants += [{"num_splits": default_ns, "num_warps": w, "num_stages": st, "pages_per_iter": ppi}
                     for w, st, ppi in ((4, 3, 4), (8, 2, 4), (4, 2, 8), (4, 2, 2), (8, 3, 8))]
        for kw in variants:
            try:
                t = bench_ms(DEC.paged_decode_attention_impl, q, kc, vc, ids, fill, D ** -0.5, **kw)
                err = ""
            except Exception as e:  # noqa: BLE001  (a variant that does not compile, e.g. out of smem)
                t, err = float("nan"), f"{type(e).__name__}: {str(e)[:80]}"
            bw = io_bytes / (t * 1e-3)
            rows.append(dict(B=B, budget=budget, **{k: kw.get(k) for k in
                        ("num_splits", "num_warps", "num_stages", "pages_per_iter")},
                        default=(kw == {"num_splits": default_ns}), ms=t, TBps=bw / 1e12,
                        pct_copy=100 * bw / copy_bw, error=err))
        del kc, vc
    return rows


def time_scores_append(cfg) -> list[dict]:
    Hq, Hkv, D, P, dt = cfg["Hq"], cfg["Hkv"], cfg["D"], cfg["P"], cfg["dtype"]
    esize = torch.tensor([], dtype=dt).element_size()
    rows = []
    for B in sorted({cfg["batches"][0], cfg["batches"][-1]}):
        for S in cfg["score_pages"]:
            N = B * S + 1
            kmin = torch.randn((N, Hkv, D), device=DEV, dtype=dt)
            kmax = kmin + 1
            ids = scattered_ids(B, Hkv, S, N, seed=31)
            q = torch.randn((B, Hq, D), device=DEV, dtype=dt)
            nbytes = B * Hkv * S * (2 * D * esize + 4 + 4) + B * Hq * D * esize
            t = bench_ms(TRI.page_scores, q, kmin, kmax, ids)
            tr = bench_ms(ref.page_scores, q, kmin, kmax, ids)
            rows.append({"op": "page_scores", "B": B, "S": S, "ms": t, "torch_ref_ms": tr, "TBps": nbytes / (t * 1e-3) / 1e12})
            del kmin, kmax
        N = 2 * B + 3
        kc, vc = make_pool(N, Hkv, P, D, dt, seed=41)
        kmin = torch.randn((N, Hkv, D), device=DEV, dtype=dt)
        kmax = torch.randn((N, Hkv, D), device=DEV, dtype=dt)
        fill0 = torch.randint(0, P // 2, (N, Hkv), device=DEV, dtype=torch.int32)
        fill = fill0.clone()
        wp = torch.stack([torch.randperm(N, device=DEV)[:B] for _ in range(Hkv)], 1).to(torch.int32)
        k = torch.randn((B, Hkv, D), device=DEV, dtype=dt)
        v = torch.randn((B, Hkv, D), device=DEV, dtype=dt)
        # each call advances fill: restore it every time and subtract the restore's own time
        t_reset = bench_ms(fill.copy_, fill0)
        t = bench_ms(_reset_then, fill, fill0, TRI.kv_append, k, v, kc, vc, kmin, kmax, fill, wp)
        tr = bench_ms(_reset_then, fill, fill0, ref.kv_append, k, v, kc, vc, kmin, kmax, fill, wp)
        rows.append({"op": "kv_append", "B": B, "S": 1, "ms": max(t - t_reset, 0.0), "torch_ref_ms": max(tr - t_reset, 0.0),
                         "TBps": float("nan")})
        del kc, vc
    return rows


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def md_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main():
    args = ARGS or _parse()
    cfg = SMOKE if args.smoke else FULL
    if not CUDA and not args.smoke:
        sys.exit("bench_kernels.py needs a CUDA device (use --smoke on a CPU machine)")
    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    meta = {
        "device": torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "smoke": bool(args.smoke),
        "interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "shape": {"Hq": cfg["Hq"], "Hkv": cfg["Hkv"], "D": cfg["D"], "P": cfg["P"], "dtype": str(cfg["dtype"])},
    }
    print(f"# bench_kernels on {meta['device']} (torch {meta['torch']}, triton {meta['triton']})", flush=True)

    copy_bw = copy_bandwidth(cfg["copy_bytes"])
    meta["copy_TBps"] = copy_bw / 1e12
    print(f"device copy bandwidth (read + write): {copy_bw / 1e9:.1f} GB/s", flush=True)

    checks = run_checks(cfg)
    print("\n## Correctness (Triton vs torch reference)\n")
    print(md_table(checks, ["check", "rel_err", "tol", "ok", "note"]), flush=True)

    print("\n## paged_decode_attention timing\n", flush=True)
    dec = time_decode(cfg, copy_bw)
    dec_cols = ["B", "budget", "num_splits", "bytes_MB", "triton_ms", "triton_TBps", "triton_pct_copy",
                "triton_mass_ms", "sdpa_ms", "sdpa_TBps", "sdpa_pct_copy"]
    print(md_table(dec, dec_cols), flush=True)

    sweep = []
    if not args.no_sweep:
        print("\n## decode launch-parameter sweep\n", flush=True)
        sweep = sweep_decode(cfg, copy_bw)
        print(md_table(sweep, ["B", "budget", "num_splits", "num_warps", "num_stages", "pages_per_iter",
                               "default", "ms", "TBps", "pct_copy", "error"]), flush=True)

    print("\n## page_scores / kv_append timing\n", flush=True)
    other = time_scores_append(cfg)
    print(md_table(other, ["op", "B", "S", "ms", "torch_ref_ms", "TBps"]), flush=True)

    meta["wall_s"] = time.time() - t0
    result = {"meta": meta, "checks": checks, "decode": dec, "sweep": sweep, "other": other}
    stem = "bench_kernels_smoke" if args.smoke else "bench_kernels"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dec[0].keys()))
        w.writeheader()
        w.writerows(dec)
    md = [f"# bench_kernels: {meta['device']}", "", f"copy bandwidth {meta['copy_TBps']:.2f} TB/s", "",
          md_table(checks, ["check", "rel_err", "tol", "ok", "note"]), "", md_table(dec, dec_cols), ""]
    if sweep:
        md += [md_table(sweep, ["B", "budget", "num_splits", "num_warps", "num_stages", "pages_per_iter",
                                "default", "ms", "TBps", "pct_copy", "error"]), ""]
    md += [md_table(other, ["op", "B", "S", "ms", "torch_ref_ms", "TBps"]), ""]
    (out_dir / f"{stem}.md").write_text("\n".join(md))
    n_bad = sum(not c["ok"] for c in checks)
    print(f"\nwrote {out_dir}/{stem}.{{json,csv,md}} in {meta['wall_s']:.0f} s; failed checks: {n_bad}")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
