"""RaaS's refresh by the Quest bounds, run once per page instead of once per step: the deferred refresh.

Same contract as `kernels.reference.window_refresh` (the specification; tests compare the two exactly).

Why it is exact. A RaaS step refreshes the stamps of a row's pages from that step's query and the pages'
key bounds, and the only reader of the stamps is the victim choice, which runs when the row opens a page.
Between two page openings nothing that the refresh reads changes, except the query: the row's set of
pages, their fills and pins and key bounds stay as they are (only the current page takes tokens, and the
refresh never scores it), and so do the row's current page and its `top`. So, under the top_half rule,
which ranks the refreshable pages alone, the refreshes of the steps
that fill one page can all run at the step that fills it, from the queries of those steps kept in a ring
of P entries a slot, and leave the stamps that the steps would have left one by one: a page's stamp is
the position of the last of those steps that refreshed it. The victim choice at the next opening then
sees exactly the stamps it would have seen; in between, a row's stamps lag behind by up to P - 1 steps,
and nothing reads them. The alpha rule is not deferrable: its softmax runs over every listed page, the
current one included, whose fill and bounds change at every step (the per-step refresh serves it).

What it saves: the per-step refresh reads every held page's kmin / kmax rows (1/P of its K and V bytes)
from memory at every step; this one reads them once a page, for the rows whose current page has just
filled (1/P of the rows at a step, when the rows' prompts have spread lengths). Every row still stores
its query into the ring every step (its G query heads, D values each).

Grid (B, Hkv). A program stores its row's query into ring[slot, position % P] (the heads of its KV
head's group). If the row's current page is full after this step's append, it then scores the page's
window, positions max(position - P + 1, first_pos[slot]) .. position, with those steps' queries from
the ring: each block of BOUNDS_PAGES pages' kmin / kmax rows is loaded once, and GP / GW steps of GW
query-head rows go through each product (8 steps, 64 rows, at the 1.5B and 7B shapes: run 98 found the
closing programs' chain of products shorter that way than at 2 steps, 16 rows), so every bound is the
product of the operands of the per-step bounds pass (`_bounds_pass` in kernels/decode_attention.py),
reduced over D in the same order: the same bits (the GPU tests compare the sampled tokens and stamps).
The scores go to a scratch [P, BLOCK_S] a row, one sort a step ranks them with top_half's keys
(`_rank_key`, shared with `_refresh_mask`), and the program stores, for each page a step of the window
refreshed, the position of the last such step. first_pos is the position of the slot's first decode
step (its prompt's length): the positions before it were prefilled, and a prefill refreshes nothing.
A first version ran `_bounds_pass` and `_refresh_mask` once per step of the window: 95 us a layer, the
dependent chain of the few rows whose page filled, and 8% slower decode steps (run 77, docs/gpu-notes.md).
A closing program is a chain of loads from L2, each waited for: with `prefetch` each product's queries are
loaded before the product ahead of them and its store, which took its cost beside the attention from
15 to 12 us a layer (run 86); two products ahead was no better.
No host synchronisation; CUDA-graph capturable.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._jit import interpreting, lazy_jit, pdl_args
from .bounded_update import _rank_key, _row_ok
from .decode_attention import BOUNDS_PAGES, _refresh_args
from .page_scores import _page_key_bounds
from .reference import Refresh


def _window_refresh_kernel(
    q_ptr, kmin_ptr, kmax_ptr, ids_ptr, fill_ptr, npages_ptr, ring_ptr, first_ptr, bounds_ptr,
    cur_ptr, slot_ptr, pos_ptr, top_ptr, pinned_ptr, stamp_ptr, stride_cs, stride_ch,
    stride_qb, stride_qh, stride_qd,
    stride_mn, stride_mh, stride_md,
    stride_ib, stride_ih, stride_is,
    stride_fn, stride_fh,
    stride_rs, stride_rp, stride_rh, stride_rd,
    S, refresh_alpha, refresh_scale,
    P: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GW: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_NUM_PAGES: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
    RULE: tl.constexpr, REFRESH_PINNED: tl.constexpr, BLOCK_S: tl.constexpr, BOUNDS_PAGES: tl.constexpr,
    PREFETCH: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # programmatic dependent launch (kernels/_jit.py): the kernel before must have finished
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    pos = tl.load(pos_ptr + b).to(tl.int64)
    rows = tl.arange(0, GW)  # query head within the group (padded to a power of two)
    row_ok = rows < G
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    m2 = row_ok[:, None] & d_ok[None, :]
    qh = kvh * G + rows
    q = tl.load(q_ptr + b * stride_qb + qh[:, None] * stride_qh + dd[None, :] * stride_qd, mask=m2, other=0.0)
    ring_row = ring_ptr + slot * stride_rs + qh[:, None] * stride_rh + dd[None, :] * stride_rd
    tl.store(ring_row + (pos % P) * stride_rp, q.to(ring_ptr.dtype.element_ty), mask=m2)

    cur = tl.load(cur_ptr + slot * stride_cs + kvh * stride_ch)
    f_cur = tl.load(fill_ptr + tl.maximum(cur, 0) * stride_fn + kvh * stride_fh, mask=cur >= 0, other=0)
    if f_cur >= P:  # the current page is full: this step closes its window
        tl.debug_barrier()  # (the ring row just stored, read back below by the program's other threads)
        num_listed = S
        if HAS_NUM_PAGES:
            num_listed = tl.minimum(tl.load(npages_ptr + b).to(tl.int32), S)
        ids_base = ids_ptr + b * stride_ib + kvh * stride_ih
        rs = tl.arange(0, BLOCK_S)
        _, ok, page, _, unpinned = _row_ok(ids_base, fill_ptr, pinned_ptr, kvh, cur, rs, num_listed,
                                           stride_is, stride_fn, stride_fh)
        if not REFRESH_PINNED:
            ok = ok & unpinned
        w0 = tl.maximum(pos - P + 1, tl.load(first_ptr + slot).to(tl.int64))  # the window's first step
        # The window's bounds, step j (position pos - P + 1 + j) in row j of the scratch [P, BLOCK_S]: each block
        # of BOUNDS_PAGES pages loaded once, then SPP = GP / GW steps a product. SPP steps of GW query heads make
        # the GP rows of a product whose every entry is the bounds pass's (kernels/decode_attention.py) on the
        # same operands as the refresh at that step: the same bits.
        SPP: tl.constexpr = GP // GW
        pr = tl.arange(0, GP)
        pg = pr % GW  # query head of the row
        pg_ok = pg < G
        ring_heads = ring_ptr + slot * stride_rs + (kvh * G + pg)[:, None] * stride_rh + dd[None, :] * stride_rd
        scratch_row = bounds_ptr + (b * HKV + kvh) * (P * BLOCK_S)
        sb = tl.arange(0, BOUNDS_PAGES)
        steps = tl.arange(0, SPP)
        for s0 in range(0, S, BOUNDS_PAGES):
            pidx = s0 + sb
            has_j, lo, hi = _page_key_bounds(ids_base + pidx * stride_is, pidx < num_listed, kvh, dd, d_ok, kmin_ptr,
                                             kmax_ptr, stride_mn, stride_mh, stride_md, stride_mn, stride_mh, stride_md)
            if DOT_F32:
                lo, hi = lo.to(tl.float32), hi.to(tl.float32)
            if PREFETCH:
                qx = _ring_tile(ring_heads, 0, pos, w0, pr, pg_ok, d_ok, stride_rp, P, GW, SPP)
            for i in tl.static_range((P + SPP - 1) // SPP):
                if PREFETCH:  # the next product's queries, loaded before this product and its store (run 86: -3.4 us a layer)
                    qx_next = _ring_tile(ring_heads, i + 1, pos, w0, pr, pg_ok, d_ok, stride_rp, P, GW, SPP)
                else:
                    qx = _ring_tile(ring_heads, i, pos, w0, pr, pg_ok, d_ok, stride_rp, P, GW, SPP)
                qx = qx.to(kmin_ptr.dtype.element_ty)
                if DOT_F32:
                    qx = qx.to(tl.float32)
                qp = tl.where(qx > 0, qx, tl.zeros_like(qx))
                qn = qx - qp
                bnd = (tl.dot(qp, tl.trans(hi), input_precision=DOT_PREC)
                       + tl.dot(qn, tl.trans(lo), input_precision=DOT_PREC))  # [GP, BOUNDS_PAGES]
                best = tl.max(tl.reshape(tl.where(pg_ok[:, None], bnd, float("-inf")), (SPP, GW, BOUNDS_PAGES)), axis=1)
                best = tl.where(has_j[None, :], best, float("-inf"))
                tl.store(scratch_row + (i * SPP + steps)[:, None] * BLOCK_S + pidx[None, :], best,
                         mask=(i * SPP + steps < P)[:, None] & (pidx < S)[None, :])
                if PREFETCH:
                    qx = qx_next
        tl.debug_barrier()
        jj = tl.arange(0, P)
        xj = pos - P + 1 + jj  # [P] each row's position
        v = tl.load(scratch_row + jj[:, None] * BLOCK_S + rs[None, :], mask=(rs < S)[None, :], other=0.0)
        refresh = _top_half_rows(v, ok, rs, tl.load(top_ptr + slot), P, BLOCK_S)
        last = tl.max(tl.where(refresh & (xj >= w0)[:, None] & unpinned[None, :], xj[:, None], -1), axis=0)
        tl.store(stamp_ptr + page * stride_fn + kvh * stride_fh, last, mask=last >= 0)


def _ring_tile(ring_heads, i, pos, w0, pr, pg_ok, d_ok, stride_rp, P: tl.constexpr, GW: tl.constexpr,
               SPP: tl.constexpr):
    """The queries of the window's steps i * SPP .. i * SPP + SPP - 1 from the ring, as the rows of one product
    [GP, D] (zeros past the window: none for i * SPP >= P)."""
    j = i * SPP + pr // GW  # [GP] the rows' steps
    x = pos - P + 1 + j
    return tl.load(ring_heads + (x % P)[:, None] * stride_rp, mask=(pg_ok & (j < P) & (x >= w0))[:, None] & d_ok[None, :],
                   other=0.0)


def _top_half_rows(v, ok, cols, top, R: tl.constexpr, BLOCK_S: tl.constexpr):
    """`_refresh_mask`'s top_half rule (kernels/bounded_update.py) on R rows of values v [R, BLOCK_S] at once,
    the refreshable entries `ok` [BLOCK_S] the same in every row: its keys (`_rank_key`) and one sort a row."""
    low = tl.full([R, BLOCK_S], -(1 << 63), tl.int64)  # below every refreshable entry's key
    key = _rank_key(v, ok[None, :], cols[None, :], low, BLOCK_S)
    desc = tl.sort(key, descending=True)
    kth = tl.max(tl.where(cols[None, :] == top - 1, desc, low), axis=1)
    return ok[None, :] & (key >= kth[:, None]) & ((cols[None, :] * 0 + top) > 0)


_kernel = lazy_jit(_window_refresh_kernel, helpers=(_row_ok, _rank_key, _ring_tile, _top_half_rows, _page_key_bounds))


def window_refresh(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, page_ids: torch.Tensor,
                   fill: torch.Tensor, refresh: Refresh, num_pages: torch.Tensor | None, ring: torch.Tensor,
                   first_pos: torch.Tensor, *, bounds_pages: int | None = None, prefetch: bool = True,
                   steps_a_product: int | None = None, num_warps: int = 4) -> None:
    """The deferred refresh of one layer's decode step (module docstring). q [B, Hq, D] (rotated), kmin /
    kmax [N, Hkv, D], page_ids [B, Hkv, S], fill [N, Hkv], num_pages [B] or None: as `bounds_refresh`'s;
    ring [num_slots, P, Hq, D] (the layer's queries of the last P steps of each slot, in the cache's dtype),
    first_pos [num_slots] int64. Rule top_half only (module docstring). Updates the ring and, for the rows whose current
    page is full, the stamps. prefetch False: each product's queries loaded after the product before it (the
    kernel up to run 85; the same stamps). steps_a_product: the window's steps in one product (GP / GW; by
    default 8, capped so that a product has at most 64 rows, at least 16), a power of two."""
    B, Hq, D = q.shape
    N, Hkv, Dk = kmin.shape
    S = page_ids.shape[2]
    P = ring.shape[1]
    assert Dk == D and kmax.shape == kmin.shape and kmin.stride() == kmax.stride() and Hq % Hkv == 0
    assert page_ids.shape[:2] == (B, Hkv) and fill.shape == (N, Hkv) and refresh.rule == "top_half"
    assert ring.shape[2:] == (Hq, D) and ring.dtype == kmin.dtype
    if B == 0 or S == 0:
        return
    G = Hq // Hkv
    if steps_a_product is None:  # (an A/B knob of the job benchmark, read when the step is captured)
        steps_a_product = int(os.environ.get("RAAS_BATCH_WINDOW_STEPS", "0")) or None
    GW = triton.next_power_of_2(G)
    # 8 steps a product by default (64 rows at G = 6 or 7), no more than 64 rows unless a group is larger: run 98,
    # 255.8 us a layer against ~261 with 2 steps (16 rows, the kernel up to run 97), 264.9 with 4
    # (the fixed job's step: 7.03 against 7.04 ms, run 99: the layer rows overstate the refresh's cost in the job)
    GP = max(16, GW, min(64, 8 * GW)) if steps_a_product is None else GW * steps_a_product
    assert GP >= 16 and GP % GW == 0 and GP & (GP - 1) == 0, "steps_a_product: a power of two, 16 rows at least"
    meta, rule_args, floats = _refresh_args(refresh, page_ids, fill, S)
    block_s = rule_args["BLOCK_S"]
    bounds = torch.empty((B, Hkv, P, block_s), dtype=torch.float32, device=q.device)  # the window's bounds
    _kernel()[(B, Hkv)](
        q, kmin, kmax, page_ids, fill, num_pages if num_pages is not None else fill, ring, first_pos, bounds,
        *meta,
        q.stride(0), q.stride(1), q.stride(2),
        *kmin.stride(),
        page_ids.stride(0), page_ids.stride(1), page_ids.stride(2),
        fill.stride(0), fill.stride(1),
        *ring.stride(),
        S, *floats,
        P=P, HKV=Hkv, G=G, GW=GW, GP=GP, D=D, BLOCK_D=triton.next_power_of_2(D),
        HAS_NUM_PAGES=num_pages is not None, DOT_PREC="ieee" if kmin.dtype == torch.float32 else "tf32",
        DOT_F32=interpreting() and kmin.dtype == torch.bfloat16, **rule_args,
        BOUNDS_PAGES=BOUNDS_PAGES if bounds_pages is None else bounds_pages, PREFETCH=prefetch,
        num_warps=num_warps, num_stages=2, **pdl_args(q.device),
    )
