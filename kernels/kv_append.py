"""Append one decode token's key / value per (sequence, KV head) to its page, in place (Triton).

Same contract as `kernels.reference.kv_append` (the specification): k, v [B, Hkv, D];
k_cache, v_cache [N, Hkv, P, D]; kmin, kmax [N, Hkv, D]; fill [N, Hkv] int32; write_page [B, Hkv]
int32. For p = write_page[b, kvh] and o = fill[p, kvh] (the caller guarantees o < P and that no two
(b, kvh) name the same (page, head)): k_cache[p, kvh, o] = k[b, kvh], v_cache likewise; kmin / kmax of
(p, kvh) become k at o == 0 and take the elementwise min / max with k otherwise (Quest's page
representative, arXiv 2406.10774; RaaS keeps it per page, arXiv 2502.11147); fill[p, kvh] = o + 1.

Grid (B, Hkv), one program per token; nothing else in the caches is touched. The min / max is done
in fp32 on values already rounded to kmin's dtype, so it is exact. No host synchronisation.

Two fusions that the decode step uses (each saves a kernel per layer, ~5 us of launch and ramp on an
H200, where the work itself is a few hundred bytes per program):
- `rope`: the program also applies RoPE, to its key on the way to the cache and to the G query heads
  of its group in place, with kernels/rotary.py's arithmetic (so the bits are the same);
- `bounded_write_append`: the program first runs the bounded policies' write step
  (kernels/bounded_write.py's `_choose_page`: the page, evicting where one opens), then appends.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import lazy_jit, pdl_args
from .bounded_write import _KEYS, _choose_page


def _store_key(kr, dd, d_ok, kc_at, kmin_at, kmax_at, stride_cd, stride_md, stride_xd, off,
               BLOCK: tl.constexpr):
    """Write key values kr (k's dtype) at dims dd of the token's cache row (kc_at) and fold them into the
    page's min / max (kmin_at / kmax_at: the page's rows; off: the token's offset in the page)."""
    tl.store(kc_at + dd * stride_cd, kr.to(kc_at.dtype.element_ty), mask=d_ok)
    kb = kr.to(kmin_at.dtype.element_ty).to(tl.float32)  # k as kmin / kmax store it
    off_v = tl.zeros([BLOCK], tl.int32) + off  # broadcast (the interpreter rejects scalar & vector masks)
    first = off_v == 0
    # at offset 0 the old min / max are garbage (maybe NaN): not read at all
    old_mn = tl.load(kmin_at + dd * stride_md, mask=d_ok & (off_v > 0), other=0.0).to(tl.float32)
    old_mx = tl.load(kmax_at + dd * stride_xd, mask=d_ok & (off_v > 0), other=0.0).to(tl.float32)
    tl.store(kmin_at + dd * stride_md, tl.where(first, kb, tl.minimum(old_mn, kb)).to(kmin_at.dtype.element_ty),
             mask=d_ok)
    tl.store(kmax_at + dd * stride_xd, tl.where(first, kb, tl.maximum(old_mx, kb)).to(kmax_at.dtype.element_ty),
             mask=d_ok)


def _kv_append_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, kmin_ptr, kmax_ptr, fill_ptr, wp_ptr,
    q_ptr, cos_ptr, sin_ptr, pos_ptr,
    table_ptr, slot_ptr, sparse_pages_ptr, window_ptr, cur_ptr, held_ptr, peak_ptr, evicted_ptr,
    logical_ptr, pinned_ptr, stamp_ptr, mass_ptr,
    stride_kb, stride_kh, stride_kd,
    stride_vb, stride_vh, stride_vd,
    stride_cn, stride_ch, stride_cp, stride_cd,
    stride_dn, stride_dh, stride_dp, stride_dd,
    stride_mn, stride_mh, stride_md,
    stride_xn, stride_xh, stride_xd,
    stride_fn, stride_fh,
    stride_wb, stride_wh,
    stride_qb, stride_qh, stride_c,
    stride_tb, stride_tw, stride_ss, stride_sh,
    W, P, min_logical,
    D: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    CHOOSE: tl.constexpr, BLOCK_W: tl.constexpr, KEY: tl.constexpr, STAMP_ON_WRITE: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # programmatic dependent launch (kernels/_jit.py): the kernel before must have finished
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    kvh = tl.program_id(1)

    fptr = fill_ptr + kvh * stride_fh
    if CHOOSE:  # the bounded policies' write step (bounded_write.py) in the same program
        page, opened = _choose_page(
            table_ptr, slot_ptr, pos_ptr, sparse_pages_ptr, window_ptr, cur_ptr, held_ptr, peak_ptr, evicted_ptr,
            fill_ptr, logical_ptr, pinned_ptr, stamp_ptr, mass_ptr,
            stride_tb, stride_tw, stride_ss, stride_sh, stride_fn, stride_fh, W, P, min_logical, b, kvh,
            BLOCK_W, KEY, STAMP_ON_WRITE)
        tl.store(wp_ptr + b * stride_wb + kvh * stride_wh, page.to(tl.int32))
        fptr += page * stride_fn
        off = tl.where(opened, 0, tl.load(fptr))  # an opened page's fill was just reset to 0
    else:
        page = tl.load(wp_ptr + b * stride_wb + kvh * stride_wh).to(tl.int64)
        fptr += page * stride_fn
        off = tl.load(fptr)

    kc_at = kc_ptr + page * stride_cn + kvh * stride_ch + off * stride_cp
    kmin_at = kmin_ptr + page * stride_mn + kvh * stride_mh
    kmax_at = kmax_ptr + page * stride_xn + kvh * stride_xh
    k_at = k_ptr + b * stride_kb + kvh * stride_kh
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    if ROPE:  # rotate-half RoPE at the row's position, as kernels/rotary.py computes it (fp32, then k's dtype)
        pos = tl.load(pos_ptr + b)
        hh = tl.arange(0, BLOCK_HALF)
        h_ok = hh < HALF
        c = tl.load(cos_ptr + pos * stride_c + hh, mask=h_ok, other=0.0)
        s = tl.load(sin_ptr + pos * stride_c + hh, mask=h_ok, other=0.0)
        # the group's query heads, in place
        gg = tl.arange(0, GP)
        qm = (gg < G)[:, None] & h_ok[None, :]
        q_at = q_ptr + b * stride_qb + (kvh * G + gg)[:, None] * stride_qh + hh[None, :]
        x1 = tl.load(q_at, mask=qm, other=0.0)
        x2 = tl.load(q_at + HALF, mask=qm, other=0.0)
        a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
        tl.store(q_at, (a1 * c[None, :] - a2 * s[None, :]).to(x1.dtype), mask=qm)
        tl.store(q_at + HALF, (a2 * c[None, :] + a1 * s[None, :]).to(x1.dtype), mask=qm)
        # the key, rotated on its way to the cache (k itself is left as it was)
        k1 = tl.load(k_at + hh * stride_kd, mask=h_ok, other=0.0)
        k2 = tl.load(k_at + (HALF + hh) * stride_kd, mask=h_ok, other=0.0)
        b1, b2 = k1.to(tl.float32), k2.to(tl.float32)
        _store_key((b1 * c - b2 * s).to(k1.dtype), hh, h_ok, kc_at, kmin_at, kmax_at,
                   stride_cd, stride_md, stride_xd, off, BLOCK_HALF)
        _store_key((b2 * c + b1 * s).to(k1.dtype), HALF + hh, h_ok, kc_at, kmin_at, kmax_at,
                   stride_cd, stride_md, stride_xd, off, BLOCK_HALF)
    else:
        kk = tl.load(k_at + dd * stride_kd, mask=d_ok)
        _store_key(kk, dd, d_ok, kc_at, kmin_at, kmax_at, stride_cd, stride_md, stride_xd, off, BLOCK_D)
    vv = tl.load(v_ptr + b * stride_vb + kvh * stride_vh + dd * stride_vd, mask=d_ok)
    tl.store(vc_ptr + page * stride_dn + kvh * stride_dh + off * stride_dp + dd * stride_dd,
             vv.to(vc_ptr.dtype.element_ty), mask=d_ok)
    tl.store(fptr, off + 1)


_kernel = lazy_jit(_kv_append_kernel, helpers=(_store_key, _choose_page))


def _launch(k, v, k_cache, v_cache, kmin, kmax, fill, write_page, rope, bounded=None) -> None:
    B, Hkv, D = k.shape
    assert v.shape == k.shape and k_cache.shape[1] == Hkv and k_cache.shape[3] == D
    assert write_page.shape == (B, Hkv) and kmin is not None and kmax is not None
    if B == 0:
        return
    if rope is not None:
        q, cos, sin, positions = rope
        assert q.shape[0] == B and q.shape[1] % Hkv == 0 and q.shape[2] == D and D % 2 == 0
        assert q.stride(2) == 1 and cos.stride(1) == 1 and cos.stride() == sin.stride()
        G = q.shape[1] // Hkv
        rope_args, rope_strides = (q, cos, sin, positions), (q.stride(0), q.stride(1), cos.stride(0))
    else:
        G, rope_args, rope_strides = 1, (k, k, k, write_page), (0, 0, 0)  # unused (dead code under ROPE=False)
    if bounded is not None:
        (table, slot_ids, positions, sparse_pages, window, cur, held, peak, evicted, logical, pinned, stamp, mass,
         page_size, key, min_logical, stamp_on_write) = bounded
        if rope is not None:
            assert rope_args[3] is positions
        rope_args = rope_args[:3] + (positions,)
        W = table.shape[1]
        choose_args = (table, slot_ids, sparse_pages, window, cur, held, peak, evicted, logical,
                       pinned.view(torch.uint8), stamp, mass)
        choose_strides = (table.stride(0), table.stride(1), cur.stride(0), cur.stride(1), W, page_size, min_logical)
        choose_meta = {"CHOOSE": True, "BLOCK_W": max(16, triton.next_power_of_2(W)), "KEY": _KEYS[key],
                       "STAMP_ON_WRITE": stamp_on_write}
    else:
        choose_args = (fill,) * 12  # unused (dead code under CHOOSE=False)
        choose_strides = (0, 0, 0, 0, 1, 1, 0)
        choose_meta = {"CHOOSE": False, "BLOCK_W": 16, "KEY": 0, "STAMP_ON_WRITE": False}
    _kernel()[(B, Hkv)](
        k, v, k_cache, v_cache, kmin, kmax, fill, write_page, *rope_args, *choose_args,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        *kmin.stride(), *kmax.stride(), *fill.stride(), *write_page.stride(), *rope_strides, *choose_strides,
        D=D, BLOCK_D=triton.next_power_of_2(D), ROPE=rope is not None, G=G, GP=triton.next_power_of_2(G),
        HALF=D // 2, BLOCK_HALF=triton.next_power_of_2(max(1, D // 2)), **choose_meta,
        num_warps=1, **pdl_args(k.device),
    )


def kv_append(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    fill: torch.Tensor,
    write_page: torch.Tensor,
    rope: tuple | None = None,
) -> None:
    """Append one token per (sequence, KV head) to its page, in place.

    k, v: [B, Hkv, D]; k_cache, v_cache: [N, Hkv, P, D]; kmin, kmax: [N, Hkv, D]; fill: [N, Hkv] int32;
    write_page: [B, Hkv] int32. The token goes to offset fill[p, h] of page p = write_page[b, h]
    (fill < P there, pages distinct per head); kmin/kmax become k at offset 0 and take the elementwise
    min/max otherwise; fill increments. rope = (q [B, Hq, D], cos, sin [max_pos, D] fp32, positions [B]):
    k is rotated on its way to the cache and q in place (kernels/rotary.py's arithmetic), so the decode
    step needs no rotary kernel. No host synchronisation.
    """
    _launch(k, v, k_cache, v_cache, kmin, kmax, fill, write_page, rope)


def bounded_write_append(k, v, k_cache, v_cache, kmin, kmax, table, slot_ids, positions, sparse_pages, window,
                         cur, held, peak, evicted, fill, logical, pinned, stamp, mass, page_size: int,
                         key: str = "stamp", min_logical: int = 0, stamp_on_write: bool = True,
                         rope: tuple | None = None) -> torch.Tensor:
    """`bounded_write` then `kv_append` (with `rope`) in one kernel: each (sequence, KV head) program
    chooses its page, evicting where one opens, and appends the token there -> the pages [B, Hkv] int32.
    See `kernels.reference.write_then_append` for the contract (rope's positions must be `positions`)."""
    B, Hkv = table.shape[0], fill.shape[1]
    assert cur.shape == held.shape == peak.shape == evicted.shape and cur.shape[1] == Hkv
    assert cur.stride() == held.stride() == peak.stride() == evicted.stride()
    assert all(t.shape == fill.shape and t.stride() == fill.stride() for t in (logical, pinned, stamp, mass))
    assert cur.dtype == torch.int64 and sparse_pages.dtype == torch.int64 and window.dtype == torch.int64
    out = torch.empty((B, Hkv), dtype=torch.int32, device=table.device)
    _launch(k, v, k_cache, v_cache, kmin, kmax, fill, out, rope,
            (table, slot_ids, positions, sparse_pages, window, cur, held, peak, evicted, logical, pinned, stamp,
             mass, page_size, key, min_logical, stamp_on_write))
    return out


__all__ = ["bounded_write_append", "kv_append"]
