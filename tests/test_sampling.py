"""Sampling: seeded batch invariance, n samples, filters, stop conditions, per-row errors."""

from __future__ import annotations

import pytest
import torch

from raas_batch import SamplingParams
from raas_batch.engine.sampler import SamplingBatch, sample, seed_key

QUESTION = [{"role": "user", "content": "A farmer has 12 cows and buys 7 more. How many cows?"}]
OTHER = [{"role": "user", "content": "Write a haiku about the sea."}]
THIRD = "Once upon a time"


def sampled(params: SamplingParams) -> SamplingParams:
    return params


def test_seeded_sampling_is_batch_and_order_invariant(smollm):
    p = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=40, seed=7)
    noise = SamplingParams(max_new_tokens=9, temperature=1.0, seed=99)
    alone = smollm.generate([QUESTION], p)[0].outputs[0].token_ids
    in_batch = smollm.generate([OTHER, QUESTION, THIRD], [noise, p, noise])[1].outputs[0].token_ids
    reordered = smollm.generate([THIRD, OTHER, QUESTION], [noise, noise, p])[2].outputs[0].token_ids
    assert len(alone) > 0
    assert alone == in_batch == reordered


def test_seed_changes_the_sample_and_n_samples_differ(smollm):
    base = {"max_new_tokens": 12, "temperature": 1.0, "ignore_eos": True}
    a = smollm.generate([OTHER], SamplingParams(seed=1, n=3, **base))[0]
    b = smollm.generate([OTHER], SamplingParams(seed=2, **base))[0]
    again = smollm.generate([OTHER], SamplingParams(seed=1, n=3, **base))[0]
    ids = [o.token_ids for o in a.outputs]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert len({tuple(x) for x in ids}) == 3, "three samples of one prompt should differ"
    assert ids == [o.token_ids for o in again.outputs]
    assert b.outputs[0].token_ids != ids[0]
    assert all(o.seed == 1 for o in a.outputs)


def test_unseeded_request_reports_a_seed_that_reproduces_it(smollm):
    p = SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True)
    first = smollm.generate([OTHER], p)[0].outputs[0]
    replay = smollm.generate([OTHER], SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True,
                                                     seed=first.seed))[0].outputs[0]
    assert first.seed is not None and replay.token_ids == first.token_ids


def _batch(logits: torch.Tensor, temperature=1.0, top_p=1.0, top_k=0, keys=None, steps=None) -> SamplingBatch:
    B = logits.shape[0]
    keys = keys if keys is not None else torch.arange(B, dtype=torch.int64) * 7919 + 13
    return SamplingBatch(
        temperature=torch.full((B,), temperature), top_p=torch.full((B,), top_p),
        top_k=torch.full((B,), top_k, dtype=torch.int64), keys=keys,
        steps=steps if steps is not None else torch.zeros(B, dtype=torch.int64),
    )


def test_sampler_draws_from_the_softmax():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    n = 20000
    logits = probs.log().expand(n, -1).contiguous()
    keys = torch.tensor([seed_key(5, j) for j in range(n)], dtype=torch.int64)
    freq = torch.bincount(sample(logits, _batch(logits, keys=keys)), minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.015), freq


def test_top_k_and_top_p_never_leave_their_set():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4096, 50, generator=gen) * 2
    keys = torch.arange(4096, dtype=torch.int64)
    top3 = logits.topk(3, dim=-1).indices
    got = sample(logits, _batch(logits, top_k=3, keys=keys))
    assert (top3 == got.unsqueeze(1)).any(dim=1).all()
    probs = torch.softmax(logits, -1)
    got = sample(logits, _batch(logits, top_p=0.5, keys=keys))
    sorted_p, order = probs.sort(-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p
    rank = (order == got.unsqueeze(1)).float().argmax(-1)
    assert (before.gather(1, rank.unsqueeze(1)) < 0.5).all()


def test_greedy_rows_ignore_noise():
    logits = torch.randn(8, 100)
    batch = _batch(logits, temperature=0.0)
    assert torch.equal(sample(logits, batch), logits.argmax(-1))


def test_stop_string_cuts_text_and_stops(smollm):
    greedy = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    full = smollm.generate([QUESTION], greedy)[0].outputs[0]
    stop = full.text[10:14]
    assert stop.strip(), full.text
    cut = smollm.generate([QUESTION], SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True,
                                                     stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)]
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < 30


