"""The bounded KV policies' write step in Triton: choose each (sequence, KV head)'s page, evicting where
a page opens, in one small kernel per layer.

Same contract as `kernels.reference.bounded_write` (the specification; tests compare the two exactly):
table [B, W] int32 quota pages; slot_ids, positions [B] int64; sparse_pages, window [num_slots] int64;
cur, held, peak, evicted [num_slots, Hkv] int64 (in/out); fill, logical [N, Hkv] int32, pinned [N, Hkv]
bool, stamp [N, Hkv] int64, mass [N, Hkv] float32 (in/out). Returns [B, Hkv] int32.

Grid (B, Hkv), one program per (sequence, KV head). On 15 steps of 16 (page size 16) the token goes to
the current page: the program reads two per-sequence values and writes five. Only where the token
opens a page does it load the sequence's quota columns' metadata (fill, logical, pinned, key) and pick
the first empty usable column, or else the victim: the lowest key among held, unpinned pages inside
[min_logical, new page - window], ties to the smaller logical index (RaaS, arXiv 2502.11147: the
oldest stamp; H2O, arXiv 2306.14048: the least accumulated mass; StreamingLLM, arXiv 2309.17453:
the oldest page but the sink). Logical indices of held pages are distinct, so the choice is unique.
Keys are compared in their own type (int64 stamps and logical indices, fp32 mass), as the reference
does in fp64. No host synchronisation; shapes only, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import lazy_jit, pdl_args

_KEYS = {"stamp": 0, "mass": 1, "logical": 2}


def _choose_page(
    table_ptr, slot_ptr, pos_ptr, sparse_pages_ptr, window_ptr,
    cur_ptr, held_ptr, peak_ptr, evicted_ptr,
    fill_ptr, logical_ptr, pinned_ptr, stamp_ptr, mass_ptr,
    stride_tb, stride_tw, stride_ss, stride_sh, stride_mn, stride_mh,
    W, P, min_logical, b, h,
    BLOCK_W: tl.constexpr, KEY: tl.constexpr, STAMP_ON_WRITE: tl.constexpr,
):
    """(page, opened) of row b, head h: the page the token goes to (int64) and whether it opened now
    (then its fill was reset to 0 here). Updates the state and the opened page's metadata."""
    slot = tl.load(slot_ptr + b).to(tl.int64)
    pos = tl.load(pos_ptr + b).to(tl.int64)
    new_logical = pos // P
    opening = (pos % P) == 0
    state = slot * stride_ss + h * stride_sh
    cur = tl.load(cur_ptr + state)

    page = cur
    freed = tl.zeros([], tl.int64)
    evict = tl.zeros([], tl.int64)
    if opening:  # one step in page_size: choose the new page among the quota's columns
        cols = tl.arange(0, BLOCK_W)
        n = tl.load(sparse_pages_ptr + slot)
        win = tl.load(window_ptr + slot)
        tp = tl.load(table_ptr + b * stride_tb + cols * stride_tw, mask=(cols < W) & (cols < n), other=-1)
        usable = tp >= 0
        page_c = tl.where(usable, tp, 0).to(tl.int64)
        meta = page_c * stride_mn + h * stride_mh
        f = tl.load(fill_ptr + meta, mask=usable, other=0)
        lg = tl.load(logical_ptr + meta, mask=usable, other=0).to(tl.int64)
        pin = tl.load(pinned_ptr + meta, mask=usable, other=0)
        empty = usable & (f == 0)
        base = usable & (f > 0) & (pin == 0)
        cand = base & (lg <= new_logical - win) & (lg >= min_logical)
        any_cand = tl.max(cand.to(tl.int32), axis=0) > 0
        cand = tl.where(any_cand, cand, base)  # unreachable fallback (quotas leave a candidate): stay in quota
        if KEY == 1:
            key = tl.load(mass_ptr + meta, mask=usable, other=0.0)
            key = tl.where(cand, key, float("inf"))
        else:
            if KEY == 0:
                key = tl.load(stamp_ptr + meta, mask=usable, other=0).to(tl.int64)
            else:
                key = lg
            key = tl.where(cand, key, 9223372036854775807)
        best = tl.min(key, axis=0)
        tied = cand & (key == best)
        oldest = tl.min(tl.where(tied, lg, 9223372036854775807), axis=0)
        victim_col = tl.min(tl.where(tied & (lg == oldest), cols, BLOCK_W), axis=0)
        empty_col = tl.min(tl.where(empty, cols, BLOCK_W), axis=0)
        col = tl.where(empty_col < BLOCK_W, empty_col, victim_col)
        chosen = cols == col
        page = tl.sum(tl.where(chosen, page_c, 0), axis=0)
        evict = (empty_col >= BLOCK_W).to(tl.int64)
        freed = evict * tl.sum(tl.where(chosen, f, 0), axis=0).to(tl.int64)
        at = page * stride_mn + h * stride_mh
        tl.store(fill_ptr + at, 0)
        tl.store(logical_ptr + at, new_logical.to(tl.int32))
        tl.store(pinned_ptr + at, 0)
        tl.store(mass_ptr + at, 0.0)
        tl.store(stamp_ptr + at, pos)
    if STAMP_ON_WRITE:
        tl.store(stamp_ptr + page * stride_mn + h * stride_mh, pos)
    tl.store(cur_ptr + state, page)
    held_now = tl.load(held_ptr + state) + 1 - freed
    tl.store(held_ptr + state, held_now)
    tl.store(peak_ptr + state, tl.maximum(tl.load(peak_ptr + state), held_now))
    tl.store(evicted_ptr + state, tl.load(evicted_ptr + state) + evict)
    return page, opening


