"""Turns a scheduled batch into tensors, runs the model with the step's attention context, samples.

Prefill: all admitted prompts concatenated ([T] tokens), causal attention within each; the logits of
each prompt's last token give its first output token. Decode: one token per running sequence.
"""

from __future__ import annotations

import torch

from raas_batch.engine.attention import StepContext, set_context
from raas_batch.engine.page_pool import PagePool, PrefillPages
from raas_batch.engine.sampler import SamplingBatch, sample
from raas_batch.engine.sequence import Sequence
from raas_batch.policies.base import DecodeContext, KVPolicy


class ModelRunner:
    def __init__(self, model: torch.nn.Module, pool: PagePool, policy: KVPolicy, ops, device: torch.device):
        self.model, self.pool, self.policy, self.ops, self.device = model, pool, policy, ops, device
        self.page_size = pool.page_size

    def _tensor(self, values, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> list[int]:
        P = self.page_size
        input_ids, positions, token_pages, token_offsets = [], [], [], []
        pages, fills, logical, stamps = [], [], [], []
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
            cu.append(cu[-1] + n)
        meta = PrefillPages(
            token_pages=self._tensor(token_pages), token_offsets=self._tensor(token_offsets),
            pages=self._tensor(pages), fills=self._tensor(fills), logical=self._tensor(logical),
            stamps=self._tensor(stamps), pinned=torch.full((len(pages),), self.policy.pin_prompt_pages(),
                                                           dtype=torch.bool, device=self.device),
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
        width = max(len(s.pages) for s in seqs)
        table = [s.pages + [-1] * (width - len(s.pages)) for s in seqs]
        dec = DecodeContext(
            slot_ids=self._tensor([s.slot for s in seqs]),
            positions=self._tensor([s.num_tokens - 1 for s in seqs]),
            block_tables=self._tensor(table, torch.int32),
        )
        ctx = StepContext(is_prefill=False, pool=self.pool, policy=self.policy, ops=self.ops, decode=dec)
        set_context(ctx)
        try:
            hidden = self.model(self._tensor([s.last_token for s in seqs]), dec.positions)  # [B, hidden]
        finally:
            set_context(None)
        return self._sample(self.model.compute_logits(hidden), seqs)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        ps = [s.params for s in seqs]
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
