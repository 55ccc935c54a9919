"""Paged split-KV decode attention in Triton (flash-decoding), with optional exact per-page mass.

Same contract as `kernels.reference.paged_decode_attention` (the specification):
q [B, Hq, D]; k_cache, v_cache [N, Hkv, P, D] (one layer, any strides); page_ids [B, Hkv, S] int32
with -1 for "no page"; fill [N, Hkv] int32 (valid tokens of each page, 0 <= fill <= P). Query head h
reads KV head h // G, G = Hq // Hkv. Returns out [B, Hq, D] (q's dtype) and, if return_mass,
mass [B, Hkv, S] float32: the softmax probability each listed page received, max over the G heads of
the group, 0 for -1 entries. Every (sequence, KV head) must list at least one non-empty page.
With key_bounds = (kmin, kmax) it also returns the Quest bound of every entry (page_scores' contract).

Algorithm (FlashDecoding, Dao et al. 2023, https://crfm.stanford.edu/2023/10/12/flashdecoding.html;
the per-page mass is what RaaS, arXiv 2502.11147, and H2O need; the page layout follows Quest,
arXiv 2406.10774):

* Stage 1, grid (B, Hkv, num_splits): the page list of one (sequence, KV head) is cut into
  `num_splits` contiguous chunks of `pages_per_split` entries. A program loads the G query heads of
  the group at once (padded to GP = max(16, next_pow2(G)) rows so `tl.dot` can be used; the padding
  rows are masked out of every store), walks its chunk `pages_per_iter` pages at a time (one tile of
  pages_per_iter * P tokens, token rows gathered through the page ids; -1 entries cost no memory
  traffic; a listed page's K rows are read whole and its V rows up to its fill, and offsets >= fill[page,
  kvh] are masked out of the scores, so what lies past the fill, NaN included, changes nothing), and
  keeps an online softmax in base
  2: running max m, running sum l and an unnormalised fp32 accumulator acc. It writes (m, l, acc)
  per (query head, split). With return_mass it also writes, per (query head, listed page), the
  page's log2-sum-exp  lse_page = m_run + log2(sum_{tokens of page} 2^(s - m_run)), taken against
  the running max m_run at the time the page is read (m_run <= the global max, so nothing that
  matters underflows; an empty or -1 page gives -inf).
  With key bounds, the program also walks its chunk `bounds_pages` (32) pages at a time (with the K
  loads masked by fill, 16 a block took 3% longer a call, 64 1% longer, run 66; with K read whole 0.6%
  and 0.9%, run 67), loads their kmin / kmax
  rows (2 * D values a page, 1/P of its K and V bytes) and writes each page's bound, max over the
  group's heads: sum_d max(q_d kmax_d, q_d kmin_d) = q+ . kmax + q- . kmin (q+ = max(q, 0), q- = q - q+),
  two tensor-core products with fp32 accumulation. Inside the main loop they cost more: computed
  elementwise (run 15) the attention took 2.3 ms a step longer; as the same two products per tile, their
  kmin / kmax loads beside the tile's K / V (run 37), 4% longer (the 1.5B job's RaaS attention 4.33 ms a
  step against 4.15; run 37 in docs/gpu-notes.md); taken from the K tiles the main loop loads anyway
  (each page's min / max over its valid keys, then the same two products per 16 pages, no kmin / kmax
  read: commit b4475aa, run 61), the same bounds and stamps but 3.6x slower (0.558 against 0.154 ms a
  layer). A separate loop keeps the main loop as it was. Even rows run it before the main loop and odd
  rows after it (`stagger_bounds`): run after it on every row, its dependent round trips fell in all
  programs' tails at once (0.156 against 0.154 ms a layer, run 54).
  With a RaaS refresh by the bounds and one split, the program holds its row's every bound: it runs
  the refresh itself with the helpers of kernels/bounded_update.py (`_row_ok`, `_refresh_mask`: the
  same rules, the top half from one sort of the row), which saves the step one launch per layer. The
  row's page metadata (fill, pinned, the current page) is loaded before the main loop, so its latency
  hides behind the page reads, and the bounds are gathered into a register row as the bounds pass
  computes them: the refresh adds no memory round trip to the program's tail.
* With MAIN False (`bounds_refresh`) stage 1 compiles its page loop and output out: a program runs the
  bounds pass and the refresh alone, for a step that runs the refresh on a second stream beside an
  attention without bounds (the same bounds, bit for bit, and the same stamps).
* With one split and no mass, stage 1 divides by l and writes the output itself (no stage 2).
* Stage 2, grid (B, Hkv): for each head, M = max_split m, L = sum_split 2^(m - M) l,
  out = sum_split 2^(m - M) acc / L. The page mass is 2^(lse_page - (M + log2 L)), i.e. the page's
  probability under the *global* softmax of that head, then max over the G heads of the group.

No host synchronisation: grid, split count and tile sizes come from shapes only, outputs and scratch
are allocated with torch.empty, so the op can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._jit import interpreting, lazy_jit, pdl_args
from .bounded_update import _RULES, _rank_key, _refresh_mask, _row_ok, bounded_update, refresh_block
from .page_scores import _page_key_bounds
from .reference import Refresh, refresh_after

_LOG2E = 1.4426950408889634


def _bounds_pass(q, ids_base, kmin_ptr, kmax_ptr, bounds_ptr, stride_is, stride_mn, stride_mh, stride_md,
                 b, kvh, split_start, split_end, pages_per_split, S, r_v, rs, dd, d_ok, row_ok,
                 HKV: tl.constexpr, DOT_PREC: tl.constexpr, REFRESH: tl.constexpr, BOUNDS_PAGES: tl.constexpr):
    """Quest bound of each entry of the split, BOUNDS_PAGES pages at a time on the tensor cores:
    sum_d max(q_d * hi_d, q_d * lo_d) = q+ . hi + q- . lo with q+ = max(q, 0), q- = q - q+ (products exact
    in fp32). Entries past the row's page count or -1: -inf. Stores them; with REFRESH also gathers them
    into the row vector r_v (returned)."""
    qp = tl.where(q > 0, q, tl.zeros_like(q))
    qn = q - qp
    sb = tl.arange(0, BOUNDS_PAGES)
    row_end = tl.minimum(split_start + pages_per_split, S)
    for s0 in range(split_start, row_end, BOUNDS_PAGES):
        pidx = s0 + sb
        has_j, lo, hi = _page_key_bounds(ids_base + pidx * stride_is, pidx < split_end, kvh, dd, d_ok, kmin_ptr,
                                         kmax_ptr, stride_mn, stride_mh, stride_md, stride_mn, stride_mh, stride_md)
        lo, hi = lo.to(q.dtype), hi.to(q.dtype)
        bnd = (tl.dot(qp, tl.trans(hi), input_precision=DOT_PREC)
               + tl.dot(qn, tl.trans(lo), input_precision=DOT_PREC))  # [GP, BOUNDS_PAGES]
        best = tl.max(tl.where(row_ok[:, None], bnd, float("-inf")), axis=0)
        best = tl.where(has_j, best, float("-inf"))
        tl.store(bounds_ptr + (b * HKV + kvh) * S + pidx, best, mask=pidx < row_end)
        if REFRESH:  # this chunk's bounds into the row vector, at columns s0 .. s0 + BOUNDS_PAGES - 1
            r_v += tl.sum(tl.where(sb[:, None] == rs[None, :] - s0, best[:, None], 0.0), axis=0)
    return r_v


def _decode_stage1(
    q_ptr, k_ptr, v_ptr, ids_ptr, fill_ptr, npages_ptr,
    acc_ptr, m_ptr, l_ptr, lse_ptr, out_ptr, stride_ob, stride_oh, stride_od,
    kmin_ptr, kmax_ptr, bounds_ptr, stride_mn, stride_mh, stride_md,
    stride_qb, stride_qh, stride_qd,
    stride_kn, stride_kh, stride_kp, stride_kd,
    stride_vn, stride_vh, stride_vp, stride_vd,
    stride_ib, stride_ih, stride_is,
    stride_fn, stride_fh,
    cur_ptr, slot_ptr, pos_ptr, top_ptr, pinned_ptr, stamp_ptr, stride_cs, stride_ch,
    qk_scale_log2,  # softmax scale * log2(e)
    S, pages_per_split, num_splits, refresh_alpha, refresh_scale,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, PPI: tl.constexpr,
    RETURN_MASS: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, HAS_NUM_PAGES: tl.constexpr,
    DIRECT: tl.constexpr, RETURN_BOUNDS: tl.constexpr,
    REFRESH: tl.constexpr, RULE: tl.constexpr, REFRESH_PINNED: tl.constexpr, BLOCK_S: tl.constexpr,
    STAGGER: tl.constexpr, BOUNDS_PAGES: tl.constexpr, K_FILL_MASK: tl.constexpr, PDL: tl.constexpr,
    MAIN: tl.constexpr = True,
):
    if PDL:  # programmatic dependent launch (kernels/_jit.py): the kernel before must have finished
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_listed = S
    if HAS_NUM_PAGES:  # entries past the row's count are not read at all (no loop iterations)
        num_listed = tl.minimum(tl.load(npages_ptr + b).to(tl.int32), S)
    BN: tl.constexpr = PPI * BLOCK_P

    rows = tl.arange(0, GP)  # query head within the group (padded)
    row_ok = rows < G
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    qh = kvh * G + rows
    q = tl.load(
        q_ptr + b * stride_qb + qh[:, None] * stride_qh + dd[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    ).to(k_ptr.dtype.element_ty)
    if DOT_F32:
        q = q.to(tl.float32)

    tok = tl.arange(0, BN)
    tok_page = tok // BLOCK_P  # which page of the tile
    tok_off = tok % BLOCK_P  # offset inside the page
    jj = tl.arange(0, PPI)

    split_start = split * pages_per_split
    split_end = tl.minimum(split_start + pages_per_split, num_listed)
    ids_base = ids_ptr + b * stride_ib + kvh * stride_ih

    rs = tl.arange(0, BLOCK_S)
    r_v = tl.zeros([BLOCK_S], tl.float32)  # with REFRESH: the row's bounds, gathered by the bounds pass
    if REFRESH:  # RaaS's refresh of this row (one split): its metadata now, used after the bounds
        r_slot = tl.load(slot_ptr + b).to(tl.int64)
        r_listed, r_ok, r_page, r_f, r_unpinned = _row_ok(
            ids_base, fill_ptr, pinned_ptr, kvh, tl.load(cur_ptr + r_slot * stride_cs + kvh * stride_ch), rs,
            num_listed, stride_is, stride_fn, stride_fh)  # (entries past the row's page count: -1)
        if not REFRESH_PINNED:
            r_ok = r_ok & r_unpinned

    # with STAGGER even rows take their bounds pass first: its dependent round trips then overlap the page
    # reads of the odd rows, instead of every program's tail coinciding; the other rows take it last
    if MAIN:
        lead = (b % 2) < STAGGER
    else:  # the bounds pass (and the refresh) alone: `bounds_refresh`
        lead = b >= 0
    if RETURN_BOUNDS:  # noqa: SIM102  (a compile-time switch, then the runtime test)
        if lead:
            r_v = _bounds_pass(q, ids_base, kmin_ptr, kmax_ptr, bounds_ptr, stride_is, stride_mn, stride_mh,
                               stride_md, b, kvh, split_start, split_end, pages_per_split, S, r_v, rs, dd, d_ok,
                               row_ok, HKV, DOT_PREC, REFRESH, BOUNDS_PAGES)

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BLOCK_D], tl.float32)

    for start in range(split_start, split_end if MAIN else split_start, PPI):
        idx = start + tok_page
        pid = tl.load(ids_base + idx * stride_is, mask=idx < split_end, other=-1)
        has = pid >= 0
        page = tl.where(has, pid, 0).to(tl.int64)
        f = tl.load(fill_ptr + page * stride_fn + kvh * stride_fh, mask=has, other=0)
        valid = has & (tok_off < f)

        # K: whole pages, so the loads need not wait for the pages' fill (the scores of offsets >= fill are
        # masked below): 3.0-3.5% faster a call than masking the loads by it, dense and RaaS alike (run 66)
        k_ok = has
        if K_FILL_MASK:  # (benchmarks/bench_step_kernels.py's comparison)
            k_ok = valid
        k = tl.load(
            k_ptr + page[:, None] * stride_kn + kvh * stride_kh + tok_off[:, None] * stride_kp
            + dd[None, :] * stride_kd,
            mask=k_ok[:, None] & d_ok[None, :], other=0.0,
        )
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale_log2  # [GP, BN], log2 units
        s = tl.where(valid[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: avoid inf - inf
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        if RETURN_MASS:
            if PPI == 1:
                psum = tl.sum(p, axis=1)[:, None]  # [GP, 1]: the tile is one page
            else:
                psum = tl.sum(tl.reshape(p, (GP, PPI, BLOCK_P)), axis=2)  # [GP, PPI]
            l_i = l_i * alpha + tl.sum(psum, axis=1)
        else:
            l_i = l_i * alpha + tl.sum(p, axis=1)

        v = tl.load(
            v_ptr + page[:, None] * stride_vn + kvh * stride_vh + tok_off[:, None] * stride_vp
            + dd[None, :] * stride_vd,
            mask=valid[:, None] & d_ok[None, :], other=0.0,
        )
        pv = p.to(v.dtype)
        if DOT_F32:
            pv = pv.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=DOT_PREC)
        m_i = m_new

        if RETURN_MASS:
            lse = m_use[:, None] + tl.log2(tl.where(psum > 0.0, psum, 1.0))
            lse = tl.where(psum > 0.0, lse, float("-inf"))
            pidx = start + jj
            tl.store(
                lse_ptr + (b * HQ + qh[:, None]) * S + pidx[None, :],
                lse,
                mask=row_ok[:, None] & (pidx[None, :] < split_end),
            )

    if RETURN_BOUNDS:
        if not lead:
            r_v = _bounds_pass(q, ids_base, kmin_ptr, kmax_ptr, bounds_ptr, stride_is, stride_mn, stride_mh,
                               stride_md, b, kvh, split_start, split_end, pages_per_split, S, r_v, rs, dd, d_ok,
                               row_ok, HKV, DOT_PREC, REFRESH, BOUNDS_PAGES)
        if REFRESH:  # the rule on the row (the same helpers as kernels/bounded_update.py), then the stamps
            refresh = _refresh_mask(r_v, r_listed, r_ok, r_f, rs, tl.load(top_ptr + r_slot), refresh_alpha,
                                    refresh_scale, RULE, BLOCK_S)
            tl.store(stamp_ptr + r_page * stride_fn + kvh * stride_fh, tl.zeros([BLOCK_S], tl.int64)
                     + tl.load(pos_ptr + b), mask=refresh & r_unpinned)

    if not MAIN:
        pass
    elif DIRECT:  # one split and no mass: the program holds the whole softmax, so it writes the output
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b * stride_ob + qh[:, None] * stride_oh + dd[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        head_row = (b * HQ + qh) * num_splits + split  # [GP]
        tl.store(m_ptr + head_row, m_i, mask=row_ok)
        tl.store(l_ptr + head_row, l_i, mask=row_ok)
        tl.store(acc_ptr + head_row[:, None] * D + dd[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


def _decode_stage2(
    acc_ptr, m_ptr, l_ptr, lse_ptr, out_ptr, mass_ptr, npages_ptr,
    stride_ob, stride_oh, stride_od,
    S, num_splits,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, NSP: tl.constexpr,
    BLOCK_S: tl.constexpr, RETURN_MASS: tl.constexpr, HAS_NUM_PAGES: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # programmatic dependent launch (kernels/_jit.py): the kernel before must have finished
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    num_listed = S
    if HAS_NUM_PAGES:
        num_listed = tl.minimum(tl.load(npages_ptr + b).to(tl.int32), S)
    sp = tl.arange(0, NSP)
    sp_ok = sp < num_splits
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D

    for g in range(G):
        row = b * HQ + kvh * G + g
        m = tl.load(m_ptr + row * num_splits + sp, mask=sp_ok, other=float("-inf"))
        l = tl.load(l_ptr + row * num_splits + sp, mask=sp_ok, other=0.0)
        m_max = tl.max(m, axis=0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.exp2(m - m_max)  # empty splits: 2^-inf = 0
        l_tot = tl.sum(w * l, axis=0)
        acc = tl.load(
            acc_ptr + (row * num_splits + sp[:, None]) * D + dd[None, :],
            mask=sp_ok[:, None] & d_ok[None, :], other=0.0,
        )
        o = tl.sum(w[:, None] * acc, axis=0) / l_tot
        tl.store(
            out_ptr + b * stride_ob + (kvh * G + g) * stride_oh + dd * stride_od,
            o.to(out_ptr.dtype.element_ty), mask=d_ok,
        )

    if RETURN_MASS:
        gg = tl.arange(0, GP)
        g_ok = gg < G
        rows = b * HQ + kvh * G + gg  # [GP]
        mm = tl.load(
            m_ptr + rows[:, None] * num_splits + sp[None, :],
            mask=g_ok[:, None] & sp_ok[None, :], other=float("-inf"),
        )
        ll = tl.load(
            l_ptr + rows[:, None] * num_splits + sp[None, :],
            mask=g_ok[:, None] & sp_ok[None, :], other=0.0,
        )
        m_max = tl.max(mm, axis=1)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
        l_tot = tl.sum(tl.exp2(mm - m_max[:, None]) * ll, axis=1)
        lse_tot = m_max + tl.log2(tl.where(l_tot > 0.0, l_tot, 1.0))  # [GP], global log2-sum-exp
        ss = tl.arange(0, BLOCK_S)
        for s0 in range(0, S, BLOCK_S):
            sidx = s0 + ss
            lse = tl.load(
                lse_ptr + rows[:, None] * S + sidx[None, :],
                mask=g_ok[:, None] & (sidx[None, :] < num_listed), other=float("-inf"),
            )
            mass = tl.max(tl.exp2(lse - lse_tot[:, None]), axis=0)  # [BLOCK_S]
            tl.store(mass_ptr + (b * HKV + kvh) * S + sidx, mass, mask=sidx < S)


_stage1 = lazy_jit(_decode_stage1, helpers=(_row_ok, _rank_key, _refresh_mask, _bounds_pass, _page_key_bounds))
_stage2 = lazy_jit(_decode_stage2)

# Tuning knobs of the split heuristic (shapes only; see choose_num_splits). Measured on nothing yet:
# benchmarks/bench_kernels.py sweeps num_splits on the GPU.
# resident stage-1 programs per SM, as counted at 4 warps (about 106 registers x 128 threads, ~40 KB smem);
# not re-derived for today's 2 warps: at the job shape the split sweep still finds 1 split fastest
CTAS_PER_SM = 4
MIN_TOKENS_PER_SPLIT = 256  # a split's (m, l, acc) traffic stays ~5% of its K/V bytes
MAX_SPLITS = 64
TILE_TOKENS = 64
# paged_decode_attention's stagger_bounds (see paged_decode_attention_impl), on since run 54 (the raas
# job's step 7.27 against 7.32 ms, attention 0.154 against 0.156 ms a layer); RAAS_BATCH_STAGGER_BOUNDS=0
# turns it off, to measure a job both ways
STAGGER_BOUNDS = os.environ.get("RAAS_BATCH_STAGGER_BOUNDS", "1") == "1"
# paged_decode_attention_impl's bounds_pages and k_fill_mask defaults (run 66: 32, False); the variables
# set them for a whole process, to compare a job or the 7B step both ways (RAAS_BATCH_BOUNDS_PAGES=16
# RAAS_BATCH_K_FILL_MASK=1: the kernel up to run 66)
BOUNDS_PAGES = int(os.environ.get("RAAS_BATCH_BOUNDS_PAGES", "32"))
K_FILL_MASK = os.environ.get("RAAS_BATCH_K_FILL_MASK", "0") == "1"


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def choose_num_splits(B: int, Hkv: int, S: int, P: int, device: torch.device) -> int:
    """Split count from shapes only (no device data, so CUDA-graph safe).

    All stage-1 programs do the same work (S / num_splits pages), so the kernel takes about
    waves * S / num_splits page-times, waves = ceil(B * Hkv * num_splits / slots) and
    slots = CTAS_PER_SM * SMs. Going up from 1, take a larger num_splits only when it cuts
    waves / num_splits by 10% or more; at least MIN_TOKENS_PER_SPLIT tokens of page list per split.
    """
    base = max(1, B * Hkv)
    slots = CTAS_PER_SM * _num_sms(device)
    cap = max(1, min(S, (S * P) // MIN_TOKENS_PER_SPLIT, MAX_SPLITS))
    best, best_cost = 1, float("inf")
    for ns in range(1, cap + 1):
        cost = triton.cdiv(base * ns, slots) / ns
        if cost < best_cost * 0.9:  # a larger split count must pay for its extra reduce traffic
            best, best_cost = ns, cost
    return best


def _refresh_args(refresh: Refresh | None, page_ids, fill, S: int):
    """Stage 1's refresh arguments: (metadata pointers and strides, the rule's constexprs, alpha and scale);
    without a refresh, placeholders (dead code under REFRESH=False)."""
    if refresh is None:
        return (page_ids,) * 6 + (0, 0), {"RULE": 0, "REFRESH_PINNED": False, "BLOCK_S": 16}, (0.0, 1.0)
    r = refresh
    assert all(t.shape == fill.shape and t.stride() == fill.stride() for t in (r.pinned, r.stamp))
    meta = (r.cur, r.slot_ids, r.positions, r.top, r.pinned.view(torch.uint8), r.stamp, *r.cur.stride())
    rule_args = {"RULE": _RULES[r.rule], "REFRESH_PINNED": r.refresh_pinned, "BLOCK_S": refresh_block(S)}
    return meta, rule_args, (float(r.alpha), float(r.scale))


def paged_decode_attention_impl(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_ids: torch.Tensor,
    fill: torch.Tensor,
    scale: float,
    return_mass: bool = False,
    num_pages: torch.Tensor | None = None,
    key_bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    refresh: Refresh | None = None,
    *,
    fuse_refresh: bool = True,
    num_splits: int | None = None,
    pages_per_iter: int | None = None,
    num_warps: int = 2,
    num_stages: int = 2,
    batch_invariant: bool = False,
    stagger_bounds: bool | None = None,
    bounds_pages: int | None = None,
    k_fill_mask: bool | None = None,
    maxnreg: int | None = None,
):
    """`paged_decode_attention` with its launch parameters exposed (for benchmarks and tuning).

    num_warps 2 (stage 1): at the 1.5B job shape 2 warps a program read the pages 5-8% faster than 4
    (run 41: raas L=1024 0.150 vs 0.158 ms a layer, dense at 3,100 tokens 0.386 vs 0.415; run 44: 0.153
    vs 0.161 and 0.394 vs 0.427); 1 and 8 warps, 2 splits, 1 or 3 stages, 2 or 8 pages a tile are slower
    (benchmarks/bench_step_kernels.py, tables in benchmarks/results/bench_step_kernels*.md).

    refresh (reference.Refresh): RaaS's refresh by the bounds (rules top_half and alpha) runs at the end
    of the stage-1 program when one split holds a whole row (the job's case), which then has every
    bound of its row (`_refresh_mask`, the same rules as kernels/bounded_update.py); otherwise, or with
    fuse_refresh False, the `bounded_update` kernel runs after the attention, on its results.

    batch_invariant: one split per (sequence, KV head) and a fixed tile of pages per iteration, so a
    row's result depends only on its own pages (not on the batch size or the table width, which set
    the split heuristic): `LLM(batch_invariant=True)`. Slower where few rows would leave SMs idle.

    stagger_bounds: with key_bounds, even rows run their bounds pass before the main loop and odd rows
    after it (False: every row after), so that the pass's dependent round trips do not fall in every
    program's tail at once (the same values either way). None: STAGGER_BOUNDS (on).

    bounds_pages: the bounds pass's pages a block (a power of two >= 16); None: BOUNDS_PAGES (32, run 66's
    fastest). k_fill_mask: mask the K loads by the pages' fill (the kernel up to run 66; the same values,
    slower); None: K_FILL_MASK (off). maxnreg: a cap on stage 1's registers a thread (more programs an SM;
    ptxas spills what does not fit); None: the compiler's choice (benchmarks/bench_step_kernels.py)."""
    B, Hq, D = q.shape
    N, Hkv, P, Dk = k_cache.shape
    S = page_ids.shape[2]
    assert Dk == D and v_cache.shape == k_cache.shape and Hq % Hkv == 0
    assert page_ids.shape[:2] == (B, Hkv) and fill.shape == (N, Hkv)
    G = Hq // Hkv
    GP = max(16, triton.next_power_of_2(G))
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_P = triton.next_power_of_2(P)
    if stagger_bounds is None:
        stagger_bounds = STAGGER_BOUNDS
    bounds_pages = BOUNDS_PAGES if bounds_pages is None else bounds_pages
    if bounds_pages < 16 or bounds_pages & (bounds_pages - 1):
        raise ValueError(f"bounds_pages (RAAS_BATCH_BOUNDS_PAGES) must be a power of two >= 16 (tl.dot's "
                         f"smallest tile), got {bounds_pages}")
    k_fill_mask = K_FILL_MASK if k_fill_mask is None else k_fill_mask
    if batch_invariant:
        num_splits, pages_per_iter = 1, max(1, TILE_TOKENS // BLOCK_P)
    if num_splits is None:
        num_splits = choose_num_splits(B, Hkv, S, P, q.device)
    num_splits = max(1, min(num_splits, S))
    pages_per_split = triton.cdiv(S, num_splits)
    num_splits = triton.cdiv(S, pages_per_split)  # no empty trailing split
    if pages_per_iter is None:
        pages_per_iter = max(1, min(TILE_TOKENS // BLOCK_P, triton.next_power_of_2(pages_per_split)))
    pages_per_iter = max(triton.next_power_of_2(pages_per_iter), 16 // min(BLOCK_P, 16))  # tl.dot: >= 16 rows
    dot_prec = "ieee" if k_cache.dtype == torch.float32 else "tf32"
    # The Triton interpreter multiplies bf16 dot operands as their raw uint16 bits: upcast there.
    dot_f32 = interpreting() and k_cache.dtype == torch.bfloat16

    dev = q.device
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=dev)
    if num_splits == 1 and not return_mass:  # stage 1 writes the output: no partial results
        acc = m = l = out
    else:
        acc = torch.empty((B, Hq, num_splits, D), dtype=torch.float32, device=dev)
        m = torch.empty((B, Hq, num_splits), dtype=torch.float32, device=dev)
        l = torch.empty((B, Hq, num_splits), dtype=torch.float32, device=dev)
    if return_mass:
        lse = torch.empty((B, Hq, S), dtype=torch.float32, device=dev)
        mass = torch.empty((B, Hkv, S), dtype=torch.float32, device=dev)
    else:
        lse = mass = m  # unused (dead code under RETURN_MASS=False)
    if key_bounds is not None:
        kmin, kmax = key_bounds
        assert kmin.shape == kmax.shape == (N, Hkv, D) and kmin.stride() == kmax.stride()
        assert kmin.dtype == kmax.dtype == k_cache.dtype
        bounds = torch.empty((B, Hkv, S), dtype=torch.float32, device=dev)
    else:
        kmin = kmax = bounds = m  # unused (dead code under RETURN_BOUNDS=False)

    def result():
        extras = ((mass,) if return_mass else ()) + ((bounds,) if key_bounds is not None else ())
        return (out, *extras) if extras else out

    if B == 0 or S == 0:
        mass.zero_()
        bounds.fill_(float("-inf"))
        return result()

    npages = num_pages if num_pages is not None else fill  # (unused when None)
    direct = num_splits == 1 and not return_mass
    fused = (fuse_refresh and refresh is not None and num_splits == 1 and key_bounds is not None
             and not refresh.on_mass)
    meta, rule_args, floats = _refresh_args(refresh if fused else None, page_ids, fill, S)
    _stage1()[(B, Hkv, num_splits)](
        q, k_cache, v_cache, page_ids, fill, npages,
        acc, m, l, lse, out, out.stride(0), out.stride(1), out.stride(2),
        kmin, kmax, bounds, *(kmin.stride() if key_bounds is not None else (0, 0, 0)),
        q.stride(0), q.stride(1), q.stride(2),
        *k_cache.stride(), *v_cache.stride(),
        page_ids.stride(0), page_ids.stride(1), page_ids.stride(2),
        fill.stride(0), fill.stride(1),
        *meta,
        float(scale) * _LOG2E,
        S, pages_per_split, num_splits, *floats,
        HQ=Hq, HKV=Hkv, G=G, GP=GP, D=D, BLOCK_D=BLOCK_D, BLOCK_P=BLOCK_P, PPI=pages_per_iter,
        RETURN_MASS=return_mass, DOT_PREC=dot_prec, DOT_F32=dot_f32, HAS_NUM_PAGES=num_pages is not None,
        DIRECT=direct, RETURN_BOUNDS=key_bounds is not None, REFRESH=fused, STAGGER=stagger_bounds, **rule_args,
        BOUNDS_PAGES=bounds_pages, K_FILL_MASK=k_fill_mask,
        num_warps=num_warps, num_stages=num_stages, **pdl_args(dev),
        **({"maxnreg": maxnreg} if maxnreg and not interpreting() else {}),
    )
    if direct:
        if not fused:
            refresh_after(bounded_update, result(), page_ids, fill, refresh, num_pages)
        return result()
    _stage2()[(B, Hkv)](
        acc, m, l, lse, out, mass, npages,
        out.stride(0), out.stride(1), out.stride(2),
        S, num_splits,
        HQ=Hq, HKV=Hkv, G=G, GP=GP, D=D, BLOCK_D=BLOCK_D,
        NSP=max(2, triton.next_power_of_2(num_splits)),
        # BLOCK_S only sizes the mass loop: without mass a fixed value, so the table's width, which grows
        # through a dense job, builds no variants of its own (run 69: 2 of the 6 stage-2 builds inside a realistic dense job)
        BLOCK_S=min(128, max(16, triton.next_power_of_2(S))) if return_mass else 16, RETURN_MASS=return_mass,
        HAS_NUM_PAGES=num_pages is not None, num_warps=4, **pdl_args(dev),
    )
    if not fused:
        refresh_after(bounded_update, result(), page_ids, fill, refresh, num_pages)
    return result()


def bounds_refresh(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, page_ids: torch.Tensor,
                   fill: torch.Tensor, refresh: Refresh, num_pages: torch.Tensor | None = None, *,
                   bounds_pages: int | None = None) -> torch.Tensor:
    """RaaS's refresh by the Quest bounds (rules top_half and alpha) without the attention: stage 1's
    bounds pass and rule with its page loop compiled out (MAIN=False), so the bounds, bit for bit, and
    the stamps are those of `paged_decode_attention(..., key_bounds=(kmin, kmax), refresh=refresh)`.
    For a step that runs the refresh beside an attention without bounds, on a second stream
    (raas_batch/layers/attention.py). Shapes as paged_decode_attention's; returns the bounds [B, Hkv, S]."""
    B, Hq, D = q.shape
    N, Hkv, Dk = kmin.shape
    S = page_ids.shape[2]
    assert Dk == D and kmax.shape == kmin.shape and kmin.stride() == kmax.stride() and Hq % Hkv == 0
    assert page_ids.shape[:2] == (B, Hkv) and fill.shape == (N, Hkv) and not refresh.on_mass
    bounds_pages = BOUNDS_PAGES if bounds_pages is None else bounds_pages
    bounds = torch.empty((B, Hkv, S), dtype=torch.float32, device=q.device)
    if B == 0 or S == 0:
        return bounds.fill_(float("-inf"))
    G = Hq // Hkv
    meta, rule_args, floats = _refresh_args(refresh, page_ids, fill, S)
    unused = (0, 0, 0, 0)  # the page loop's K / V strides (no page loop)
    _stage1()[(B, Hkv, 1)](
        q, kmin, kmax, page_ids, fill, num_pages if num_pages is not None else fill,
        bounds, bounds, bounds, bounds, bounds, 0, 0, 0,
        kmin, kmax, bounds, *kmin.stride(),
        q.stride(0), q.stride(1), q.stride(2),
        *unused, *unused,
        page_ids.stride(0), page_ids.stride(1), page_ids.stride(2),
        fill.stride(0), fill.stride(1),
        *meta,
        1.0, S, S, 1, *floats,
        HQ=Hq, HKV=Hkv, G=G, GP=max(16, triton.next_power_of_2(G)), D=D, BLOCK_D=triton.next_power_of_2(D),
        BLOCK_P=16, PPI=1, RETURN_MASS=False, DOT_PREC="ieee" if kmin.dtype == torch.float32 else "tf32",
        DOT_F32=interpreting() and kmin.dtype == torch.bfloat16, HAS_NUM_PAGES=num_pages is not None,
        DIRECT=True, RETURN_BOUNDS=True, REFRESH=True, STAGGER=False, **rule_args,
        BOUNDS_PAGES=bounds_pages, K_FILL_MASK=False, MAIN=False,
        num_warps=2, num_stages=2, **pdl_args(q.device),
    )
    return bounds


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_ids: torch.Tensor,
    fill: torch.Tensor,
    scale: float,
    return_mass: bool = False,
    num_pages: torch.Tensor | None = None,
    key_bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    refresh: Refresh | None = None,
):
    """Exact softmax attention of one query token per sequence over the listed pages (Triton).

    q: [B, Hq, D]; k_cache, v_cache: [N, Hkv, P, D]; page_ids: [B, Hkv, S] int32 (-1 = none);
    fill: [N, Hkv] int32; num_pages: [B] int32 or None: only the first num_pages[b] entries of row b
    are read (the rest count as -1, and cost no loop iterations). Returns out [B, Hq, D] in q's dtype
    and, if return_mass, mass [B, Hkv, S] float32 (per listed page softmax mass, max over the group's
    query heads, 0 for -1 and unread entries); with key_bounds = (kmin, kmax) ([N, Hkv, D]), also the
    pages' Quest bounds [B, Hkv, S] float32, equal to page_scores(q, kmin, kmax, page_ids) with unread
    entries -inf. Returns out alone, or the tuple (out, mass), (out, bounds) or (out, mass, bounds).
    refresh: a bounded policy's update after attention (reference.Refresh), run on this call's bounds or
    mass; RaaS's refresh runs inside the kernel where it can (paged_decode_attention_impl).
    Split-KV (FlashDecoding); no host sync, CUDA-graph capturable. See the module docstring.
    """
    return paged_decode_attention_impl(q, k_cache, v_cache, page_ids, fill, scale, return_mass, num_pages,
                                       key_bounds, refresh)


__all__ = ["bounds_refresh", "choose_num_splits", "paged_decode_attention", "paged_decode_attention_impl"]
