"""The one per-step global: the metadata of the step being run (prefill or decode).

The model runner sets it before a forward and clears it after; the attention layer
(`raas_batch.layers.attention.attend`) reads it. Nothing else is global.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raas_batch.engine.page_pool import PagePool, PrefillPages
from raas_batch.policies.base import DecodeContext, KVPolicy


@dataclass
class StepContext:
    is_prefill: bool
    pool: PagePool
    policy: KVPolicy
    ops: object  # raas_batch.kernels.ops namespace (torch reference or Triton)
    cu_seqlens: torch.Tensor | None = None  # prefill: [num_seqs + 1] int32
    max_seqlen: int = 0  # prefill: longest prompt in the batch
    prefill: PrefillPages | None = None
    decode: DecodeContext | None = None


_CONTEXT: StepContext | None = None


def set_context(ctx: StepContext | None) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def get_context() -> StepContext:
    if _CONTEXT is None:
        raise RuntimeError("attention called outside an engine step (no step context set).")
    return _CONTEXT
