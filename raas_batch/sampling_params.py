"""Per-request sampling settings (field names follow vLLM where vLLM has one)."""

from __future__ import annotations

import copy
from dataclasses import InitVar, dataclass, field

# What an unset field becomes when the model's generation_config does not say either.
FALLBACK_DEFAULTS = {"max_new_tokens": 256, "temperature": 1.0, "top_p": 1.0, "top_k": 0}


@dataclass
class SamplingParams:
    """How to sample one request.

    `max_new_tokens`, `temperature`, `top_p` and `top_k` may be left unset (None): the engine then takes
    the model's `generation_config` values (`LLM.get_default_sampling_params()`, as vLLM does), else
    256, 1.0, 1.0 and 0; `with_defaults` makes that copy. temperature 0 means greedy, top_k 0 turns it
    off. `seed` makes the random draws reproducible per request (sample j of a request uses the stream
    derived from (seed, j)), whatever else is in the batch and in whatever order requests arrive; the
    tokens are too where the logits do not depend on the batch (README "Reproducible rows": on the GPU
    with `LLM(batch_invariant=True)`). `max_tokens` is vLLM's name of `max_new_tokens`
    (either may be given; both read back the same value). `thinking_budget` caps the tokens generated
    inside a `<think>...</think>` block: when it is reached the engine closes the block itself.
    """

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    thinking_budget: int | None = None
    max_tokens: InitVar[int | None] = None  # vLLM's spelling of max_new_tokens

    def __post_init__(self, max_tokens: int | None):
        if max_tokens is not None:
            if self.max_new_tokens is not None and self.max_new_tokens != max_tokens:
                raise ValueError(f"SamplingParams: max_tokens={max_tokens} and max_new_tokens={self.max_new_tokens} "
                                 "disagree; give one of them.")
            self.max_new_tokens = max_tokens
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        checks = [
            (self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature is None or self.temperature >= 0, "temperature must be >= 0 (0 is greedy)"),
            (self.top_p is None or 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k is None or self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (self.n >= 1, "n must be >= 1"),
            (self.thinking_budget is None or self.thinking_budget >= 0, "thinking_budget must be >= 0"),
            (all(s for s in self.stop), "stop strings must be non-empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {message}.")

    def unset(self) -> list[str]:
        """The fields left to the model's generation_config (None here)."""
        return [name for name in FALLBACK_DEFAULTS if getattr(self, name) is None]

    def with_defaults(self, defaults: dict | None = None) -> SamplingParams:
        """A copy with every unset field taken from `defaults` (a model's generation_config), else
        from FALLBACK_DEFAULTS. Given fields are kept."""
        out = copy.copy(self)
        out.stop, out.stop_token_ids = list(self.stop), list(self.stop_token_ids)
        for name in self.unset():
            value = (defaults or {}).get(name)
            setattr(out, name, value if value is not None else FALLBACK_DEFAULTS[name])
        return out

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# max_tokens reads and writes max_new_tokens (an InitVar keeps it out of fields(), repr and equality).
SamplingParams.max_tokens = property(lambda self: self.max_new_tokens,
                                     lambda self, value: setattr(self, "max_new_tokens", value))
