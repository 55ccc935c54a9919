"""The bounded KV policies' update after attention in Triton: RaaS's stamp refresh and H2O's mass
accumulation, one small kernel per layer.

Same contract as `kernels.reference.bounded_update` (the specification; tests compare the two exactly):
page_ids [B, Hkv, S] int32 (the pages read, -1 = none, any strides: the bounded policies pass a
stride-0 view over heads); values [B, Hkv, S] float32 (Quest bounds or attention mass); cur
[num_slots, Hkv] int64; slot_ids, positions [B] int64; top [num_slots] int64; fill [N, Hkv] int32,
pinned [N, Hkv] bool, stamp [N, Hkv] int64, mass [N, Hkv] float32 (in/out).

Grid (B, Hkv). A program loads its row of S pages and their metadata once and applies the rule (the
decode attention applies the same rules with the same helpers, `_row_ok` and `_refresh_mask`, when it
runs RaaS's refresh itself: kernels/decode_attention.py):
- top_half (RaaS, arXiv 2502.11147: "the top 50%" of pages by the Quest bound, arXiv 2406.10774):
  a refreshable page's rank is the number of refreshable pages with a larger value, plus those with
  an equal value in an earlier column (a stable descending sort's position, from one `tl.sort` of
  the row: `_refresh_mask`); rank < top[slot] -> stamp = position;
- alpha: softmax over the listed, non-empty pages of (value * scale + log fill) > alpha -> stamp;
- mass (RaaS with exact attention mass, our extension): value > alpha -> stamp;
- accumulate (H2O, arXiv 2306.14048): mass[page] += value (pages are distinct in a row, so no races).
A pinned page's stamp and mass are never written: pinned prompt pages may be shared by the samples of
one request (several rows of a step), and a pinned page is never a victim, so nothing reads them.
No host synchronisation; CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import lazy_jit, pdl_args

_RULES = {"top_half": 0, "alpha": 1, "mass": 2, "accumulate": 3}


def _row_ok(ids_row, fill_ptr, pinned_ptr, h, cur, cols, S, stride_is, stride_mn, stride_mh):
    """(listed, refreshable but for the pin, page, fill, unpinned) of the row's columns `cols` (entries
    from S on count as -1)."""
    pid = tl.load(ids_row + cols * stride_is, mask=cols < S, other=-1)
    listed = pid >= 0
    page = tl.where(listed, pid, 0).to(tl.int64)
    meta = page * stride_mn + h * stride_mh
    f = tl.load(fill_ptr + meta, mask=listed, other=0)
    unpinned = tl.load(pinned_ptr + meta, mask=listed, other=1) == 0
    return listed, listed & (f > 0) & (page != cur), page, f, unpinned


def _rank_key(v, ok, cols, low, BLOCK_S: tl.constexpr):
    """top_half's sort key of each entry (any shape that v, ok and cols broadcast to, `low` of that shape
    filled with -2^63): the value's fp32 bits made order-preserving as an int32, shifted above the column, so
    that int order is (value descending, column ascending) order; entries not `ok` below every one that is."""
    bits = (v + 0.0).to(tl.int32, bitcast=True)  # (+ 0.0: -0.0 becomes +0.0, equal values tie)
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)  # int order = float order
    return tl.where(ok, (ordered << 32) | (BLOCK_S - 1 - cols), low + (BLOCK_S - 1 - cols))


def _refresh_mask(v, listed, ok, f, cols, top, alpha, scale, RULE: tl.constexpr, BLOCK_S: tl.constexpr):
    """Which refreshable entries (`ok`) of a row the rule refreshes, from the row's values v [BLOCK_S].
    top_half: the entries whose rank under a stable descending sort of the refreshable entries' values is
    below `top`. The rank comes from one sort of the row: a key per entry that orders like (value
    descending, column ascending) - the value's fp32 bits made order-preserving as an int32, shifted
    above the column - with the other entries' keys below every refreshable one; an entry is refreshed
    when its key is at least the top-th largest key (every refreshable entry when fewer than top exist)."""
    if RULE == 0:
        low = tl.full([BLOCK_S], -(1 << 63), tl.int64)  # below every refreshable entry's key
        key = _rank_key(v, ok, cols, low, BLOCK_S)
        desc = tl.sort(key, descending=True)
        kth = tl.max(tl.where(cols == top - 1, desc, low), axis=0)
        refresh = ok & (key >= kth) & ((cols * 0 + top) > 0)  # (vector: the interpreter rejects scalar masks)
    elif RULE == 1:
        logit = v * scale + tl.log(tl.maximum(f, 1).to(tl.float32))
        logit = tl.where(listed & (f > 0), logit, float("-inf"))
        e = tl.exp(logit - tl.max(logit, axis=0))
        refresh = ok & (e / tl.sum(e, axis=0) > alpha)
    else:
        refresh = ok & (v > alpha)
    return refresh


def _bounded_update_kernel(
    ids_ptr, val_ptr, cur_ptr, slot_ptr, pos_ptr, top_ptr,
    fill_ptr, pinned_ptr, stamp_ptr, mass_ptr,
    stride_ib, stride_ih, stride_is, stride_vb, stride_vh, stride_vs,
    stride_ss, stride_sh, stride_mn, stride_mh,
    S, alpha, scale,
    RULE: tl.constexpr, REFRESH_PINNED: tl.constexpr, BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # programmatic dependent launch (kernels/_jit.py): the kernel before must have finished
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    h = tl.program_id(1)
    ss = tl.arange(0, BLOCK_S)
    ids_row = ids_ptr + b * stride_ib + h * stride_ih
    v = tl.load(val_ptr + b * stride_vb + h * stride_vh + ss * stride_vs, mask=ss < S, other=0.0)
    if RULE == 3:
        pid = tl.load(ids_row + ss * stride_is, mask=ss < S, other=-1)
        listed = pid >= 0
        at = tl.where(listed, pid, 0).to(tl.int64) * stride_mn + h * stride_mh
        listed = listed & (tl.load(pinned_ptr + at, mask=listed, other=1) == 0)
        tl.store(mass_ptr + at, tl.load(mass_ptr + at, mask=listed, other=0.0) + v, mask=listed)
    else:
        slot = tl.load(slot_ptr + b).to(tl.int64)
        cur = tl.load(cur_ptr + slot * stride_ss + h * stride_sh)
        listed, ok, page, f, unpinned = _row_ok(ids_row, fill_ptr, pinned_ptr, h, cur, ss, S, stride_is,
                                                stride_mn, stride_mh)
        if not REFRESH_PINNED:
            ok = ok & unpinned
        refresh = _refresh_mask(v, listed, ok, f, ss, tl.load(top_ptr + slot), alpha, scale, RULE, BLOCK_S)
        # a pinned page's stamp is never written (refresh_pinned lets it take a refresh slot only)
        tl.store(stamp_ptr + page * stride_mn + h * stride_mh, tl.zeros([BLOCK_S], tl.int64) + tl.load(pos_ptr + b),
                 mask=refresh & unpinned)


_kernel = lazy_jit(_bounded_update_kernel, helpers=(_row_ok, _rank_key, _refresh_mask))


def refresh_block(S: int) -> int:
    """BLOCK_S of the refresh over rows of S entries: the whole row in one block (a power of two)."""
    return max(16, triton.next_power_of_2(S))


def bounded_update(page_ids, values, cur, slot_ids, positions, top, fill, pinned, stamp, mass,
                   rule: str, refresh_pinned: bool = False, alpha: float = 0.0, scale: float = 1.0,
                   q=None, kmin=None, kmax=None) -> None:
    """Refresh stamps (RaaS) or accumulate attention mass (H2O) after attention, in place.
    See `kernels.reference.bounded_update` for the contract. The engine passes the Quest bounds that
    the decode-attention kernel computed (key_bounds); with values None (rules top_half and alpha) the
    page_scores kernel computes them first. Computing them inside this kernel was measured slower on
    the H200 (docs/gpu-notes.md, runs 10-13)."""
    B, Hkv, S = page_ids.shape
    assert all(t.shape == fill.shape and t.stride() == fill.stride() for t in (pinned, stamp, mass))
    if B == 0 or S == 0:
        return
    if values is None:
        from .page_scores import page_scores

        values = page_scores(q, kmin, kmax, page_ids)
    assert values.shape == page_ids.shape and values.dtype == torch.float32
    block_s = refresh_block(S)
    _kernel()[(B, Hkv)](
        page_ids, values, cur, slot_ids, positions, top,
        fill, pinned.view(torch.uint8), stamp, mass,
        *page_ids.stride(), *values.stride(), cur.stride(0), cur.stride(1), fill.stride(0), fill.stride(1),
        S, float(alpha), float(scale),
        RULE=_RULES[rule], REFRESH_PINNED=refresh_pinned, BLOCK_S=block_s,
        num_warps=4 if block_s >= 128 else 1, **pdl_args(page_ids.device),
    )


__all__ = ["bounded_update", "refresh_block"]