def _bounded_write_kernel(
    table_ptr, slot_ptr, pos_ptr, sparse_pages_ptr, window_ptr,
    cur_ptr, held_ptr, peak_ptr, evicted_ptr,
    fill_ptr, logical_ptr, pinned_ptr, stamp_ptr, mass_ptr, out_ptr,
    stride_tb, stride_tw, stride_ss, stride_sh, stride_mn, stride_mh,
    W, P, min_logical,
    HKV: tl.constexpr, BLOCK_W: tl.constexpr, KEY: tl.constexpr, STAMP_ON_WRITE: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # programmatic dependent launch (kernels/_jit.py): the kernel before must have finished
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    h = tl.program_id(1)
    page, _ = _choose_page(
        table_ptr, slot_ptr, pos_ptr, sparse_pages_ptr, window_ptr, cur_ptr, held_ptr, peak_ptr, evicted_ptr,
        fill_ptr, logical_ptr, pinned_ptr, stamp_ptr, mass_ptr,
        stride_tb, stride_tw, stride_ss, stride_sh, stride_mn, stride_mh, W, P, min_logical, b, h,
        BLOCK_W, KEY, STAMP_ON_WRITE)
    tl.store(out_ptr + b * HKV + h, page.to(tl.int32))


_kernel = lazy_jit(_bounded_write_kernel, helpers=(_choose_page,))


def bounded_write(table, slot_ids, positions, sparse_pages, window, cur, held, peak, evicted,
                  fill, logical, pinned, stamp, mass, page_size: int, key: str = "stamp",
                  min_logical: int = 0, stamp_on_write: bool = True) -> torch.Tensor:
    """The page each (sequence, KV head) appends to, evicting where a page opens -> [B, Hkv] int32.
    See `kernels.reference.bounded_write` for the contract; in place on the state and metadata."""
    B, W = table.shape
    Hkv = fill.shape[1]
    assert cur.shape == held.shape == peak.shape == evicted.shape and cur.shape[1] == Hkv
    assert cur.stride() == held.stride() == peak.stride() == evicted.stride()
    metas = (fill, logical, pinned, stamp, mass)
    assert all(t.shape == fill.shape and t.stride() == fill.stride() for t in metas)
    assert cur.dtype == torch.int64 and sparse_pages.dtype == torch.int64 and window.dtype == torch.int64
    out = torch.empty((B, Hkv), dtype=torch.int32, device=table.device)
    if B == 0:
        return out
    _kernel()[(B, Hkv)](
        table, slot_ids, positions, sparse_pages, window,
        cur, held, peak, evicted,
        fill, logical, pinned.view(torch.uint8), stamp, mass, out,
        table.stride(0), table.stride(1), cur.stride(0), cur.stride(1), fill.stride(0), fill.stride(1),
        W, page_size, min_logical,
        HKV=Hkv, BLOCK_W=max(16, triton.next_power_of_2(W)), KEY=_KEYS[key], STAMP_ON_WRITE=stamp_on_write,
        num_warps=1, **pdl_args(table.device),
    )
    return out


__all__ = ["bounded_write"]
