"""The KV policy interface: which pages a decode step reads and which page it writes.

Every hook that runs inside a decode step works on device tensors only (no host synchronisation),
so that the GPU path can capture decode steps in CUDA graphs. Host-side hooks (`quota_pages`,
`on_admit`, `seq_stats`) run at admission and retirement.

Per decode step and layer the attention layer calls, in order:
  write_pages -> kv_append (kernel) -> read_pages -> paged_decode_attention (kernel) -> observe
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class DecodeContext:
    """Device tensors describing one decode step (B sequences).

    slot_ids: [B] int64, each sequence's row in per-sequence state tensors (< max_num_seqs).
    positions: [B] int64, absolute position of the token being appended.
    block_tables: [B, Q] int32, each sequence's quota pages in order, -1 padded.
    """

    slot_ids: torch.Tensor
    positions: torch.Tensor
    block_tables: torch.Tensor


@dataclass
class KVPolicy:
    """Base class. Subclasses are small dataclasses registered by name in `raas_batch.policies`."""

    kv_budget: int | None = None
    page_size: int = 16

    name: ClassVar[str] = ""
    needs_mass: ClassVar[bool] = False  # observe() wants the attention mass per page read

    def quota_pages(self, num_prompt_tokens: int, max_new_tokens: int) -> int:
        """Pages reserved for a sequence at admission (never exceeded afterwards)."""
        raise NotImplementedError

    def bind(self, pool, max_num_seqs: int) -> None:
        """Attach to the engine's page pool; allocate per-sequence state [max_num_seqs, ...]."""
        self.pool = pool
        self.max_num_seqs = max_num_seqs

    def pin_prompt_pages(self) -> bool:
        """Whether prefill marks prompt pages pinned."""
        return False

    def on_admit(self, slot: int, pages: list[int], num_prompt_tokens: int) -> None:
        """Host-side: a sequence took `slot` with quota `pages`; its prompt fills the first pages."""

    def write_pages(self, layer: int, ctx: DecodeContext) -> torch.Tensor:
        """-> [B, Hkv] int32: the page each (sequence, kv head) appends this step's token to. The page
        has room (fill < page_size) and holds, or is reset to hold, the token's logical page."""
        raise NotImplementedError

    def read_pages(self, layer: int, q: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        """q: [B, Hq, D] -> [B, Hkv, S] int32 pages to attend (-1 = none); includes the written page."""
        raise NotImplementedError

    def observe(self, layer: int, ctx: DecodeContext, page_ids: torch.Tensor, mass: torch.Tensor | None) -> None:
        """After attention: page_ids [B, Hkv, S] as read, mass [B, Hkv, S] float32 (if needs_mass)."""

    def seq_stats(self, slot: int, pages: list[int]) -> tuple[int, int]:
        """Host-side, at retirement: (peak_kv_tokens, evicted_pages) of the sequence."""
        return self.pool.held_tokens(pages), 0

    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)
