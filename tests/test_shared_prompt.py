"""The n samples of a request prefill their prompt once and share its pages (engine/sequence.py
PromptGroup): the same tokens as prefilling each sample alone, one prefill per request, a shared page
never written, counted once, and released with the last sample that reads it."""

from __future__ import annotations

import contextlib

import pytest
import torch

from raas_batch.engine.engine import Engine
from raas_batch.policies import make_policy
from raas_batch.sampling_params import SamplingParams

PAGE = 16


@contextlib.contextmanager
def engine_of(llm, policy: str, budget=None, share=True, max_num_seqs=4, num_kv_tokens=4096, **options):
    """The loaded model on a fresh engine (restored afterwards)."""
    own = llm.engine
    llm.engine = Engine(llm.model, llm.tokenizer, llm.eos_token_ids, make_policy(policy, budget, PAGE, **options),
                        PAGE, max_num_seqs, num_kv_tokens, llm.device, llm.dtype, "cpu", share_prompts=share)
    try:
        yield llm.engine
    finally:
        llm.engine = own


# prompts: a partly filled last page (45 tokens), whole pages only (32), and shorter than a page (9)
PROMPTS = [{"prompt_token_ids": list(range(1000, 1045))}, {"prompt_token_ids": list(range(3000, 3032))},
           {"prompt_token_ids": list(range(5000, 5009))}]
CASES = [("dense", None, {}), ("raas", 64, {}), ("raas", 64, {"pin_prompt": True}), ("h2o", 64, {"pin_prompt": True}),
         ("raas-paper", 64, {}), ("streaming", 64, {}), ("quest", 64, {})]


