"""What `LLM.generate` returns: one RequestOutput per prompt, one CompletionOutput per sample."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One sample of one prompt.

    `text` is the whole completion; `reasoning` is the part inside `<think>...</think>` (also when
    the chat template opened the block), `answer` the rest. `finish_reason` is "stop" (EOS, a stop
    token or a stop string), "length" (max_new_tokens or the context end) or "error" (the prompt
    could not be run; `error` says why and nothing was generated).

    KV accounting (raas_batch.policies): `peak_kv_tokens` is the largest number of tokens the sequence
    held in any one (layer, KV head) over the whole generation; `evicted_pages` is the number of
    pages evicted in the (layer, KV head) that evicted most (per-(layer, head) max, not a sum over
    layers and heads); `kv_over_budget` is True when the prompt did not fit kv_budget, so the
    sequence kept its prompt pages plus a small decode allowance instead (see docs/kv-policies.md).
    `shared_kv_tokens` are the prompt tokens of those counted that the sample read from pages stored
    once for all the samples of its request (0 when n = 1, or when the policy may evict prompt pages:
    README "Samples of one prompt").
    """

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    reasoning: str = ""
    answer: str = ""
    finish_reason: str = "length"
    error: str | None = None
    num_reasoning_tokens: int = 0
    thinking_budget_hit: bool = False
    seed: int | None = None
    peak_kv_tokens: int = 0
    evicted_pages: int = 0
    kv_over_budget: bool = False
    shared_kv_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class RequestOutput:
    """All samples of one prompt, in `generate`'s input order."""

    index: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
