"""Several policies in one engine, chosen per sequence: for benchmarks that compare policies.

`PolicyMixture(members={"raas": RaasPolicy(...), "h2o": H2OPolicy(...), ...})`; a sequence selects
its member with `kv_override=(member name, kv_budget or None)`. Every member binds to the same page
pool and keeps its own per-slot state; each decode step splits the batch by member (from the host
list DecodeContext.host_slot_ids, so no device sync) and calls the members' hooks on their rows.
read_pages pads the members' page lists to a common width with -1.
Invariant: a slot belongs to one member from admission to retirement.
Eager decode only: the split needs the host slot list, which a CUDA-graph replay does not pass, so
the engine refuses a mixture with CUDA graphs (`supports_cuda_graphs`).
"""

from __future__ import annotations

import torch

from raas_batch.policies.base import DecodeContext, KVPolicy


class PolicyMixture(KVPolicy):
    name = "mixture"
    supports_cuda_graphs = False

    def __init__(self, members: dict[str, KVPolicy], page_size: int = 16):
        super().__init__(kv_budget=None, page_size=page_size)
        if any(m.page_size != page_size for m in members.values()):
            raise ValueError("every member of a PolicyMixture needs the mixture's page_size.")
        self.members = dict(members)
        self._slot_member: dict[int, str] = {}
        self._split_for = None

    @property
    def needs_mass(self) -> bool:  # type: ignore[override]
        return any(m.needs_mass for m in self.members.values())

    @property
    def needs_prefill_mass(self) -> bool:  # type: ignore[override]
        # Harmless for the other members: an opened page's mass is reset, and no other member reads it.
        return any(m.needs_prefill_mass for m in self.members.values())

    @property
    def uses_key_bounds(self) -> bool:  # type: ignore[override]
        return any(m.uses_key_bounds for m in self.members.values())

    @property
    def needs_bounds(self) -> bool:  # type: ignore[override]
        return any(m.needs_bounds for m in self.members.values())

    def _member(self, override) -> tuple[KVPolicy, object]:
        if not isinstance(override, tuple) or len(override) != 2 or override[0] not in self.members:
            raise ValueError(f"a PolicyMixture sequence needs kv_override=(member, kv_budget) with member one of "
                             f"{', '.join(self.members)}; got {override!r}.")
        return self.members[override[0]], override[1]

    def quota_pages(self, num_prompt_tokens, max_new_tokens, override=None):
        member, budget = self._member(override)
        return member.quota_pages(num_prompt_tokens, max_new_tokens, budget)

    def over_budget(self, num_prompt_tokens, max_new_tokens, override=None):
        member, budget = self._member(override)
        return member.over_budget(num_prompt_tokens, max_new_tokens, budget)

    def shares_prompt_pages(self, num_prompt_tokens, override=None):
        member, budget = self._member(override)
        return member.shares_prompt_pages(num_prompt_tokens, budget)

    def bind(self, pool, max_num_seqs):
        super().bind(pool, max_num_seqs)
        for m in self.members.values():
            m.bind(pool, max_num_seqs)
        # each slot's member (its index in `members`), on the device: picks the member's statistics
        self._member_index = torch.full((max_num_seqs,), -1, dtype=torch.int64, device=pool.fill.device)

    def use_ops(self, ops):
        super().use_ops(ops)
        for m in self.members.values():
            m.use_ops(ops)

    def on_admit(self, slot, pages, num_prompt_tokens, override=None):
        if override is None:  # the engine's padding slot (CUDA-graph batches): give it to the first member
            override = (next(iter(self.members)), None)
        member, budget = self._member(override)
        self._slot_member[slot] = override[0]
        self._member_index[slot] = list(self.members).index(override[0])
        member.on_admit(slot, pages, num_prompt_tokens, budget)

    def pin_prompt_pages(self, slot=None):
        return self.members[self._slot_member[slot]].pin_prompt_pages(slot)

    def seq_stats(self, slot, pages):
        return self.members[self._slot_member[slot]].seq_stats(slot, pages)

    def device_stats(self):
        """Each slot's statistics from its own member; -1 where that member has none (the host's count)."""
        parts = [m.device_stats() for m in self.members.values()]
        if all(p is None for p in parts):
            return None
        out = torch.full((2, self._member_index.shape[0]), -1, dtype=torch.int64, device=self._member_index.device)
        for i, p in enumerate(parts):
            if p is not None:
                out = torch.where(self._member_index == i, p, out)
        return out

    def _split(self, ctx: DecodeContext) -> list[tuple[KVPolicy, torch.Tensor, DecodeContext]]:
        """Member, rows [b] and sub-context of each member present in the step (cached per step)."""
        if self._split_for is not ctx:
            groups: dict[str, list[int]] = {}
            for row, slot in enumerate(ctx.host_slot_ids):
                groups.setdefault(self._slot_member[slot], []).append(row)
            dev = ctx.slot_ids.device
            self._groups = []
            for name, rows in groups.items():
                idx = torch.tensor(rows, dtype=torch.int64, device=dev)
                self._groups.append((self.members[name], idx, ctx.select(idx, rows)))
            self._split_for = ctx
        return self._groups

    def write_pages(self, layer, ctx):
        groups = self._split(ctx)
        if sum(len(sub.host_slot_ids) for _, _, sub in groups) != ctx.positions.shape[0]:
            raise RuntimeError("PolicyMixture needs DecodeContext.host_slot_ids for every row (eager decode).")
        out = torch.full((ctx.positions.shape[0], self.pool.num_kv_heads), -1, dtype=torch.int32,
                         device=ctx.positions.device)
        for member, rows, sub in groups:
            out[rows] = member.write_pages(layer, sub)
        return out

    def read_pages(self, layer, q, ctx):
        parts = [(rows, member.read_pages(layer, q[rows], sub)) for member, rows, sub in self._split(ctx)]
        width = max(p.shape[-1] for _, p in parts)
        out = torch.full((q.shape[0], self.pool.num_kv_heads, width), -1, dtype=torch.int32, device=q.device)
        for rows, p in parts:
            out[rows, :, : p.shape[-1]] = p
        return out

    def after_attention(self, layer, q, ctx, page_ids, mass, bounds=None):
        # The members' pages were padded with -1 columns to a common width: no page, no update.
        def rows_of(x, rows):
            return x[rows] if x is not None else None

        for member, rows, sub in self._split(ctx):
            member.after_attention(layer, q[rows], sub, page_ids[rows], rows_of(mass, rows), rows_of(bounds, rows))
