"""The decode step's own kernels at the job benchmark's shape, timed as a step runs them.

bench_job.py says how a step's time splits by kernel; this script tries the alternatives of the two
kernels a change touches, side by side in one run (a ratio between runs on different H200s moves by a
few percent, run 32 vs run 35):
- decode attention of a 1.5B-shape step (Hq 12, Hkv 2, D 128, pages of 16, batch 512): RaaS at
  kv_budget 1024 (66 pages a row, Quest bounds returned) and dense at 3,100 tokens (the fixed job's
  mean context), each with a few launch settings (which must not change the result), and RaaS with its
  top-half refresh, run by the bounded_update kernel after the attention or inside its program (the
  same stamps), the latter also with the bounds pass moved before the main loop on every other row;
- RaaS's refresh in a layer (the attention, then the layer's cuBLAS products): inside the attention's
  program, or on a second stream beside the attention and the products (the same stamps);
- the sampler over a [512, 49152] logits row block (temperature 0.6, top-p 0.95): bf16 in, fp32 in
  (the same tokens), without the race's screen (every token's exact value), and at top-p 1 (one round:
  what the rejection rounds cost; other tokens).
Each attention variant runs one call per layer over 28 layers' own caches (so L2 holds no layer's
pages for the next), timed with bench_matmul.py's CUDA-graph timer; the table gives ms per call and per
step (x 28 for attention, x 1 for the sampler), the share of copy bandwidth the attention reaches on
the bytes it must read (K, V and, with bounds, kmin / kmax of the listed pages), and each variant's
difference from the default.

    python benchmarks/bench_step_kernels.py            # writes bench_step_kernels.{json,md} to $OUT
    python benchmarks/bench_step_kernels.py --smoke    # tiny sizes; on a CPU in the Triton interpreter
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU: Triton interpreter)")
    ap.add_argument("--skip", default="", help="comma-separated attention variants to leave out (the default "
                    "always runs), e.g. the launch settings an earlier run already swept")
    ap.add_argument("--no-sampler", action="store_true", help="leave the sampler rows out")
    ap.add_argument("--layers-only", action="store_true", help="only the layer rows (RaaS's refresh placements)")
    ap.add_argument("--sampler-only", action="store_true", help="only the sampler rows")
    ap.add_argument("--sampler-shape", default="", help="ROWSxVOCAB for the sampler rows (default 512x49152; "
                    "batch 1 at the 7B shape: 1x152064)")
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.smoke and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# (triton after TRITON_INTERPRET is set) the kernel benchmark's pool, page lists, copy bandwidth and
# table; the matmul benchmark's graph timer
import triton
import triton.language as tl
from bench_job import results_dir, save_results
from bench_kernels import CUDA, DEC, DEV, TRI, copy_bandwidth, make_pool, md_table, ref, rel, scattered_ids
from bench_matmul import timed

FULL = {"layers": 28, "B": 512, "Hq": 12, "Hkv": 2, "D": 128, "P": 16, "raas_pages": 66, "dense_tokens": 3100,
        "V": 49152, "reps": 20, "copy_bytes": 2 << 30, "hidden": 1536, "intermediate": 8960}
SMOKE = {"layers": 2, "B": 3, "Hq": 12, "Hkv": 2, "D": 32, "P": 16, "raas_pages": 5, "dense_tokens": 100,
         "V": 3000, "reps": 1, "copy_bytes": 1 << 20, "hidden": 64, "intermediate": 96}
ATTN_VARIANTS = [  # (name, launch keywords); the default is 2 warps (run 41), 4 before
    ("default", {}),
    ("4 warps", {"num_warps": 4}),
    ("8 pages a tile", {"pages_per_iter": 8}),
    ("3 stages", {"num_stages": 3}),
    ("2 splits", {"num_splits": 2}),
    ("1 warp", {"num_warps": 1}),
    # RaaS: the bounds pass's pages a block (32 since run 66; 16 before)
    ("bounds 16 pages a block", {"bounds_pages": 16}),
    ("bounds 64 pages a block", {"bounds_pages": 64}),
    # K tiles masked by the pages' fill, as up to run 66 (the loads then wait for it)
    ("K masked by fill", {"k_fill_mask": True}),
    # diagnostic (RaaS): the same pages without the bounds pass, to see what the pass costs beyond its bytes
    ("no bounds (diagnostic)", {"no_bounds": True}),
    # registers a thread capped (224 uncapped, 4 programs an SM): 200 -> 5 programs an SM, 168 -> 6 (ptxas spills
    # the rest); RaaS without bounds is its attention when the refresh runs on the side stream
    ("200 registers", {"maxnreg": 200}),
    ("168 registers", {"maxnreg": 168}),
    ("no bounds, 200 registers", {"no_bounds": True, "maxnreg": 200}),
    ("no bounds, 168 registers", {"no_bounds": True, "maxnreg": 168}),
]
BOUNDS_ONLY = {"bounds 16 pages a block", "bounds 64 pages a block", "no bounds (diagnostic)",
               "no bounds, 200 registers", "no bounds, 168 registers"}
SAMPLER_VARIANTS = [("no screen (every exact value)", {"screen": False}),
                    ("no screen, top-p 1", {"screen": False, "top_p": 1.0}), ("top-p 1", {"top_p": 1.0}),
                    ("block 512", {"block_v": 512}), ("<= 40 registers", {"maxnreg": 40}),
                    ("<= 32 registers", {"maxnreg": 32}), ("block 1024, <= 32 registers", {"block_v": 1024, "maxnreg": 32}),
                    ("8 warps", {"num_warps": 8}), ("4 warps", {"num_warps": 4}),
                    ("block 1024", {"block_v": 1024}), ("block 4096", {"block_v": 4096, "num_warps": 16}),
                    ("1 stage", {"num_stages": 1}), ("4 stages", {"num_stages": 4})]
COLS = ["kernel", "policy", "variant", "ms_per_call", "ms_per_step", "pct_copy", "rel_err_vs_default"]


# RaaS's refresh (top-half by the bounds) with the attention: run by the bounded_update kernel after it
# (the engine's path up to run 44), or inside the attention's program (the engine's path since run 45)
REFRESH_VARIANTS = [("+ refresh kernel after", {"fuse_refresh": False}),
                    # the bounds pass after the main loop on every row (the engine's path up to run 53)
                    ("+ refresh in the program, bounds last on every row", {"stagger_bounds": False}),
                    # even rows run their bounds pass before the main loop, odd rows after it (since run 54)
                    ("+ refresh in the program, bounds first on even rows", {}),
                    ("+ refresh in the program, K masked by fill, bounds 16", {"k_fill_mask": True, "bounds_pages": 16})]


def layer_caches(cfg, pages_per_row: int, seed: int):
    """One layer's pool holding B rows of `pages_per_row` full pages, scattered; -> (k, v, kmin, kmax,
    fill, ids [B, Hkv, S], refresh): refresh is RaaS's top-half refresh of the layer (a slot per row,
    position 3,000, the current page the row's first, half the row's pages refreshed)."""
    B, Hkv, D, P = cfg["B"], cfg["Hkv"], cfg["D"], cfg["P"]
    N = B * pages_per_row + 1
    k, v = make_pool(N, Hkv, P, D, torch.bfloat16, seed)
    fill = torch.full((N, Hkv), P, dtype=torch.int32, device=DEV)
    ids = scattered_ids(B, Hkv, pages_per_row, N, seed)
    refresh = ref.Refresh(ids[:, :, 0].long().contiguous(), torch.arange(B, device=DEV),
                          torch.full((B,), 3000, device=DEV), torch.full((B,), pages_per_row // 2, device=DEV),
                          torch.zeros((N, Hkv), dtype=torch.bool, device=DEV),
                          torch.zeros((N, Hkv), dtype=torch.int64, device=DEV),
                          torch.zeros((N, Hkv), device=DEV), "top_half", scale=D ** -0.5)
    return k, v, k.amin(2), k.amax(2), fill, ids, refresh


def attention_rows(cfg, copy_bw, skip=()) -> list[dict]:
    """Every variant must give the default's output (and bounds): the launch settings change only speed."""
    B, Hq, Hkv, D, P, L = cfg["B"], cfg["Hq"], cfg["Hkv"], cfg["D"], cfg["P"], cfg["layers"]
    q = torch.randn((B, Hq, D), device=DEV, dtype=torch.bfloat16)
    rows = []
    for policy, pages, bounds in (("raas L=1024", cfg["raas_pages"], True),
                                  ("dense", -(-cfg["dense_tokens"] // P), False)):
        layers = [layer_caches(cfg, pages, seed) for seed in range(L)]
        want = stamps = None
        for name, kw in ATTN_VARIANTS + (REFRESH_VARIANTS if bounds else []):
            if name in skip or (name in BOUNDS_ONLY and not bounds):
                continue
            with_refresh = (name, kw) in REFRESH_VARIANTS
            kw = dict(kw)
            use_bounds = bounds and not kw.pop("no_bounds", False)

            def call(layer, kw=kw, bounds=use_bounds, with_refresh=with_refresh):
                k, v, kmin, kmax, fill, ids, refresh = layer
                return DEC.paged_decode_attention_impl(q, k, v, ids, fill, D ** -0.5,
                                                       key_bounds=(kmin, kmax) if bounds else None,
                                                       refresh=refresh if with_refresh else None, **kw)

            if with_refresh:  # both ways leave the same stamps
                layers[0][-1].stamp.zero_()
            out = call(layers[0])
            if with_refresh:
                stamp = layers[0][-1].stamp.clone()
                assert int((stamp > 0).sum()) > 0, "the refresh stamped no page"
                stamps = stamp if stamps is None else stamps
                assert torch.equal(stamp, stamps), f"{name}: other stamps than {REFRESH_VARIANTS[0][0]}"
            got = torch.cat([t.float().flatten() for t in (out if isinstance(out, tuple) else (out,))])
            want = got if want is None else want
            row_bytes = B * Hkv * pages * (2 * P * D * 2 + (2 * D * 2 if use_bounds else 0))  # K, V (and bounds)
            ms = timed(cfg["reps"], lambda call=call, layers=layers: [call(layer) for layer in layers]) / L
            rows.append({"kernel": "decode attention", "policy": policy, "variant": name, "ms_per_call": ms,
                         "ms_per_step": ms * L, "pct_copy": 100 * row_bytes / (ms * 1e-3) / copy_bw,
                         "rel_err_vs_default": rel(got, want[:got.numel()])})
            print(f"  {policy:12s} {name:16s} {ms * 1e3:8.1f} us/call  {ms * L:6.3f} ms/step  "
                  f"{rows[-1]['pct_copy']:5.1f}% of copy", flush=True)
        layers.clear()  # free this policy's caches before the next one's
    return rows


# RaaS's refresh placed three ways in a layer of the step (the attention, then the layer's products)
LAYER_VARIANTS = [("refresh in the attention's program", "inside"),
                  # the attention without bounds; the bounds pass and rule alone on a second stream, joined
                  # after the last layer (RAAS_BATCH_REFRESH_STREAM=1)
                  ("refresh on a side stream", "side"),
                  ("no refresh (diagnostic)", "none")]
# RaaS's refresh once a page (kernels/window_refresh.py, the engine's default since run 78) on the side stream: 1/P of
# the rows close a page each step (positions spread over a page). Run 84 tried fewer warps and capped registers (so
# that a window program fits beside the attention's 4 programs an SM), 4 or 16 rows a program, and run 85 every listed
# page's bounds in one block without the scratch: all slower or the same. Run 86: loading a product's queries two
# products ahead instead of one was no faster (261.3 against 257.8 us a layer). Run 89: 64 or 32 programs a KV head
# finding the closing rows and sharing them (the queries stored beforehand) instead of a program a row: 263.4 / 263.8
# against 258.3, and with no row closing 250.3 against 250.8 (the 1,024 short programs cost nothing measurable).
# Run 90: beside the products instead of the attention, 266.8 against 264.1.
WINDOW_VARIANTS = [("refresh once a page, side stream", {}),
                   # the kernel up to run 97: 2 of the window's steps a product (16 rows); run 98: ~261 us a layer
                   # against 255.8 with 8 steps (64 rows, the default since), 264.9 with 4; 8 steps at 8 warps 259.7,
                   # 64 pages a block (2 steps) 261.7; every row closing 341.3 (2 steps) against 317.7 (8 steps)
                   # (run 99: 261.2 against 265.9 again; the fixed job's step 7.03 against 7.04 ms)
                   ("once a page, 2 steps a product (up to run 97)", {"steps_a_product": 2}),
                   ("once a page, 16 steps a product", {"steps_a_product": 16}),
                   ("once a page, 16 steps a product, 8 warps", {"steps_a_product": 16, "num_warps": 8}),
                   ("once a page, 64 pages a block", {"bounds_pages": 64}),
                   # each product's queries loaded only after the product before it has been stored (up to run 85)
                   ("once a page, no prefetch", {"prefetch": False}),
                   # the side stream forked after the attention: the refresh runs beside the layer's products
                   ("once a page, beside the products", {"after": True}),
                   ("once a page, beside the products, no row closing (diagnostic)", {"after": True, "closing": "none"}),
                   # diagnostics: no row closes its page (the queries stored, nothing scored), or every row does
                   ("once a page, no row closing (diagnostic)", {"closing": "none"}),
                   ("once a page, every row closing (diagnostic)", {"closing": "all"}),
                   ("once a page, 2 steps a product, every row closing (diagnostic)",
                    {"closing": "all", "steps_a_product": 2}),
                   ("once a page, 16 steps a product, every row closing (diagnostic)",
                    {"closing": "all", "steps_a_product": 16})]


def layer_rows(cfg, skip=()) -> list[dict]:
    """RaaS's refresh (top half by the Quest bounds) in a layer: the decode attention over 66 pages a row,
    then the layer's products through cuBLAS (o, gate_up, SiLU and mul, down, the next layer's qkv; the
    1.5B shapes), 28 layers in one graph. Inside the attention's program it lengthens the attention; on a
    side stream it runs beside the attention and the products. Both must leave the same stamps; the
    diagnostic row, without a refresh, is the floor."""
    from raas_batch.engine.step_context import SideStream

    B, Hq, Hkv, D, L = cfg["B"], cfg["Hq"], cfg["Hkv"], cfg["D"], cfg["layers"]
    H, inter = cfg["hidden"], cfg["intermediate"]
    g = torch.Generator(device=DEV).manual_seed(11)

    def weight(n, k):
        return (torch.randn((n, k), generator=g, device=DEV) * k ** -0.5).to(torch.bfloat16)

    wo, wgu, wd, wqkv = weight(H, Hq * D), weight(2 * inter, H), weight(H, inter), weight((Hq + 2 * Hkv) * D, H)
    q = torch.randn((B, Hq, D), device=DEV, dtype=torch.bfloat16)
    layers = [layer_caches(cfg, cfg["raas_pages"], seed) for seed in range(L)]
    side = SideStream(torch.cuda.Stream() if CUDA else None)
    linear = torch.nn.functional.linear

    def products(out):  # the layer's products after its attention (o, gate_up, SiLU and mul, down, the next qkv)
        gate, up = linear(linear(out.view(B, Hq * D), wo), wgu).chunk(2, dim=-1)
        linear(linear(torch.nn.functional.silu(gate) * up, wd), wqkv)

    def step(how):
        for k, v, kmin, kmax, fill, ids, refresh in layers:
            if how == "side":
                side.fork()
            out = DEC.paged_decode_attention_impl(q, k, v, ids, fill, D ** -0.5,
                                                  key_bounds=(kmin, kmax) if how == "inside" else None,
                                                  refresh=refresh if how == "inside" else None)
            out = out[0] if isinstance(out, tuple) else out  # (the bounds, with the refresh inside)
            if how == "side":
                side.run(DEC.bounds_refresh, q, kmin, kmax, ids, fill, refresh)
            products(out)
        side.join()

    rows, stamps = [], None
    for name, how in LAYER_VARIANTS:
        if name in skip:
            continue
        for layer in layers:
            layer[-1].stamp.zero_()
        step(how)
        if how != "none":  # both placements leave the same stamps in every layer
            stamps = _same_stamps(name, [layer[-1].stamp for layer in layers], stamps, LAYER_VARIANTS[0][0])
        rows.append(_layer_row(name, timed(cfg["reps"], step, how) / L, L))
    rows += window_rows(cfg, layers, q, products, side, skip)
    layers.clear()
    return rows


def _same_stamps(name: str, per_layer: list, stamps, first: str):
    """The variant's stamps of every layer, checked non-empty and equal to the first variant's (`stamps`, None for
    the first) -> the stamps the next variant must leave."""
    got = torch.stack(per_layer)
    assert int((got > 0).sum()) > 0, f"{name}: the refresh stamped no page"
    assert stamps is None or torch.equal(got, stamps), f"{name}: other stamps than {first}"
    return got if stamps is None else stamps


def _layer_row(name: str, ms: float, num_layers: int) -> dict:
    """A layer row of the table (ms a layer), printed as it comes."""
    print(f"  layer {name:40s} {ms * 1e3:8.1f} us/layer  {ms * num_layers:6.3f} ms/step", flush=True)
    return {"kernel": "layer: attention + products", "policy": "raas L=1024", "variant": name, "ms_per_call": ms,
            "ms_per_step": ms * num_layers, "pct_copy": float("nan"), "rel_err_vs_default": 0.0}


def window_rows(cfg, layers, q, products, side, skip=()) -> list[dict]:
    """The layer rows with RaaS's refresh once a page on the side stream (WINDOW_VARIANTS): row b at position
    3000 + (b + 7) mod P, so one row in P (b mod P = 0) closes its current page this step and scores its window
    (the ring's other entries hold zeros: the same work). Every launch setting must leave the same stamps."""
    import dataclasses
    import functools

    from raas_batch.kernels.window_refresh import window_refresh

    B, Hq, Hkv, D, P = cfg["B"], cfg["Hq"], cfg["Hkv"], cfg["D"], cfg["P"]
    first = torch.full((B,), 100, dtype=torch.int64, device=DEV)
    rings = [torch.zeros((B, P, Hq, D), dtype=layer[0].dtype, device=DEV) for layer in layers]

    def make_state(closing):
        # position 3000 = 8 mod 16: nobody closes; 3000 + (b + 7) mod P: row b closes when b = 0 mod P
        shift = {"none": torch.zeros(B, dtype=torch.int64, device=DEV), "all": torch.full((B,), 7, device=DEV),
                 "spread": (torch.arange(B, device=DEV) + 7) % P}[closing]
        pos = 3000 + shift
        state = []
        for (k, v, kmin, kmax, fill, ids, refresh), ring in zip(layers, rings):
            wfill = fill.clone()
            wfill[refresh.cur, torch.arange(Hkv, device=DEV)[None, :]] = (pos % P + 1).to(torch.int32)[:, None]
            state.append((k, v, kmin, kmax, wfill, ids, dataclasses.replace(refresh, positions=pos), ring))
        return state

    def step(state, kw, after=False):
        fn = functools.partial(window_refresh, **kw)
        for k, v, kmin, kmax, wfill, ids, wrefresh, ring in state:
            if not after:
                side.fork()
            out = DEC.paged_decode_attention_impl(q, k, v, ids, wfill, D ** -0.5)
            if after:
                side.fork()
            side.run(fn, q, kmin, kmax, ids, wfill, wrefresh, None, ring, first)
            products(out)
        side.join()

    rows, stamps = [], None
    for name, kw in WINDOW_VARIANTS:
        if name in skip:
            continue
        kw = dict(kw)
        closing = kw.pop("closing", "spread")
        after = kw.pop("after", False)
        state = make_state(closing)
        for *_, wrefresh, ring in state:
            wrefresh.stamp.zero_()
            ring.zero_()
        step(state, kw, after)
        if closing == "spread":  # every launch setting leaves the same stamps
            stamps = _same_stamps(name, [layer[6].stamp for layer in state], stamps, WINDOW_VARIANTS[0][0])
        rows.append(_layer_row(name, timed(cfg["reps"], step, state, kw, after) / cfg["layers"], cfg["layers"]))
        state.clear()
    return rows


def sampler_rows(cfg) -> list[dict]:
    """bf16 logits (the decode step's) and their fp32 copy must give the same tokens."""
    B, V = cfg["B"], cfg["V"]
    if ARGS is not None and ARGS.sampler_shape:
        B, V = (int(n) for n in ARGS.sampler_shape.lower().split("x"))
    g = torch.Generator(device=DEV).manual_seed(5)
    logits = (torch.randn((B, V), generator=g, device=DEV) * 3).to(torch.bfloat16)
    settings = (torch.full((B,), 0.6, device=DEV), torch.full((B,), 0.95, device=DEV),
                torch.zeros(B, dtype=torch.int64, device=DEV), torch.arange(B, dtype=torch.int64, device=DEV) * 7919,
                torch.full((B,), 1000, dtype=torch.int64, device=DEV))
    rows, wants = [], {}
    for name, x, kw in (("bf16 logits (decode)", logits, {}), ("fp32 logits", logits.float(), {}),
                        *((f"bf16, {n}", logits, kw) for n, kw in SAMPLER_VARIANTS)):
        kw = dict(kw)
        args = settings
        if "top_p" in kw:  # a row setting, not a launch setting: its tokens differ (the rejection rounds' cost)
            args = (settings[0], torch.full((B,), kw.pop("top_p"), device=DEV), *settings[2:])
        got = TRI.sample_tokens(x, *args, **kw)
        want = wants.setdefault(float(args[1][0]), got)  # the first row of its top-p: the same tokens
        ms = timed(cfg["reps"], TRI.sample_tokens, x, *args, **kw)
        rows.append({"kernel": "sampler", "policy": "", "variant": name, "ms_per_call": ms, "ms_per_step": ms,
                     "pct_copy": float("nan"), "rel_err_vs_default": float((got != want).float().mean())})
        print(f"  sampler {name:24s} {ms * 1e3:8.1f} us", flush=True)
    return rows


def _scale_kernel(x_ptr, y_ptr, n, USE_PDL: tl.constexpr, BLOCK: tl.constexpr):
    if USE_PDL:  # wait for the kernel before to finish (its writes visible) before touching memory
        tl.extra.cuda.gdc_wait()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 1.0001, mask=offs < n)


def pdl_rows(cfg) -> list[dict]:
    """Programmatic dependent launch: a chain of small kernels (one norm's bytes each, [B, 1536] bf16),
    alone or each after a [B, 1536] x [1536, 1536] cuBLAS product, launched plainly or with PDL (each
    kernel waits for the one before at its first instruction, so only the launch overlaps)."""
    kern = triton.jit(_scale_kernel)
    B, n_chain = cfg["B"], 112
    x = torch.randn((B, 1536), device=DEV, dtype=torch.bfloat16)
    y, w = torch.empty_like(x), torch.randn((1536, 1536), device=DEV, dtype=torch.bfloat16) * 0.02
    grid = (triton.cdiv(x.numel(), 4096),)
    rows = []
    for with_gemm in (False, True):
        base = None
        for pdl in (False, True):
            def chain(pdl=pdl, with_gemm=with_gemm):
                a, b = x, y
                for _ in range(n_chain):
                    if with_gemm:
                        a = torch.nn.functional.linear(a, w)
                    kern[grid](a, b, a.numel(), USE_PDL=pdl, BLOCK=4096, **({"launch_pdl": True} if pdl else {}))
                    a, b = b, a
            name = ("after a product, " if with_gemm else "alone, ") + ("PDL" if pdl else "plain")
            try:
                ms = timed(cfg["reps"], chain) / n_chain
            except Exception as e:  # noqa: BLE001 - a Triton without launch_pdl / gdc_wait
                print(f"  pdl {name}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            base = ms if base is None else base
            # a link's time only: no output to compare, and a step's launches are not links of this chain
            rows.append({"kernel": "launch chain (a norm's bytes)", "policy": "", "variant": name, "ms_per_call": ms,
                         "ms_per_step": float("nan"), "pct_copy": float("nan"), "rel_err_vs_default": float("nan")})
            print(f"  chain {name:28s} {ms * 1e3:8.2f} us per link ({ms / base:.2f}x plain)", flush=True)
    return rows


def main():
    args = ARGS or _parse()
    cfg = SMOKE if args.smoke else FULL
    if not CUDA and not args.smoke:
        sys.exit("bench_step_kernels.py needs a CUDA device (use --smoke on a CPU machine)")
    copy_bw = copy_bandwidth(cfg["copy_bytes"])
    print(f"# decode-step kernels, {torch.cuda.get_device_name() if CUDA else 'cpu'}; copy {copy_bw / 1e12:.2f} TB/s",
          flush=True)
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    if args.sampler_only:
        rows = sampler_rows(cfg)
    else:
        rows = layer_rows(cfg, skip)
        if not args.layers_only:
            rows = (attention_rows(cfg, copy_bw, skip) + rows + ([] if args.no_sampler else sampler_rows(cfg))
                    + (pdl_rows(cfg) if CUDA and not args.no_sampler else []))
    text = "\n".join([f"# Decode-step kernels at the 1.5B job shape (copy bandwidth {copy_bw / 1e12:.2f} TB/s)", "",
                      ("`python benchmarks/bench_step_kernels.py`: CUDA graphs of one call per layer over 28 "
                      "layers' caches; rel_err_vs_default: each variant's output (bounds included) against the "
                      "default's, and for the sampler the share of tokens that differ. Launch-chain rows: "
                      "ms_per_call is one link's time."), "", md_table(rows, COLS)])
    save_results(results_dir(), "bench_step_kernels" + ("_smoke" if args.smoke else "")
                 + (f"_sampler_{args.sampler_shape.lower()}" if args.sampler_shape else ""),
                 {"config": cfg, "copy_TBps": copy_bw / 1e12, "rows": rows}, text)
    print(md_table(rows, COLS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
