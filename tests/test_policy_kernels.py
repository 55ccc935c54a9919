"""The fused policy ops (kernels/bounded_write.py, kernels/bounded_update.py) against their torch
specification (kernels/reference.py), exactly: the same written pages, victims, stamps, masses and
per-sequence counters at every step of long random runs, for every bounded policy and option.

Two identical pools run in lockstep, one policy on the reference ops and one on the Triton ops (the
interpreter on a CPU). Only the policy's own ops differ: pool A appends with the reference kv_append
after the reference write step, pool B with the Triton policy's `append` (the write step and the
append in one kernel, the engine's path), and both policies get the same attention mass (the
reference attention's, on pool A).
RaaS's Quest bounds take each path's own route: the Triton policy gets them from the Triton attention
kernel and hands that kernel its refresh (`attention_refresh`, as in the engine: the refresh runs in
the attention program), the reference policy computes them with page_scores in its after_attention.
Keys and queries are small integers, so Quest bounds are exact integers in fp32 whatever the order
of the sums: the two paths must agree bit for bit, and ties (frequent with integers) exercise the
tie rules (stable ranks, the older page).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from raas_batch.kernels import ops as kops
from raas_batch.kernels import reference as ref

from raas_batch.engine.page_pool import PagePool, PrefillPages
from raas_batch.policies import DecodeContext, make_policy

P, HKV, HQ, D, LAYERS = 4, 2, 6, 16, 2  # D >= 16: tl.dot in the attention kernel on a GPU
TRITON = kops.get_ops("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

CASES = [
    ("raas", {}), ("raas", {"refresh_rule": "alpha"}), ("raas", {"recent_pages": 2}),
    ("raas", {"pin_prompt": False, "refresh_pinned": True}), ("raas", {"dense_layers": 1}),
    ("raas-mass", {}), ("raas-paper", {}), ("h2o", {}), ("h2o", {"pin_prompt": True}), ("streaming", {}),
]


class Lockstep:
    def __init__(self, name, options, budget=6 * P, seed=0, num_pages=300, dtype=torch.float32, fused=True,
                 refresh_in_attention=True):
        self.gen = torch.Generator().manual_seed(seed)
        self.fused = fused
        self.refresh_in_attention = refresh_in_attention
        self.pools, self.policies = [], []
        for ops in (kops.get_ops("torch"), TRITON):
            pool = PagePool(LAYERS, num_pages, HKV, P, D, dtype, DEVICE)
            policy = make_policy(name, budget, P, **options)
            policy.bind(pool, 5)
            policy.use_ops(ops)
            self.pools.append(pool)
            self.policies.append(policy)
        self.seqs: dict[int, list] = {}  # slot -> [pages, position]
        self.dtype = dtype

    def ints(self, *shape):
        return torch.randint(-3, 4, shape, generator=self.gen).to(self.dtype).to(DEVICE)

    def admit(self, slot: int, n: int, max_new: int = 200) -> None:
        k, v = self.ints(n, HKV, D), self.ints(n, HKV, D)
        for pool, policy in zip(self.pools, self.policies):
            pages = pool.allocate(policy.quota_pages(n, max_new))
            policy.on_admit(slot, pages, n)
            npg = -(-n // P)
            t = lambda x: torch.tensor(x, device=DEVICE)
            meta = PrefillPages(
                token_pages=t([pages[i // P] for i in range(n)]), token_offsets=t([i % P for i in range(n)]),
                pages=t(pages[:npg]), fills=t([min(P, n - j * P) for j in range(npg)]), logical=t(list(range(npg))),
                stamps=t([min(n, (j + 1) * P) - 1 for j in range(npg)]),
                pinned=torch.full((npg,), policy.pin_prompt_pages(slot), device=DEVICE))
            pool.write_prefill_pages(meta)
            for layer in range(LAYERS):
                pool.write_prefill(layer, k, v, meta)
        self.seqs[slot] = [pages, n]

    def step(self) -> None:
        slots = list(self.seqs)
        width = max(len(p) for p, _ in self.seqs.values())
        table = torch.tensor([p + [-1] * (width - len(p)) for p, _ in self.seqs.values()], dtype=torch.int32,
                             device=DEVICE)
        ctxs = [DecodeContext(slot_ids=torch.tensor(slots, device=DEVICE),
                              positions=torch.tensor([n for _, n in self.seqs.values()], device=DEVICE),
                              page_tables=table, host_slot_ids=slots) for _ in self.pools]
        for layer in range(LAYERS):
            q, k, v = self.ints(len(slots), HQ, D), self.ints(len(slots), HKV, D), self.ints(len(slots), HKV, D)
            pool = self.pools[0]
            writes = [self.policies[0].write_pages(layer, ctxs[0])]
            ref.kv_append(k, v, pool.k_cache[layer], pool.v_cache[layer], pool.kmin[layer], pool.kmax[layer],
                          pool.fill[layer], writes[0])
            if self.fused:  # the engine's path on Triton: choice and append in one kernel
                writes.append(self.policies[1].append(layer, ctxs[1], k, v))
            else:  # the write step's own kernel, then the reference append
                pool = self.pools[1]
                writes.append(self.policies[1].write_pages(layer, ctxs[1]))
                ref.kv_append(k, v, pool.k_cache[layer], pool.v_cache[layer], pool.kmin[layer], pool.kmax[layer],
                              pool.fill[layer], writes[1])
            assert torch.equal(writes[0], writes[1]), f"layer {layer}: written pages differ"
            reads = [pol.read_pages(layer, q, ctx) for pol, ctx in zip(self.policies, ctxs)]
            assert torch.equal(reads[0], reads[1])
            mass = None
            if self.policies[0].needs_mass:
                pool = self.pools[0]
                _, mass = ref.paged_decode_attention(q, pool.k_cache[layer], pool.v_cache[layer], reads[0],
                                                     pool.fill[layer], D ** -0.5, return_mass=True)
            # The Triton policy ranks by the bounds its attention kernel returns (the engine's path); the
            # reference policy gets none, so its bounded_update scores the pages with page_scores.
            # With refresh_in_attention (the engine's path) the Triton policy's refresh is handed to that
            # kernel, which runs it on the row's bounds in the same program.
            bounds, refresh = [None, None], None
            if self.policies[1].needs_bounds:
                pool = self.pools[1]
                if self.refresh_in_attention:
                    refresh = self.policies[1].attention_refresh(layer, ctxs[1])
                _, bounds[1] = TRITON.paged_decode_attention(
                    q, pool.k_cache[layer], pool.v_cache[layer], reads[1], pool.fill[layer], D ** -0.5,
                    key_bounds=(pool.kmin[layer], pool.kmax[layer]), refresh=refresh)
            self.policies[0].after_attention(layer, q, ctxs[0], reads[0], mass, bounds[0])
            if refresh is None:
                self.policies[1].after_attention(layer, q, ctxs[1], reads[1], mass, bounds[1])
        for s in slots:
            self.seqs[s][1] += 1
        self.check()

    def check(self) -> None:
        a, b = self.pools
        for name in ("fill", "logical", "pinned", "stamp", "mass", "kmin", "kmax", "k_cache"):
            assert torch.equal(getattr(a, name), getattr(b, name)), f"pool.{name} differs"
        for name in ("cur", "held", "peak", "evicted"):
            assert torch.equal(getattr(self.policies[0], name), getattr(self.policies[1], name)), f"{name} differs"


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{'-'.join(map(str, o.values())) or 'default'}"
                                                     for n, o in CASES])
def test_fused_policy_ops_equal_reference(name, options):
    run = Lockstep(name, options)
    # slot 2's prompt does not fit the budget (prompt pages + decode allowance); slot 3 starts mid-page
    for slot, n in {0: 2 * P + 3, 1: 5, 2: 7 * P, 3: 3 * P + 1}.items():
        run.admit(slot, n)
    for _ in range(10 * P):  # each sequence evicts several times (quota 6 pages, a page opens every P steps)
        run.step()
    assert int(run.policies[0].evicted.max()) > 0  # evictions happened, so victims were compared


def test_write_kernel_alone_equals_reference():
    """`bounded_write` on its own (the op `write_pages` runs; the engine fuses it with the append)."""
    run = Lockstep("raas", {}, fused=False)
    for slot, n in {0: 2 * P + 3, 1: 5, 2: 7 * P}.items():
        run.admit(slot, n)
    for _ in range(6 * P):
        run.step()
    assert int(run.policies[0].evicted.max()) > 0


def test_refresh_kernel_alone_equals_reference():
    """RaaS's refresh as its own `bounded_update` kernel after the attention (the path where one program
    does not hold a whole row: several splits), for both bound rules."""
    for options in ({}, {"refresh_rule": "alpha", "refresh_pinned": True, "pin_prompt": True}):
        run = Lockstep("raas", options, refresh_in_attention=False)
        for slot, n in {0: 2 * P + 3, 1: 5, 2: 7 * P}.items():
            run.admit(slot, n)
        for _ in range(6 * P):
            run.step()
        assert int(run.policies[0].evicted.max()) > 0


def test_fused_refresh_in_bf16():
    """A bf16 pool and query (the GPU's dtype): bounds and ranks still agree exactly."""
    run = Lockstep("raas", {}, dtype=torch.bfloat16)
    for slot, n in {0: 2 * P + 3, 1: 5, 2: 7 * P}.items():
        run.admit(slot, n)
    for _ in range(6 * P):
        run.step()
    assert int(run.policies[0].evicted.max()) > 0


def test_fused_refresh_with_more_pages_than_one_block():
    """A budget of 140 pages: the ranks come from a sort of 256 keys (kernels/bounded_update.py,
    `_refresh_mask`), in the attention's program."""
    run = Lockstep("raas", {}, budget=140 * P, num_pages=700)
    for slot, n in {0: 2 * P + 3, 1: 5, 2: 3 * P + 1}.items():
        run.admit(slot, n, max_new=4000)
    assert run.policies[0].sparse_pages[0] == 140
    for _ in range(3 * P):
        run.step()


def test_fused_top_half_ranks_ties_like_a_stable_sort():
    """Equal bounds everywhere: the refreshed pages are the first `top` refreshable columns."""
    B, S, N = 2, 12, 40
    page_ids = torch.stack([torch.randperm(20, generator=torch.Generator().manual_seed(b))[:S] + 20 * b for b in range(B)])
    page_ids = page_ids.int().view(B, 1, S).expand(B, HKV, S).contiguous().to(DEVICE)
    page_ids[0, :, 3] = -1
    values = torch.full((B, HKV, S), 7.0, device=DEVICE)
    outs = []
    for ops in (ref, kops.get_ops("triton")):
        fill = torch.full((N, HKV), P, dtype=torch.int32, device=DEVICE)
        pinned = torch.zeros(N, HKV, dtype=torch.bool, device=DEVICE)
        pinned[page_ids[1, 0, 0].long()] = True
        stamp = torch.zeros(N, HKV, dtype=torch.int64, device=DEVICE)
        cur = page_ids[:, :, 5].long().contiguous()  # the current page is never refreshed
        ops.bounded_update(page_ids, values, cur, torch.arange(B, device=DEVICE), torch.tensor([50, 60], device=DEVICE),
                           torch.tensor([4, 4], device=DEVICE), fill, pinned, stamp, torch.zeros(N, HKV, device=DEVICE),
                           rule="top_half")
        outs.append(stamp)
    assert torch.equal(outs[0], outs[1])
    got0 = [c for c in range(S) if outs[0][page_ids[0, 0, c].long(), 0] == 50 and page_ids[0, 0, c] >= 0]
    got1 = [c for c in range(S) if outs[0][page_ids[1, 0, c].long(), 0] == 60]
    assert got0 == [0, 1, 2, 4] and got1 == [1, 2, 3, 4]
