"""Append one decode token's key / value per (sequence, KV head) to its page, in place (Triton).

Same contract as `kernels.reference.kv_append` (the specification): k, v [B, Hkv, D];
k_cache, v_cache [N, Hkv, P, D]; kmin, kmax [N, Hkv, D]; fill [N, Hkv] int32; write_page [B, Hkv]
int32. For p = write_page[b, kvh] and o = fill[p, kvh] (the caller guarantees o < P and that no two
(b, kvh) name the same (page, head)): k_cache[p, kvh, o] = k[b, kvh], v_cache likewise; kmin / kmax of
(p, kvh) become k at o == 0 and take the elementwise min / max with k otherwise (Quest's page
representative, arXiv 2406.10774; RaaS keeps it per page, arXiv 2502.11147); fill[p, kvh] = o + 1.

Grid (B, Hkv), one program per token; nothing else in the caches is touched. The min / max is done
in fp32 on values already rounded to kmin's dtype, so it is exact. No host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import lazy_jit


def _kv_append_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, kmin_ptr, kmax_ptr, fill_ptr, wp_ptr,
    stride_kb, stride_kh, stride_kd,
    stride_vb, stride_vh, stride_vd,
    stride_cn, stride_ch, stride_cp, stride_cd,
    stride_dn, stride_dh, stride_dp, stride_dd,
    stride_mn, stride_mh, stride_md,
    stride_xn, stride_xh, stride_xd,
    stride_fn, stride_fh,
    stride_wb, stride_wh,
    D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D

    page = tl.load(wp_ptr + b * stride_wb + kvh * stride_wh).to(tl.int64)
    fptr = fill_ptr + page * stride_fn + kvh * stride_fh
    off = tl.load(fptr)

    kk = tl.load(k_ptr + b * stride_kb + kvh * stride_kh + dd * stride_kd, mask=d_ok)
    vv = tl.load(v_ptr + b * stride_vb + kvh * stride_vh + dd * stride_vd, mask=d_ok)
    tl.store(kc_ptr + page * stride_cn + kvh * stride_ch + off * stride_cp + dd * stride_cd,
             kk.to(kc_ptr.dtype.element_ty), mask=d_ok)
    tl.store(vc_ptr + page * stride_dn + kvh * stride_dh + off * stride_dp + dd * stride_dd,
             vv.to(vc_ptr.dtype.element_ty), mask=d_ok)

    kr = kk.to(kmin_ptr.dtype.element_ty).to(tl.float32)  # k as kmin / kmax store it
    mn_ptrs = kmin_ptr + page * stride_mn + kvh * stride_mh + dd * stride_md
    mx_ptrs = kmax_ptr + page * stride_xn + kvh * stride_xh + dd * stride_xd
    off_v = tl.zeros([BLOCK_D], tl.int32) + off  # broadcast (the interpreter rejects scalar & vector masks)
    first = off_v == 0
    # at offset 0 the old min / max are garbage (maybe NaN): not read at all
    old_mn = tl.load(mn_ptrs, mask=d_ok & (off_v > 0), other=0.0).to(tl.float32)
    old_mx = tl.load(mx_ptrs, mask=d_ok & (off_v > 0), other=0.0).to(tl.float32)
    new_mn = tl.where(first, kr, tl.minimum(old_mn, kr))
    new_mx = tl.where(first, kr, tl.maximum(old_mx, kr))
    tl.store(mn_ptrs, new_mn.to(kmin_ptr.dtype.element_ty), mask=d_ok)
    tl.store(mx_ptrs, new_mx.to(kmax_ptr.dtype.element_ty), mask=d_ok)
    tl.store(fptr, off + 1)


_kernel = lazy_jit(_kv_append_kernel)


def kv_append(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    fill: torch.Tensor,
    write_page: torch.Tensor,
) -> None:
    """Append one token per (sequence, KV head) to its page, in place.

    k, v: [B, Hkv, D]; k_cache, v_cache: [N, Hkv, P, D]; kmin, kmax: [N, Hkv, D]; fill: [N, Hkv] int32;
    write_page: [B, Hkv] int32. The token goes to offset fill[p, h] of page p = write_page[b, h]
    (fill < P there, pages distinct per head); kmin/kmax become k at offset 0 and take the elementwise
    min/max otherwise; fill increments. No host synchronisation.
    """
    B, Hkv, D = k.shape
    assert v.shape == k.shape and k_cache.shape[1] == Hkv and k_cache.shape[3] == D
    assert write_page.shape == (B, Hkv)
    if B == 0:
        return
    _kernel()[(B, Hkv)](
        k, v, k_cache, v_cache, kmin, kmax, fill, write_page,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        *kmin.stride(), *kmax.stride(), *fill.stride(), *write_page.stride(),
        D=D, BLOCK_D=triton.next_power_of_2(D),
        num_warps=1,
    )
    return


__all__ = ["kv_append"]
