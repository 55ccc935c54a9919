"""RaaS: Reasoning-Aware Attention Sparsity (Hu et al., ACL Findings 2025, arXiv 2502.11147), page-based.

Spec: docs/raas-algorithm.md (shared/docs). Per decode step, layer and KV head:
1. append the token to the current page and stamp it with the position (stamp on write);
2. score every retained page but the current one with the Quest bound
   s = sum_i max(q_i * kmax_i, q_i * kmin_i), max over the query heads of the group;
3. attend exactly over all retained pages (O(L));
4. refresh: the top floor((L/P)/2) scored pages get stamp = position (`refresh_rule="top_half"`), or
   those whose bound-estimated share of attention exceeds `alpha` (`refresh_rule="alpha"`).
Eviction (when a new page is needed and all L/P slots are held): the unpinned page with the oldest
stamp, ties to the older page. Prompt pages are pinned (`pin_prompt`). Memory is O(L), reused.

Variants registered here:
- `raas`: the reading above (stamp on write, pinned pages kept out of the refresh by default).
- `raas-mass`: refresh the pages whose exact attention mass (emitted by the decode kernel: softmax
  probability summed over the page's tokens, max over the query group) exceeds `alpha`.
- `raas-paper`: the authors' public code: a page is stamped once, when it is opened, and pinned
  pages compete for the top-half refresh. Kept so that the benchmark can show the difference.

Options (dataclass fields, LLM(policy_options={...})): pin_prompt, refresh_pinned, recent_pages
(never evict the last W completed pages), dense_layers, refresh_rule, alpha. Defaults and the
evidence for them: README.md, "KV policies and fidelity".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from raas_batch.policies.base import DecodeContext
from raas_batch.policies.bounded import BoundedPolicy


@dataclass
class RaasPolicy(BoundedPolicy):
    pin_prompt: bool = True
    refresh_pinned: bool = False  # pinned pages may take refresh slots (wasted: they are never evicted)
    recent_pages: int = 0  # never evict the last W completed pages (paper: 0)
    refresh_rule: str = "top_half"  # "top_half" | "alpha" (Quest bound) | "mass" (exact attention mass)
    alpha: float = 0.001

    name = "raas"

    def __post_init__(self):
        if self.refresh_rule not in ("top_half", "alpha", "mass"):
            raise ValueError(f"refresh_rule {self.refresh_rule!r} is unknown; choose top_half, alpha or mass.")

    @property
    def needs_mass(self) -> bool:  # type: ignore[override]
        return self.refresh_rule == "mass"

    @property
    def uses_key_bounds(self) -> bool:  # type: ignore[override]
        return self.refresh_rule != "mass"

    def _eviction_key(self, layer, ctx, table, logical, cand):
        stamp = self._meta(self.pool.stamp[layer], table)  # [B, Hkv, W]
        if self.recent_pages > 0:
            newest_done = (ctx.positions // self.page_size - 1).view(-1, 1, 1)
            cand = cand & (logical <= newest_done - self.recent_pages)
        return stamp, cand

    def _refreshable(self, layer: int, ctx: DecodeContext, page_ids: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, S] bool: retained pages other than the current one (and unpinned, unless refresh_pinned)."""
        pool = self.pool
        safe = page_ids.clamp(min=0).long()
        heads = self._heads.view(1, -1, 1).expand_as(safe)
        ok = (page_ids >= 0) & (pool.fill[layer][safe, heads] > 0)
        ok &= safe != self.cur[layer, ctx.slot_ids].unsqueeze(-1)
        if not self.refresh_pinned:
            ok &= ~pool.pinned[layer][safe, heads]
        return ok

    def _after_read(self, layer, q, ctx, page_ids):
        if self.refresh_rule == "mass":
            return
        pool = self.pool
        scores = self._ops().page_scores(q, pool.kmin[layer], pool.kmax[layer], page_ids)  # [B, Hkv, S]
        ok = self._refreshable(layer, ctx, page_ids)
        if self.refresh_rule == "top_half":
            s = scores.masked_fill(~ok, float("-inf"))
            order = s.argsort(dim=-1, descending=True, stable=True)
            rank = torch.empty_like(order)
            rank.scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
            top = (self.budget_pages[ctx.slot_ids] // 2).view(-1, 1, 1)
            refresh = ok & (rank < top)
        else:
            # Bound-based estimate of each page's attention share: softmax over retained pages of
            # (scale * bound + log fill); an upper-bound proxy for the exact mass.
            safe = page_ids.clamp(min=0).long()
            heads = self._heads.view(1, -1, 1).expand_as(safe)
            fill = pool.fill[layer][safe, heads].float()
            logit = scores * self.pool.head_dim ** -0.5 + fill.clamp(min=1).log()
            logit = logit.masked_fill((page_ids < 0) | (fill == 0), float("-inf"))
            refresh = ok & (torch.softmax(logit, dim=-1) > self.alpha)
        self._stamp_where(layer, ctx, page_ids, refresh)

    def observe(self, layer, ctx, page_ids, mass):
        if self.refresh_rule != "mass" or layer < self.dense_layers:
            return
        refresh = self._refreshable(layer, ctx, page_ids) & (mass > self.alpha)
        self._stamp_where(layer, ctx, page_ids, refresh)


@dataclass
class RaasMassPolicy(RaasPolicy):
    """RaaS refreshed by exact attention mass > alpha (our extension; the paper's future work)."""

    refresh_rule: str = "mass"
    alpha: float = 0.001

    name = "raas-mass"


@dataclass
class RaasPaperPolicy(RaasPolicy):
    """The authors' reading: stamp a page once, when opened; pinned pages compete for the refresh."""

    refresh_pinned: bool = True

    name = "raas-paper"
    stamp_on_write: ClassVar[bool] = False
