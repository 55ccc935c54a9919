"""The scheduler's refill rule (raas_batch/engine/scheduler.py, `prefill_cost_steps`): while sequences run,
waiting ones that fit are admitted once the slots left empty since the last prefill add up to R full decode
steps; nothing running, or R = 0, admits at once; the rule counts pages as well as slots."""

from __future__ import annotations

import pytest
import torch

from raas_batch import SamplingParams
from raas_batch.engine.page_pool import PagePool
from raas_batch.engine.scheduler import Scheduler
from raas_batch.engine.sequence import Sequence
from raas_batch.policies import make_policy

P = 4


def make(num_pages=64, slots=4, cost=2.0, max_prefill_tokens=10**6):
    pool = PagePool(1, num_pages, 1, P, 8, torch.float32, torch.device("cpu"))
    policy = make_policy("dense", page_size=P)
    policy.bind(pool, slots + 1)
    return Scheduler(pool, policy, max_num_seqs=slots, max_prefill_tokens=max_prefill_tokens, prefill_cost_steps=cost)


def seq(i: int, prompt_len: int = 5, max_new: int = 7) -> Sequence:
    return Sequence(request_idx=i, sample_idx=0, prompt_token_ids=list(range(prompt_len)),
                    params=SamplingParams(max_new_tokens=max_new), seed_key=0, seed=0, max_new_tokens=max_new)


def finish(sched: Scheduler, seqs) -> None:
    for s in seqs:
        s.finished = True
    for s in sched.retire_finished():
        sched.release(s)


def decodes_until_prefill(sched: Scheduler, limit: int = 100) -> tuple[int, list[Sequence]]:
    for n in range(limit):
        kind, seqs = sched.schedule()
        if kind == "prefill":
            return n, seqs
    raise AssertionError("no prefill")


def test_refill_waits_for_empty_slots_worth_of_r_steps():
    sched = make(cost=2.0)
    seqs = [seq(i) for i in range(8)]
    for s in seqs:
        sched.add(s)
    kind, first = sched.schedule()  # nothing runs: all that fit at once
    assert kind == "prefill" and first == seqs[:4]
    finish(sched, seqs[:1])  # one free slot, a batch of 4: R x 4 = 8 slot-steps -> 7 decode steps, then the prefill
    n, admitted = decodes_until_prefill(sched)
    assert (n, admitted) == (7, seqs[4:5]) and sched.idle_slot_steps == 0
    finish(sched, seqs[1:3])  # two free: 2 + 2 + 2 + 2 >= 8 after 3 decode steps
    n, admitted = decodes_until_prefill(sched)
    assert (n, admitted) == (3, seqs[5:7])
    finish(sched, sched.running)  # nothing running: the last one at once
    assert sched.schedule() == ("prefill", seqs[7:8])


@pytest.mark.parametrize("cost", [0.0, 2.0])
def test_no_wait_without_a_cost_or_with_nothing_to_admit(cost):
    sched = make(cost=cost)
    seqs = [seq(i) for i in range(5)]
    for s in seqs:
        sched.add(s)
    assert sched.schedule() == ("prefill", seqs[:4])
    assert sched.schedule() == ("decode", seqs[:4])  # no free slot: nothing counted
    assert sched.idle_slot_steps == 0
    finish(sched, seqs[:1])
    kind, admitted = sched.schedule()
    assert (kind, admitted) == (("prefill", seqs[4:]) if cost == 0 else ("decode", seqs[1:4]))
    assert sched.idle_slot_steps == (0 if cost == 0 else 1)


def test_the_rule_counts_pages_too():
    # 3 pages a sequence (5 prompt + 7 new tokens, pages of 4); 13 pages: 4 sequences and one page left
    sched = make(num_pages=13, cost=1.0)
    seqs = [seq(i) for i in range(6)]
    for s in seqs:
        sched.add(s)
    assert sched.schedule()[1] == seqs[:4]
    assert sched.pool.num_free < 3 and sched.num_fitting() == 0
    finish(sched, seqs[:2])  # two slots and 6 pages free: both fit
    assert sched.num_fitting() == 2
    n, admitted = decodes_until_prefill(sched)  # 2 x 2 >= 1 x 4 after one decode step
    assert (n, admitted) == (1, seqs[4:6])


def test_a_negative_cost_is_refused():
    with pytest.raises(ValueError, match="prefill_cost_steps"):
        make(cost=-1)


