"""Continuous batching: admit waiting sequences while their KV quota fits, prefill them, decode the
running ones together, retire the finished ones so new ones take their place.

Invariants:
- A sequence's quota (policy.quota_pages) is reserved whole at admission and released at
  retirement; nothing is preempted, because a sequence never needs more than its quota.
- At most max_num_seqs sequences run at once; each holds a distinct slot in [0, max_num_seqs).
- Sequences are admitted in arrival order (no overtaking), so a long prompt cannot starve.
"""

from __future__ import annotations

import time
from collections import deque

from raas_batch.engine.page_pool import PagePool
from raas_batch.engine.sequence import Sequence
from raas_batch.policies.base import KVPolicy


class Scheduler:
    def __init__(self, pool: PagePool, policy: KVPolicy, max_num_seqs: int, max_prefill_tokens: int):
        self.pool, self.policy = pool, policy
        self.max_num_seqs, self.max_prefill_tokens = max_num_seqs, max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))

    def add(self, seq: Sequence) -> None:
        quota = self.quota(seq)
        if quota > self.pool.num_pages:
            raise ValueError(
                f"a sequence needs {quota} KV pages but the cache holds {self.pool.num_pages}; lower "
                f"max_new_tokens, set a kv_budget, or give the cache more memory (num_kv_tokens)."
            )
        self.waiting.append(seq)

    def quota(self, seq: Sequence) -> int:
        return self.policy.quota_pages(len(seq.prompt_token_ids), seq.max_new_tokens, seq.kv_override)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[str, list[Sequence]]:
        """-> ("prefill", newly admitted) when any waiting sequence fits, else ("decode", running)."""
        admitted: list[Sequence] = []
        num_tokens = 0
        while self.waiting and self._free_slots:
            seq = self.waiting[0]
            n = len(seq.prompt_token_ids)
            if admitted and num_tokens + n > self.max_prefill_tokens:
                break
            pages = self.pool.allocate(self.quota(seq))
            if pages is None:
                break
            self.waiting.popleft()
            seq.pages, seq.slot = pages, self._free_slots.pop()
            seq.t_admitted = time.perf_counter()
            self.policy.on_admit(seq.slot, pages, n, seq.kv_override)
            seq.kv_over_budget = self.policy.over_budget(n, seq.max_new_tokens, seq.kv_override)
            admitted.append(seq)
            num_tokens += n
        if admitted:
            self.running.extend(admitted)
            return "prefill", admitted
        return "decode", list(self.running)

    def retire_finished(self) -> list[Sequence]:
        done = [s for s in self.running if s.finished]
        if done:
            self.running = [s for s in self.running if not s.finished]
        return done

    def release(self, seq: Sequence) -> None:
        self.pool.release(seq.pages)
        self._free_slots.append(seq.slot)
        seq.pages, seq.slot = [], -1
