"""The one per-step global: the metadata of the step being run (prefill or decode).

The model runner sets it before a forward and clears it after; the attention layer
(`raas_batch.layers.attention.attend`) reads it. Nothing else is global.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from raas_batch.engine.page_pool import PagePool, PrefillPages
from raas_batch.policies.base import DecodeContext, KVPolicy

# RaaS's refresh on a second stream, beside the attention (1, the default on CUDA) or inside the attention's
# program (0). The fixed 1.5B job's RaaS decode tokens/s with it: +0.75% and +0.89% (runs 71 and 72 in
# docs/gpu-notes.md, an A/B in one session each).
REFRESH_STREAM_ENV = "RAAS_BATCH_REFRESH_STREAM"


def refresh_stream_enabled() -> bool:
    return _flag(REFRESH_STREAM_ENV)


# RaaS's top_half refresh once per page, at the step that fills a row's current page, from the queries of the
# page's steps kept in a ring (1, the default where the refresh runs on the side stream), or at every step (0):
# kernels/window_refresh.py.
REFRESH_WINDOW_ENV = "RAAS_BATCH_REFRESH_WINDOW"


def _flag(name: str) -> bool:
    value = os.environ.get(name, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def refresh_window_enabled() -> bool:
    return _flag(REFRESH_WINDOW_ENV)


@dataclass
class RefreshWindow:
    """What the deferred refresh keeps across steps (kernels/window_refresh.py): ring [layers, num_slots, P,
    Hq, D], every slot's rotated queries of its last P decode steps, each layer's; first_pos [num_slots]
    int64, the position of each slot's first decode step (its prompt's length: the runner's prompt_len)."""

    ring: torch.Tensor
    first_pos: torch.Tensor


@dataclass
class SideStream:
    """A second CUDA stream for a decode step's work that nothing later in the step reads (RaaS's refresh:
    its stamps are read by the next step's page choice), so it can run beside the step's own kernels.

    `fork()` makes the side stream wait for what the step has enqueued so far; `run` enqueues a call on
    it and keeps its tensor arguments alive; `join()` makes the step's stream wait for the side stream
    and drops those references. The caching allocator ties a block to the stream that allocated it, so a
    tensor of the step's stream read on the side stream must not be freed before the join: after it,
    whatever reuses its block is ordered after the side stream's reads. Works eagerly and under CUDA-graph
    capture (the side stream joins the capture at the fork and leaves it at the join). stream None: every
    call runs where it is enqueued (the CPU stand-in of tests and benchmarks)."""

    stream: torch.cuda.Stream | None
    held: list = field(default_factory=list)
    forked: bool = False  # since the last join: a join without a fork waits for nothing (and may not, in a capture)

    def fork(self) -> None:
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream())
        self.forked = True

    def run(self, fn, *args):
        if self.stream is None:
            return fn(*args)
        with torch.cuda.stream(self.stream):
            out = fn(*args)
        self.held.append(args)
        return out

    def join(self) -> None:
        if self.stream is not None and self.forked:
            torch.cuda.current_stream().wait_stream(self.stream)
        self.held.clear()
        self.forked = False


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
    side: SideStream | None = None  # decode on CUDA (RAAS_BATCH_REFRESH_STREAM, on by default): RaaS's refresh there
    window: RefreshWindow | None = None  # read with side only: RaaS's top_half refresh once a page


_CONTEXT: StepContext | None = None


def set_context(ctx: StepContext | None) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def get_context() -> StepContext:
    if _CONTEXT is None:
        raise RuntimeError("attention called outside an engine step (no step context set).")
    return _CONTEXT