@pytest.mark.parametrize("policy,budget,options", CASES, ids=[f"{p}-{o}" for p, _, o in CASES])
def test_shared_prefill_gives_the_unshared_tokens(smollm, policy, budget, options):
    """Greedy and seeded sampling, n = 5 with 4 slots (a sample admitted after the group's prefill
    takes its first token from the kept logits), budgets that evict: the same tokens, KV figures and
    finish reasons with and without sharing; one prefill per request with it, n without."""
    runs = {}
    for share in (False, True):
        with engine_of(smollm, policy, budget, share, **options) as engine:
            outs = []
            for params in (SamplingParams(n=5, max_new_tokens=40, temperature=0.9, seed=7, ignore_eos=True),
                           SamplingParams(n=3, max_new_tokens=24, temperature=0.0, ignore_eos=True)):
                outs += smollm.generate(PROMPTS, params)
            runs[share] = [[(c.token_ids, c.finish_reason, c.peak_kv_tokens, c.evicted_pages) for c in o.outputs]
                           for o in outs]
            prompt_tokens = sum(len(p["prompt_token_ids"]) for p in PROMPTS)
            assert engine.runner.num_prefill_tokens == prompt_tokens * (2 if share else 5 + 3)
            assert engine.pool.num_free == engine.pool.num_pages - 1  # every page back (one scratch page)
            shares_in_place = share and engine.policy.shares_prompt_pages(45, budget)
            expect = [45 // PAGE * PAGE, 32, 0] if shares_in_place else [0, 0, 0]  # full prompt pages read in place
            assert [[c.shared_kv_tokens for c in o.outputs] for o in outs] == \
                [[t] * 5 for t in expect] + [[t] * 3 for t in expect]
    if budget is not None and policy != "quest":
        assert any(e > 0 for o in runs[True] for _, _, _, e in o), "the budget should force evictions"
    assert runs[True] == runs[False]


def test_which_policies_read_the_prompt_in_place():
    """Dense and Quest never write a full prompt page after prefill; a bounded policy never evicts a
    pinned one; one that may evict prompt pages has its samples copy them."""
    def shares(name, budget=None, n=100, **options):
        return make_policy(name, budget, PAGE, **options).shares_prompt_pages(n, None)

    assert shares("dense") and shares("quest", 256)
    assert not shares("raas", 256) and not shares("h2o", 256) and not shares("streaming", 256)
    assert shares("raas", 256, pin_prompt=True) and shares("raas-paper", 256) and shares("raas-mass", 256)
    assert shares("raas", 256, n=128, pin_prompt="auto")  # 8 prompt pages of 16: at most half, pinned
    assert not shares("raas", 256, n=129, pin_prompt="auto")


def _group_pages_state(pool, pages):
    idx = torch.tensor(pages)
    return [t[:, idx].clone() for t in (pool.k_cache, pool.v_cache, pool.kmin, pool.kmax, pool.fill, pool.logical,
                                        pool.pinned, pool.stamp, pool.mass)]


@pytest.mark.parametrize("policy,options", [("dense", {}), ("raas-paper", {}), ("h2o", {"pin_prompt": True})])
def test_a_shared_page_is_never_written_and_is_freed_with_its_last_reader(smollm, policy, options):
    """Through a run that evicts (refresh_pinned for raas-paper, mass accumulation for h2o): the group's
    prompt pages hold exactly what the prefill wrote; they are counted once while their samples run
    and return to the pool when the last sample retires."""
    budget = None if policy == "dense" else 64
    with engine_of(smollm, policy, budget, max_num_seqs=6, **options) as engine:
        core = smollm.llm_engine
        prompt = {"prompt_token_ids": list(range(1000, 1045))}  # 2 full pages and a partial one
        core.add_request("a", prompt, SamplingParams(n=6, max_new_tokens=60, temperature=1.0, seed=3, ignore_eos=True))
        free_before = engine.pool.num_free
        finished, _ = core.step()  # the prefill
        seqs = list(engine.scheduler.running)
        group = seqs[0].group
        assert len(seqs) == 6 and all(s.group is group for s in seqs) and group.shared
        assert all(s.pages[:2] == group.pages[:2] and s.num_shared == 2 for s in seqs)
        own = engine.scheduler.quota(seqs[0])
        assert own == engine.policy.quota_pages(45, 60) - 2
        assert free_before - engine.pool.num_free == 6 * own + 3  # the prompt's 3 pages once
        shared_ids = list(group.pages[:2])
        before = _group_pages_state(engine.pool, shared_ids)
        while not finished:
            finished, _ = core.step()
            if engine.scheduler.running:
                assert group.pages is not None
        for a, b in zip(before, _group_pages_state(engine.pool, shared_ids)):
            assert torch.equal(a, b)
        assert group.refs == 0 and group.pages is None
        assert engine.pool.num_free == free_before
        if budget:
            assert max(c.evicted_pages for c in finished[0][1].outputs) > 0


@pytest.mark.parametrize("policy,options", [("dense", {}), ("raas", {})])
def test_abort_releases_the_prompt_pages_of_waiting_samples(smollm, policy, options):
    """Two slots for six samples: after the group's prefill four samples wait on its pages and logits;
    an abort (engine error, stream closed) gives every page back."""
    budget = None if policy == "dense" else 64
    with engine_of(smollm, policy, budget, max_num_seqs=2, **options) as engine:
        core = smollm.llm_engine
        full = engine.pool.num_free
        core.add_request("a", {"prompt_token_ids": list(range(1000, 1045))},
                         SamplingParams(n=6, max_new_tokens=30, temperature=1.0, seed=1))
        core.step()
        group = engine.scheduler.running[0].group
        assert group.pages is not None and group.logits is not None and group.num_unadmitted == 4
        core.step()
        core.abort_all()
        assert engine.pool.num_free == full and group.pages is None and group.refs == 0


def test_samples_are_counted_once_more_fit(smollm):
    """A pool of 24 pages, dense, a 64-token prompt (4 pages) and 16 new tokens (1 page): alone each
    sample reserves 5 pages, so 4 run at once; sharing the prompt, each reserves 1 and the prompt's 4
    pages are held once, so all 8 run at once."""
    most = {}
    for share in (False, True):
        with engine_of(smollm, "dense", share=share, max_num_seqs=8, num_kv_tokens=24 * PAGE) as engine:
            core = smollm.llm_engine
            core.add_request("a", {"prompt_token_ids": list(range(1000, 1064))},
                             SamplingParams(n=8, max_new_tokens=16, temperature=0.0, ignore_eos=True))
            most[share] = 0
            while core.has_unfinished_requests():
                core.step()
                most[share] = max(most[share], len(engine.scheduler.running))
    assert most == {False: 4, True: 8}


@pytest.mark.parametrize("policy,budget,options", [("dense", None, {}), ("raas", 64, {})])
def test_rows_with_the_same_prompt_join_one_group(smollm, policy, budget, options):
    """Three requests (n = 3) with the same prompt and one other: every sample's tokens as without
    sharing (each request its own seed). Where the pages are read in place (dense) the duplicates join
    the first group while it runs: two prefills in all; a copying policy (raas) joins only while samples
    wait. Groups are forgotten once done; a later request with that prompt starts a new group."""
    dup = {"prompt_token_ids": list(range(1000, 1045))}
    other = {"prompt_token_ids": list(range(3000, 3020))}
    requests = [(dup, 1), (other, 2), (dup, 3), (dup, 4)]
    runs = {}
    for share in (False, True):
        with engine_of(smollm, policy, budget, share, max_num_seqs=8, **options) as engine:
            params = [SamplingParams(n=3, max_new_tokens=30, temperature=0.9, seed=s, ignore_eos=True) for _, s in requests]
            outs = smollm.generate([p for p, _ in requests], params)
            runs[share] = [[c.token_ids for c in o.outputs] for o in outs]
            if share:
                prefilled = engine.runner.num_prefill_tokens
                assert prefilled == 45 + 20 if policy == "dense" else 45 + 20 <= prefilled <= 3 * 45 + 20
                assert smollm.llm_engine._groups == {}
                again = smollm.generate([dup], params[2])[0]
                assert [c.token_ids for c in again.outputs] == runs[True][2]
                assert engine.runner.num_prefill_tokens == prefilled + 45
            assert engine.pool.num_free == engine.pool.num_pages - 1
    assert runs[True] == runs[False]
