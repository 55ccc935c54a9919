"""The bounded KV policies' update after attention in Triton: RaaS's stamp refresh and H2O's mass
accumulation, one small kernel per layer.

Same contract as `kernels.reference.bounded_update` (the specification; tests compare the two exactly):
page_ids [B, Hkv, S] int32 (the pages read, -1 = none, any strides: the bounded policies pass a
stride-0 view over heads); values [B, Hkv, S] float32 (Quest bounds or attention mass); cur
[num_slots, Hkv] int64; slot_ids, positions [B] int64; top [num_slots] int64; fill [N, Hkv] int32,
pinned [N, Hkv] bool, stamp [N, Hkv] int64, mass [N, Hkv] float32 (in/out).

Grid (B, Hkv). A program loads its row of S pages and their metadata once and applies the rule (for
top_half and alpha it can also compute the Quest bounds itself, from q and the pages' kmin / kmax, when
the row has at most FUSED_SCORES_MAX_PAGES pages: one kernel per layer for RaaS's whole refresh):
- top_half (RaaS, arXiv 2502.11147: "the top 50%" of pages by the Quest bound, arXiv 2406.10774):
  a refreshable page's rank is the number of refreshable pages with a larger value, plus those with
  an equal value in an earlier column (a stable descending sort's position, computed as pairwise
  comparisons against BLOCK_J columns at a time); rank < top[slot] -> stamp = position;
- alpha: softmax over the listed, non-empty pages of (value * scale + log fill) > alpha -> stamp;
- mass (RaaS with exact attention mass, our extension): value > alpha -> stamp;
- accumulate (H2O, arXiv 2306.14048): mass[page] += value (pages are distinct in a row, so no races).
No host synchronisation; CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import lazy_jit

_RULES = {"top_half": 0, "alpha": 1, "mass": 2, "accumulate": 3}


def _row_ok(ids_row, fill_ptr, pinned_ptr, h, cur, cols, S, stride_is, stride_mn, stride_mh,
            REFRESH_PINNED: tl.constexpr):
    """(listed, refreshable, page, fill) of the row's columns `cols`."""
    pid = tl.load(ids_row + cols * stride_is, mask=cols < S, other=-1)
    listed = pid >= 0
    page = tl.where(listed, pid, 0).to(tl.int64)
    meta = page * stride_mn + h * stride_mh
    f = tl.load(fill_ptr + meta, mask=listed, other=0)
    ok = listed & (f > 0) & (page != cur)
    if not REFRESH_PINNED:
        ok = ok & (tl.load(pinned_ptr + meta, mask=listed, other=1) == 0)
    return listed, ok, page, f


def _quest_bounds(q_ptr, kmin_ptr, kmax_ptr, page, listed, b, h, stride_qb, stride_qh, stride_kn, stride_kh,
                  G: tl.constexpr, D: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_S: tl.constexpr):
    """[BLOCK_S] fp32 Quest bounds of the row's pages, max over the G query heads of KV head h:
    sum_d max(q_d kmax_d, q_d kmin_d), in fp32, a chunk of head dims at a time (as kernels/page_scores.py)."""
    best = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for g in range(G):
        bound = tl.zeros([BLOCK_S], tl.float32)
        for d0 in range(0, D, BLOCK_DC):
            dd = d0 + tl.arange(0, BLOCK_DC)
            d_ok = dd < D
            qv = tl.load(q_ptr + b * stride_qb + (h * G + g) * stride_qh + dd, mask=d_ok, other=0.0).to(tl.float32)
            at = page[:, None] * stride_kn + h * stride_kh + dd[None, :]
            m2 = listed[:, None] & d_ok[None, :]
            hi = tl.load(kmax_ptr + at, mask=m2, other=0.0).to(tl.float32)  # [BLOCK_S, DC]
            lo = tl.load(kmin_ptr + at, mask=m2, other=0.0).to(tl.float32)
            bound += tl.sum(tl.maximum(qv[None, :] * hi, qv[None, :] * lo), axis=1)
        best = tl.maximum(best, bound)
    return best


