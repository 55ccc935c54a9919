"""Turns a scheduled batch into tensors, runs the model with the step's attention context, samples.

Prefill: all admitted prompts concatenated ([T] tokens), causal attention within each; the logits of
each prompt's last token give its first output token. Decode: one token per running sequence.

Per-slot state lives on the device (written at admission, read by every decode step): the last token
of each sequence (the sampler writes it, the next decode step reads it), its sampling settings and
prompt length. A decode step therefore needs from the host only the slots and positions of its rows
(one pinned buffer copied without a sync) and can be launched before the host has seen the previous
step's tokens: `launch_decode` returns a `DecodeLaunch` whose tokens (and the policy's per-sequence
counters after the step) arrive in pinned host memory; `DecodeLaunch.wait()` waits for that step only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from raas_batch.engine.page_pool import PagePool, PrefillPages
from raas_batch.engine.sampler import SamplingBatch, sample
from raas_batch.engine.sequence import Sequence
from raas_batch.engine.step_context import (
    RefreshWindow,
    SideStream,
    StepContext,
    refresh_stream_enabled,
    refresh_window_enabled,
    set_context,
)
from raas_batch.policies.base import DecodeContext, KVPolicy


@dataclass
class DecodeLaunch:
    """A decode step in flight: its rows, and where its results land."""

    seqs: list[Sequence]
    tokens: torch.Tensor  # [B] int64, host (pinned on CUDA)
    stats: torch.Tensor | None  # [2, num_slots] int64 host copy of the policy's counters after the step
    event: torch.cuda.Event | None
    ints: list[int]  # the runner's token_ints: the tokens are returned as those objects

    def wait(self) -> tuple[list[int], torch.Tensor | None]:
        if self.event is not None:
            self.event.synchronize()
        return as_token_ints(self.tokens, self.ints), self.stats


def as_token_ints(tokens: torch.Tensor, ints: list[int]) -> list[int]:
    """A host tensor of token ids -> a list of ints, each the object of `ints` (the runner's token_ints) for its id.
    A sequence's list of output tokens then holds references to one shared object per vocabulary entry instead
    of an int object of its own per token: a finished 512 x 6,144-token shard no longer frees 3.1M ints (0.10-0.12 s
    of the fixed 1.5B job's last shard, on its writer thread before the job could end: run 105, docs/gpu-notes.md)."""
    return list(map(ints.__getitem__, tokens.tolist()))


def _refreshes_top_half(policy: KVPolicy) -> bool:
    return getattr(policy, "refresh_rule", None) == "top_half" and policy.needs_bounds


def refresh_placement(policy: KVPolicy, device: torch.device, backend: str) -> tuple[bool, bool]:
    """Where an engine of `policy` on `device` with kernel `backend` runs RaaS's refresh -> (on a side stream, once a
    page with a ring of queries). The side stream: CUDA, Triton, a refresh by the Quest bounds
    (RAAS_BATCH_REFRESH_STREAM). Once a page: besides, the top_half rule (RAAS_BATCH_REFRESH_WINDOW)."""
    side = device.type == "cuda" and backend == "triton" and policy.needs_bounds and refresh_stream_enabled()
    return side, side and refresh_window_enabled() and _refreshes_top_half(policy)


def window_ring_shape(spec, num_slots: int, page_size: int) -> tuple[int, ...]:
    """The ring of queries of the refresh once a page: [layers, slots, P, Hq, D] (P steps of every query head)."""
    return spec.num_layers, num_slots, page_size, spec.num_heads, spec.head_dim


def window_ring_bytes(spec, page_size: int, dtype: torch.dtype) -> int:
    """Bytes of one slot's ring (`window_ring_shape`), what the page pool's default size leaves room for."""
    return math.prod(window_ring_shape(spec, 1, page_size)) * dtype.itemsize


class ModelRunner:
    def __init__(self, model: torch.nn.Module, pool: PagePool, policy: KVPolicy, ops, device: torch.device,
                 num_slots: int, max_pages: int):
        self.model, self.pool, self.policy, self.ops, self.device = model, pool, policy, ops, device
        self.page_size = pool.page_size
        self.token_ints = list(range(model.spec.vocab_size))  # one int object per token id (`as_token_ints`)
        # Each slot's quota pages in order, -1 padded: written at admission, gathered on the device
        # every decode step (no per-step host-side page table).
        self.slot_tables = torch.full((num_slots, max_pages), -1, dtype=torch.int32, device=device)
        self.graphs = None  # DecodeGraphs on CUDA (raas_batch/engine/cuda_graph.py)
        # per-slot decode state (see the module docstring)
        per_slot = {"size": (num_slots,), "device": device}
        self.last_token = torch.zeros(**per_slot, dtype=torch.int64)
        self.temperature = torch.zeros(**per_slot, dtype=torch.float32)
        self.top_p = torch.ones(**per_slot, dtype=torch.float32)
        self.top_k = torch.zeros(**per_slot, dtype=torch.int64)
        self.seed_keys = torch.zeros(**per_slot, dtype=torch.int64)
        self.prompt_len = torch.zeros(**per_slot, dtype=torch.int64)
        self._pinned = device.type == "cuda"
        self.num_prefill_tokens = 0  # prompt tokens run through the model (a request's samples count once)
        # Optional observer of every step's logits: logits_hook(seqs, logits [B, V]) before sampling
        # (teacher-forced scoring, raas_batch/engine/scoring.py).
        self.logits_hook = None
        # RaaS's refresh by the Quest bounds on a second stream, beside an attention without bounds, instead
        # of inside the attention's program (RAAS_BATCH_REFRESH_STREAM=0): see layers/attention.py
        self.side = None
        side, window = refresh_placement(policy, device, getattr(ops, "backend", ""))
        if side:
            self.side = SideStream(torch.cuda.Stream(device))
        # With the refresh on the side stream, RaaS's top_half refresh runs once per page, at the step that fills
        # a row's current page (RAAS_BATCH_REFRESH_WINDOW=0: every step): kernels/window_refresh.py
        self.window = self.refresh_window(policy, num_slots) if window else None

    def refresh_window(self, policy: KVPolicy, num_slots: int) -> RefreshWindow | None:
        """The deferred refresh's state for `policy`, or None where its refresh is not top_half by the bounds.
        The ring takes `window_ring_bytes` a slot (1.5B shape, P = 16: 1.4 MB, 5% of a 1024-token KV budget);
        the page pool's default size leaves room for it (raas_batch/llm.py `kv_pool_tokens`)."""
        if not _refreshes_top_half(policy):
            return None
        ring = torch.zeros(window_ring_shape(self.model.spec, num_slots, self.pool.page_size),
                           dtype=self.pool.kmin.dtype, device=self.device)
        return RefreshWindow(ring, self.prompt_len)

    def _tensor(self, values, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def set_slot_pages(self, slot: int, pages: list[int]) -> None:
        self._set_page_tables([slot], [pages])

    def _set_page_tables(self, slots, page_lists: list[list[int]]) -> None:
        """Each slot's page table row: its pages, then -1; the rows built on the host, one copy for them all."""
        rows = torch.full((len(page_lists), self.slot_tables.shape[1]), -1, dtype=torch.int32)
        for i, pages in enumerate(page_lists):
            rows[i, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self.slot_tables[slots] = rows.to(self.device)

    def _admit(self, seqs: list[Sequence]) -> torch.Tensor:
        """Write the admitted sequences' per-slot state; -> their slots [B] int64 on the device."""
        slots = self._tensor([s.slot for s in seqs])
        self._set_page_tables(slots, [s.pages for s in seqs])
        self.temperature[slots] = self._tensor([s.params.temperature for s in seqs], torch.float32)
        self.top_p[slots] = self._tensor([s.params.top_p for s in seqs], torch.float32)
        self.top_k[slots] = self._tensor([s.params.top_k for s in seqs])
        self.seed_keys[slots] = self._tensor([s.seed_key for s in seqs])
        self.prompt_len[slots] = self._tensor([len(s.prompt_token_ids) for s in seqs])
        return slots

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> list[int]:
        """Admit `seqs`, run their prompts, sample their first tokens. The samples of one request
        (seq.group) run their prompt once, into the group's pages; each then takes the group's prompt
        pages it does not read in place (the partly filled last one, or all when not shared) by copy,
        and samples its first token from the group's logits with its own seed."""
        slots = self._admit(seqs)
        runs: list[Sequence] = []  # the sequences whose prompt runs now: one per group
        started: set[int] = set()
        for seq in seqs:
            group = seq.group
            if group is None or (group.logits is None and id(group) not in started):
                runs.append(seq)
                if group is not None:
                    started.add(id(group))
        logits = self._prefill_forward(runs) if runs else None  # [len(runs), V]
        rows: dict[int, torch.Tensor] = {}
        for i, seq in enumerate(runs):
            if seq.group is None:
                rows[id(seq)] = logits[i]
            else:
                seq.group.logits = logits[i]
        src, dst = [], []
        for seq in seqs:
            group = seq.group
            if group is not None:
                prompt_pages = -(-len(seq.prompt_token_ids) // self.page_size)
                src += group.pages[seq.num_shared:prompt_pages]
                dst += seq.pages[seq.num_shared:prompt_pages]
        self.pool.copy_pages(src, dst)
        seq_logits = torch.stack([rows[id(s)] if s.group is None else s.group.logits for s in seqs])  # [B, V]
        if self.logits_hook is not None:
            self.logits_hook(seqs, seq_logits)
        tokens = self._sample(seq_logits, slots, self.prompt_len[slots] - 1)
        self.last_token[slots] = tokens
        return as_token_ints(tokens.cpu(), self.token_ints)

    def _prefill_forward(self, seqs: list[Sequence]) -> torch.Tensor:
        """Run the prompts of `seqs` (into their group's pages when grouped) -> last-token logits [B, V]."""
        P = self.page_size
        input_ids, positions, token_pages, token_offsets = [], [], [], []
        pages, fills, logical, stamps, pinned = [], [], [], [], []
        cu = [0]
        for seq in seqs:
            n = len(seq.prompt_token_ids)
            target = seq.group.pages if seq.group is not None else seq.pages
            self.num_prefill_tokens += n
            input_ids += seq.prompt_token_ids
            positions += range(n)
            token_pages += [target[i // P] for i in range(n)]
            token_offsets += [i % P for i in range(n)]
            for j in range((n + P - 1) // P):
                pages.append(target[j])
                fills.append(min(P, n - j * P))
                logical.append(j)
                stamps.append(min(n, (j + 1) * P) - 1)  # position of the page's newest token
                pinned.append(self.policy.pin_prompt_pages(seq.slot))
            cu.append(cu[-1] + n)
        meta = PrefillPages(
            token_pages=self._tensor(token_pages), token_offsets=self._tensor(token_offsets),
            pages=self._tensor(pages), fills=self._tensor(fills), logical=self._tensor(logical),
            stamps=self._tensor(stamps), pinned=self._tensor(pinned, torch.bool),
        )
        self.pool.write_prefill_pages(meta)  # every layer's page metadata; each layer writes its keys and values
        ctx = StepContext(is_prefill=True, pool=self.pool, policy=self.policy, ops=self.ops,
                          cu_seqlens=self._tensor(cu, torch.int32), max_seqlen=max(cu[i + 1] - cu[i] for i in range(len(seqs))),
                          prefill=meta)
        set_context(ctx)
        try:
            hidden = self.model(self._tensor(input_ids), self._tensor(positions))  # [T, hidden]
        finally:
            set_context(None)
        last = self._tensor([c - 1 for c in cu[1:]])
        return self.model.compute_logits(hidden[last])  # [B, V]

    @torch.inference_mode()
    def launch_decode(self, seqs: list[Sequence], positions: list[int]) -> DecodeLaunch:
        """Enqueue one decode step for `seqs` (their tokens at `positions` are their last tokens,
        already in `last_token`): forward, sample, write `last_token`. Returns without waiting."""
        slots = [s.slot for s in seqs]
        width = max(self.policy.table_width(len(s.pages), p + 1) for s, p in zip(seqs, positions))
        if self.logits_hook is None:  # the whole step in one graph: forward, head, sampler, counters
            if self.graphs is not None:
                tokens, stats = self.graphs.run(positions, slots, width, sample=True)
            else:
                tokens, stats = self.decode_step(self._tensor(positions), self._tensor(slots), width,
                                                 host_slot_ids=slots)
        else:  # the hook reads the fp32 logits between the forward (a graph) and the sampler (eager)
            if self.graphs is not None:
                hidden, pos_t, slot_t = self.graphs.run(positions, slots, width)
            else:
                pos_t, slot_t = self._tensor(positions), self._tensor(slots)
                hidden = self.decode_forward(pos_t, slot_t, width, host_slot_ids=slots)
            tokens, stats = self._head_and_sample(hidden, slot_t, pos_t, seqs)
        if not self._pinned:
            return DecodeLaunch(seqs, tokens, stats, None, self.token_ints)
        host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host_tokens.copy_(tokens, non_blocking=True)
        host_stats = None
        if stats is not None:
            host_stats = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            host_stats.copy_(stats, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return DecodeLaunch(seqs, host_tokens, host_stats, event, self.token_ints)

    def set_last_tokens(self, seqs: list[Sequence]) -> None:
        """The host replaced these sequences' sampled tokens (forced tokens): the next step reads these."""
        self.last_token[self._tensor([s.slot for s in seqs])] = self._tensor([s.last_token for s in seqs])

    @torch.inference_mode()
    def decode_step(self, positions: torch.Tensor, slot_ids: torch.Tensor, width: int,
                    host_slot_ids: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`decode_forward`, then the head, the sampler and the last-token write -> (tokens [B] int64, the
        policy's device_stats()). The sampler reads the head's bf16 output and upcasts it exactly
        (kernels/sample.py). Never synchronises with the host: the decode graphs capture it whole, so the
        sampler's per-slot gathers and the writes after it are not launched one by one every step."""
        try:  # the side stream's last refresh may run beside the head and the sampler: joined after them
            hidden = self.decode_forward(positions, slot_ids, width, host_slot_ids, join=False)
            return self._head_and_sample(hidden, slot_ids, positions)
        finally:
            if self.side is not None:
                self.side.join()

    def _head_and_sample(self, hidden: torch.Tensor, slot_ids: torch.Tensor, positions: torch.Tensor,
                         hook_seqs: list[Sequence] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head, the sampler and the last-token write after the forward -> (tokens, device_stats()).
        With hook_seqs the logits hook first gets the fp32 logits of those sequences."""
        if hook_seqs is not None:
            logits = self.model.compute_logits(hidden)  # [B, V] fp32
            self.logits_hook(hook_seqs, logits)
        else:
            logits = self.model.compute_logits(hidden, fp32=False)
        tokens = self._sample(logits, slot_ids, positions)
        self.last_token[slot_ids] = tokens
        return tokens, self.policy.device_stats()

    @torch.inference_mode()
    def decode_forward(self, positions: torch.Tensor, slot_ids: torch.Tensor, width: int,
                       host_slot_ids: list[int] | None = None, join: bool = True) -> torch.Tensor:
        """The decode forward on device tensors ([B] each) -> hidden [B, hidden]; each row's input is
        its slot's last token. Never synchronises with the host, so it can be captured in a CUDA graph.
        join False: the caller joins the side stream (`decode_step`, after the sampler)."""
        token_ids = self.last_token[slot_ids]
        dec = DecodeContext(slot_ids=slot_ids, positions=positions, page_tables=self.slot_tables[slot_ids, :width],
                            host_slot_ids=host_slot_ids or [])
        set_context(StepContext(is_prefill=False, pool=self.pool, policy=self.policy, ops=self.ops, decode=dec,
                                side=self.side, window=self.window))
        try:
            return self.model(token_ids, positions)
        finally:
            set_context(None)
            if join and self.side is not None:
                self.side.join()

    def _sample(self, logits: torch.Tensor, slot_ids: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        """-> [B] int64 on the device. Settings come from the per-slot state; a row's counter is the
        number of tokens its sequence has generated (position - prompt length + 1)."""
        batch = SamplingBatch(temperature=self.temperature[slot_ids], top_p=self.top_p[slot_ids],
                              top_k=self.top_k[slot_ids], keys=self.seed_keys[slot_ids],
                              steps=positions - self.prompt_len[slot_ids] + 1)
        return sample(logits, batch, self.ops)
