"""Quest page scores in Triton: the upper bound of q.k over each listed page, max over the query group.

Same contract as `kernels.reference.page_scores` (the specification): q [B, Hq, D];
kmin, kmax [N, Hkv, D] (channel-wise min / max of each page's valid keys); page_ids [B, Hkv, S] int32
(-1 = none). Returns [B, Hkv, S] float32:
    score[b, kvh, s] = max_{h in group(kvh)} sum_d max(q[b,h,d] * kmax[p,kvh,d], q[b,h,d] * kmin[p,kvh,d])
with p = page_ids[b, kvh, s], and -inf where p == -1. The bound is Quest's (Tang et al., ICML 2024,
arXiv 2406.10774); the max over the G = Hq // Hkv heads of a group is RaaS's GQA rule (arXiv 2502.11147).

Grid (B, Hkv, cdiv(S, BLOCK_S)): a program gathers BLOCK_S pages' kmin / kmax rows once and loops
over the G query heads of the group, keeping the running max. fp32 arithmetic. No host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import lazy_jit, pdl_args


def _page_key_bounds(ids_at, ok, kvh, dd, d_ok, kmin_ptr, kmax_ptr, stride_mn, stride_mh, stride_md,
                     stride_xn, stride_xh, stride_xd):
    """The key bounds of a block of listed pages (page ids at `ids_at` where `ok`, -1 = none) ->
    (listed [n], kmin rows [n, BLOCK_D], kmax rows [n, BLOCK_D]) in the cache's dtype, 0 where unlisted.
    Shared with the decode attention's bounds pass (kernels/decode_attention.py)."""
    pid = tl.load(ids_at, mask=ok, other=-1)
    has = pid >= 0
    page = tl.where(has, pid, 0).to(tl.int64)
    m2 = has[:, None] & d_ok[None, :]
    lo = tl.load(kmin_ptr + page[:, None] * stride_mn + kvh * stride_mh + dd[None, :] * stride_md, mask=m2, other=0.0)
    hi = tl.load(kmax_ptr + page[:, None] * stride_xn + kvh * stride_xh + dd[None, :] * stride_xd, mask=m2, other=0.0)
    return has, lo, hi


def _page_scores_kernel(
    q_ptr, kmin_ptr, kmax_ptr, ids_ptr, out_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_mn, stride_mh, stride_md,
    stride_xn, stride_xh, stride_xd,
    stride_ib, stride_ih, stride_is,
    S,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # programmatic dependent launch (kernels/_jit.py): the kernel before must have finished
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sblk = tl.program_id(2)
    ss = sblk * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = ss < S
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D

    has, lo, hi = _page_key_bounds(ids_ptr + b * stride_ib + kvh * stride_ih + ss * stride_is, s_ok, kvh, dd, d_ok,
                                   kmin_ptr, kmax_ptr, stride_mn, stride_mh, stride_md, stride_xn, stride_xh, stride_xd)
    lo, hi = lo.to(tl.float32), hi.to(tl.float32)

    best = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for g in range(G):
        qv = tl.load(q_ptr + b * stride_qb + (kvh * G + g) * stride_qh + dd * stride_qd,
                     mask=d_ok, other=0.0).to(tl.float32)
        bound = tl.sum(tl.maximum(qv[None, :] * hi, qv[None, :] * lo), axis=1)
        best = tl.maximum(best, bound)
    best = tl.where(has, best, float("-inf"))
    tl.store(out_ptr + (b * HKV + kvh) * S + ss, best, mask=s_ok)


_kernel = lazy_jit(_page_scores_kernel, helpers=(_page_key_bounds,))


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, page_ids: torch.Tensor) -> torch.Tensor:
    """Quest upper bound of q.k over each listed page, max over the query heads of a KV head's group.

    q: [B, Hq, D]; kmin, kmax: [N, Hkv, D]; page_ids: [B, Hkv, S] int32 (-1 = none).
    Returns [B, Hkv, S] float32, -inf for -1 entries. No host synchronisation.
    """
    B, Hq, D = q.shape
    Hkv = kmin.shape[1]
    S = page_ids.shape[2]
    assert kmax.shape == kmin.shape and kmin.shape[2] == D and Hq % Hkv == 0
    assert page_ids.shape[:2] == (B, Hkv)
    out = torch.empty((B, Hkv, S), dtype=torch.float32, device=q.device)
    if B == 0 or S == 0:
        return out
    BLOCK_S = min(32, max(16, triton.next_power_of_2(S)))
    _kernel()[(B, Hkv, triton.cdiv(S, BLOCK_S))](
        q, kmin, kmax, page_ids, out,
        q.stride(0), q.stride(1), q.stride(2),
        kmin.stride(0), kmin.stride(1), kmin.stride(2),
        kmax.stride(0), kmax.stride(1), kmax.stride(2),
        page_ids.stride(0), page_ids.stride(1), page_ids.stride(2),
        S,
        HKV=Hkv, G=Hq // Hkv, D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_S=BLOCK_S,
        num_warps=4, **pdl_args(q.device),
    )
    return out


__all__ = ["page_scores"]
