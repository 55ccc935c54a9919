"""Per-request sampling settings (field names follow vLLM where vLLM has one)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to sample one request.

    temperature 0 means greedy. `seed` makes sampling reproducible per request: the same request with
    the same seed gives the same tokens whatever else is in the batch and in whatever order requests
    arrive (sample j of a request uses the stream derived from (seed, j)). `max_tokens` is accepted as
    vLLM's alias of `max_new_tokens`. `thinking_budget` caps the tokens generated inside a
    `<think>...</think>` block: when it is reached the engine closes the block itself.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    thinking_budget: int | None = None
    max_tokens: int | None = None  # vLLM alias; wins over max_new_tokens when given

    def __post_init__(self):
        if self.max_tokens is not None:
            self.max_new_tokens = self.max_tokens
            self.max_tokens = None
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0 (0 is greedy)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (self.n >= 1, "n must be >= 1"),
            (self.thinking_budget is None or self.thinking_budget >= 0, "thinking_budget must be >= 0"),
            (all(s for s in self.stop), "stop strings must be non-empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {message}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
