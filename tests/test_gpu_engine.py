"""The engine on a CUDA device (run on the GPU machine; skipped elsewhere): the decode step never
synchronises with the host, CUDA-graph replay equals eager decoding, and the Triton path's greedy
tokens agree with the torch reference path's on a random-weight model, for every policy."""

from __future__ import annotations

import json
import os

import pytest
import torch

from raas_batch import LLM, SamplingParams
from raas_batch.engine.sampler import seed_key
from raas_batch.engine.sequence import Sequence
from raas_batch.policies import POLICIES

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def small_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                       initializer_range=0.2)


def make_llm(policy: str, budget: int | None, **kw) -> LLM:
    return LLM(hf_config=small_config(), load_format="random", kv_policy=policy, kv_budget=budget,
               dtype="bf16", device="cuda", max_num_seqs=16, num_kv_tokens=64 * 1024, **kw)


def prompts(num: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [37, 5, 70, 16, 129, 48, 3, 90][:num]
    return [{"prompt_token_ids": torch.randint(10, 4000, (n,), generator=gen).tolist()} for n in lengths]


POLICY_BUDGETS = [(name, None if name == "dense" else 64) for name in sorted(POLICIES) if name != "mixture"]


@pytest.mark.parametrize("policy,budget", POLICY_BUDGETS)
def test_decode_step_does_not_synchronise(policy, budget):
    llm = make_llm(policy, budget, enforce_eager=True)
    eng = llm.engine
    for p in prompts(4):
        seq = Sequence(request_idx=0, sample_idx=0, prompt_token_ids=p["prompt_token_ids"],
                       params=SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True),
                       seed_key=seed_key(0, 0), seed=0, max_new_tokens=200)
        eng.add(seq)
    eng.step()  # prefill (may synchronise)
    for step in range(80):  # long enough for bounded policies to evict
        seqs = eng.scheduler.running
        runner = eng.runner
        pos = torch.tensor([s.num_tokens - 1 for s in seqs], device="cuda")
        slots = torch.tensor([s.slot for s in seqs], device="cuda")
        width = max(len(s.pages) for s in seqs)
        torch.cuda.synchronize()
        # the first step compiles the Triton kernels (module loading may synchronise): check the rest
        torch.cuda.set_sync_debug_mode("error" if step > 0 else "default")
        try:
            hidden = runner.decode_forward(pos, slots, width)
            with torch.inference_mode():
                tokens = runner.model.compute_logits(hidden).argmax(-1)
                runner.last_token[slots] = tokens
        finally:
            torch.cuda.set_sync_debug_mode("default")
        tokens = tokens.tolist()  # the step's one sync, outside
        for s, t in zip(seqs, tokens):
            s.append(t, set(), None)


@pytest.mark.parametrize("policy,budget", POLICY_BUDGETS)
def test_cuda_graphs_equal_eager(policy, budget):
    params = SamplingParams(max_new_tokens=96, temperature=0, ignore_eos=True)
    eager = make_llm(policy, budget, enforce_eager=True).generate(prompts(8), params)
    graphed = make_llm(policy, budget).generate(prompts(8), params)
    for a, b in zip(eager, graphed):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


