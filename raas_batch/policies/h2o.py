"""H2O: Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023, arXiv 2306.14048), page-granular.

Half of the Q = kv_budget / P page slots go to the most recent pages (the page being written
included), half to the pages with the largest attention mass accumulated since they entered the
cache (the decode kernel emits each page's softmax mass, max over the query group; `after_attention` adds
it up in PagePool.mass). When a new page is needed, the page outside the recent window with the
smallest accumulated mass is evicted (ties to the older page). The prompt is not pinned, and its
pages start with the mass the prompt's own queries gave them in the causal prefill (H2O accumulates
over every query, prompt included; `kernels.reference.prefill_page_mass`), so a prompt page starts
ahead of a new decode page rather than level with it.
Memory O(L), reused.
"""

from __future__ import annotations

from dataclasses import dataclass

from raas_batch.policies.bounded import BoundedPolicy


@dataclass
class H2OPolicy(BoundedPolicy):
    name = "h2o"
    uses_key_bounds = False
    needs_mass = True
    needs_prefill_mass = True
    eviction_key = "mass"

    def window_pages(self, sparse_pages: int, pinned_pages: int) -> int:
        # Half of the unpinned slots (the page being opened included) are the recent window, so the
        # other half always holds a candidate. Unpinned prompt (the default): half of all slots.
        return max(1, (sparse_pages - pinned_pages) // 2)

    def after_attention(self, layer, q, ctx, page_ids, mass, bounds=None):
        if layer < self.dense_layers:
            return
        pool = self.pool
        self._ops().bounded_update(page_ids, mass, self.cur[layer], ctx.slot_ids, ctx.positions, self.top,
                                   pool.fill[layer], pool.pinned[layer], pool.stamp[layer], pool.mass[layer],
                                   rule="accumulate")