def test_grouped_refills_give_the_same_tokens_with_fewer_prefills(smollm):
    """On the CPU backend a row's tokens do not depend on its batch: the rule only regroups admissions (fewer
    prefill steps), in lock step and overlapped alike."""
    prompts = [f"Count from {i} to {i + 20}:" for i in range(14)]
    params = [SamplingParams(max_new_tokens=6 + 5 * (i % 4), temperature=0, ignore_eos=True) for i in range(14)]
    engine = smollm.engine
    calls = []
    real = engine.runner.prefill

    def counted(seqs):
        calls.append(len(seqs))
        return real(seqs)

    saved = (engine.scheduler.prefill_cost_steps, engine.overlap)
    engine.runner.prefill = counted
    try:
        results = {}
        for cost, overlap in ((0.0, False), (3.0, False), (3.0, True)):
            engine.scheduler.prefill_cost_steps, engine.overlap = cost, overlap
            calls.clear()
            outs = smollm.generate(prompts, params)
            results[cost, overlap] = ([o.outputs[0].token_ids for o in outs], list(calls))
    finally:
        engine.runner.prefill = real
        engine.scheduler.prefill_cost_steps, engine.overlap = saved
    tokens0, calls0 = results[0.0, False]
    assert all(len(t) == p.max_new_tokens for t, p in zip(tokens0, params))
    for key in ((3.0, False), (3.0, True)):
        tokens, grouped = results[key]
        assert tokens == tokens0, key
        assert sum(grouped) == sum(calls0) == 14 and len(grouped) < len(calls0), (grouped, calls0)


def test_the_default_by_device_and_its_override(monkeypatch):
    from raas_batch.engine.engine import PREFILL_COST_ENV, default_prefill_cost_steps

    monkeypatch.delenv(PREFILL_COST_ENV, raising=False)
    assert default_prefill_cost_steps(torch.device("cpu")) == 0.0
    assert default_prefill_cost_steps(torch.device("cuda")) == 4.0
    monkeypatch.setenv(PREFILL_COST_ENV, "8")
    assert default_prefill_cost_steps(torch.device("cpu")) == 8.0
    monkeypatch.setenv(PREFILL_COST_ENV, "soon")
    with pytest.raises(ValueError, match=PREFILL_COST_ENV):
        default_prefill_cost_steps(torch.device("cpu"))


def test_a_round_cut_by_the_prefill_token_cap_goes_on_at_once():
    """A batch's start (or a burst of free slots) larger than max_prefill_tokens is prefilled in consecutive
    steps, not held back by the refill rule once the first part runs."""
    sched = make(cost=4.0, max_prefill_tokens=10)
    seqs = [seq(i) for i in range(6)]
    for s in seqs:
        sched.add(s)
    assert sched.schedule() == ("prefill", seqs[0:2])  # 10 prompt tokens: the cap
    assert sched.schedule() == ("prefill", seqs[2:4])  # the rest of the round, though two run
    assert sched.schedule() == ("decode", seqs[0:4])  # no slot free
    finish(sched, seqs[:1])
    assert sched.schedule() == ("decode", seqs[1:4])  # a new round waits for its R steps' worth


def test_the_last_rows_of_a_stream_start_once_all_of_them_fit():
    """With nothing more coming (raas_batch.streaming sets `more_coming` when its source is exhausted), waiting
    sequences that all fit are admitted at once: one prefill runs them either way, and waiting only delays them."""
    sched = make(cost=2.0)
    seqs = [seq(i) for i in range(7)]
    for s in seqs:
        sched.add(s)
    assert sched.schedule() == ("prefill", seqs[:4])
    sched.more_coming = False
    finish(sched, seqs[:1])  # 1 of the 3 waiting fits: the rule still groups
    assert sched.schedule()[0] == "decode"
    finish(sched, seqs[1:2])  # 2 of 3
    assert sched.schedule()[0] == "decode"
    finish(sched, seqs[2:3])  # all 3 fit: at once, whatever the empty slots added up to
    assert sched.idle_slot_steps < 2.0 * 4
    assert sched.schedule() == ("prefill", seqs[4:7])


def test_streams_tell_the_scheduler_when_their_source_is_exhausted(smollm):
    from raas_batch.streaming import generate_stream

    sched = smollm.engine.scheduler
    seen = []

    def source():
        for i in range(3):
            seen.append(sched.more_coming)
            yield i, f"Say {i}.", SamplingParams(max_new_tokens=2, temperature=0)
        seen.append(sched.more_coming)

    at_steps, real = [], sched.schedule

    def schedule():
        at_steps.append(sched.more_coming)
        return real()

    sched.schedule = schedule
    try:
        outs = list(generate_stream(smollm.llm_engine, source(), max_waiting=1))
    finally:
        del sched.schedule
    assert len(outs) == 3 and all(seen) and sched.more_coming  # True while pulling; set back after the stream
    assert at_steps[0] and not at_steps[-1]  # steps after the source ran out saw more_coming False