@pytest.mark.parametrize("policy,budget", [("dense", None), ("raas", 64), ("h2o", 64)])
def test_programmatic_dependent_launch_changes_nothing(policy, budget, monkeypatch):
    """Every kernel waits for the one before at its first instruction when launched with PDL
    (kernels/_jit.py): a sampled run in CUDA graphs gives the same tokens with it and without it."""
    from raas_batch.kernels._jit import pdl_args

    params = SamplingParams(max_new_tokens=96, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    assert pdl_args(torch.device("cuda")).get("PDL") == (torch.cuda.get_device_capability()[0] >= 9)
    with_pdl = make_llm(policy, budget).generate(prompts(8), params)
    monkeypatch.setenv("RAAS_BATCH_PDL", "0")
    assert pdl_args(torch.device("cuda")) == {"PDL": False}
    without = make_llm(policy, budget).generate(prompts(8), params)
    for a, b in zip(with_pdl, without):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("policy,options", [("raas", {}), ("raas", {"refresh_rule": "alpha"}), ("raas", {"pin_prompt": True})])
def test_refresh_on_a_side_stream_changes_nothing(policy, options, eager, monkeypatch):
    """RAAS_BATCH_REFRESH_STREAM=1 (the default): RaaS's refresh runs on a second stream beside an attention
    without bounds (layers/attention.py, ops.bounds_refresh), joined at the end of the step: the same sampled
    tokens and, after the run, the same stamps in every layer as the refresh inside the attention's
    program, in CUDA graphs and eagerly. A budget of 4 pages evicts throughout, so a stamp that differed
    or came late would choose another victim."""
    params = SamplingParams(max_new_tokens=160, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    kw = {"enforce_eager": eager, "policy_options": options} if options else {"enforce_eager": eager}
    monkeypatch.setenv("RAAS_BATCH_REFRESH_WINDOW", "0")  # (a refresh at every step: the next test defers it)
    monkeypatch.setenv("RAAS_BATCH_REFRESH_STREAM", "0")
    inside = make_llm(policy, 64, **kw)
    assert inside.engine.runner.side is None
    want = inside.generate(prompts(8), params)
    monkeypatch.setenv("RAAS_BATCH_REFRESH_STREAM", "1")
    beside = make_llm(policy, 64, **kw)
    runner = beside.engine.runner
    assert runner.side is not None
    calls = []
    op = runner.ops.bounds_refresh
    runner.ops.bounds_refresh = lambda *a: calls.append(1) or op(*a)
    got = beside.generate(prompts(8), params)
    assert calls, "the refresh did not run on the side stream"
    for a, b in zip(want, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert torch.equal(inside.engine.pool.stamp, beside.engine.pool.stamp)


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("options", [{}, {"pin_prompt": True}, {"refresh_pinned": True}])
def test_refresh_once_a_page_changes_nothing(options, eager, monkeypatch):
    """RAAS_BATCH_REFRESH_WINDOW=1 (the default with the side stream): RaaS's top_half refresh runs once per
    page, at the step that fills a row's current page, from the queries of the page's steps
    (ops.window_refresh, kernels/window_refresh.py): the same sampled tokens as the refresh at every step,
    in CUDA graphs and eagerly, and the same stamps in every layer at the end, where every row has just
    filled a page (prompts of 16k + 1 tokens, 160 new tokens). A budget of 4 pages evicts throughout, so a
    stamp that differed when a page opened would choose another victim. The alpha rule keeps its refresh at
    every step (its softmax spans the current page): no ring."""
    params = SamplingParams(max_new_tokens=160, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    gen = torch.Generator().manual_seed(1)
    rows = [{"prompt_token_ids": torch.randint(10, 4000, (n,), generator=gen).tolist()}
            for n in (17, 1, 49, 33, 97, 65, 129, 17)]
    kw = {"enforce_eager": eager, "policy_options": options}
    monkeypatch.setenv("RAAS_BATCH_REFRESH_WINDOW", "0")
    every = make_llm("raas", 64, **kw)
    assert every.engine.runner.window is None
    want = every.generate(rows, params)
    monkeypatch.setenv("RAAS_BATCH_REFRESH_WINDOW", "1")
    once = make_llm("raas", 64, **kw)
    runner = once.engine.runner
    assert runner.window is not None
    calls = []
    op = runner.ops.window_refresh
    runner.ops.window_refresh = lambda *a: calls.append(1) or op(*a)
    got = once.generate(rows, params)
    assert calls, "the refresh did not run once a page"
    assert all(o.outputs[0].evicted_pages > 0 for o in got)
    for a, b in zip(want, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert torch.equal(every.engine.pool.stamp, once.engine.pool.stamp)
    assert make_llm("raas", 64, policy_options={"refresh_rule": "alpha"}).engine.runner.window is None


@pytest.mark.parametrize("policy,budget", [("dense", None), ("quest", 64), ("h2o", 64), ("raas-mass", 64)])
def test_refresh_stream_setting_leaves_other_policies_as_they_are(policy, budget, monkeypatch):
    """RAAS_BATCH_REFRESH_STREAM=1 with a policy that has no refresh by the bounds: no side stream, or one
    never forked (its join then waits for nothing, which a CUDA-graph capture requires): the same tokens."""
    params = SamplingParams(max_new_tokens=96, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    monkeypatch.setenv("RAAS_BATCH_REFRESH_STREAM", "0")
    want = make_llm(policy, budget).generate(prompts(8), params)
    monkeypatch.setenv("RAAS_BATCH_REFRESH_STREAM", "1")
    got = make_llm(policy, budget).generate(prompts(8), params)
    for a, b in zip(want, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


@pytest.mark.parametrize("policy,budget", POLICY_BUDGETS)
def test_triton_path_agrees_with_torch_path(policy, budget):
    """The torch path decodes greedily; the Triton path is teacher-forced along the same tokens and
    its greedy choice is compared at every step (free-running trajectories part at the first flip,
    which would hide how often the two paths agree afterwards)."""
    params = SamplingParams(max_new_tokens=128, temperature=0, ignore_eos=True)
    ref = make_llm(policy, budget, backend="torch", enforce_eager=True).generate(prompts(8), params)
    fast = make_llm(policy, budget, backend="triton")
    scored = fast.score_continuations([r.prompt_token_ids for r in ref], [r.outputs[0].token_ids for r in ref])
    same = sum(sum(a == b for a, b in zip(r.outputs[0].token_ids, s.greedy_token_ids)) for r, s in zip(ref, scored))
    total = sum(len(r.outputs[0].token_ids) for r in ref)
    first = [next((i for i, (a, b) in enumerate(zip(r.outputs[0].token_ids, s.greedy_token_ids)) if a != b), 128)
             for r, s in zip(ref, scored)]
    agreement = same / total
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "triton_vs_torch_agreement.jsonl"), "a") as f:
            f.write(json.dumps({"policy": policy, "budget": budget, "teacher_forced_agreement": agreement,
                                "first_divergence_per_prompt": first}) + "\n")
    # bf16 allows rare near-tie flips; a wrong kernel or policy step disagrees far more often
    assert agreement >= 0.9, agreement


@pytest.mark.parametrize("policy,budget", [("dense", None), ("raas", 64), ("h2o", 64)])
def test_overlapped_decoding_equals_lock_step(policy, budget):
    """On the GPU the overlap is real (the host records step t while step t+1 runs): same outputs as
    lock step, with sampling, stop token ids that end rows early, and admission mid-run."""
    llm = make_llm(policy, budget)
    stop = list(range(100, 4000, 97))  # ~40 of 4096 ids: rows stop after ~100 tokens on average
    params = [SamplingParams(max_new_tokens=160, temperature=0.8, top_p=0.95, seed=i, stop_token_ids=stop)
              for i in range(24)]
    prompts_24 = prompts(8) * 3
    outs = {}
    for overlap in (False, True):
        llm.engine.overlap = overlap
        outs[overlap] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].peak_kv_tokens,
                          o.outputs[0].evicted_pages) for o in llm.generate(prompts_24, params)]
    assert outs[True] == outs[False]
    assert {r for _, r, _, _ in outs[True]} == {"stop", "length"}


@pytest.mark.parametrize("policy,budget,options", [("dense", None, {}), ("raas-paper", 64, {}),
                                                   ("h2o", 64, {"pin_prompt": True}), ("raas", 64, {})])
def test_samples_share_the_prompt_on_the_gpu(policy, budget, options):
    """Triton kernels and CUDA graphs, two requests of n samples of one prompt: one prefill; the prompt pages read in
    place hold what the prefill wrote through a run that evicts (Triton's refresh of pinned pages for
    raas-paper and its mass accumulation for pinned h2o skip them); every page is back afterwards; greedy
    samples of one prompt are identical (they read the same pages with the same logits)."""
    llm = make_llm(policy, budget, policy_options=options)
    eng, core = llm.engine, llm.llm_engine
    prompt = prompts(1)[0]  # 37 tokens: 2 full pages and a partial one
    free = eng.pool.num_free
    core.add_request("s", prompt, SamplingParams(n=6, max_new_tokens=160, temperature=1.0, seed=3, ignore_eos=True))
    core.add_request("g", prompt, SamplingParams(n=4, max_new_tokens=64, temperature=0.0, ignore_eos=True))
    done, _ = core.step()  # the prefill: the second request (same prompt) joined the first one's group
    assert eng.runner.num_prefill_tokens == 37
    groups = {id(s.group): s.group for s in eng.scheduler.running}
    assert len(groups) == 1 and len(eng.scheduler.running) == 10
    shared = [p for g in groups.values() if g.shared for p in g.pages[:2]]
    assert bool(shared) == eng.policy.shares_prompt_pages(37, budget)
    pool = eng.pool
    idx = torch.tensor(shared, device="cuda", dtype=torch.long)

    def state():
        return [t[:, idx].clone() for t in (pool.k_cache, pool.v_cache, pool.kmin, pool.kmax, pool.fill,
                                            pool.logical, pool.pinned, pool.stamp, pool.mass)]

    before = state()
    outs = dict(done)
    while core.has_unfinished_requests():
        outs.update(core.step()[0])
    for a, b in zip(before, state()):
        assert torch.equal(a, b)
    assert eng.pool.num_free == free
    greedy = [c.token_ids for c in outs["g"].outputs]
    assert all(t == greedy[0] for t in greedy)
    if budget:
        assert max(c.evicted_pages for c in outs["s"].outputs) > 0


@pytest.mark.parametrize("stage_bytes", [256, None])
def test_staged_weight_copy_on_cuda(stage_bytes):
    """copy_weights on CUDA (the loader's path for a checkpoint's tensors: a pinned buffer, a thread and a stream
    each, blocking copies): every parameter, freshly allocated and written on the current stream, holds its
    source converted to its dtype once the call returns, with buffers far smaller than the tensors (256 bytes)
    or the default's. (Run 102: when these copies were asynchronous, a CUDA-graph capture in a later test of the
    same process failed; tests/test_gpu_jobs.py runs after this file.)"""
    from raas_batch.models.loader import copy_weights

    g = torch.Generator().manual_seed(5)
    shapes = [(1000, 37), (4096,), (3, 5), (257, 129), (1,)]
    sources = [torch.randn(s, generator=g) for s in shapes]
    sources[1] = sources[1].to(torch.bfloat16)
    targets = [torch.full(s, float("nan"), dtype=torch.bfloat16, device="cuda") for s in shapes]
    copy_weights(list(zip(targets, sources)), threads=3, stage_bytes=stage_bytes)
    for t, s in zip(targets, sources):
        assert torch.equal(t.cpu(), s.to(torch.bfloat16))


@pytest.mark.parametrize("policy,budget", [("dense", None), ("raas", 64)])
def test_grouped_refills_on_the_gpu(policy, budget):
    """CUDA's default refill rule (engine/scheduler.py: admissions once the empty slots add up to 4 decode steps)
    admits the rows that wait in fewer prefill steps; with batch-invariant rows (a row's tokens do not depend on
    its batch) every row's tokens are those of admitting each row as soon as it fits."""
    llm = make_llm(policy, budget, batch_invariant=True)
    engine = llm.engine
    assert engine.scheduler.prefill_cost_steps == 4.0
    stop = list(range(100, 4000, 97))
    params = [SamplingParams(max_new_tokens=120, temperature=0.8, top_p=0.95, seed=i, stop_token_ids=stop)
              for i in range(40)]
    calls, real = [], engine.runner.prefill

    def counted(seqs):
        calls.append(len(seqs))
        return real(seqs)

    engine.runner.prefill = counted
    outs = {}
    try:
        for cost in (0.0, 4.0):
            engine.scheduler.prefill_cost_steps = cost
            calls.clear()
            outs[cost] = ([(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in llm.generate(prompts(8) * 5, params)],
                          list(calls))
    finally:
        engine.runner.prefill = real
    assert outs[4.0][0] == outs[0.0][0]
    assert sum(outs[4.0][1]) == sum(outs[0.0][1]) == 40 and len(outs[4.0][1]) < len(outs[0.0][1]), outs
