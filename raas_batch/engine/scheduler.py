"""Continuous batching: admit waiting sequences while their KV quota fits, prefill them, decode the
running ones together, retire the finished ones so new ones take their place.

Invariants:
- A sequence's quota (policy.quota_pages) is reserved whole at admission and released at
  retirement; nothing is preempted, because a sequence never needs more than its quota.
- At most max_num_seqs sequences run at once; each holds a distinct slot in [0, max_num_seqs).
- Sequences are admitted in arrival order (no overtaking), so a long prompt cannot starve.
- The samples of one request (a PromptGroup) prefill their prompt once: the first one admitted also
  reserves the prompt's pages, and its prompt tokens count against max_prefill_tokens; the others
  cost only their own quota. A shared prompt page is reserved once and counted once, however many
  samples read it; it goes back to the pool with the last of them (engine/sequence.py has the rules).

Refills come in groups (`prefill_cost_steps` R > 0): a prefill step stops the whole batch's decoding
for about R decode steps (on an H200 at the 1.5B shape, ~30 ms for one row's prompt against a 5-9 ms
decode step: an eager forward, and the decode pipeline restarted). Admitting each row as soon as a slot
frees made a long job of realistic lengths spend a third of its time in prefill steps of one or two
rows. So while sequences run, waiting ones that fit are admitted only once the slots left empty since
the last prefill add up to R full steps (the sum over decode steps of the waiting sequences that would
have fitted >= R x the batch they would make): the loss to empty slots is then about one prefill's
worth, and a burst of free slots (a shard whose rows all stop together) refills within a few steps.
With rows finishing steadily this admits groups of about sqrt(2 R x batch x rows finishing a step).
Nothing running, or R = 0: every sequence that fits is admitted at once; so is the rest of a round that
max_prefill_tokens cut (the first 8,192 prompt tokens of a full batch's start, then the next), and the last
sequences of a stream (`more_coming` False: the caller's source is exhausted) once all of them fit: one
prefill then runs them all, and waiting could only delay them. The rule
counts steps, not seconds, so the schedule, and with it every row's tokens, is the same on every run.
"""

from __future__ import annotations

import time
from collections import deque
from itertools import islice

from raas_batch.engine.page_pool import PagePool
from raas_batch.engine.sequence import Sequence
from raas_batch.policies.base import KVPolicy


