"""Shared machinery of the policies whose memory is bounded at admission (raas*, h2o, streaming).

A sequence's quota is Q page slots (Q = kv_budget / page_size), reserved at admission. In every
(layer, KV head) the sequence's tokens live in those Q slots only: when a new page is needed
(the token's position starts a page) and no slot is empty, the policy picks a victim page among the
held, unpinned pages (`_eviction_key`, lowest first, ties to the older page, i.e. the smaller logical
index), resets its metadata and reuses its slot for the new page. Nothing is masked while held.

    quota slots of one (layer, head):  [ prompt pages (pinned?) | decode pages ... | empty ]
                                         ^ never evicted if pinned    ^ victim = lowest key

Invariants (tested in tests/test_policies.py):
- pages held per (sequence, layer, head) never exceed the quota, so held tokens <= Q * page_size;
- a pinned page is never evicted; the page being written is never the victim;
- prompt too long: Q = prompt pages + 2 (the current page and one more), reported by `over_budget`;
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


def argmin_older(key: torch.Tensor, logical: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """key, logical: [..., W]; cand: [..., W] bool -> [...] index of the candidate with the lowest key,
    ties broken towards the smaller logical page (the older one). Rows without candidates give 0."""
    big = torch.finfo(torch.float64).max
    k = torch.where(cand, key.double(), big)
    best = k.amin(dim=-1, keepdim=True)
    tied = cand & (k == best)
    lg = torch.where(tied, logical.long(), torch.iinfo(torch.int64).max)
    return lg.argmin(dim=-1)


@dataclass
class BoundedPolicy(KVPolicy):
    pin_prompt: bool = False  # prefill pins the prompt pages (never evicted)
    dense_layers: int = 0  # the first k layers keep every token (memory then O(N))

    stamp_on_write: ClassVar[bool] = True  # the written page is stamped with the position every step

    # ---- host side ----
    def _budget(self, override) -> int:
        return int(override) if override is not None else int(self.kv_budget)

    def _sparse_slots(self, num_prompt_tokens: int, max_new_tokens: int, override=None) -> int:
        budget_pages = self._budget(override) // self.page_size
        need = max(budget_pages, self.pages_for(num_prompt_tokens) + DECODE_ALLOWANCE)
        return min(need, self.pages_for(num_prompt_tokens + max_new_tokens))

    def quota_pages(self, num_prompt_tokens: int, max_new_tokens: int, override=None) -> int:
        slots = self._sparse_slots(num_prompt_tokens, max_new_tokens, override)
        if self.dense_layers > 0:
            slots = max(slots, self.pages_for(num_prompt_tokens + max_new_tokens))
        return slots

    def over_budget(self, num_prompt_tokens: int, max_new_tokens: int, override=None) -> bool:
        slots = self._sparse_slots(num_prompt_tokens, max_new_tokens, override)
        return slots > self._budget(override) // self.page_size

    def pin_prompt_pages(self, slot: int | None = None) -> bool:
        return self.pin_prompt

    def bind(self, pool, max_num_seqs: int) -> None:
        super().bind(pool, max_num_seqs)
        dev = pool.fill.device
        shape = (pool.num_layers, max_num_seqs, pool.num_kv_heads)
        self.nslots = torch.zeros(max_num_seqs, dtype=torch.int64, device=dev)  # slots sparse layers use
        self.budget_pages = torch.zeros(max_num_seqs, dtype=torch.int64, device=dev)  # kv_budget / P
        self.cur = torch.zeros(shape, dtype=torch.int64, device=dev)  # page being written
        self.held = torch.zeros(shape, dtype=torch.int64, device=dev)  # tokens held now
        self.peak = torch.zeros(shape, dtype=torch.int64, device=dev)
        self.evicted = torch.zeros(shape, dtype=torch.int64, device=dev)
        self._heads = torch.arange(pool.num_kv_heads, device=dev)

    def on_admit(self, slot: int, pages: list[int], num_prompt_tokens: int, override=None) -> None:
        n = num_prompt_tokens
        # max_new_tokens is not passed here: the quota already caps the slots at the sequence's pages.
        self.nslots[slot] = min(len(pages), max(self._budget(override) // self.page_size,
                                                self.pages_for(n) + DECODE_ALLOWANCE))
        self.budget_pages[slot] = self._budget(override) // self.page_size
        self.cur[:, slot] = pages[(n - 1) // self.page_size]
        self.held[:, slot] = n
        self.peak[:, slot] = n
        self.evicted[:, slot] = 0

    def seq_stats(self, slot: int, pages: list[int]) -> tuple[int, int]:
        return int(self.peak[:, slot].max().item()), int(self.evicted[:, slot].max().item())

    # ---- device side ----
    def _slot_table(self, layer: int, ctx: DecodeContext) -> torch.Tensor:
        """-> [B, W] int64 the pages this layer may use (-1 = not usable)."""
        table = ctx.block_tables.long()
        if layer < self.dense_layers:
            return table
        cols = torch.arange(table.shape[1], device=table.device).unsqueeze(0)
        return torch.where(cols < self.nslots[ctx.slot_ids].unsqueeze(1), table, -1)

    def _meta(self, tensor_layer: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """tensor_layer: [N, Hkv]; table: [B, W] (-1 allowed) -> [B, Hkv, W]."""
        return tensor_layer[table.clamp(min=0)].transpose(1, 2)

    def _eviction_key(self, layer: int, ctx: DecodeContext, table: torch.Tensor, logical: torch.Tensor,
                      cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (key [B, Hkv, W], candidates [B, Hkv, W]): the victim is the candidate with the lowest key."""
        raise NotImplementedError

    def write_pages(self, layer: int, ctx: DecodeContext) -> torch.Tensor:
        pool, P = self.pool, self.page_size
        pos = ctx.positions  # [B]
        B, Hkv = pos.shape[0], pool.num_kv_heads
        heads = self._heads.unsqueeze(0).expand(B, Hkv)
        cur = self.cur[layer, ctx.slot_ids]  # [B, Hkv]
        opening = (pos % P == 0).unsqueeze(1).expand(B, Hkv)  # [B, Hkv] a new page is needed
        if layer < self.dense_layers:
            new_page = ctx.block_tables.long().gather(1, (pos // P).unsqueeze(1)).expand(B, Hkv)
            evict = torch.zeros_like(opening)
            freed = torch.zeros_like(cur)
        else:
            table = self._slot_table(layer, ctx)  # [B, W]
            usable = (table >= 0).unsqueeze(1)  # [B, 1, W]
            fill = self._meta(pool.fill[layer], table)  # [B, Hkv, W]
            logical = self._meta(pool.logical[layer], table)
            pinned = self._meta(pool.pinned[layer], table)
            empty = usable & (fill == 0)
            held = usable & (fill > 0)
            base = held & ~pinned
            key, cand = self._eviction_key(layer, ctx, table, logical, base)
            cand = torch.where(cand.any(-1, keepdim=True), cand, base)  # a policy's extra rule never blocks
            col = torch.where(empty.any(-1), empty.int().argmax(-1), argmin_older(key, logical, cand))  # [B, Hkv]
            new_page = table.unsqueeze(1).expand(B, Hkv, -1).gather(2, col.unsqueeze(-1)).squeeze(-1)
            evict = opening & ~empty.any(-1)
            freed = torch.where(evict, fill.gather(2, col.unsqueeze(-1)).squeeze(-1).long(), 0)
        page = torch.where(opening, new_page, cur)  # [B, Hkv]
        # Reset an opened page's metadata (kv_append then writes at offset 0 and resets kmin/kmax).
        self._put(pool.fill[layer], page, heads, opening, 0)
        self._put(pool.logical[layer], page, heads, opening, (pos // P).unsqueeze(1))
        self._put(pool.pinned[layer], page, heads, opening, False)
        self._put(pool.mass[layer], page, heads, opening, 0.0)
        stamp_now = torch.ones_like(opening) if self.stamp_on_write else opening
        self._put(pool.stamp[layer], page, heads, stamp_now, pos.unsqueeze(1))
        self.cur[layer, ctx.slot_ids] = page
        held_now = self.held[layer, ctx.slot_ids] + 1 - freed
        self.held[layer, ctx.slot_ids] = held_now
        self.peak[layer, ctx.slot_ids] = torch.maximum(self.peak[layer, ctx.slot_ids], held_now)
        self.evicted[layer, ctx.slot_ids] += evict.long()
        return page.to(torch.int32)

    @staticmethod
    def _put(t: torch.Tensor, page: torch.Tensor, heads: torch.Tensor, mask: torch.Tensor, value) -> None:
        """t[page, head] = value where mask; pages are distinct per (b, head), so no write conflicts."""
        old = t[page, heads]
        if isinstance(value, torch.Tensor):
            value = value.to(t.dtype)
        # A Python scalar goes straight to torch.where: making it a device tensor would copy from the
        # host, which synchronises and cannot be captured in a CUDA graph.
        t[page, heads] = torch.where(mask, value, old)

    def read_pages(self, layer: int, q: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        table = self._slot_table(layer, ctx)  # [B, W]
        page_ids = table.unsqueeze(1).expand(-1, self.pool.num_kv_heads, -1)  # [B, Hkv, W]
        if layer >= self.dense_layers:
            self._after_read(layer, q, ctx, page_ids)
        return page_ids.to(torch.int32)

    def _after_read(self, layer: int, q: torch.Tensor, ctx: DecodeContext, page_ids: torch.Tensor) -> None:
        """Hook for policies that score pages with the query (RaaS's Quest-bound refresh)."""

    def _stamp_where(self, layer: int, ctx: DecodeContext, page_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """stamp[page] = position where mask; page_ids [B, Hkv, S] may hold -1 (never masked in)."""
        stamp = self.pool.stamp[layer]
        safe = page_ids.clamp(min=0).long()
        heads = self._heads.view(1, -1, 1).expand_as(safe)
        delta = torch.where(mask, ctx.positions.view(-1, 1, 1) - stamp[safe, heads], 0)
        stamp.index_put_((safe, heads), delta, accumulate=True)  # zero deltas make -1 padding harmless
