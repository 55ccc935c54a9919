"""A batch-invariant matrix product in Triton: y = x @ weight^T (+ bias), for `LLM(batch_invariant=True)`.

cuBLAS picks its kernel (tile shape, split-K) from the product's shape, so a row's result can change
in its last bits with the number of rows beside it. Here every output element is computed the same way
whatever M is: fixed tiles (BLOCK_M x BLOCK_N, BLOCK_K along the reduction), no split-K, the K loop
always from 0 to K in steps of BLOCK_K with an fp32 accumulator. A row's products and their order
depend only on K, so row i of x @ W^T is bit-identical alone, in any batch and at any position.

x [M, K] (rows contiguous), weight [N, K] (nn.Linear's layout), bias [N] or None -> [M, N] in x's
dtype. The cost against cuBLAS is measured by the job benchmark (README "Reproducible rows").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import interpreting, lazy_jit

BLOCK_M, BLOCK_N, BLOCK_K = 64, 128, 64


def _matmul_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
                   stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                   HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)  # [BK, BN]
        if UPCAST:  # the interpreter multiplies bf16 dot operands as raw bits
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


_kernel = lazy_jit(_matmul_kernel)


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           block: tuple[int, int, int] = (BLOCK_M, BLOCK_N, BLOCK_K), num_warps: int = 4,
           num_stages: int = 3) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T (+ bias) -> [..., N], each row computed independently of the others.
    block / num_warps / num_stages: launch parameters for benchmarks/bench_matmul.py's sweep (the model
    always uses the defaults, so its rows never see two configurations)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, K = x2.shape
    N = weight.shape[0]
    assert weight.shape[1] == K
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*shape[:-1], N)
    bm, bn, bk = block
    _kernel()[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        x2, weight, bias if bias is not None else y, y, M, N, K,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, UPCAST=interpreting() and x.dtype != torch.float32,
        # fp32 models: full-precision products (tf32 would change the rounding, not the invariance)
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        BM=bm, BN=bn, BK=bk, num_warps=num_warps, num_stages=num_stages,
    )
    return y.view(*shape[:-1], N)


__all__ = ["matmul"]