def _bounded_update_kernel(
    ids_ptr, val_ptr, cur_ptr, slot_ptr, pos_ptr, top_ptr,
    fill_ptr, pinned_ptr, stamp_ptr, mass_ptr, q_ptr, kmin_ptr, kmax_ptr,
    stride_ib, stride_ih, stride_is, stride_vb, stride_vh, stride_vs,
    stride_ss, stride_sh, stride_mn, stride_mh, stride_qb, stride_qh, stride_kn, stride_kh,
    S, alpha, scale,
    RULE: tl.constexpr, REFRESH_PINNED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr,
    SCORES: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_DC: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    ss = tl.arange(0, BLOCK_S)
    ids_row = ids_ptr + b * stride_ib + h * stride_ih
    val_row = val_ptr + b * stride_vb + h * stride_vh
    if not SCORES:
        v = tl.load(val_row + ss * stride_vs, mask=ss < S, other=0.0)
    if RULE == 3:
        pid = tl.load(ids_row + ss * stride_is, mask=ss < S, other=-1)
        listed = pid >= 0
        at = tl.where(listed, pid, 0).to(tl.int64) * stride_mn + h * stride_mh
        tl.store(mass_ptr + at, tl.load(mass_ptr + at, mask=listed, other=0.0) + v, mask=listed)
    else:
        slot = tl.load(slot_ptr + b).to(tl.int64)
        pos = tl.load(pos_ptr + b).to(tl.int64)
        cur = tl.load(cur_ptr + slot * stride_ss + h * stride_sh)
        listed, ok, page, f = _row_ok(ids_row, fill_ptr, pinned_ptr, h, cur, ss, S, stride_is,
                                      stride_mn, stride_mh, REFRESH_PINNED)
        if SCORES:  # the Quest bounds, computed here (the row's pages fit one block)
            v = _quest_bounds(q_ptr, kmin_ptr, kmax_ptr, page, listed, b, h, stride_qb, stride_qh, stride_kn,
                              stride_kh, G, D, BLOCK_DC, BLOCK_S)
        if RULE == 0 and SCORES:  # every pair at once: v and ok are in registers
            before = (v[None, :] > v[:, None]) | ((v[None, :] == v[:, None]) & (ss[None, :] < ss[:, None]))
            rank = tl.sum((before & ok[None, :]).to(tl.int32), axis=1)
            refresh = ok & (rank < tl.load(top_ptr + slot))
        elif RULE == 0:
            rank = tl.zeros([BLOCK_S], tl.int32)
            for j0 in range(0, S, BLOCK_J):
                jj = j0 + tl.arange(0, BLOCK_J)
                _, ok_j, _, _ = _row_ok(ids_row, fill_ptr, pinned_ptr, h, cur, jj, S, stride_is,
                                        stride_mn, stride_mh, REFRESH_PINNED)
                v_j = tl.load(val_row + jj * stride_vs, mask=jj < S, other=0.0)
                before = (v_j[None, :] > v[:, None]) | ((v_j[None, :] == v[:, None]) & (jj[None, :] < ss[:, None]))
                rank += tl.sum((before & ok_j[None, :]).to(tl.int32), axis=1)
            refresh = ok & (rank < tl.load(top_ptr + slot))
        elif RULE == 1:
            logit = v * scale + tl.log(tl.maximum(f, 1).to(tl.float32))
            logit = tl.where(listed & (f > 0), logit, float("-inf"))
            e = tl.exp(logit - tl.max(logit, axis=0))
            refresh = ok & (e / tl.sum(e, axis=0) > alpha)
        else:
            refresh = ok & (v > alpha)
        tl.store(stamp_ptr + page * stride_mn + h * stride_mh, tl.zeros([BLOCK_S], tl.int64) + pos, mask=refresh)


_kernel = lazy_jit(_bounded_update_kernel, helpers=(_row_ok, _quest_bounds))
FUSED_SCORES_MAX_PAGES = 0  # measured (docs/gpu-notes.md run 12): bounds in their own kernel are faster


def bounded_update(page_ids, values, cur, slot_ids, positions, top, fill, pinned, stamp, mass,
                   rule: str, refresh_pinned: bool = False, alpha: float = 0.0, scale: float = 1.0,
                   q=None, kmin=None, kmax=None) -> None:
    """Refresh stamps (RaaS) or accumulate attention mass (H2O) after attention, in place.
    See `kernels.reference.bounded_update` for the contract. With values None (rules top_half and
    alpha), the Quest bounds of q over kmin / kmax are computed in the same kernel."""
    B, Hkv, S = page_ids.shape
    assert all(t.shape == fill.shape and t.stride() == fill.stride() for t in (pinned, stamp, mass))
    if B == 0 or S == 0:
        return
    block_s = max(16, triton.next_power_of_2(S))
    scores = values is None
    if scores and block_s > FUSED_SCORES_MAX_PAGES:  # too many pages for one block: bounds in their own kernel
        from .page_scores import page_scores

        values, scores = page_scores(q, kmin, kmax, page_ids), False
    if scores:
        assert kmin.stride(2) == 1 and q.stride(2) == 1 and kmin.stride() == kmax.stride()
        qq, lo, hi, G, D = q, kmin, kmax, q.shape[1] // Hkv, q.shape[2]
        vals, vstride = page_ids, (0, 0, 0)
    else:
        assert values.shape == page_ids.shape and values.dtype == torch.float32
        qq = lo = hi = values  # unused (SCORES=False)
        G, D, vals, vstride = 1, 16, values, values.stride()
    _kernel()[(B, Hkv)](
        page_ids, vals, cur, slot_ids, positions, top,
        fill, pinned.view(torch.uint8), stamp, mass, qq, lo, hi,
        *page_ids.stride(), *vstride, cur.stride(0), cur.stride(1), fill.stride(0), fill.stride(1),
        qq.stride(0) if scores else 0, qq.stride(1) if scores else 0,
        lo.stride(0) if scores else 0, lo.stride(1) if scores else 0,
        S, float(alpha), float(scale),
        RULE=_RULES[rule], REFRESH_PINNED=refresh_pinned, BLOCK_S=block_s,
        BLOCK_J=max(1, min(32, 4096 // block_s)), SCORES=scores, G=G,
        D=D, BLOCK_DC=min(32, triton.next_power_of_2(D)),
        num_warps=4 if block_s >= 64 or scores else 1,
    )


__all__ = ["bounded_update"]
