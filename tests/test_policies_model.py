"""KV policies inside the engine: a budget covering the whole sequence gives exactly the dense tokens
(tiny random models and SmolLM2), held KV stays within the budget however long the generation,
over-budget prompts are reported, and teacher-forced scoring replays a trajectory."""

from __future__ import annotations

import pytest
import torch

from raas_batch import LLM, SamplingParams
from raas_batch.engine.engine import Engine
from raas_batch.engine.scoring import ScoreRequest, run_scored
from raas_batch.engine.step_context import SideStream
from raas_batch.policies import PolicyMixture, make_policy

SPARSE = ["raas", "raas-mass", "raas-paper", "quest", "h2o", "streaming"]
# quest keeps its first 2 layers dense by default, which is all of a tiny model: test its sparse path too.
OPTIONS = {"quest": {"dense_layers": 0}}


def prompts_for(vocab: int, lengths=(3, 17, 40, 70)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    path = tiny_model_dir("llama")  # 4 query heads, 2 KV heads
    dense = LLM(model=path, device="cpu", dtype="fp32", max_num_seqs=4)
    return path, dense


@pytest.mark.parametrize("name", SPARSE)
def test_full_budget_equals_dense_tiny(tiny, name):
    path, dense = tiny
    prompts = [{"prompt_token_ids": p} for p in prompts_for(dense.model.spec.vocab_size)]
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in dense.generate(prompts, params)]
    llm = LLM(model=path, device="cpu", dtype="fp32", max_num_seqs=3, kv_policy=name, kv_budget=1024,
              policy_options=OPTIONS.get(name))
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == ref
    for o, p in zip(outs, prompts):
        assert o.outputs[0].evicted_pages == 0 and not o.outputs[0].kv_over_budget
        assert o.outputs[0].peak_kv_tokens == len(p["prompt_token_ids"]) + 40 - 1  # the last token is never fed


# raas-mass and raas-paper share this code path; their bookkeeping is covered in test_policies.py.
@pytest.mark.parametrize("name", ["raas", "h2o", "streaming"])
def test_peak_kv_within_budget_long_generation(tiny, name):
    path, _ = tiny
    budget = 48
    llm = LLM(model=path, device="cpu", dtype="fp32", max_num_seqs=4, kv_policy=name, kv_budget=budget)
    vocab = llm.model.spec.vocab_size
    prompts = [{"prompt_token_ids": p} for p in prompts_for(vocab, (5, 16, 60))]
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=120, temperature=0, ignore_eos=True))
    short, mid, long_ = (o.outputs[0] for o in outs)
    for o in (short, mid):
        assert o.peak_kv_tokens <= budget and o.evicted_pages > 0 and not o.kv_over_budget
        assert o.num_tokens == 120
    # 60 prompt tokens = 4 pages > 3: the prompt pages plus 2 decode pages, reported
    assert long_.kv_over_budget and long_.peak_kv_tokens <= (4 + 2) * 16


def test_quest_reads_at_most_budget_pages(tiny):
    path, _ = tiny
    llm = LLM(model=path, device="cpu", dtype="fp32", max_num_seqs=2, kv_policy="quest", kv_budget=48,
              policy_options={"dense_layers": 0})
    pol = llm.engine.policy
    widths = []
    orig = pol.read_pages

    def spy(layer, q, ctx):
        out = orig(layer, q, ctx)
        widths.append(int((out >= 0).sum(-1).max()))
        return out

    pol.read_pages = spy
    out = llm.generate({"prompt_token_ids": list(range(10, 60))}, SamplingParams(max_new_tokens=40, temperature=0))
    assert max(widths) == 3  # top 2 pages + the current one
    assert out[0].outputs[0].evicted_pages == 0  # quest keeps everything (memory O(N))


