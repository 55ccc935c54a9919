"""Teacher-forced scoring and traced greedy decoding through the engine (for fidelity measurements).

A `ScoreRequest` with `continuation_ids` is teacher-forced: every decode step feeds the given token
whatever the model predicts (the `Sequence.forced` mechanism), so a sparse KV cache can be replayed
along a dense trajectory; the logits of every step are observed before sampling. Without
`continuation_ids` the request decodes greedily (up to `max_new_tokens`, stopping at EOS unless
`ignore_eos`). Both kinds can share one engine run, and each carries its own `kv_override`
(a kv_budget, or (member, kv_budget) for a PolicyMixture).

Step t of a request is the prediction of its t-th output token: step 0 comes from the prefill's
last position, step t > 0 from the decode step that fed output token t-1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from raas_batch.engine.sequence import Sequence
from raas_batch.sampling_params import SamplingParams


@dataclass
class ScoreRequest:
    prompt_token_ids: list[int]
    continuation_ids: list[int] | None = None  # teacher-forced tokens; None = free greedy decoding
    max_new_tokens: int = 0  # free decoding only
    ignore_eos: bool = False  # free decoding only
    kv_override: object = None


@dataclass
class ScoreResult:
    token_ids: list[int] = field(default_factory=list)  # tokens fed (forced) or generated
    greedy_token_ids: list[int] = field(default_factory=list)  # argmax at every step
    token_logprobs: list[float] = field(default_factory=list)  # log p(token_ids[t]) at step t
    finish_reason: str = "length"
    peak_kv_tokens: int = 0
    evicted_pages: int = 0
    kv_over_budget: bool = False


def run_scored(engine, requests: list[ScoreRequest],
               on_logprobs: Callable[[list[int], list[int], torch.Tensor], None] | None = None) -> list[ScoreResult]:
    """Run every request to completion -> one ScoreResult each, through the request core.

    engine: an `LLMEngine` (what `LLM.score_continuations` passes) or a bare `Engine` (benchmarks
    build their own); either must be idle. on_logprobs(request_indices, steps, logprobs [B, V]
    float32) is called at every engine step.
    """
    from raas_batch.llm_engine import LLMEngine

    core = engine if isinstance(engine, LLMEngine) else LLMEngine(engine, engine.tokenizer)
    if core.has_unfinished_requests() or core.engine.has_work():
        raise RuntimeError("run_scored needs an idle engine (generate() is still running).")
    results = [ScoreResult() for _ in requests]
    for i, req in enumerate(requests):
        forced = req.continuation_ids
        if forced is not None and not forced:
            raise ValueError(f"request {i}: continuation_ids is empty; give at least one token.")
        n_new = len(forced) if forced is not None else req.max_new_tokens
        if n_new < 1:
            raise ValueError(f"request {i}: max_new_tokens must be >= 1 for free decoding.")
        params = SamplingParams(max_new_tokens=n_new, temperature=0.0, top_p=1.0, top_k=0, seed=0,
                                ignore_eos=True if forced is not None else req.ignore_eos)
        core.add_request(i, {"prompt_token_ids": list(req.prompt_token_ids)}, params, forced=forced,
                         kv_override=req.kv_override)

    def hook(seqs: list[Sequence], logits: torch.Tensor) -> None:
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
        greedy = logprobs.argmax(dim=-1)
        fed = [s.forced[0] if s.forced else None for s in seqs]
        fed_t = torch.tensor([f if f is not None else -1 for f in fed], device=logits.device)
        fed_t = torch.where(fed_t >= 0, fed_t, greedy)
        lp = logprobs.gather(1, fed_t.unsqueeze(1)).squeeze(1)
        rows = [core.key_of(s) for s in seqs]
        for r, g, v in zip(rows, greedy.tolist(), lp.tolist()):
            results[r].greedy_token_ids.append(g)
            results[r].token_logprobs.append(v)
        if on_logprobs is not None:
            on_logprobs(rows, [len(s.output_token_ids) for s in seqs], logprobs)

    runner = core.engine.runner
    runner.logits_hook = hook
    try:
        while core.has_unfinished_requests():
            finished, _ = core.step()
            for i, out in finished:
                c = out.outputs[0]
                if c.finish_reason == "error":
                    raise ValueError(f"request {i}: {c.error}")
                res = results[i]
                res.token_ids, res.finish_reason = list(c.token_ids), c.finish_reason
                res.peak_kv_tokens, res.evicted_pages, res.kv_over_budget = (c.peak_kv_tokens, c.evicted_pages,
                                                                            c.kv_over_budget)
    finally:
        runner.logits_hook = None
        if core.has_unfinished_requests():
            core.abort_all()
    return results
