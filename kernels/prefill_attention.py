"""Varlen causal flash-attention forward in Triton for the prefill of concatenated prompts.

Same contract as `kernels.reference.prefill_attention` (the specification): q [T, Hq, D];
k, v [T, Hkv, D]; cu_seqlens [num_seqs + 1] int32 (start offsets, last = T). Sequence i owns tokens
[cu_seqlens[i], cu_seqlens[i+1]); token t attends to the tokens of its own sequence at positions <= t.
Query head h reads KV head h // (Hq // Hkv). Returns [T, Hq, D] in q's dtype; fp32 softmax.

FlashAttention forward (Dao et al., arXiv 2205.14135 / 2307.08691): grid
(cdiv(max_seqlen, BLOCK_M), Hq, num_seqs); a program holds BLOCK_M query rows of one head of one
sequence and streams BLOCK_N key / value rows up to the diagonal with an online softmax (base 2).
Used for the dense prefill that RaaS (arXiv 2502.11147) and Quest (arXiv 2406.10774) both keep.

`max_seqlen` sizes the grid; when not given it is computed from cu_seqlens, which synchronises with
the host (fine: prefill is not captured in a CUDA graph).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import interpreting, lazy_jit, pdl_args

_LOG2E = 1.4426950408889634


def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, cu_ptr, o_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    qk_scale_log2,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # programmatic dependent launch (kernels/_jit.py): the kernel before must have finished
        tl.extra.cuda.gdc_wait()
    mblk = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.program_id(2)
    kvh = h // G
    start = tl.load(cu_ptr + seq)
    L = tl.load(cu_ptr + seq + 1) - start
    m0 = mblk * BLOCK_M

    rm = m0 + tl.arange(0, BLOCK_M)  # query positions within the sequence
    m_ok = rm < L
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    tq = (start + rm).to(tl.int64)
    q = tl.load(q_ptr + tq[:, None] * stride_qt + h * stride_qh + dd[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = tl.where(m0 < L, tl.minimum(L, m0 + BLOCK_M), 0)  # causal: keys up to the block's last row
    for n0 in range(0, hi, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < L
        tk = (start + rn).to(tl.int64)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + tk[:, None] * stride_kt + kvh * stride_kh + dd[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + tk[:, None] * stride_vt + kvh * stride_vh + dd[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale_log2
        s = tl.where(n_ok[None, :] & (rn[None, :] <= rm[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pv = p.to(v.dtype)
        if DOT_F32:
            pv = pv.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=DOT_PREC)
        m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(o_ptr + tq[:, None] * stride_ot + h * stride_oh + dd[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


_kernel = lazy_jit(_prefill_kernel)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    *,
    max_seqlen: int | None = None,
    batch_invariant: bool = False,
) -> torch.Tensor:
    """Causal attention within each of several concatenated sequences (Triton flash-attention).

    q: [T, Hq, D]; k, v: [T, Hkv, D]; cu_seqlens: [num_seqs + 1] int32 (start offsets, last = T).
    Returns [T, Hq, D] in q's dtype; fp32 softmax. max_seqlen (longest sequence) sizes the grid; if
    None it is computed from cu_seqlens (a host sync). batch_invariant: the same tiles whatever the
    longest sequence of the batch is (no small-tile case), so each sequence's result depends only on it.
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    assert k.shape == (T, Hkv, D) and v.shape == k.shape and Hq % Hkv == 0
    num_seqs = cu_seqlens.numel() - 1
    out = torch.empty_like(q)
    if T == 0 or num_seqs <= 0:
        return out
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    if max_seqlen <= 0:
        return out
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_M = 64 if BLOCK_D <= 128 else 32
    BLOCK_N = 64 if BLOCK_D <= 64 else 32
    if max_seqlen <= 16 and not batch_invariant:
        BLOCK_M = BLOCK_N = 16
    _kernel()[(triton.cdiv(max_seqlen, BLOCK_M), Hq, num_seqs)](
        q, k, v, cu_seqlens, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        float(scale) * _LOG2E,
        G=Hq // Hkv, D=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        # the Triton interpreter multiplies bf16 dot operands as raw uint16 bits: upcast there
        DOT_F32=interpreting() and q.dtype == torch.bfloat16,
        num_warps=4 if BLOCK_M <= 64 else 8, num_stages=2, **pdl_args(q.device),
    )
    return out


__all__ = ["prefill_attention"]
