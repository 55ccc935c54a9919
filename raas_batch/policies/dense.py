"""Dense policy: every token kept and attended. The reference every sparse policy is judged against.

Slot j of a sequence's quota holds tokens [j*P, (j+1)*P) in every layer and head; the quota is the
prompt plus max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raas_batch.policies.base import DecodeContext, KVPolicy


@dataclass
class DensePolicy(KVPolicy):
    name = "dense"
    uses_key_bounds = False

    def quota_pages(self, num_prompt_tokens: int, max_new_tokens: int, override=None) -> int:
        return self.pages_for(num_prompt_tokens + max_new_tokens)

    def shares_prompt_pages(self, num_prompt_tokens: int, override=None) -> bool:
        return True  # decode writes only the pages of positions past the prompt

    def table_width(self, num_quota_pages: int, num_tokens: int) -> int:
        # only the pages written so far, including the one the step's token goes to
        return min(num_quota_pages, self.pages_for(num_tokens))

    # Every layer and head of a step writes and reads the same pages: computed once per step (ctx.memo).
    def write_pages(self, layer: int, ctx: DecodeContext) -> torch.Tensor:
        page = ctx.memo.get("dense_write")
        if page is None:
            logical = (ctx.positions // self.page_size).unsqueeze(1)  # [B, 1]
            page = ctx.page_tables.gather(1, logical)  # [B, 1]
            page = ctx.memo["dense_write"] = page.expand(-1, self.pool.num_kv_heads).to(torch.int32)
        return page

    def read_limit(self, layer: int, ctx: DecodeContext) -> torch.Tensor:
        # pages written so far; the table (cut to a CUDA-graph width bucket) may list more, all empty
        limit = ctx.memo.get("dense_limit")
        if limit is None:
            limit = ctx.memo["dense_limit"] = (ctx.positions // self.page_size + 1).to(torch.int32)
        return limit

    def read_pages(self, layer: int, q: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        # The table holds the pages written so far (table_width); any later quota page in it is empty
        # (fill 0 since admission) and contributes nothing.
        pages = ctx.memo.get("dense_read")
        if pages is None:
            B = ctx.page_tables.shape[0]
            pages = ctx.memo["dense_read"] = ctx.page_tables.unsqueeze(1).expand(B, self.pool.num_kv_heads, -1)
        return pages
