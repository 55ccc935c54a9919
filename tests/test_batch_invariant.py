"""Batch-invariant decoding (`LLM(batch_invariant=True)`, README "Reproducible rows"): a row's results do
not depend on what else is in the batch. The kernels' contract is checked here under the Triton
interpreter (CPU) and on the GPU; the engine-level test (seeded prompts alone, in a batch, inside a
larger batch in another order) runs on the GPU only."""

from __future__ import annotations

import os
import random

import pytest
import torch


@pytest.mark.parametrize("split", [None, 3])
def test_matmul_rows_do_not_depend_on_the_other_rows(split):
    """The product's rows alone, at tile edges, across tiles and reversed are bit-identical to the whole
    batch's; split: the shape's own configuration (whose tiles differ between 1 and 150 rows), or one
    that cuts K = 200 into fixed chunks (128 + 72, the partial sums added by the second kernel)."""
    from raas_batch.kernels.matmul import Config, matmul

    cfg = None if split is None else Config(64, 64, 64, 4, 2, split)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    dtypes = (torch.float32, torch.bfloat16) if dev == "cuda" else (torch.float32,)
    for dtype in dtypes:
        K = 96 if split is None else 200
        w = torch.randn(200, K, generator=gen).to(dev, dtype)
        b = torch.randn(200, generator=gen).to(dev, dtype)
        x = torch.randn(150, K, generator=gen).to(dev, dtype)
        full = matmul(x, w, b, config=cfg)
        want = (x.double() @ w.double().T + b.double()).to(dtype)
        torch.testing.assert_close(full.float(), want.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-4,
                                   atol=2e-2 if dtype == torch.bfloat16 else 1e-4)
        for rows in ([0], [149], [3, 70, 140], list(range(64, 130))):  # alone, at a tile edge, across tiles
            part = matmul(x[rows], w, b, config=cfg)
            assert torch.equal(part, full[rows])
        assert torch.equal(matmul(x.flip(0), w, b, config=cfg), full.flip(0))  # another order
        assert matmul(x[:0], w, config=cfg).shape == (0, 200)
        # another tile shape, warps and stages with the same split: the same bits (what lets the tiles
        # follow the number of rows)
        other = Config(128, 128, 64, 8, 3, split or 1)
        assert torch.equal(matmul(x, w, b, config=other), full if split else matmul(x, w, b, config=other._replace(
            bm=64, bn=64, warps=4, stages=4)))
        if split is not None:  # without bias through the split path too
            torch.testing.assert_close(matmul(x, w, config=cfg).float(), (full - b).float(), rtol=2e-2, atol=2e-2)


def test_decode_attention_rows_do_not_depend_on_the_batch():
    """One split per row and a fixed tile: a row's output, mass and bounds are the same alone (its own
    table width) and in a batch whose table is wider and whose other rows are longer. (The default
    launch fails this on the CPU too: alone, the 64-page row gets two splits, in the batch one; the
    short rows get a smaller page tile alone.)"""
    from raas_batch.kernels.ops import get_ops

    attn = get_ops("triton", batch_invariant=True).paged_decode_attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(1)
    N, Hkv, P, D, Hq = 160, 2, 16, 16, 4
    k = torch.randn(N, Hkv, P, D, generator=gen).to(dev)
    v = torch.randn(N, Hkv, P, D, generator=gen).to(dev)
    fill = torch.full((N, Hkv), P, dtype=torch.int32, device=dev)
    fill[5] = 7
    kmin, kmax = k.amin(2), k.amax(2)
    q = torch.randn(6, Hq, D, generator=gen).to(dev)
    counts = [3, 1, 9, 64, 2, 12]
    perm = torch.randperm(N, generator=gen).tolist()
    table = torch.full((6, Hkv, 64), -1, dtype=torch.int32)
    start = 0
    for b, c in enumerate(counts):
        table[b, :, :c] = torch.tensor(perm[start:start + c], dtype=torch.int32).view(1, -1)
        start = (start + c) % (N - 64)
    table = table.to(dev)
    for mass in (False, True):
        full = attn(q, k, v, table, fill, 0.3, return_mass=mass, key_bounds=(kmin, kmax))
        for b, c in enumerate(counts):
            alone = attn(q[b:b + 1], k, v, table[b:b + 1, :, :c].contiguous(), fill, 0.3, return_mass=mass,
                         key_bounds=(kmin, kmax))
            assert torch.equal(alone[0][0], full[0][b])
            for a, f in zip(alone[1:], full[1:]):
                assert torch.equal(a[0], f[b, :, :c])


