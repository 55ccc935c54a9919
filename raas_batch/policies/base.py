"""The KV policy interface: which pages a decode step reads and which page it writes.

Every hook that runs inside a decode step works on device tensors only (no host synchronisation),
so that the GPU path can capture decode steps in CUDA graphs. Host-side hooks (`quota_pages`,
`on_admit`, `over_budget`, `seq_stats`) run at admission and retirement.

Per decode step and layer the attention layer calls, in order:
  append (write_pages + kv_append) -> read_pages -> paged_decode_attention (kernel) -> after_attention
Each hook does what its name says:
- `write_pages` chooses the page each (sequence, KV head) writes and changes whatever that choice
  changes (evicting a victim, resetting an opened page, stamping the written page); `append` calls
  it and writes the token there (a policy may do both in one kernel: the bounded policies on Triton);
- `read_pages` is a pure read: it changes no state (calling it twice gives the same pages);
- `after_attention` is the one hook that updates state from what attention saw (RaaS refreshes
  stamps from the query's page bounds or the pages' attention mass; H2O accumulates mass). A policy
  may also give that update as data, `attention_refresh` (a `kernels.reference.Refresh`): the step
  then hands it to the attention op, which runs it on its own results (the Triton kernel inside the
  program that computed them), and does not call after_attention. Both forms mean the same update.

Per-sequence settings: a sequence may carry `kv_override` (the scheduler passes it to the host-side
hooks): for a single policy it is that sequence's kv_budget in tokens (None = the policy's own); for a
`PolicyMixture` it is `(member name, kv_budget or None)`. This lets one engine run carry several
budgets (and, for benchmarks, several policies) at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from raas_batch.kernels.reference import Refresh


@dataclass
class DecodeContext:
    """Device tensors describing one decode step (B sequences).

    slot_ids: [B] int64, each sequence's slot: its row in every per-sequence tensor (< max_num_seqs).
    positions: [B] int64, absolute position of the token being appended.
    page_tables: [B, W] int32, each sequence's quota pages in order, -1 padded.
    host_slot_ids: the same slot ids as a host list (known before the step; lets a PolicyMixture
    split the batch by member without a device sync).
    """

    slot_ids: torch.Tensor
    positions: torch.Tensor
    page_tables: torch.Tensor
    host_slot_ids: list[int] = field(default_factory=list)
    # Per-step values a policy computes once and reuses in every layer (e.g. the dense page table).
    memo: dict = field(default_factory=dict)

    def select(self, rows: torch.Tensor, host_rows: list[int]) -> DecodeContext:
        """The sub-batch of `rows` ([b] int64 device tensor; the same indices as a host list)."""
        return DecodeContext(self.slot_ids[rows], self.positions[rows], self.page_tables[rows],
                             [self.host_slot_ids[r] for r in host_rows])


@dataclass
class KVPolicy:
    """Base class. Subclasses are small dataclasses registered by name in `raas_batch.policies`."""

    kv_budget: int | None = None
    page_size: int = 16

    name: ClassVar[str] = ""
    needs_mass: ClassVar[bool] = False  # after_attention() wants the attention mass per page read
    # after_attention() wants the Quest bound of each page read (the attention computes it as it reads)
    needs_bounds: ClassVar[bool] = False
    # prefill writes each prompt page's attention mass from the prompt's own queries into pool.mass
    # (kernels/reference.py prefill_page_mass); for policies that rank pages by accumulated mass (H2O)
    needs_prefill_mass: ClassVar[bool] = False
    # reads the pages' key bounds (pool.kmin / kmax, via ops.page_scores); when False the CPU backends
    # skip maintaining them
    uses_key_bounds: ClassVar[bool] = True
    ops: ClassVar[object] = None  # kernel namespace (page_scores); set by the engine via use_ops
    supports_cuda_graphs: ClassVar[bool] = True  # the decode hooks need nothing a graph replay lacks

    def quota_pages(self, num_prompt_tokens: int, max_new_tokens: int, override=None) -> int:
        """Pages reserved for a sequence at admission (never exceeded afterwards)."""
        raise NotImplementedError

    def bind(self, pool, max_num_seqs: int) -> None:
        """Attach to the engine's page pool; allocate per-sequence state [max_num_seqs, ...]."""
        self.pool = pool
        self.max_num_seqs = max_num_seqs

    def use_ops(self, ops) -> None:
        """The engine's kernel namespace (torch reference or Triton); policies call ops.page_scores."""
        self.ops = ops

    def _ops(self):
        if self.ops is None:
            from raas_batch.kernels import reference

            return reference
        return self.ops

    def pin_prompt_pages(self, slot: int | None = None) -> bool:
        """Whether prefill marks the prompt pages of the sequence in `slot` pinned."""
        return False

    def shares_prompt_pages(self, num_prompt_tokens: int, override=None) -> bool:
        """Host-side: whether a sequence's full prompt pages stay as prefill wrote them (never written,
        evicted or reused by decode), so the samples of one request can read one copy in place. The
        page metadata a policy updates after attention (stamps, mass) must then be left alone on those
        pages too. False (the safe answer) makes each sample copy the prompt pages instead."""
        return False

    def on_admit(self, slot: int, pages: list[int], num_prompt_tokens: int, override=None) -> None:
        """Host-side: a sequence took `slot` with quota `pages`; its prompt fills the first pages."""

    def on_admit_many(self, admissions: list[tuple[int, list[int], int, Any]]) -> None:
        """`on_admit` of each (slot, pages, num_prompt_tokens, override) of one scheduling round (distinct slots);
        a policy with per-slot device state may write it in one op a tensor instead of one a sequence."""
        for slot, pages, num_prompt_tokens, override in admissions:
            self.on_admit(slot, pages, num_prompt_tokens, override)

    def over_budget(self, num_prompt_tokens: int, max_new_tokens: int, override=None) -> bool:
        """Host-side: whether the sequence's quota exceeds its kv_budget (the prompt did not fit)."""
        return False

    def write_pages(self, layer: int, ctx: DecodeContext) -> torch.Tensor:
        """-> [B, Hkv] int32: the page each (sequence, kv head) appends this step's token to. The page
        has room (fill < page_size) and holds, or is reset to hold, the token's logical page."""
        raise NotImplementedError

    def append(self, layer: int, ctx: DecodeContext, k: torch.Tensor, v: torch.Tensor, bounds: bool = True,
               rope: tuple | None = None) -> torch.Tensor:
        """The decode step's write: k, v [B, Hkv, D] go to the pages `write_pages` picks (ops.kv_append,
        which keeps the pages' key bounds unless bounds is False). rope = (q, cos, sin, positions): q
        and k are not yet rotated; the op rotates q in place and k on its way to the cache. -> the
        pages [B, Hkv] int32."""
        pages = self.write_pages(layer, ctx)
        k_cache, v_cache, kmin, kmax, fill = self.pool.layer_views[layer]
        if not bounds:
            kmin = kmax = None
        self._ops().kv_append(k, v, k_cache, v_cache, kmin, kmax, fill, pages, rope=rope)
        return pages

    def read_pages(self, layer: int, q: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        """q: [B, Hq, D] -> [B, Hkv, S] int32 pages to attend (-1 = none); includes the written page.
        Pure: changes no state."""
        raise NotImplementedError

    def read_limit(self, layer: int, ctx: DecodeContext) -> torch.Tensor | None:
        """Pure, optional: [B] int32, how many leading entries of each row of `read_pages` can hold
        tokens (the rest are empty). The Triton attention then skips the rest outright; None = all."""
        return None

    def after_attention(self, layer: int, q: torch.Tensor, ctx: DecodeContext, page_ids: torch.Tensor,
                        mass: torch.Tensor | None, bounds: torch.Tensor | None = None) -> None:
        """The state update from this step's attention: q [B, Hq, D]; page_ids [B, Hkv, S] as read;
        mass [B, Hkv, S] float32 per page read (None unless needs_mass); bounds [B, Hkv, S] float32,
        the Quest bound of q over each page read (ops.page_scores; None unless needs_bounds)."""

    def attention_refresh(self, layer: int, ctx: DecodeContext) -> Refresh | None:
        """Optional: this layer's `after_attention` as a `kernels.reference.Refresh`, which the decode
        step hands to the attention op instead of calling `after_attention` (the Triton kernel then runs
        RaaS's refresh inside the attention program that computed the bounds). It must mean exactly
        what after_attention does with the attention's mass or bounds. None: the step calls
        after_attention."""
        del layer, ctx
        return None

    def seq_stats(self, slot: int, pages: list[int]) -> tuple[int, int]:
        """Host-side (synchronises): (peak_kv_tokens, evicted_pages) of the sequence now. The engine
        uses `device_stats` instead; this is for tests and tools."""
        return self.pool.held_tokens(pages), 0

    def device_stats(self) -> torch.Tensor | None:
        """[2, num_slots] int64 on the device: each slot's (peak_kv_tokens, evicted_pages) as of the
        step just enqueued, copied to the host with its tokens (no sync). None when nothing is ever
        evicted: then the peak is every token written, which the host knows (as for a slot whose
        column holds -1, which a PolicyMixture gives for its members without device statistics)."""
        return None

    def table_width(self, num_quota_pages: int, num_tokens: int) -> int:
        """Host-side, per decode step: how many of a sequence's quota pages the step's page table must
        show (the table is cut to the batch's largest width). Bounded policies need the whole quota."""
        return num_quota_pages

    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)
