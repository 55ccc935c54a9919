"""One sequence being generated: a (prompt, sample index) pair with its pages and its progress; and the
group that the samples of one request form, so that their prompt is prefilled once."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from raas_batch.reasoning import BUDGET_CLOSE, THINK_CLOSE, THINK_OPEN, IncrementalText
from raas_batch.sampling_params import SamplingParams


@dataclass(eq=False)
class PromptGroup:
    """The samples of one request (n > 1): one prefill, and the prompt's pages kept once.

    The first sample admitted allocates `pages` (the prompt's pages) and the prefill writes the prompt
    there once; `logits` (the last prompt token's, [V] on the device) give every sample its first token
    with its own seed, also samples admitted in a later step and the samples of a later request with
    the same prompt that joins the group (LLMEngine._group_for) while the logits are kept: while the
    pages live for a shared group, until the last sample is admitted otherwise. How a sample uses the pages (`shared`,
    decided by the scheduler from `KVPolicy.shares_prompt_pages`):
    - shared: its page table starts with the prompt's full pages, read in place and never written
      (the policy never writes or evicts them); a partly filled last prompt page is copied into the
      sample's own first page, since the sample's next token lands there;
    - not shared (a policy that may evict a prompt page and reuse its slot): the sample copies every
      prompt page into its own quota after the prefill, so it pays memory as before but no prefill.
    `refs` counts the samples that still need `pages` (not yet admitted, or running with shared
    pages); the pages go back to the pool when it drops to 0.
    """

    num_prompt_tokens: int
    shared: bool | None = None  # set by the scheduler when the first sample is added
    pages: list[int] | None = None
    logits: Any = None  # torch.Tensor [V] once prefilled; dropped when the last sample is admitted
    refs: int = 0
    num_unadmitted: int = 0


@dataclass
class Sequence:
    request_idx: int
    sample_idx: int
    prompt_token_ids: list[int]
    params: SamplingParams
    seed_key: int
    seed: int
    max_new_tokens: int  # params.max_new_tokens clipped to the model's context
    starts_in_think: bool = False
    output_token_ids: list[int] = field(default_factory=list)
    # scheduling
    slot: int = -1
    pages: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    # reasoning / stop-string tracking (only when the request needs it)
    detok: IncrementalText | None = None
    in_think: bool = False
    num_reasoning_tokens: int = 0
    thinking_budget_hit: bool = False
    forced: list[int] = field(default_factory=list)
    stop_text_end: int | None = None  # text cut here when a stop string matched
    # the text of output_token_ids[:text_upto], decoded while the sequence ran (llm_engine.advance_texts;
    # without stop strings or a thinking budget, whose `detok` holds the text)
    text_done: str = ""
    text_upto: int = 0
    # per-sequence KV setting (kv_budget, or (member, kv_budget) for a PolicyMixture); see policies/base.py
    kv_override: object = None
    kv_over_budget: bool = False  # set at admission: the quota exceeds kv_budget (prompt too long)
    # the request's other samples (None: prefilled alone); the leading `num_shared` entries of `pages`
    # are the group's prompt pages, read in place (not this sequence's to write or release)
    group: PromptGroup | None = None
    num_shared: int = 0
    holds_group_ref: bool = False  # counted in group.refs (engine/scheduler.py drops it once)
    shared_kv_tokens: int = 0  # prompt tokens read in place from the group's pages (set at admission)
    # decode steps launched for this sequence whose tokens the host has not recorded yet (0 or 1)
    num_in_flight: int = 0
    # filled when the sequence finishes, from the KV policy's counters of that step
    peak_kv_tokens: int = 0
    evicted_pages: int = 0
    # timings (perf_counter seconds)
    t_arrival: float = field(default_factory=time.perf_counter)
    t_admitted: float | None = None  # set by the scheduler when the sequence joins the running batch
    t_first_token: float | None = None
    t_finish: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def can_decode(self) -> bool:
        """Another decode step may be launched: not finished, and the steps in flight leave room."""
        return not self.finished and len(self.output_token_ids) + self.num_in_flight < self.max_new_tokens

    @property
    def host_picks_next(self) -> bool:
        """The host may replace the next token (forced tokens, or a thinking budget that can start them),
        so the next step must wait for this one to be recorded."""
        return bool(self.forced) or self.params.thinking_budget is not None

    @property
    def last_token(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def start_tracking(self, tokenizer) -> None:
        if self.params.stop or self.params.thinking_budget is not None:
            self.detok = IncrementalText(tokenizer)
            self.in_think = self.starts_in_think

    def append(self, token_id: int, eos_ids: set[int], tokenizer) -> None:
        """Record a sampled token (replaced by a forced one while the engine closes a think block)
        and decide whether the sequence is finished."""
        was_forced = bool(self.forced)
        if was_forced:
            token_id = self.forced.pop(0)
        self.output_token_ids.append(token_id)
        if self.t_first_token is None:
            self.t_first_token = time.perf_counter()
        p = self.params
        if self.detok is not None:
            self._track_text(token_id, tokenizer, was_forced)
        if self.finished:
            return
        if not p.ignore_eos and token_id in eos_ids and not self.forced or token_id in p.stop_token_ids:
            self._finish("stop")
        elif len(self.output_token_ids) >= self.max_new_tokens:
            self._finish("length")

    def _track_text(self, token_id: int, tokenizer, was_forced: bool) -> None:
        p = self.params
        was_in_think = self.in_think
        new = self.detok.push(token_id)
        text = self.detok.text
        if new:
            tail = text[-(len(new) + len(THINK_CLOSE)):]
            if THINK_CLOSE in tail and text.rfind(THINK_CLOSE) > text.rfind(THINK_OPEN):
                self.in_think = False
            elif THINK_OPEN in tail and text.rfind(THINK_OPEN) > text.rfind(THINK_CLOSE):
                self.in_think = True
        if was_in_think and not was_forced:  # the engine's own closing tokens are not reasoning
            self.num_reasoning_tokens += 1
        budget = p.thinking_budget
        if (budget is not None and self.in_think and not self.forced and not self.thinking_budget_hit
                and self.num_reasoning_tokens >= budget):
            self.forced = list(tokenizer.encode(BUDGET_CLOSE, add_special_tokens=False))
            self.thinking_budget_hit = True
        if p.stop and new:
            longest = max(len(s) for s in p.stop)
            window_start = max(0, len(text) - len(new) - longest + 1)
            hits = [i for i in (text.find(s, window_start) for s in p.stop) if i >= 0]
            if hits:
                self.stop_text_end = min(hits)
                self._finish("stop")

    def _finish(self, reason: str) -> None:
        self.finished = True
        self.finish_reason = reason
        self.t_finish = time.perf_counter()
