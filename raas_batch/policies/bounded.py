"""Shared machinery of the policies whose memory is bounded at admission (raas*, h2o, streaming).

A sequence's quota is Q page slots (Q = kv_budget / page_size), reserved at admission. In every
(layer, KV head) the sequence's tokens live in those Q slots only: when a new page is needed
(the token's position starts a page) and no slot is empty, the policy evicts a victim among the
held, unpinned pages and reuses its slot for the new page. Nothing is masked while held.

    quota slots of one (layer, head):  [ prompt pages (pinned?) | decode pages ... | empty ]
                                         ^ never evicted if pinned    ^ victim = lowest key

The victim is the candidate with the lowest key (`eviction_key`: stamp for RaaS, accumulated mass for
H2O, logical index for StreamingLLM), ties to the older page (the smaller logical index). Candidates
are the held, unpinned pages outside the sequence's eviction window: logical <= new page - window
(`window_pages`: RaaS's `recent_pages` + 1, H2O's recent half) and logical >= `min_logical`
(StreamingLLM's attention sink). Quotas are sized so that this filter always leaves a candidate
(`decode_allowance`, H2O's window counted over unpinned slots), so it is never dropped; the kernel
op `bounded_write` (kernels/reference.py is its specification) still falls back to any unpinned page
rather than write outside the quota, and tests/test_policies.py checks over long runs that every
victim satisfied the filter.

Per decode step and layer (policies/base.py has the contract):
- `write_pages` runs `ops.bounded_write`: picks the page (evicting where a page opens), resets an
  opened page's metadata, stamps the written page, and keeps the per-sequence counters; `append`
  then writes the token there (on the Triton backend both in one kernel, `ops.bounded_write_append`);
- `read_pages` is a pure read: the sequence's first `sparse_pages` quota pages, the same for every sparse
  layer and head, built once per step (DecodeContext.memo);
- `after_attention` (subclasses) refreshes stamps or accumulates mass with `ops.bounded_update`.
On the Triton backend both ops are one small kernel each over (sequence, KV head), with no host sync.

Invariants (tested in tests/test_policies.py):
- pages held per (sequence, layer, head) never exceed the quota, so held tokens <= Q * page_size;
- a pinned page is never evicted; the page being written is never the victim;
- prompt too long: Q = prompt pages + the decode allowance (the current page and one more, or what
  the eviction window needs), reported by `over_budget`;
- a budget covering the whole sequence never evicts (Q is capped at the sequence's own pages).

Per-sequence state lives in tensors indexed by slot (DecodeContext.slot_ids): the page currently
written (per layer, head), tokens held now, the peak of that, and the eviction count. `seq_stats`
reports the peak as the max over layers and heads, and evicted_pages as the per-(layer, head) max.
`dense_layers` > 0 keeps the first layers dense (then the quota covers the whole sequence; the
sparse layers still use only their first Q slots).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from raas_batch.policies.base import DecodeContext, KVPolicy

DECODE_ALLOWANCE = 2  # pages beyond the prompt when the prompt alone does not fit (current + one)


@dataclass
class BoundedPolicy(KVPolicy):
    # prefill pins the prompt pages (never evicted): True, False, or "auto": pin them when they take at most
    # half of the budget's pages (a sequence's choice, made at admission; README "Defaults" has the evidence)
    pin_prompt: bool | str = False
    dense_layers: int = 0  # the first k layers keep every token (memory then O(N))

    stamp_on_write: ClassVar[bool] = True  # the written page is stamped with the position every step
    eviction_key: ClassVar[str] = "stamp"  # "stamp" | "mass" | "logical": the victim has the lowest
    min_logical: ClassVar[int] = 0  # pages with a smaller logical index are never victims

    def __post_init__(self):
        if self.pin_prompt not in (True, False, "auto"):
            raise ValueError(f"pin_prompt must be true, false or \"auto\", got {self.pin_prompt!r}.")

    # ---- host side ----
    def pins(self, prompt_pages: int, budget_pages: int) -> bool:
        """Whether a sequence with this many prompt pages under this budget has its prompt pinned."""
        if self.pin_prompt == "auto":
            return 2 * prompt_pages <= budget_pages
        return bool(self.pin_prompt)

    def decode_allowance(self) -> int:
        """Unpinned pages a quota needs beyond the prompt so that the eviction window leaves a candidate."""
        return DECODE_ALLOWANCE

    def window_pages(self, sparse_pages: int, pinned_pages: int) -> int:
        """Eviction window of a sequence: victims have logical <= (new page) - window. 1 = any older page."""
        return 1

    def _budget(self, override) -> int:
        return int(override) if override is not None else int(self.kv_budget)

    def _sparse_slots(self, num_prompt_tokens: int, max_new_tokens: int, override=None) -> int:
        budget_pages = self._budget(override) // self.page_size
        need = max(budget_pages, self.pages_for(num_prompt_tokens) + self.decode_allowance())
        return min(need, self.pages_for(num_prompt_tokens + max_new_tokens))

    def quota_pages(self, num_prompt_tokens: int, max_new_tokens: int, override=None) -> int:
        slots = self._sparse_slots(num_prompt_tokens, max_new_tokens, override)
        if self.dense_layers > 0:
            slots = max(slots, self.pages_for(num_prompt_tokens + max_new_tokens))
        return slots

    def over_budget(self, num_prompt_tokens: int, max_new_tokens: int, override=None) -> bool:
        slots = self._sparse_slots(num_prompt_tokens, max_new_tokens, override)
        return slots > self._budget(override) // self.page_size

    def shares_prompt_pages(self, num_prompt_tokens: int, override=None) -> bool:
        # A pinned page is never a victim, so never reused; bounded_update leaves pinned pages' stamps
        # and mass alone. An unpinned prompt page may be evicted in any (layer, head), and its slot then
        # takes a decode page: that sample needs the slot as its own.
        return self.pins(self.pages_for(num_prompt_tokens), self._budget(override) // self.page_size)

    def pin_prompt_pages(self, slot: int | None = None) -> bool:
        if self.pin_prompt == "auto":
            return self._pinned_slots.get(slot, False)  # decided in on_admit
        return bool(self.pin_prompt)

    def bind(self, pool, max_num_seqs: int) -> None:
        super().bind(pool, max_num_seqs)
        dev = pool.fill.device
        shape = (pool.num_layers, max_num_seqs, pool.num_kv_heads)
        per_seq = {"dtype": torch.int64, "device": dev}
        self.sparse_pages = torch.zeros(max_num_seqs, **per_seq)  # quota columns the sparse layers use
        self.all_pages = torch.zeros(max_num_seqs, **per_seq)  # the whole quota (dense layers)
        self.window = torch.ones(max_num_seqs, **per_seq)  # eviction window (window_pages)
        self.top = torch.zeros(max_num_seqs, **per_seq)  # refresh slots per step (RaaS top-half)
        self.cur = torch.zeros(shape, **per_seq)  # page being written
        self.held = torch.zeros(shape, **per_seq)  # tokens held now
        self.peak = torch.zeros(shape, **per_seq)
        self.evicted = torch.zeros(shape, **per_seq)
        self._pinned_slots: dict[int, bool] = {}  # pin_prompt="auto": each admitted slot's choice

    def on_admit(self, slot: int, pages: list[int], num_prompt_tokens: int, override=None) -> None:
        self.on_admit_many([(slot, pages, num_prompt_tokens, override)])

    def on_admit_many(self, admissions) -> None:
        """The slots' state, computed on the host and written with one op a tensor (512 admissions at once: ~10
        ops, not ~5,000 one-element writes, each a launch on CUDA)."""
        slots, cols = [], {name: [] for name in ("sparse_pages", "all_pages", "window", "top", "cur", "held")}
        for slot, pages, n, override in admissions:
            prompt_pages = self.pages_for(n)
            budget_pages = self._budget(override) // self.page_size
            # max_new_tokens is not passed here: the quota already caps the slots at the sequence's pages.
            sparse_pages = min(len(pages), max(budget_pages, prompt_pages + self.decode_allowance()))
            pinned = self.pins(prompt_pages, budget_pages)
            self._pinned_slots[slot] = pinned
            slots.append(slot)
            for name, value in (("sparse_pages", sparse_pages), ("all_pages", len(pages)),
                                ("window", self.window_pages(sparse_pages, prompt_pages if pinned else 0)),
                                ("top", budget_pages // 2), ("cur", pages[(n - 1) // self.page_size]), ("held", n)):
                cols[name].append(value)
        if not slots:
            return
        dev = self.cur.device
        idx = torch.tensor(slots, dtype=torch.long, device=dev)

        def values(name: str, like: torch.Tensor) -> torch.Tensor:
            return torch.tensor(cols[name], dtype=like.dtype, device=dev)

        for name in ("sparse_pages", "all_pages", "window", "top"):
            getattr(self, name)[idx] = values(name, getattr(self, name))
        per_head = (1, len(slots), 1)  # [layers, slots, heads] state: the same value in every layer and head
        self.cur[:, idx] = values("cur", self.cur).view(per_head)
        held = values("held", self.held).view(per_head)
        self.held[:, idx] = held
        self.peak[:, idx] = held
        self.evicted[:, idx] = torch.zeros((), dtype=self.evicted.dtype, device=dev)

    def seq_stats(self, slot: int, pages: list[int]) -> tuple[int, int]:
        return int(self.peak[:, slot].max().item()), int(self.evicted[:, slot].max().item())

    def device_stats(self) -> torch.Tensor:
        return torch.stack([self.peak.amax(dim=(0, 2)), self.evicted.amax(dim=(0, 2))])  # [2, num_slots]

    # ---- device side ----
    def _write_args(self, layer: int, ctx: DecodeContext) -> tuple:
        # A dense layer (layer < dense_layers) may use every quota column: its pages open in order and
        # are never evicted (its quota covers the sequence), so the first empty column is always the one
        # of the token's logical page and the same op serves it.
        pool = self.pool
        columns = self.all_pages if layer < self.dense_layers else self.sparse_pages
        return (ctx.page_tables, ctx.slot_ids, ctx.positions, columns, self.window,
                self.cur[layer], self.held[layer], self.peak[layer], self.evicted[layer],
                pool.fill[layer], pool.logical[layer], pool.pinned[layer], pool.stamp[layer], pool.mass[layer],
                self.page_size)

    def _write_options(self) -> dict:
        return {"key": self.eviction_key, "min_logical": self.min_logical, "stamp_on_write": self.stamp_on_write}

    def write_pages(self, layer: int, ctx: DecodeContext) -> torch.Tensor:
        return self._ops().bounded_write(*self._write_args(layer, ctx), **self._write_options())

    def append(self, layer: int, ctx: DecodeContext, k: torch.Tensor, v: torch.Tensor, bounds: bool = True,
               rope: tuple | None = None) -> torch.Tensor:
        """The write step and the append as one op, `bounded_write_append` (one kernel on Triton)."""
        k_cache, v_cache, kmin, kmax, _ = self.pool.layer_views[layer]
        if not bounds:
            kmin = kmax = None
        return self._ops().bounded_write_append(k, v, k_cache, v_cache, kmin, kmax, *self._write_args(layer, ctx),
                                                **self._write_options(), rope=rope)

    def read_pages(self, layer: int, q: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        """Pure: the sequence's usable quota pages, [B, Hkv, W] (a stride-0 view over heads)."""
        dense = layer < self.dense_layers
        key = "bounded_read_dense" if dense else "bounded_read"
        pages = ctx.memo.get(key)
        if pages is None:
            table = ctx.page_tables
            if not dense:
                cols = torch.arange(table.shape[1], device=table.device).unsqueeze(0)
                table = torch.where(cols < self.sparse_pages[ctx.slot_ids].unsqueeze(1), table, -1)
            pages = table.to(torch.int32).unsqueeze(1).expand(-1, self.pool.num_kv_heads, -1)
            ctx.memo[key] = pages
        return pages