def test_score_continuations_replays_dense(tiny):
    _, dense = tiny
    prompts = prompts_for(dense.model.spec.vocab_size, (9, 33))
    params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    conts = [o.outputs[0].token_ids for o in dense.generate([{"prompt_token_ids": p} for p in prompts], params)]
    seen = []
    res = dense.score_continuations(prompts, conts, on_logprobs=lambda r, s, lp: seen.append((r, s, lp.shape)))
    for r, c in zip(res, conts):
        assert r.token_ids == c and r.greedy_token_ids == c  # greedy under teacher forcing = the trajectory
        assert len(r.token_logprobs) == 20 and all(v <= 0 for v in r.token_logprobs)
    assert sum(len(rows) for rows, _, _ in seen) == 40
    # A forced continuation that is not the model's choice is still fed (and scored lower).
    wrong = [[(t + 1) % dense.model.spec.vocab_size for t in c] for c in conts]
    res2 = dense.score_continuations(prompts, wrong)
    assert res2[0].token_ids == wrong[0]
    assert sum(res2[0].token_logprobs) < sum(res[0].token_logprobs)


def test_smollm2_full_budget_equals_dense(smollm):
    """Every policy, one engine run through a PolicyMixture, on the real model."""
    tok = smollm.tokenizer
    prompt = tok.encode("Question: A farmer has 12 cows and buys 7 more, then sells 4. How many cows are left?\n"
                        "Answer: Let's think step by step.")
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    ref = smollm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0].token_ids
    members = {n: make_policy(n, 1024, 16, **OPTIONS.get(n, {})) for n in SPARSE}
    mix = PolicyMixture(members, page_size=16)
    engine = Engine(smollm.model, tok, smollm.eos_token_ids, mix, 16, len(SPARSE), 4096, smollm.device,
                    smollm.dtype, "torch")
    res = run_scored(engine, [ScoreRequest(prompt, max_new_tokens=24, ignore_eos=True, kv_override=(n, None))
                              for n in SPARSE])
    for name, r in zip(SPARSE, res):
        assert r.token_ids == ref, name


def test_mixture_reports_each_members_statistics(tiny):
    """One engine run through a PolicyMixture gives each sequence the KV statistics its own policy gives
    when it runs alone (evicting members from the device counters, quest / dense from the host count)."""
    path, dense = tiny
    names, budget = ["raas", "h2o", "streaming", "quest"], 48
    prompts = prompts_for(dense.model.spec.vocab_size, (5, 30))
    params = SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True)
    alone = {}
    for n in names:
        llm = LLM(model=path, device="cpu", dtype="fp32", max_num_seqs=4, kv_policy=n, kv_budget=budget,
                  policy_options=OPTIONS.get(n))
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        alone[n] = [(o.outputs[0].peak_kv_tokens, o.outputs[0].evicted_pages) for o in outs]
    mix = PolicyMixture({n: make_policy(n, budget, 16, **OPTIONS.get(n, {})) for n in names}, page_size=16)
    engine = Engine(dense.model, dense.tokenizer, [], mix, 16, 8, 4096, torch.device("cpu"), torch.float32, "torch")
    reqs = [ScoreRequest(p, max_new_tokens=100, ignore_eos=True, kv_override=(n, None)) for n in names for p in prompts]
    res = run_scored(engine, reqs)
    got = {n: [(r.peak_kv_tokens, r.evicted_pages) for r in res[i * 2:i * 2 + 2]] for i, n in enumerate(names)}
    assert got == alone
    assert all(e > 0 for n in ("raas", "h2o", "streaming") for _, e in got[n])


