"""A batch-invariant matrix product in Triton: y = x @ weight^T (+ bias), for `LLM(batch_invariant=True)`.

cuBLAS picks its kernel (tile shape, split-K, stream-K) from the product's shape, so a row's result can
change in its last bits with the number of rows beside it. Here a row's arithmetic depends only on the
weight's shape (N, K), never on M:

- the reduction over K is cut into `split_for(N, K)` fixed chunks (each a multiple of BLOCK_K = 64);
  each chunk runs its K loop in order with an fp32 accumulator, 64 at a time, and the chunks' partial
  sums are added in chunk order by a second kernel (one chunk: the tile stores directly);
- BLOCK_K and the split are the only launch parameters that decide a product's bits. The output tile
  (BLOCK_M x BLOCK_N), warps and pipeline stages only decide which program computes an element, not
  how: `benchmarks/bench_matmul.py` checks this on the GPU for every configuration it sweeps, and
  tests/test_batch_invariant.py checks rows computed with small-batch tiles against large-batch ones.
  So the tiles may follow M (small tiles for a few rows, larger ones for a full decode batch).

Row i of x @ W^T is therefore bit-identical alone, in any batch and at any position. The fixed split
keeps the GPU busy on a tall reduction (the MLP's down projection: K = 8,960, N = 1,536 at the 1.5B
shape) without making the order depend on the batch, as cuBLAS's own split-K does.

x [M, K] (rows contiguous), weight [N, K] (nn.Linear's layout), bias [N] or None -> [M, N] in x's
dtype. `python benchmarks/bench_matmul.py` times it against cuBLAS; the job's cost is in the README
("Reproducible rows").
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._jit import interpreting, lazy_jit, pdl_args

BLOCK_K = 64
NOMINAL_ROWS = 512  # the decode batch the split is chosen for (a constant: the split never sees M)
TARGET_PROGRAMS = 132  # about one wave on an H100 / H200 (132 SMs); a constant, so every GPU makes the same choice


class Config(NamedTuple):
    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    split: int


def split_for(N: int, K: int) -> int:
    """How many fixed chunks the reduction over K is cut into: a function of the weight's shape only.
    A reduction taller than the output is wide (K >= 2N) is cut while a 512-row batch's 128 x 128 tiles
    fill less than one wave of programs and each chunk keeps >= 1,024 of K (measured, run 29: the 1.5B
    down projection 0.067 -> 0.035 ms in 4 chunks, the 7B one 0.164 -> 0.121 ms in 2; a square or wide
    product only loses from cutting)."""
    split = 1
    if K >= 2 * N:
        tiles = triton.cdiv(NOMINAL_ROWS, 128) * triton.cdiv(N, 128)
        while tiles * split < TARGET_PROGRAMS and K // (2 * split) >= 1024:
            split *= 2
    return split


def config_for(M: int, N: int, K: int) -> Config:
    """The launch configuration for M rows of a product with weight [N, K]. Its split (the bits) comes
    from (N, K) alone; the tiles follow M (the fastest of run 29's sweep at 512 rows,
    benchmarks/results/bench_matmul_run29_sweep.md)."""
    split = split_for(N, K)
    if M <= 64:  # a few rows: the product reads the weight once, so many small programs
        return Config(64, 64, BLOCK_K, 4, 4, split)
    if N <= 2048:
        return Config(64, 128, BLOCK_K, 4, 3, split)
    if split > 1 and K >= 8192:
        return Config(128, 256, BLOCK_K, 8, 3, split)
    return Config(128, 128, BLOCK_K, 8, 3, split)


def _matmul_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, K_CHUNK,
                   stride_xm, stride_xk, stride_wn, stride_wk, stride_ys, stride_ym, stride_yn,
                   HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # programmatic dependent launch (kernels/_jit.py): the kernel before must have finished
        tl.extra.cuda.gdc_wait()
    # program (m tile, n tile, chunk): consecutive programs share an n tile, so a weight tile is read
    # from memory once and from L2 by the other m tiles
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    k_start = pid_s * K_CHUNK
    k_end = tl.minimum(k_start + K_CHUNK, K)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(k_start, k_end, BK):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (kk[None, :] < k_end), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=(rn[None, :] < N) & (kk[:, None] < k_end), other=0.0)  # [BK, BN]
        if UPCAST:  # the interpreter multiplies bf16 dot operands as raw bits
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if PARTIAL:  # fp32 partial sums of this chunk, added in order by _reduce_kernel
        tl.store(y_ptr + pid_s * stride_ys + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _reduce_kernel(p_ptr, b_ptr, y_ptr, M, N, stride_ps, stride_pm, stride_ym,
                   SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # programmatic dependent launch (kernels/_jit.py): the kernel before must have finished
        tl.extra.cuda.gdc_wait()
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None] * stride_pm + rn[None, :]
    acc = tl.load(p_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT):  # chunk order, always
        acc += tl.load(p_ptr + s * stride_ps + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


_kernel = lazy_jit(_matmul_kernel)
_reduce = lazy_jit(_reduce_kernel)


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           config: Config | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T (+ bias) -> [..., N], each row computed independently of the others.
    config: a launch configuration for benchmarks/bench_matmul.py's sweep and the tests; the model always
    uses `config_for(M, N, K)`, whose split (what decides the bits) depends on the weight alone."""
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
    cfg = config or config_for(M, N, K)
    k_chunk = triton.cdiv(triton.cdiv(K, cfg.split), cfg.bk) * cfg.bk  # a multiple of BLOCK_K
    split = triton.cdiv(K, k_chunk)  # chunks that hold any of K
    partial = split > 1
    out = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if partial else y
    has_bias = bias is not None
    _kernel()[(triton.cdiv(M, cfg.bm), triton.cdiv(N, cfg.bn), split)](
        x2, weight, bias if has_bias else y, out, M, N, K, k_chunk,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
        out.stride(0) if partial else 0, out.stride(-2), out.stride(-1),
        HAS_BIAS=has_bias, PARTIAL=partial, UPCAST=interpreting() and x.dtype != torch.float32,
        # fp32 models: full-precision products (tf32 would change the rounding, not the invariance)
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, num_warps=cfg.warps, num_stages=cfg.stages, **pdl_args(x.device),
    )
    if partial:
        rbm, rbn = 32, 128
        _reduce()[(triton.cdiv(M, rbm), triton.cdiv(N, rbn))](
            out, bias if has_bias else y, y, M, N, out.stride(0), out.stride(1), y.stride(0),
            SPLIT=split, HAS_BIAS=has_bias, BM=rbm, BN=rbn, num_warps=4, **pdl_args(x.device))
    return y.view(*shape[:-1], N)


__all__ = ["Config", "config_for", "matmul", "split_for"]
