"""Fused (residual add +) RMSNorm in Triton: one kernel per call instead of ~8 elementwise ones.

Same contract as `kernels.reference.rms_norm` (the specification), with the rounding of the
Llama/Qwen reference code: the sum `x + residual` is rounded to the input dtype (and stored back as
the new residual), normalised in fp32, rounded to the input dtype, then multiplied by the weight and
rounded again. Grid: one program per token row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import lazy_jit, pdl_args


def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, N, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # programmatic dependent launch (kernels/_jit.py): the kernel before must have finished
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    normed = (xf * tl.rsqrt(var + eps)).to(dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = (w.to(tl.float32) * normed.to(tl.float32)).to(dtype)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


_kernel = lazy_jit(_rms_norm_kernel)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x: [T, N]; weight: [N]; residual: [T, N] or None (updated in place to x + residual).
    Returns out [T, N] (and, with a residual, the updated residual)."""
    T, N = x.shape
    out = torch.empty_like(x)
    res = residual if residual is not None else x
    if T > 0:
        _kernel()[(T,)](x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), N, eps,
                        HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(N), num_warps=4,
                        **pdl_args(x.device))
    return out if residual is None else (out, residual)


__all__ = ["rms_norm"]
