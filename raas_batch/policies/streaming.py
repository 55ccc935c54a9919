"""StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453), page-granular: the first page (attention
sinks) plus the most recent pages up to the budget. When a new page is needed, the oldest page other
than the first is evicted. Positions stay absolute: kept keys are never re-rotated (unlike the
paper's rolling cache). Memory O(L), reused.
"""

from __future__ import annotations

from dataclasses import dataclass

from raas_batch.policies.bounded import BoundedPolicy


@dataclass
class StreamingPolicy(BoundedPolicy):
    name = "streaming"
    uses_key_bounds = False

    def _eviction_key(self, layer, ctx, table, logical, cand):
        return logical.float(), cand & (logical > 0)
