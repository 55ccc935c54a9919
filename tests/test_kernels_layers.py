"""Fused layer kernels (kernels/rmsnorm.py, kernels/rotary.py) against their references in
kernels/reference.py, and the model's torch layers against the same references. Interpreter on the
CPU (TRITON_INTERPRET=1 from conftest), compiled on the GPU machine."""

from __future__ import annotations

import pytest
import torch
from raas_batch.kernels import reference as ref
from raas_batch.kernels.rmsnorm import rms_norm
from raas_batch.kernels.rotary import apply_rotary

from raas_batch.layers.norm import RMSNorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: same operations in the same order; bf16 / fp16: one rounding step of the output dtype apart
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 64), (7, 96), (13, 576)])
def test_rms_norm_matches_reference(dtype, rows, dim):
    gen = torch.Generator().manual_seed(rows * dim)
    x = (torch.randn(rows, dim, generator=gen) * 3).to(dtype).to(DEVICE)
    res = torch.randn(rows, dim, generator=gen).to(dtype).to(DEVICE)
    w = (torch.rand(dim, generator=gen) + 0.5).to(dtype).to(DEVICE)
    assert rel(rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6)) <= TOL[dtype]
    res_k, res_r = res.clone(), res.clone()
    out_k, new_k = rms_norm(x, w, 1e-6, res_k)
    out_r, new_r = ref.rms_norm(x, w, 1e-6, res_r)
    assert new_k.data_ptr() == res_k.data_ptr()  # the residual is updated in place
    # exact, except that the interpreter rounds fp32 -> bf16 by truncation (compiled Triton rounds to nearest)
    assert torch.equal(new_k, new_r) if dtype != torch.bfloat16 or DEVICE == "cuda" else rel(new_k, new_r) <= TOL[dtype]
    assert rel(out_k, out_r) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hq,hkv,d", [(1, 4, 1, 16), (9, 7, 1, 64), (5, 6, 2, 40)])
def test_rotary_matches_reference(dtype, tokens, hq, hkv, d):
    gen = torch.Generator().manual_seed(tokens * hq + d)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=gen).to(dtype).to(DEVICE)
    q = qkv[:, :hq * d].view(tokens, hq, d)  # non-contiguous views, as the model passes them
    k = qkv[:, hq * d:(hq + hkv) * d].view(tokens, hkv, d)
    angles = torch.rand(100, d // 2, generator=gen) * 6.28
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(DEVICE)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(DEVICE)
    pos = torch.randint(0, 100, (tokens,), generator=gen).to(DEVICE)
    q_ref, k_ref = ref.apply_rotary(q, k, cos, sin, pos)
    v_before = qkv[:, (hq + hkv) * d:].clone()
    apply_rotary(q, k, cos, sin, pos)
    assert rel(q, q_ref) <= TOL[dtype] and rel(k, k_ref) <= TOL[dtype]
    assert torch.equal(qkv[:, (hq + hkv) * d:], v_before)  # v untouched


def test_model_norm_is_the_reference():
    norm = RMSNorm(32, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, res = torch.randn(5, 32), torch.randn(5, 32)
    assert torch.equal(norm(x), ref.rms_norm(x, norm.weight, 1e-5))
    out, new = norm(x, res)
    out_r, new_r = ref.rms_norm(x, norm.weight, 1e-5, res.clone())
    assert torch.equal(out, out_r) and torch.equal(new, new_r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inner", [(1, 64), (5, 1000), (3, 2304)])
def test_silu_mul_matches_reference(dtype, rows, inner):
    from raas_batch.kernels.silu_mul import silu_mul

    gen = torch.Generator().manual_seed(rows + inner)
    x = (torch.randn(rows, 2 * inner + 8, generator=gen) * 4).to(dtype).to(DEVICE)[:, :2 * inner]  # strided rows
    got, want = silu_mul(x), ref.silu_mul(x)
    assert got.shape == (rows, inner) and rel(got, want) <= TOL[dtype]
