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
