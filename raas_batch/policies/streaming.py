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
    eviction_key = "logical"  # the oldest page goes first
    min_logical = 1  # ... but never the first one (the attention sinks)
