"""The gated MLP's activation in Triton: silu(gate) * up from the gate_up projection, in one pass.

Same contract as `kernels.reference.silu_mul` (the specification): x [T, 2I] (gate | up, the fused
projection's output, any row stride) -> [T, I] in x's dtype, with torch's rounding: silu in fp32
rounded to the dtype, the product in fp32 rounded again. torch runs this as two elementwise kernels
over strided halves (the SiLU, then the multiply), reading and writing [T, I] twice more.
Grid (T, cdiv(I, BLOCK)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import lazy_jit, pdl_args


def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, I, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # programmatic dependent launch (kernels/_jit.py): the kernel before must have finished
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * stride_o + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


_kernel = lazy_jit(_silu_mul_kernel)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] -> silu(x[:, :I]) * x[:, I:], [T, I]."""
    T, two_i = x.shape
    assert two_i % 2 == 0 and x.stride(1) == 1
    inner = two_i // 2
    out = torch.empty((T, inner), dtype=x.dtype, device=x.device)
    if T > 0:
        block = min(1024, triton.next_power_of_2(inner))
        _kernel()[(T, triton.cdiv(inner, block))](x, out, x.stride(0), out.stride(0), inner, BLOCK=block,
                                                  num_warps=4, **pdl_args(x.device))
    return out


__all__ = ["silu_mul"]