def test_prefill_attention_sequences_do_not_depend_on_the_batch():
    """A sequence alone and in a batch with a longer one: the same bits. The default launch differs only
    for batches of at most 16 tokens (smaller tiles), which the interpreter computes to the same bits; on
    the GPU (run 27) this is the check that the tiles are fixed."""
    from raas_batch.kernels.ops import get_ops

    prefill = get_ops("triton", batch_invariant=True).prefill_attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(2)
    lengths = [9, 70, 3]
    T, Hq, Hkv, D = sum(lengths), 4, 2, 16
    q, k, v = (torch.randn(T, h, D, generator=gen).to(dev) for h in (Hq, Hkv, Hkv))
    cu = torch.tensor([0, 9, 79, 82], dtype=torch.int32, device=dev)
    full = prefill(q, k, v, cu, 0.25)
    for i, n in enumerate(lengths):
        s = int(cu[i])
        alone = prefill(q[s:s + n], k[s:s + n], v[s:s + n], torch.tensor([0, n], dtype=torch.int32, device=dev), 0.25)
        assert torch.equal(alone, full[s:s + n])


# (prompts of mine, other prompts, steps): the GPU list's size, and the (RAAS_BATCH_FULL_INVARIANCE=1,
# about three minutes on an H200: 64 x 512 steps alone per policy and sampling mode)
SIZES = (64, 256, 512) if os.environ.get("RAAS_BATCH_FULL_INVARIANCE") == "1" else (16, 48, 256)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy,budget", [("dense", None), ("raas", 64)])
def test_seeded_rows_are_the_same_alone_in_a_batch_and_among_others(policy, budget):
    """Seeded prompts generated alone, as one batch, and inside a batch of other prompts in another order:
    the same tokens for every step, greedy and sampled, with CUDA graphs (bf16, random weights). Sizes:
    SIZES."""
    from test_gpu_engine import small_config

    from raas_batch import LLM, SamplingParams

    n_mine, n_others, steps = SIZES
    llm = LLM(hf_config=small_config(), load_format="random", kv_policy=policy, kv_budget=budget, dtype="bf16",
              device="cuda", max_num_seqs=n_mine + n_others, num_kv_tokens=(n_mine + n_others) * (steps + 320),
              batch_invariant=True)
    gen = torch.Generator().manual_seed(5)
    mine = [{"prompt_token_ids": torch.randint(10, 4000, (int(n),), generator=gen).tolist()}
            for n in torch.randint(3, 140, (n_mine,), generator=gen)]
    others = [{"prompt_token_ids": torch.randint(10, 4000, (int(n),), generator=gen).tolist()}
              for n in torch.randint(3, 300, (n_others,), generator=gen)]
    for params in (SamplingParams(max_new_tokens=steps, temperature=1.0, top_p=0.95, seed=11, ignore_eos=True),
                   SamplingParams(max_new_tokens=steps, temperature=0.0, ignore_eos=True)):
        alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in mine]
        batch = [o.outputs[0].token_ids for o in llm.generate(mine, params)]
        mixed = [(True, i, p) for i, p in enumerate(mine)] + [(False, i, p) for i, p in enumerate(others)]
        random.Random(3).shuffle(mixed)
        outs = llm.generate([p for _, _, p in mixed], params)
        among = {i: o.outputs[0].token_ids for (is_mine, i, _), o in zip(mixed, outs) if is_mine}
        assert all(len(t) == steps for t in alone)
        assert batch == alone
        assert [among[i] for i in range(n_mine)] == alone
