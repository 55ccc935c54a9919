"""H2O: Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023, arXiv 2306.14048), page-granular.

Half of the Q = kv_budget / P page slots go to the most recent pages (the page being written
included), half to the pages with the largest attention mass accumulated since they entered the
cache (the decode kernel emits each page's softmax mass, max over the query group; `observe` adds
it up in PagePool.mass). When a new page is needed, the page outside the recent window with the
smallest accumulated mass is evicted (ties to the older page). The prompt is not pinned, and its
pages start at zero mass (the prefill kernel does not emit attention probabilities).
Memory O(L), reused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raas_batch.policies.bounded import BoundedPolicy


@dataclass
class H2OPolicy(BoundedPolicy):
    name = "h2o"
    uses_key_bounds = False
    needs_mass = True

    def _eviction_key(self, layer, ctx, table, logical, cand):
        mass = self._meta(self.pool.mass[layer], table)  # [B, Hkv, W]
        recent = (self.nslots[ctx.slot_ids] // 2).view(-1, 1, 1)  # window incl. the new page
        new_logical = (ctx.positions // self.page_size).view(-1, 1, 1)
        return mass, cand & (logical <= new_logical - recent)

    def observe(self, layer, ctx, page_ids, mass):
        if layer < self.dense_layers:
            return
        safe = page_ids.clamp(min=0).long()
        heads = self._heads.view(1, -1, 1).expand_as(safe)
        # mass is 0 for -1 entries, so accumulating into the clamped index is harmless.
        self.pool.mass[layer].index_put_((safe, heads), torch.where(page_ids >= 0, mass, 0.0), accumulate=True)