def test_prefill_page_mass_matches_per_query_softmax():
    """Each prompt page's prefill mass is the sum over the prompt's queries of the max over the query group
    of the causal softmax on its tokens; odd lengths, two sequences, grouped heads."""
    from raas_batch.kernels.reference import prefill_page_mass

    gen = torch.Generator().manual_seed(3)
    lengths, Hq, Hkv, D, P = (37, 5), 6, 2, 8, 16
    q = torch.randn(sum(lengths), Hq, D, generator=gen)
    k = torch.randn(sum(lengths), Hkv, D, generator=gen)
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
    got = prefill_page_mass(q, k, cu, 0.3, P, chunk=7)  # chunks that straddle pages
    want = []
    for start, n in ((0, lengths[0]), (lengths[0], lengths[1])):
        pages = torch.zeros((n + P - 1) // P, Hkv)
        for t in range(n):
            for h in range(Hkv):
                best = torch.zeros(pages.shape[0])
                for g in range(Hq // Hkv):
                    s = q[start + t, h * (Hq // Hkv) + g] @ k[start:start + t + 1, h].T * 0.3
                    p = torch.softmax(s, -1)
                    per = torch.zeros(pages.shape[0]).index_add_(0, torch.arange(t + 1) // P, p)
                    best = torch.maximum(best, per)
                pages[:, h] += best
        want.append(pages)
    want = torch.cat(want)
    assert got.shape == (3 + 1, Hkv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got[:3].sum(0) >= lengths[0] - 1e-4).all()  # every query's page maxima add up to >= 1


def test_h2o_prompt_pages_start_with_their_prefill_mass(tiny):
    """After prefill, H2O's prompt pages hold the attention mass the prompt gave them (not 0); other
    policies leave the pool's mass alone."""
    path, _ = tiny
    for name, expect_mass in (("h2o", True), ("streaming", False)):
        llm = LLM(model=path, device="cpu", dtype="fp32", max_num_seqs=1, kv_policy=name, kv_budget=64)
        runner = llm.engine.runner
        seen = []

        def at_prefill(seqs, logits, runner=runner, seen=seen):  # runs while the prompt's pages are held
            if not seen:
                seen.append(runner.pool.mass[:, seqs[0].pages[:3]].clone())  # [layers, 3 prompt pages, Hkv]

        runner.logits_hook = at_prefill
        prompt = prompts_for(llm.model.spec.vocab_size, (40,))[0]
        llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True))
        mass = seen[0]
        if expect_mass:
            assert (mass > 0).all()
            # per layer and head, the pages' masses add up to at least one per prompt query
            assert (mass.sum(dim=1) >= 40 - 1e-3).all()
        else:
            assert (mass == 0).all()


class CountingSide(SideStream):
    """The engine's side stream without a stream (each call runs where it is enqueued), counting."""

    def __init__(self):
        super().__init__(None)
        self.calls, self.forks, self.joins = 0, 0, 0

    def fork(self):
        self.forks += 1
        super().fork()

    def run(self, fn, *args):
        self.calls += 1
        return super().run(fn, *args)

    def join(self):
        self.joins += 1
        super().join()


def test_refresh_beside_the_attention_equals_the_refresh_inside_it(tiny):
    """The decode step's RaaS refresh handed to the side stream (RAAS_BATCH_REFRESH_STREAM=1 on CUDA; here
    one without a stream, the Triton kernels in the interpreter): the attention then reads no key bounds,
    ops.bounds_refresh refreshes the stamps, every step forks and joins, and the tokens and every layer's
    stamps equal those of the refresh inside the attention's program. A budget of 5 pages of 4 evicts from
    the first steps on, so a wrong stamp would choose another victim. The same with the refresh deferred to
    each page's last step (RAAS_BATCH_REFRESH_WINDOW=1 on CUDA; ops.window_refresh): the same victims, so
    the same tokens, and the same stamps at the end (every row's last step fills its page: prompts of
    4k + 1 tokens, 23 decode steps)."""
    path, _ = tiny
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    runs = []
    for side, window in ((None, False), (CountingSide(), False), (CountingSide(), True)):
        llm = LLM(model=path, device="cpu", dtype="fp32", backend="triton", max_num_seqs=3, kv_policy="raas",
                  kv_budget=20, page_size=4)
        runner = llm.engine.runner
        runner.side = side
        if window:
            runner.window = runner.refresh_window(runner.policy, runner.slot_tables.shape[0])
            windows = []
            window_op = runner.ops.window_refresh
            runner.ops.window_refresh = lambda *a, op=window_op, calls=windows: calls.append(1) or op(*a)
        bounds_given = []
        attention = runner.ops.paged_decode_attention
        runner.ops.paged_decode_attention = lambda *a, given=bounds_given, op=attention, **k: given.append(
            k.get("key_bounds") is not None) or op(*a, **k)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts_for(llm.model.spec.vocab_size, (5, 9, 13))],
                            params)
        assert all(o.outputs[0].evicted_pages > 0 for o in outs)
        runs.append(([o.outputs[0].token_ids for o in outs], llm.engine.pool.stamp.clone()))
        assert all(bounds_given) if side is None else not any(bounds_given)
        if side is not None:
            assert side.calls == len(bounds_given) > 0 and side.forks == side.calls and side.joins == 23
        if window:
            assert len(windows) == side.calls
    for tokens, stamps in runs[1:]:
        assert tokens == runs[0][0] and torch.equal(stamps, runs[0][1])


def test_refresh_window_only_for_the_top_half_rule(tiny, monkeypatch):
    """The runner's state for the refresh once a page (kernels/window_refresh.py): a ring of every layer's
    queries, P a slot, in the cache's dtype (window_ring_bytes a slot, what the pool's default size leaves room for), and each slot's first decode position (its prompt length), for
    RaaS's top_half rule only; none for the alpha rule (its softmax spans the current page, whose fill changes
    every step), raas-mass, H2O and dense. On the CPU the runner makes none (no side stream); a setting
    other than 0 or 1 is refused by name."""
    from raas_batch.engine.model_runner import window_ring_bytes

    path, _ = tiny
    llm = LLM(model=path, device="cpu", dtype="fp32", max_num_seqs=3, kv_policy="raas", kv_budget=20, page_size=4)
    runner = llm.engine.runner
    assert runner.side is None and runner.window is None
    spec = llm.model.spec
    window = runner.refresh_window(runner.policy, 4)
    assert window.ring.shape == (spec.num_layers, 4, 4, spec.num_heads, spec.head_dim)
    assert window.ring.dtype == llm.engine.pool.kmin.dtype and window.first_pos is runner.prompt_len
    assert window.ring.numel() * window.ring.element_size() == 4 * window_ring_bytes(spec, 4, llm.dtype)  # (as sized)
    for name, options in (("raas", {"refresh_rule": "alpha"}), ("raas-mass", {}), ("h2o", {})):
        assert runner.refresh_window(make_policy(name, kv_budget=20, page_size=4, **options), 4) is None
    assert runner.refresh_window(make_policy("dense"), 4) is None
    monkeypatch.setenv("RAAS_BATCH_REFRESH_WINDOW", "yes")
    from raas_batch.engine.step_context import refresh_window_enabled

    with pytest.raises(ValueError, match="RAAS_BATCH_REFRESH_WINDOW"):
        refresh_window_enabled()


def test_side_stream_forks_holds_and_joins(monkeypatch):
    """SideStream's ordering on stand-in streams (no CUDA here): a fork makes the side stream wait for the
    step's stream; `run` enqueues the call on the side stream and holds its arguments; a join makes the
    step's stream wait for the side one only after a fork (a CUDA-graph capture rejects a wait on a stream
    that took no part in it: run 71 in docs/gpu-notes.md) and drops the references."""
    import contextlib

    events = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append((self.name, other.name))

    current = [Stream("step")]

    @contextlib.contextmanager
    def on(stream):
        before, current[0] = current[0], stream
        try:
            yield
        finally:
            current[0] = before

    monkeypatch.setattr(torch.cuda, "current_stream", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "stream", on)
    side = SideStream(Stream("side"))
    side.join()
    assert events == [] and not side.forked  # nothing forked: nothing to wait for
    side.fork()
    t = torch.ones(3)
    assert side.run(lambda x: (current[0].name, float(x.sum())), t) == ("side", 3.0)
    assert current[0].name == "step" and side.held == [(t,)]
    side.join()
    assert events == [("side", "step"), ("step", "side")] and side.held == [] and not side.forked
    side.join()
    assert len(events) == 2
