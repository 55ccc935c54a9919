"""Overlapped decoding (raas_batch/engine/engine.py): a decode step is launched before the previous
one's tokens are recorded. It must give exactly what lock-step decoding gives (tokens, finish
reasons, KV statistics), including sequences that stop on EOS, stop tokens and stop strings (seen
one step late), admission while others run, evicting policies, and the thinking budget (whose forced
tokens make the engine fall back to lock step). On a CPU the overlap buys nothing, but the order of
launching and recording is the same code as on the GPU.
"""

from __future__ import annotations

import pytest

from raas_batch import LLM, SamplingParams

PROMPTS = [
    [{"role": "user", "content": "Say hi."}],
    [{"role": "user", "content": "A farmer has 12 cows and buys 7 more. How many cows?"}],
    "Once upon a time",
    [{"role": "user", "content": "Name three colours."}],
    "The capital of France is",
    [{"role": "user", "content": "Write a haiku about the sea."}],
    "1, 2, 3, 4,",
    [{"role": "user", "content": "What is 17 * 23?"}],
    "def fibonacci(n):",
    [{"role": "user", "content": "Why is the sky blue? One sentence."}],
]


def run(llm: LLM, overlap: bool, prompts, params):
    saved = llm.engine.overlap
    llm.engine.overlap = overlap
    try:
        outs = llm.generate(prompts, params)
    finally:
        llm.engine.overlap = saved
    assert not llm.engine.has_work()
    return [(o.finish_reason, o.token_ids, o.text, o.peak_kv_tokens, o.evicted_pages)
            for r in outs for o in r.outputs]


def assert_same(llm, prompts, params):
    lockstep = run(llm, False, prompts, params)
    overlapped = run(llm, True, prompts, params)
    assert overlapped == lockstep
    return lockstep


def test_greedy_with_eos_and_admission_mid_run(smollm):
    # 10 prompts, 8 slots: two are admitted as others stop on EOS
    out = assert_same(smollm, PROMPTS, SamplingParams(max_new_tokens=48, temperature=0))
    reasons = [r for r, *_ in out]
    assert "stop" in reasons and "length" in reasons


def test_seeded_sampling_stop_strings_and_ids(smollm):
    full = smollm.generate(PROMPTS[:4], SamplingParams(max_new_tokens=24, temperature=0.8, seed=3, ignore_eos=True))
    stop_text = full[1].outputs[0].text[6:9]
    stop_id = full[2].outputs[0].token_ids[7]
    params = [SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.9, top_k=50, seed=3 + i, n=2,
                             stop=[stop_text] if stop_text.strip() else [], stop_token_ids=[stop_id])
              for i in range(len(PROMPTS))]
    out = assert_same(smollm, PROMPTS, params)
    assert any(r == "stop" for r, *_ in out)


def test_evicting_policy_keeps_its_statistics():
    llm = LLM(kv_policy="raas", kv_budget=64, max_num_seqs=4, device="cpu")
    out = assert_same(llm, PROMPTS[:6], SamplingParams(max_new_tokens=40, temperature=0))
    assert any(evicted > 0 for *_, evicted in out)


def test_thinking_budget_falls_back_to_lock_step(smollm):
    params = SamplingParams(max_new_tokens=30, temperature=0, thinking_budget=5)
    prompts = [[{"role": "user", "content": "Think first."}, {"role": "assistant", "content": "<think>"}]]
    assert_same(smollm, prompts * 2, params)


def test_launch_comes_before_record_when_overlapping(smollm, monkeypatch):
    engine = smollm.engine
    log: list[str] = []
    launch, record = engine.runner.launch_decode, engine._record_in_flight

    def spy_launch(seqs, positions):
        log.append("launch")
        return launch(seqs, positions)

    def spy_record():
        if engine.in_flight is not None:
            log.append("record")
        return record()

    monkeypatch.setattr(engine.runner, "launch_decode", spy_launch)
    monkeypatch.setattr(engine, "_record_in_flight", spy_record)
    run(smollm, True, ["Once upon a time"], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    # prefill gives token 1; decode steps give tokens 2..6: launch 2, launch 3, record 2, ...
    assert log == ["launch", "launch", "record", "launch", "record", "launch", "record", "launch", "record",
                   "record"]
    log.clear()
    run(smollm, False, ["Once upon a time"], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))
    assert log == ["launch", "record"] * 3


@pytest.mark.parametrize("max_new", [1, 2])
def test_short_requests(smollm, max_new):
    assert_same(smollm, PROMPTS[:3], SamplingParams(max_new_tokens=max_new, temperature=0))


@pytest.mark.parametrize("overlap", [False, True])
def test_output_tokens_are_the_runners_shared_ints(smollm, overlap):
    """Every recorded token, the prefill's first one included, is the runner's one int object for its id
    (model_runner.as_token_ints): a finished shard frees no int of its own per token."""
    ints = smollm.engine.runner.token_ints
    saved = smollm.engine.overlap
    smollm.engine.overlap = overlap
    try:
        outs = smollm.generate(PROMPTS[:3], SamplingParams(max_new_tokens=12, temperature=0.8, seed=1, ignore_eos=True))
    finally:
        smollm.engine.overlap = saved
    tokens = [t for r in outs for t in r.outputs[0].token_ids]
    assert len(tokens) == 36 and any(t > 256 for t in tokens)  # (ints up to 256 are shared by Python itself)
    assert all(t is ints[t] for t in tokens)
