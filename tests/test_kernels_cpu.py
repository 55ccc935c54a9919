"""The CPU decode path against the specification: kernels/cpu.py against kernels/reference.py, the
transposed small-row product against F.linear, and whole engines on backend "cpu" against backend
"torch" (the references) for every KV policy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from raas_batch.kernels import cpu
from raas_batch.kernels import reference as ref

from raas_batch.layers.linear import SMALL_ROWS, Linear, small_rows_linear


def decode_case(seed: int, B=3, Hq=8, Hkv=2, D=32, P=16, S=6, N=40, dtype=torch.float32):
    """A pool with scattered pages, odd fills (as after eviction), -1 entries and finite garbage past
    every page's fill (the engine's pool never holds non-finite values there)."""
    g = torch.Generator().manual_seed(seed)
    k_cache = (torch.randn((N, Hkv, P, D), generator=g) * 3).to(dtype)
    v_cache = (torch.randn((N, Hkv, P, D), generator=g) * 3).to(dtype)
    fill = torch.randint(0, P + 1, (N, Hkv), generator=g, dtype=torch.int32)
    ids = torch.stack([torch.randperm(N, generator=g)[:S] for _ in range(B * Hkv)]).view(B, Hkv, S).to(torch.int32)
    ids[0, 0, 2] = ids[1, 1, 0] = ids[2, :, -1] = -1
    fill[ids[:, :, 0].clamp(min=0).long(), torch.arange(Hkv).expand(B, Hkv)] = P  # a full page in every row
    fill[ids[1, 0, 0].long(), 0] = 5  # and partly filled ones
    q = torch.randn((B, Hq, D), generator=g).to(dtype)
    return q, k_cache, v_cache, ids, fill


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("P,G", [(16, 4), (64, 1), (16, 3)])
def test_decode_attention_equals_reference(dtype, P, G):
    q, kc, vc, ids, fill = decode_case(P * 10 + G, Hq=2 * G, P=P, dtype=dtype)
    scale = 0.17
    want = ref.paged_decode_attention(q, kc, vc, ids, fill, scale)
    want_out, want_mass = ref.paged_decode_attention(q, kc, vc, ids, fill, scale, return_mass=True)
    out = cpu.paged_decode_attention(q, kc, vc, ids, fill, scale)
    out_m, mass = cpu.paged_decode_attention(q, kc, vc, ids, fill, scale, return_mass=True)
    assert out.dtype == q.dtype and out.shape == q.shape and mass.shape == ids.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(out_m.float(), want_out.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(mass, want_mass, rtol=1e-5, atol=1e-6)
    assert torch.all(mass[ids < 0] == 0)


def test_decode_table_memo_follows_the_contents():
    """The flat rows are memoised per page table: a new table, and the same tensor changed in place,
    must both be seen (results equal the reference each time)."""
    q, kc, vc, ids, fill = decode_case(5)
    for table in (ids, ids.clone(), ids.flip(-1).contiguous()):
        torch.testing.assert_close(cpu.paged_decode_attention(q, kc, vc, table, fill, 0.2),
                                   ref.paged_decode_attention(q, kc, vc, table, fill, 0.2), rtol=1e-6, atol=1e-6)
    table = ids.clone()
    cpu.paged_decode_attention(q, kc, vc, table, fill, 0.2)
    table[0, 0] = table[0, 0].roll(1)  # in place: same object, other contents
    table[2, 1, 0] = -1
    torch.testing.assert_close(cpu.paged_decode_attention(q, kc, vc, table, fill, 0.2),
                               ref.paged_decode_attention(q, kc, vc, table, fill, 0.2), rtol=1e-6, atol=1e-6)


def append_case(seed: int, P: int, dtype):
    g = torch.Generator().manual_seed(seed)
    B, Hkv, D, N = 4, 3, 24, 20
    fill = torch.randint(1, P - 3, (N, Hkv), generator=g, dtype=torch.int32)  # room for 3 tokens
    fill[:3] = 0  # fresh pages: their kmin / kmax hold garbage (NaN) that must not be read
    k_cache = torch.randn((N, Hkv, P, D), generator=g).to(dtype)
    v_cache = torch.randn((N, Hkv, P, D), generator=g).to(dtype)
    kmin = torch.randn((N, Hkv, D), generator=g).to(dtype) - 2
    kmax = kmin + 4
    kmin[:3] = kmax[:3] = float("nan")
    write_page = torch.stack([torch.randperm(N, generator=g)[:B] for _ in range(Hkv)], dim=1).to(torch.int32)
    write_page[0] = torch.tensor([0, 1, 2], dtype=torch.int32)  # every head opens a page
    k = torch.randn((B, Hkv, D), generator=g).to(dtype)
    v = torch.randn((B, Hkv, D), generator=g).to(dtype)
    return k, v, [k_cache, v_cache, kmin, kmax, fill], write_page


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("P", [16, 64])
@pytest.mark.parametrize("bounds", [True, False], ids=["bounds", "no-bounds"])
def test_kv_append_equals_reference(dtype, P, bounds):
    k, v, state, write_page = append_case(P, P, dtype)
    want, got = [t.clone() for t in state], [t.clone() for t in state]
    if not bounds:
        want[2] = want[3] = got[2] = got[3] = None
    for _ in range(3):  # three tokens in a row: the memoised write rows must follow the fills
        ref.kv_append(k, v, *want, write_page)
        assert cpu.kv_append(k, v, *got, write_page) is None
        k, v = k * 1.5 + 0.1, v - 0.3
    for name, a, b in zip(("k_cache", "v_cache", "kmin", "kmax", "fill"), got, want):
        if b is not None:  # bit-identical, NaN garbage of unwritten pages included
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), name


@pytest.mark.parametrize("rows", list(range(1, SMALL_ROWS + 1)))
@pytest.mark.parametrize("bias", [False, True])
def test_small_rows_linear_matches_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn((rows, 96), generator=g)
    w = torch.randn((160, 96), generator=g)
    b = torch.randn(160, generator=g) if bias else None
    out = small_rows_linear(x, w, b)
    assert out.shape == (rows, 160) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_linear_uses_the_plain_product_elsewhere():
    layer = Linear(32, 48)
    many = torch.randn(SMALL_ROWS + 1, 32)
    assert torch.equal(layer(many), F.linear(many, layer.weight, layer.bias))  # prefill-sized
    few = torch.randn(3, 32)
    layer16 = Linear(32, 48).to(torch.bfloat16)
    assert torch.equal(layer16(few.bfloat16()), F.linear(few.bfloat16(), layer16.weight, layer16.bias))
    assert layer(torch.randn(3, 5, 32)).shape == (3, 5, 48)


POLICIES = [("dense", None, {}), ("raas", 48, {}), ("raas-mass", 48, {}), ("quest", 48, {"dense_layers": 0}),
            ("h2o", 48, {}), ("streaming", 48, {})]


@pytest.mark.parametrize("name,budget,options", POLICIES, ids=[p[0] for p in POLICIES])
def test_cpu_backend_equals_reference_backend(smollm, name, budget, options):
    """Whole engines: backend "cpu" gives the same greedy tokens as the references ("torch") for every
    policy, with budgets that evict (so the key bounds and page choices of the sparse policies are
    exercised), ragged prompts and more prompts than slots."""
    from raas_batch.engine.engine import Engine
    from raas_batch.policies import make_policy
    from raas_batch.sampling_params import SamplingParams

    tok = smollm.tokenizer
    prompts = [tok.encode(t) for t in ("The capital of France is", "def fibonacci(n):\n",
                                       "Question: Tom has 3 apples and buys 5 more. How many now?\nAnswer:")]
    params = SamplingParams(max_new_tokens=48, temperature=0, ignore_eos=True)
    tokens = {}
    own_engine = smollm.engine
    try:
        for backend in ("torch", "cpu"):  # the loaded model, a fresh engine per backend (2 slots, 3 prompts)
            smollm.engine = Engine(smollm.model, tok, smollm.eos_token_ids, make_policy(name, budget, 16, **options),
                                   16, 2, 4096, smollm.device, smollm.dtype, backend)
            outs = smollm.generate([{"prompt_token_ids": p} for p in prompts], params)
            tokens[backend] = [o.outputs[0].token_ids for o in outs]
            if name not in ("dense", "quest"):  # quest keeps every page and selects among them
                assert any(o.outputs[0].evicted_pages > 0 for o in outs), "the budget should force evictions"
    finally:
        smollm.engine = own_engine
    assert tokens["cpu"] == tokens["torch"]


def test_admission_clears_a_previous_owners_values():
    """Backend cpu does not mask V past a page's fill: the pool must zero a page's keys and values when a
    new sequence takes it, so a previous owner's non-finite values cannot reach it."""
    from raas_batch.engine.page_pool import PagePool

    pool = PagePool(num_layers=2, num_pages=6, num_kv_heads=2, page_size=4, head_dim=8, dtype=torch.float32,
                    device=torch.device("cpu"))
    first = pool.allocate(3)
    pool.k_cache[:, first] = float("nan")
    pool.v_cache[:, first] = float("inf")
    pool.release(first)
    pool.allocate(3)  # the three untouched pages
    again = pool.allocate(3)  # the poisoned ones, for a new owner
    assert sorted(again) == sorted(first)
    assert torch.all(pool.k_cache[:, again] == 0) and torch.all(pool.v_cache[:, again] == 0)
    q = torch.randn(1, 4, 8)
    pool.fill[0, again[0]] = 1  # one valid token; the other slots are former garbage
    pool.k_cache[0, again[0], :, 0] = 1.0
    pool.v_cache[0, again[0], :, 0] = 2.0
    ids = torch.tensor([[[again[0]], [again[0]]]], dtype=torch.int32)
    out = cpu.paged_decode_attention(q, pool.k_cache[0], pool.v_cache[0], ids, pool.fill[0], 0.3)
    assert torch.allclose(out, torch.full_like(out, 2.0))
