"""Quest: query-aware sparsity (Tang et al., ICML 2024, arXiv 2406.10774).

Every page is kept (memory O(N), the dense quota); per decode step, layer and KV head the pages
before the current one are scored with the bound s = sum_i max(q_i * kmax_i, q_i * kmin_i) (max over
the query group), and attention reads the top (L/P - 1) of them plus the current page. The first
`dense_layers` (default 2, as in Quest) attend to everything. A sequence with at most L/P pages
attends to all of them. read_pages returns [B, Hkv, min(K, W) + 1] (K = the largest L/P - 1 of the
admitted sequences, W the block-table width), -1 padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raas_batch.policies.base import DecodeContext, KVPolicy


@dataclass
class QuestPolicy(KVPolicy):
    dense_layers: int = 2

    name = "quest"

    def quota_pages(self, num_prompt_tokens: int, max_new_tokens: int, override=None) -> int:
        return self.pages_for(num_prompt_tokens + max_new_tokens)

    def shares_prompt_pages(self, num_prompt_tokens: int, override=None) -> bool:
        return True  # every page is kept; decode writes only the pages of positions past the prompt

    def bind(self, pool, max_num_seqs: int) -> None:
        super().bind(pool, max_num_seqs)
        self.topk = torch.zeros(max_num_seqs, dtype=torch.int64, device=pool.fill.device)  # L/P - 1
        # host: the largest top-k among admitted sequences (fixes read_pages' shape). Set from kv_budget
        # up front so that a captured CUDA graph keeps its shape; only a per-sequence budget above
        # kv_budget raises it later (eager decode only).
        self._k = max(1, int(self.kv_budget) // self.page_size - 1) if self.kv_budget else 1

    def on_admit(self, slot: int, pages: list[int], num_prompt_tokens: int, override=None) -> None:
        budget = int(override) if override is not None else int(self.kv_budget)
        k = max(1, budget // self.page_size - 1)
        self.topk[slot] = k
        self._k = max(self._k, k)

    def write_pages(self, layer: int, ctx: DecodeContext) -> torch.Tensor:
        logical = (ctx.positions // self.page_size).unsqueeze(1)  # [B, 1]
        page = ctx.page_tables.gather(1, logical)  # [B, 1]
        return page.expand(-1, self.pool.num_kv_heads).to(torch.int32)

    def read_pages(self, layer: int, q: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        table = ctx.page_tables  # [B, W]
        B, W = table.shape
        Hkv = self.pool.num_kv_heads
        full = table.unsqueeze(1).expand(B, Hkv, W)
        if layer < self.dense_layers:
            return full
        cur_logical = (ctx.positions // self.page_size).unsqueeze(1)  # [B, 1]
        cols = torch.arange(W, device=table.device).unsqueeze(0)
        before = (cols < cur_logical) & (table >= 0)  # [B, W] pages before the current one
        scores = self._ops().page_scores(q, self.pool.kmin[layer], self.pool.kmax[layer], full)  # [B, Hkv, W]
        scores = scores.masked_fill(~before.unsqueeze(1), float("-inf"))
        k = min(self._k, W)
        values, idx = scores.topk(k, dim=-1)  # [B, Hkv, k]
        rank = torch.arange(k, device=table.device).view(1, 1, -1)
        keep = (values > float("-inf")) & (rank < self.topk[ctx.slot_ids].view(-1, 1, 1))
        chosen = torch.where(keep, full.gather(2, idx), -1)
        current = table.gather(1, cur_logical).unsqueeze(1).expand(B, Hkv, 1)
        return torch.cat([chosen, current], dim=-1).to(torch.int32)