def test_stop_token_ids_and_max_tokens_alias(smollm):
    full = smollm.generate([QUESTION], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].outputs[0]
    assert full.num_tokens == 20 and full.finish_reason == "length"
    target = full.token_ids[5]
    first = full.token_ids.index(target)
    stopped = smollm.generate([QUESTION], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True,
                                                         stop_token_ids=[target]))[0].outputs[0]
    assert stopped.token_ids == full.token_ids[:first + 1] and stopped.finish_reason == "stop"


def test_eos_stops_unless_ignored(smollm):
    out = smollm.generate([[{"role": "user", "content": "Say hi."}]],
                          SamplingParams(max_new_tokens=200, temperature=0))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in smollm.eos_token_ids
    assert out.ttft_s > 0 and out.e2e_s >= out.ttft_s


@pytest.mark.parametrize("prompt, message", [
    ("", "empty"),
    ("   ", "empty"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([], "empty"),
    ({"tokens": [1, 2]}, "prompt_token_ids"),
    ({"prompt_token_ids": list(range(5, 9000))}, "context"),
])
def test_bad_prompts_become_error_rows(smollm, prompt, message):
    good = [{"role": "user", "content": "Hi"}]
    outs = smollm.generate([good, prompt], SamplingParams(max_new_tokens=3, temperature=0, n=2))
    assert all(o.finish_reason in ("stop", "length") for o in outs[0].outputs)
    assert [o.finish_reason for o in outs[1].outputs] == ["error", "error"]
    assert message in outs[1].outputs[0].error and outs[1].outputs[0].token_ids == []


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    assert SamplingParams(stop="x").stop == ["x"]


def test_sampler_kernel_equals_reference():
    """kernels/sample.py (Triton; the interpreter on a CPU) against kernels.reference.sample_tokens:
    greedy, temperature, top-k, top-p and both, tied logits, a vocabulary that is not a multiple of the
    kernel's block."""
    import os

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from raas_batch.kernels import ops as kops
    from raas_batch.kernels import reference as ref

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    B, V = 48, 2 * 2048 + 77
    logits = (torch.randn(B, V, generator=gen) * 3).to(dev)
    logits[8:16, : V // 2] = logits[8:16, V // 2: 2 * (V // 2)]  # every value twice: ties everywhere
    logits[16:24] = logits[16:24].round()  # many exact ties
    temperature = torch.tensor([0.0, 0.6, 1.0, 1.7] * (B // 4), device=dev)
    top_p = torch.tensor(([1.0] * 4 + [0.95] * 4 + [0.5] * 4) * (B // 12), device=dev)
    top_k = torch.tensor(([0] * 3 + [5, 50, 0]) * (B // 6), dtype=torch.int64, device=dev)
    keys = torch.tensor([seed_key(11, j) for j in range(B)], dtype=torch.int64, device=dev)
    steps = torch.arange(B, dtype=torch.int64, device=dev) * 3
    want = ref.sample_tokens(logits, temperature, top_p, top_k, keys, steps)
    got = kops.get_ops("triton").sample_tokens(logits, temperature, top_p, top_k, keys, steps)
    assert torch.equal(got, want), (got != want).nonzero().flatten().tolist()
    assert len(set(got[temperature > 0].tolist())) > B // 2  # the race really samples
    # some rows' first winner was outside the kept set: the kernel's rejection rounds ran
    unfiltered = ref.sample_tokens(logits, temperature, torch.ones_like(top_p), torch.zeros_like(top_k), keys, steps)
    assert int((unfiltered != want).sum()) >= 3
    # the decode step hands the sampler the lm_head's bf16 output: the tokens of its exact fp32 copy
    half = logits.to(torch.bfloat16)
    want_half = ref.sample_tokens(half.float(), temperature, top_p, top_k, keys, steps)
    got_half = kops.get_ops("triton").sample_tokens(half, temperature, top_p, top_k, keys, steps)
    assert torch.equal(got_half, want_half), (got_half != want_half).nonzero().flatten().tolist()
    assert torch.equal(ref.sample_tokens(half, temperature, top_p, top_k, keys, steps), want_half)



def _race_values(logits, temperature, keys, steps):
    """The reference's race values s - log(-log u), [B, V] (as kernels/reference.py's sample_tokens)."""
    from raas_batch.kernels import reference as ref

    s = logits.float() * (1.0 / temperature.float().clamp(min=1e-5)).unsqueeze(1)
    return s - torch.log(-torch.log(ref.uniform_noise(keys, steps, logits.shape[1])))


@pytest.mark.parametrize("temperature", [1.0, 0.6, 0.02])
def test_sampler_screen_keeps_near_ties(temperature):
    """The kernel's screen (kernels/sample.py, `_may_beat`) skips the exact race values of chunks that
    cannot beat the best so far. Each row gets a token in a later chunk whose race value is the largest
    float below the earlier best, equal to it, or the smallest above it: the kernel, with and without the
    screen, must pick the reference's token: the later one only when strictly above (the earlier on a
    tie). Small blocks: many chunks a row; a low temperature scales s, and its rounding, up."""
    import os

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from raas_batch.kernels import ops as kops
    from raas_batch.kernels import reference as ref

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the rows are built with the device's logarithms
    gen = torch.Generator().manual_seed(7)
    B, V, block = 18, 2000, 256
    logits = (torch.randn(B, V, generator=gen) * 2).to(dev)
    temp = torch.full((B,), temperature, device=dev)
    keys = torch.tensor([seed_key(5, j) for j in range(B)], dtype=torch.int64, device=dev)
    steps = torch.full((B,), 4, dtype=torch.int64, device=dev)
    up, down = torch.tensor(float("inf"), device=dev), torch.tensor(float("-inf"), device=dev)
    first = _race_values(logits, temp, keys, steps).argmax(dim=1)
    later, orders = [], []
    for r in range(B):
        w = int(first[r])
        target = _race_values(logits[r:r + 1], temp[r:r + 1], keys[r:r + 1], steps[r:r + 1])[0, w].item()
        j = min(V - 1, (w // block + 1 + r % 2) * block + 17)
        order = (-1, 0, 1)[r % 3]  # below, tied (where a float reaches it), above
        u = ref.uniform_noise(keys[r:r + 1], steps[r:r + 1], V)[0, j]
        logits[r, j] = (target + torch.log(-torch.log(u)).item()) * temperature
        for _ in range(64):  # start a few floats below, then walk up
            logits[r, j] = torch.nextafter(logits[r, j], down)
        for _ in range(400):  # one float at a time until the token's race value is where the row wants it
            gj = _race_values(logits[r:r + 1], temp[r:r + 1], keys[r:r + 1], steps[r:r + 1])[0, j].item()
            if (order < 0 and gj < target) or (order > 0 and gj > target) or (order == 0 and gj >= target):
                break
            logits[r, j] = torch.nextafter(logits[r, j], up)
        if order < 0:  # approached from above: step down to the first value below
            while _race_values(logits[r:r + 1], temp[r:r + 1], keys[r:r + 1], steps[r:r + 1])[0, j].item() >= target:
                logits[r, j] = torch.nextafter(logits[r, j], down)
        gj = _race_values(logits[r:r + 1], temp[r:r + 1], keys[r:r + 1], steps[r:r + 1])[0, j].item()
        later.append(j if gj > target else w)
        orders.append((order, gj - target))
    top_p, top_k = torch.ones(B, device=dev), torch.zeros(B, dtype=torch.int64, device=dev)
    want = ref.sample_tokens(logits, temp, top_p, top_k, keys, steps)
    assert want.tolist() == later, orders  # the rows are what they claim: the later token wins only above
    assert len(set(want.tolist()) & set(first.tolist())) > 0 and (want != first).any()
    ops = kops.get_ops("triton")
    for screen in (True, False):
        got = ops.sample_tokens(logits, temp, top_p, top_k, keys, steps, block_v=block, screen=screen)
        assert torch.equal(got, want), (screen, (got != want).nonzero().flatten().tolist())
    # with top-p, the rejection rounds race above a pivot through the same screen
    top_p = torch.full((B,), 0.8, device=dev)
    want = ref.sample_tokens(logits, temp, top_p, top_k, keys, steps)
    got = ops.sample_tokens(logits, temp, top_p, top_k, keys, steps, block_v=block)
    assert torch.equal(got, want), (got != want).nonzero().flatten().tolist()
