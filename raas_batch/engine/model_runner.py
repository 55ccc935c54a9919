"""Turns a scheduled batch into tensors, runs the model with the step's attention context, samples.

Prefill: all admitted prompts concatenated ([T] tokens), causal attention within each; the logits of
each prompt's last token give its first output token. Decode: one token per running sequence.
"""

from __future__ import annotations

import torch

from raas_batch.engine.page_pool import PagePool, PrefillPages
from raas_batch.engine.sampler import SamplingBatch, sample
from raas_batch.engine.sequence import Sequence
from raas_batch.engine.step_context import StepContext, set_context
from raas_batch.policies.base import DecodeContext, KVPolicy


class ModelRunner:
    def __init__(self, model: torch.nn.Module, pool: PagePool, policy: KVPolicy, ops, device: torch.device,
                 num_slots: int, max_pages: int):
        self.model, self.pool, self.policy, self.ops, self.device = model, pool, policy, ops, device
        self.page_size = pool.page_size
        # Each slot's quota pages in order, -1 padded: written at admission, gathered on the device
        # every decode step (no per-step host-side page table).
        self.slot_tables = torch.full((num_slots, max_pages), -1, dtype=torch.int32, device=device)
        self.graphs = None  # DecodeGraphs on CUDA (raas_batch/engine/cuda_graph.py)
        # Optional observer of every step's logits: logits_hook(seqs, logits [B, V]) before sampling
        # (teacher-forced scoring, raas_batch/engine/scoring.py).
        self.logits_hook = None

    def _tensor(self, values, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def set_slot_pages(self, slot: int, pages: list[int]) -> None:
        row = torch.full((self.slot_tables.shape[1],), -1, dtype=torch.int32)
        row[:len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self.slot_tables[slot] = row.to(self.device)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> list[int]:
        P = self.page_size
        for seq in seqs:
            self.set_slot_pages(seq.slot, seq.pages)
        input_ids, positions, token_pages, token_offsets = [], [], [], []
        pages, fills, logical, stamps, pinned = [], [], [], [], []
        cu = [0]
        for seq in seqs:
            n = len(seq.prompt_token_ids)
            input_ids += seq.prompt_token_ids
            positions += range(n)
            token_pages += [seq.pages[i // P] for i in range(n)]
            token_offsets += [i % P for i in range(n)]
            for j in range((n + P - 1) // P):
                pages.append(seq.pages[j])
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
        ctx = StepContext(is_prefill=True, pool=self.pool, policy=self.policy, ops=self.ops,
                          cu_seqlens=self._tensor(cu, torch.int32), max_seqlen=max(cu[i + 1] - cu[i] for i in range(len(seqs))),
                          prefill=meta)
        set_context(ctx)
        try:
            hidden = self.model(self._tensor(input_ids), self._tensor(positions))  # [T, hidden]
        finally:
            set_context(None)
        last = self._tensor([c - 1 for c in cu[1:]])
        logits = self.model.compute_logits(hidden[last])  # [B, V]
        return self._sample(logits, seqs)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> list[int]:
        slots = [s.slot for s in seqs]
        token_ids = [s.last_token for s in seqs]
        positions = [s.num_tokens - 1 for s in seqs]
        width = max(self.policy.table_width(len(s.pages), s.num_tokens) for s in seqs)
        if self.graphs is not None:
            hidden = self.graphs.run(token_ids, positions, slots, width)
        else:
            hidden = self.decode_forward(self._tensor(token_ids), self._tensor(positions), self._tensor(slots), width,
                                         host_slot_ids=slots)
        return self._sample(self.model.compute_logits(hidden), seqs)

    @torch.inference_mode()
    def decode_forward(self, token_ids: torch.Tensor, positions: torch.Tensor, slot_ids: torch.Tensor, width: int,
                       host_slot_ids: list[int] | None = None) -> torch.Tensor:
        """The decode forward on device tensors ([B] each) -> hidden [B, hidden]. Never synchronises
        with the host, so it can be captured in a CUDA graph."""
        dec = DecodeContext(slot_ids=slot_ids, positions=positions, page_tables=self.slot_tables[slot_ids, :width],
                            host_slot_ids=host_slot_ids or [])
        set_context(StepContext(is_prefill=False, pool=self.pool, policy=self.policy, ops=self.ops, decode=dec))
        try:
            return self.model(token_ids, positions)
        finally:
            set_context(None)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        if self.logits_hook is not None:
            self.logits_hook(seqs, logits)
        ps = [s.params for s in seqs]
        if all(p.greedy for p in ps):  # no per-row settings to ship to the device
            return logits.argmax(dim=-1).tolist()
        batch = SamplingBatch(
            temperature=self._tensor([p.temperature for p in ps], torch.float32),
            top_p=self._tensor([p.top_p for p in ps], torch.float32),
            top_k=self._tensor([p.top_k for p in ps]),
            keys=self._tensor([s.seed_key for s in seqs]),
            steps=self._tensor([len(s.output_token_ids) for s in seqs]),
            any_sampling=any(not p.greedy for p in ps),
            any_filter=any(not p.greedy and (p.top_p < 1 or p.top_k > 0) for p in ps),
        )
        return sample(logits, batch).tolist()
