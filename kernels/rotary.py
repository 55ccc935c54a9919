"""Rotary position embedding applied to q and k in place, in one Triton kernel (rotate-half layout).

Same contract as `kernels.reference.apply_rotary` (the specification): for each token t and head,
x1, x2 = x[:D/2], x[D/2:]; out = [x1*c - x2*s, x2*c + x1*s] with c, s = cos/sin[positions[t], :D/2]
from fp32 tables; computed in fp32, rounded to x's dtype. Grid: (tokens, q heads + k heads).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import lazy_jit, pdl_args


def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_c, HQ, HALF: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # programmatic dependent launch (kernels/_jit.py): the kernel before must have finished
        tl.extra.cuda.gdc_wait()
    t = tl.program_id(0)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr + t)
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    c = tl.load(cos_ptr + pos * stride_c + offs, mask=mask, other=0.0)
    s = tl.load(sin_ptr + pos * stride_c + offs, mask=mask, other=0.0)
    if h < HQ:
        base = q_ptr + t * stride_qt + h * stride_qh
    else:
        base = k_ptr + t * stride_kt + (h - HQ) * stride_kh
    x1 = tl.load(base + offs, mask=mask, other=0.0)
    x2 = tl.load(base + HALF + offs, mask=mask, other=0.0)
    dtype = x1.dtype
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(base + offs, (a * c - b * s).to(dtype), mask=mask)
    tl.store(base + HALF + offs, (b * c + a * s).to(dtype), mask=mask)


_kernel = lazy_jit(_rotary_kernel)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hkv, D] (last dim contiguous), rotated in place; cos, sin: [max_pos, D]
    fp32 (rotate-half tables, both halves equal); positions: [T]. Returns (q, k)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1
    if T > 0:
        _kernel()[(T, Hq + Hkv)](q, k, cos, sin, positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                 cos.stride(0), Hq, HALF=D // 2, BLOCK=triton.next_power_of_2(D // 2), num_warps=1,
                                 **pdl_args(q.device))
    return q, k


__all__ = ["apply_rotary"]