class Scheduler:
    def __init__(self, pool: PagePool, policy: KVPolicy, max_num_seqs: int, max_prefill_tokens: int,
                 prefill_cost_steps: float = 0.0):
        if prefill_cost_steps < 0:
            raise ValueError(f"prefill_cost_steps must be >= 0 (0: admit at once), got {prefill_cost_steps}")
        self.pool, self.policy = pool, policy
        self.max_num_seqs, self.max_prefill_tokens = max_num_seqs, max_prefill_tokens
        self.prefill_cost_steps = prefill_cost_steps
        self.idle_slot_steps = 0  # since the last prefill: sum over decode steps of the waiting sequences that fitted
        self._round_open = False  # the last prefill was cut by max_prefill_tokens: the rest of its round goes next
        self.more_coming = True  # False: every sequence still to run has been added (raas_batch.streaming sets it)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))

    def add(self, seq: Sequence) -> None:
        group, n = seq.group, len(seq.prompt_token_ids)
        if group is not None and group.shared is None:
            group.shared = self.policy.shares_prompt_pages(n, seq.kv_override)
        need = self.quota(seq) + self._prompt_pages_to_reserve(seq)
        if need > self.pool.num_pages:
            raise ValueError(
                f"a sequence needs {need} KV pages but the cache holds {self.pool.num_pages}; lower "
                f"max_new_tokens, set a kv_budget, or give the cache more memory (num_kv_tokens)."
            )
        if group is not None:
            group.refs += 1
            group.num_unadmitted += 1
            seq.holds_group_ref = True
        self.waiting.append(seq)

    def num_shared(self, seq: Sequence) -> int:
        """Leading page-table entries of `seq` read in place from its group: the prompt's full pages."""
        group = seq.group
        return len(seq.prompt_token_ids) // self.pool.page_size if group is not None and group.shared else 0

    def _prompt_pages_to_reserve(self, seq: Sequence) -> int:
        """The group's prompt pages, when `seq` would be the first of its group admitted (else 0)."""
        group = seq.group
        return self.policy.pages_for(len(seq.prompt_token_ids)) if group is not None and group.pages is None else 0

    def quota(self, seq: Sequence) -> int:
        """Pages `seq` reserves for itself (its policy's quota less the shared prompt pages)."""
        own = self.policy.quota_pages(len(seq.prompt_token_ids), seq.max_new_tokens, seq.kv_override)
        return own - self.num_shared(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[str, list[Sequence]]:
        """-> ("prefill", newly admitted) when waiting sequences fit and their refill is due (see the module
        doc), else ("decode", running)."""
        if self.prefill_cost_steps > 0 and self.running and self.waiting and self._free_slots and not self._round_open:
            fitting = self.num_fitting()
            last = not self.more_coming and fitting == len(self.waiting)  # the stream's last sequences, all fitting
            if fitting and not last and self.idle_slot_steps + fitting < self.prefill_cost_steps * (len(self.running) + fitting):
                self.idle_slot_steps += fitting
                return "decode", list(self.running)
        admitted: list[Sequence] = []
        fresh: list[int] = []  # the pages taken in this call, reset together before the prefill reads any
        admissions = []  # (slot, pages, prompt tokens, override): the policy's slot state, written together
        num_tokens = 0
        capped = False
        while self.waiting and self._free_slots:
            seq = self.waiting[0]
            group, n = seq.group, len(seq.prompt_token_ids)
            runs_prompt = group is None or group.pages is None  # else its group's prefill is done or under way
            if admitted and runs_prompt and num_tokens + n > self.max_prefill_tokens:
                capped = True
                break
            own, prompt_pages = self.quota(seq), self._prompt_pages_to_reserve(seq)
            if own + prompt_pages > self.pool.num_free:
                break
            if prompt_pages:
                group.pages = self.pool.allocate(prompt_pages, reset=False)
                fresh += group.pages
            pages = self.pool.allocate(own, reset=False)
            fresh += pages
            self.waiting.popleft()
            seq.num_shared = self.num_shared(seq)
            seq.pages = (group.pages[:seq.num_shared] if group is not None else []) + pages
            seq.shared_kv_tokens = seq.num_shared * self.pool.page_size
            seq.slot = self._free_slots.pop()
            if group is not None:
                group.num_unadmitted -= 1
            seq.t_admitted = time.perf_counter()
            admissions.append((seq.slot, seq.pages, n, seq.kv_override))
            seq.kv_over_budget = self.policy.over_budget(n, seq.max_new_tokens, seq.kv_override)
            admitted.append(seq)
            num_tokens += n if runs_prompt else 0
        self._round_open = capped
        if admitted:
            self.idle_slot_steps = 0
            self.pool.reset(fresh)  # one reset for the batch (512 admissions: one set of index ops, not 512)
            self.policy.on_admit_many(admissions)
            self.running.extend(admitted)
            return "prefill", admitted
        return "decode", list(self.running)

    def num_fitting(self) -> int:
        """How many waiting sequences, in arrival order, the free slots and pages would take now (what
        `schedule` would admit, less its max_prefill_tokens cut)."""
        free, count, counted = self.pool.num_free, 0, set()
        for seq in islice(self.waiting, len(self._free_slots)):
            group = seq.group
            need = self.quota(seq)
            if group is not None and group.pages is None and id(group) not in counted:
                need += self.policy.pages_for(len(seq.prompt_token_ids))  # its group's prompt, reserved once
                counted.add(id(group))
            if need > free:
                break
            free -= need
            count += 1
        return count

    def prefilled(self, seqs: list[Sequence]) -> None:
        """After the prefill of `seqs`: a sample that copied its group's prompt pages no longer needs
        them, and a copying group whose samples are all admitted no longer needs its logits. (A shared
        group keeps them while its pages live, so that a request with the same prompt can join it:
        LLMEngine._group_for.)"""
        for seq in seqs:
            group = seq.group
            if group is None:
                continue
            if group.num_unadmitted == 0 and not group.shared:
                group.logits = None
            if not group.shared:
                self._drop_group_ref(seq)

    def retire_finished(self) -> list[Sequence]:
        done = [s for s in self.running if s.finished]
        if done:
            self.running = [s for s in self.running if not s.finished]
        return done

    def release(self, seq: Sequence) -> None:
        self.pool.release(seq.pages[seq.num_shared:])
        self._drop_group_ref(seq)
        self._free_slots.append(seq.slot)
        seq.pages, seq.slot, seq.num_shared = [], -1, 0

    def abort(self) -> None:
        """Release every sequence, running or waiting, and the prompt pages of their groups."""
        for seq in self.running:
            self.release(seq)
        for seq in self.waiting:
            self._drop_group_ref(seq)
        self.running.clear()
        self.waiting.clear()

    def _drop_group_ref(self, seq: Sequence) -> None:
        group = seq.group
        if group is None or not seq.holds_group_ref:
            return
        seq.holds_group_ref = False
        group.refs -= 1
        if group.refs == 0:
            if group.pages is not None:
                self.pool.release(group.pages)
            group.pages, group.logits = None, None

