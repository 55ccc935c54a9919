"""KV policy bookkeeping on a small PagePool, hooks driven directly (exact page ids), plus invariants
over long random runs. Model-level tests (dense parity at full budget) are in test_policies_model.py."""

from __future__ import annotations

import pytest
import torch
from raas_batch.kernels import reference as ops

from raas_batch.engine.page_pool import PagePool, PrefillPages
from raas_batch.policies import POLICIES, DecodeContext, PolicyMixture, make_policy
from raas_batch.policies.bounded import BoundedPolicy

P, HKV, HQ, D = 4, 2, 4, 8
BOUNDED = ["raas", "raas-mass", "raas-paper", "h2o", "streaming"]


class Harness:
    """A pool, a policy and sequences whose prefill and decode steps run through the real hooks."""

    def __init__(self, policy, num_pages=64, num_layers=1, max_num_seqs=4):
        self.pool = PagePool(num_layers, num_pages, HKV, P, D, torch.float32, torch.device("cpu"))
        self.policy = policy
        policy.bind(self.pool, max_num_seqs)
        self.seqs: dict[int, dict] = {}
        self.gen = torch.Generator().manual_seed(0)

    def admit(self, slot: int, prompt_len: int, max_new: int = 1000, override=None) -> list[int]:
        pages = self.pool.allocate(self.policy.quota_pages(prompt_len, max_new, override))
        self.policy.on_admit(slot, pages, prompt_len, override)
        n = prompt_len
        k = torch.randn(n, HKV, D, generator=self.gen)
        npg = -(-n // P)
        meta = PrefillPages(
            token_pages=torch.tensor([pages[i // P] for i in range(n)]), token_offsets=torch.tensor([i % P for i in range(n)]),
            pages=torch.tensor(pages[:npg]), fills=torch.tensor([min(P, n - j * P) for j in range(npg)]),
            logical=torch.tensor(list(range(npg))), stamps=torch.tensor([min(n, (j + 1) * P) - 1 for j in range(npg)]),
            pinned=torch.full((npg,), self.policy.pin_prompt_pages(slot)))
        self.pool.write_prefill_pages(meta)
        for layer in range(self.pool.num_layers):
            self.pool.write_prefill(layer, k, torch.randn_like(k), meta)
        self.seqs[slot] = {"pages": pages, "pos": n}
        return pages

    def ctx(self, slots: list[int]) -> DecodeContext:
        width = max(len(self.seqs[s]["pages"]) for s in slots)
        table = [self.seqs[s]["pages"] + [-1] * (width - len(self.seqs[s]["pages"])) for s in slots]
        return DecodeContext(slot_ids=torch.tensor(slots), positions=torch.tensor([self.seqs[s]["pos"] for s in slots]),
                             page_tables=torch.tensor(table, dtype=torch.int32), host_slot_ids=list(slots))

    def step(self, slots: list[int], q=None, k=None, layer: int = 0):
        """One decode step of `slots` in `layer` -> (written pages [B, Hkv], read pages [B, Hkv, S])."""
        ctx = self.ctx(slots)
        B = len(slots)
        q = torch.randn(B, HQ, D, generator=self.gen) if q is None else q
        k = torch.randn(B, HKV, D, generator=self.gen) if k is None else k
        pool = self.pool
        write = self.policy.write_pages(layer, ctx)
        ops.kv_append(k, torch.randn_like(k), pool.k_cache[layer], pool.v_cache[layer], pool.kmin[layer],
                      pool.kmax[layer], pool.fill[layer], write)
        read = self.policy.read_pages(layer, q, ctx)
        res = ops.paged_decode_attention(q, pool.k_cache[layer], pool.v_cache[layer], read, pool.fill[layer], D**-0.5,
                                         return_mass=self.policy.needs_mass)
        mass = res[1] if self.policy.needs_mass else None
        self.policy.after_attention(layer, q, ctx, read, mass)
        if layer == self.pool.num_layers - 1:
            for s in slots:
                self.seqs[s]["pos"] += 1
        return write, read

    def held(self, slot: int, layer: int = 0, head: int = 0) -> dict[int, int]:
        """logical page -> physical page held by (slot, layer, head)."""
        out = {}
        for p in self.seqs[slot]["pages"]:
            if self.pool.fill[layer, p, head] > 0:
                out[int(self.pool.logical[layer, p, head])] = p
        return out


def run_to(h: Harness, slot: int, pos: int) -> None:
    while h.seqs[slot]["pos"] < pos:
        h.step([slot])


def test_prefill_writes_page_metadata_once_for_every_layer():
    """write_prefill_pages: the prefilled pages' fill, logical index, stamp and pinned flag in every layer and head
    at once (the per-layer write_prefill then writes keys, values and bounds only); other pages untouched; the
    bounds skip the slots past a page's fill, and that mask is built once a prefill."""
    pool = PagePool(3, 10, HKV, P, D, torch.float32, torch.device("cpu"))
    n, pages = P + 3, [7, 2]  # a full page and one of 3 tokens
    meta = PrefillPages(token_pages=torch.tensor([pages[i // P] for i in range(n)]),
                        token_offsets=torch.tensor([i % P for i in range(n)]), pages=torch.tensor(pages),
                        fills=torch.tensor([P, 3]), logical=torch.tensor([0, 1]), stamps=torch.tensor([P - 1, n - 1]),
                        pinned=torch.tensor([True, False]))
    pool.write_prefill_pages(meta)
    assert pool.fill[:, 7].eq(P).all() and pool.fill[:, 2].eq(3).all()
    assert pool.logical[:, 7].eq(0).all() and pool.logical[:, 2].eq(1).all()
    assert pool.stamp[:, 7].eq(P - 1).all() and pool.stamp[:, 2].eq(n - 1).all()
    assert pool.pinned[:, 7].all() and not pool.pinned[:, 2].any()
    others = [i for i in range(10) if i not in pages]
    assert pool.fill[:, others].eq(0).all() and pool.logical[:, others].eq(-1).all() and not pool.pinned[:, others].any()
    for layer in range(3):
        k = torch.randn(n, HKV, D)
        pool.write_prefill(layer, k, -k, meta)
        assert torch.equal(pool.kmin[layer, 2], k[P:].amin(dim=0)) and torch.equal(pool.kmax[layer, 7], k[:P].amax(dim=0))
        assert torch.equal(pool.v_cache[layer, 2, :, :3], -k[P:].transpose(0, 1))
    assert meta.empty_slots(P) is meta.empty_slots(P) and int(meta.empty_slots(P).sum()) == P - 3
    assert int(meta.empty_slots(2 * P).sum()) == P + (2 * P - 3)  # another page size: built again, not reused


# ---- registry ----
@pytest.mark.parametrize("num_pages", [37, 48, 3])
def test_pool_metadata_layer_slices_are_16_byte_aligned(num_pages):
    """Every layer's slice of the pages' metadata starts 16-byte aligned whatever the page count (Triton
    builds a kernel variant per pointer alignment, and the engine's page count follows the free memory),
    and holds exactly num_pages pages, contiguous, that pool-wide writes and per-layer views share."""
    pool = PagePool(3, num_pages, HKV, P, D, torch.float32, torch.device("cpu"))
    for t in (pool.fill, pool.stamp, pool.pinned, pool.logical, pool.mass):
        assert t.shape == (3, num_pages, HKV)
        for layer in range(3):
            view = t[layer]
            assert view.is_contiguous() and view.data_ptr() % 16 == 0, (t.dtype, layer)
    assert bool((pool.logical == -1).all()) and int(pool.fill.sum()) == 0
    pool.fill[:, num_pages - 1] = 5  # a write through the whole tensor shows in each layer's view
    assert all(int(pool.layer_views[layer][4][num_pages - 1].sum()) == 5 * HKV for layer in range(3))


def test_registry_names_and_options():
    assert set(POLICIES) == {"dense", "raas", "raas-mass", "raas-paper", "quest", "h2o", "streaming"}
    for name in POLICIES:
        pol = make_policy(name, None if name == "dense" else 128, 16)
        assert pol.name == name
    assert make_policy("raas", 256, refresh_pinned=True, pin_prompt=False).refresh_pinned
    with pytest.raises(ValueError, match="no option bogus"):
        make_policy("raas", 256, bogus=1)
    with pytest.raises(ValueError, match="needs kv_budget"):
        make_policy("h2o")
    with pytest.raises(ValueError, match="unknown"):
        make_policy("nope", 64)


def test_quota_and_over_budget():
    pol = make_policy("raas", 32, P)  # 8 pages
    assert pol.quota_pages(10, 100) == 8 and not pol.over_budget(10, 100)
    assert pol.quota_pages(30, 100) == 8 + 2 and pol.over_budget(30, 100)  # 8 prompt pages + 2
    assert pol.quota_pages(10, 6) == 4 and not pol.over_budget(10, 6)  # never more than the sequence
    assert pol.quota_pages(10, 100, 64) == 16  # per-sequence budget override
    assert make_policy("quest", 32, P).quota_pages(10, 100) == 28  # keeps everything


# ---- RaaS: exact victims ----
def test_raas_evicts_oldest_stamp_per_head_and_never_pinned():
    h = Harness(make_policy("raas", 4 * P, P, pin_prompt=True))  # 4 slots; prompt 1 page (pinned), 3 decode pages
    pages = h.admit(0, P)
    run_to(h, 0, 4 * P)  # pages 1..3 filled with logical 1..3
    assert h.held(0) == {0: pages[0], 1: pages[1], 2: pages[2], 3: pages[3]}
    stamp = h.pool.stamp[0]
    stamp[pages[0]] = torch.tensor([-5, -5])  # the pinned prompt page is the oldest: still kept
    stamp[pages[1], 0], stamp[pages[2], 0], stamp[pages[3], 0] = 9, 7, 15  # head 0: page 2 oldest
    stamp[pages[1], 1], stamp[pages[2], 1], stamp[pages[3], 1] = 6, 8, 15  # head 1: page 1 oldest
    write, read = h.step([0])
    assert write.tolist() == [[pages[2], pages[1]]]
    assert h.pool.logical[0, pages[2], 0] == 4 and h.pool.fill[0, pages[2], 0] == 1
    assert h.pool.logical[0, pages[1], 1] == 4 and h.pool.fill[0, pages[1], 1] == 1
    assert h.held(0, head=0) == {0: pages[0], 1: pages[1], 3: pages[3], 4: pages[2]}
    assert h.held(0, head=1) == {0: pages[0], 2: pages[2], 3: pages[3], 4: pages[1]}
    assert sorted(read[0, 0].tolist()) == sorted(pages)  # everything held is read
    assert h.policy.seq_stats(0, pages) == (4 * P, 1)


def test_raas_tie_goes_to_older_page():
    h = Harness(make_policy("raas", 4 * P, P, pin_prompt=True))
    pages = h.admit(0, P)
    run_to(h, 0, 4 * P)
    h.pool.stamp[0, pages[1]] = 20
    h.pool.stamp[0, pages[2]] = 20
    h.pool.stamp[0, pages[3]] = 20
    write, _ = h.step([0])
    assert write.tolist() == [[pages[1], pages[1]]]


def test_raas_stamps_on_write_and_paper_on_open():
    for name, expect_written in (("raas", True), ("raas-paper", False)):
        h = Harness(make_policy(name, 8 * P, P))
        pages = h.admit(0, P)
        run_to(h, 0, P + 3)  # page 1 opened at position P, written up to P + 2
        st = h.pool.stamp[0, pages[1]].tolist()
        assert st == ([P + 2] * HKV if expect_written else [P] * HKV), name


def test_raas_top_half_refresh_picks_largest_bounds():
    # 8 slots, prompt of 1 page; decode pages 1..5 held, current page 6. Keys are hand-made so that the
    # bound of page j for query q = e_0 is j's chosen value; top floor(8/2) = 4 unpinned pages refresh.
    h = Harness(make_policy("raas", 8 * P, P, pin_prompt=True))
    pages = h.admit(0, P)
    run_to(h, 0, 6 * P + 1)
    bound = {1: 3.0, 2: -1.0, 3: 5.0, 4: 0.5, 5: 4.0}
    for j, b in bound.items():
        h.pool.kmax[0, pages[j]] = 0.0
        h.pool.kmin[0, pages[j]] = 0.0
        h.pool.kmax[0, pages[j], :, 0] = b
        h.pool.kmin[0, pages[j], :, 0] = b
        h.pool.stamp[0, pages[j]] = 0
    h.pool.kmax[0, pages[0], :, 0] = 100.0  # pinned: never takes a refresh slot by default
    q = torch.zeros(1, HQ, D)
    q[..., 0] = 1.0
    pos = h.seqs[0]["pos"]
    h.step([0], q=q)
    refreshed = {j for j in bound if int(h.pool.stamp[0, pages[j], 0]) == pos}
    assert refreshed == {1, 3, 4, 5}  # the four largest bounds: 5, 4, 3, 0.5
    assert int(h.pool.stamp[0, pages[0], 0]) != pos


def test_raas_mass_refreshes_pages_above_alpha():
    h = Harness(make_policy("raas-mass", 8 * P, P, alpha=0.2))
    pages = h.admit(0, P)
    run_to(h, 0, 3 * P + 1)
    for j in (1, 2):
        h.pool.stamp[0, pages[j]] = 0
    # Page 1's keys align with the query, page 2's oppose it: page 1 takes almost all the mass.
    h.pool.k_cache[0, pages[1]] = 0.0
    h.pool.k_cache[0, pages[1], :, :, 0] = 10.0
    h.pool.k_cache[0, pages[2]] = 0.0
    h.pool.k_cache[0, pages[2], :, :, 0] = -10.0
    q = torch.zeros(1, HQ, D)
    q[..., 0] = 3.0
    pos = h.seqs[0]["pos"]
    h.step([0], q=q, k=torch.zeros(1, HKV, D))
    assert h.pool.stamp[0, pages[1]].tolist() == [pos] * HKV
    assert h.pool.stamp[0, pages[2]].tolist() == [0] * HKV


# ---- baselines ----
def test_streaming_keeps_first_and_most_recent_pages():
    h = Harness(make_policy("streaming", 5 * P, P))
    pages = h.admit(0, 2 * P + 1)
    for _ in range(12 * P):
        h.step([0])
        last = (h.seqs[0]["pos"] - 1) // P
        for head in range(HKV):
            held = set(h.held(0, head=head))
            expect = {0} | set(range(max(1, last - 3), last + 1))
            assert held == expect
    assert h.policy.seq_stats(0, pages)[1] > 0


def test_h2o_evicts_smallest_mass_outside_recent_window():
    h = Harness(make_policy("h2o", 6 * P, P))  # 6 slots: recent window 3 pages (incl. the new one)
    pages = h.admit(0, P)
    run_to(h, 0, 6 * P)  # logical 0..5 held; opening logical 6 evicts among logical <= 3
    mass = h.pool.mass[0]
    mass[pages[0]] = torch.tensor([5.0, 0.1])
    mass[pages[1]] = torch.tensor([0.3, 2.0])
    mass[pages[2]] = torch.tensor([0.2, 2.0])
    mass[pages[3]] = torch.tensor([9.0, 2.0])
    mass[pages[4]] = torch.tensor([0.0, 0.0])  # inside the recent window: protected
    write, _ = h.step([0])
    assert write.tolist() == [[pages[2], pages[0]]]
    assert h.pool.mass[0, pages[2], 0] > 0  # the new page accumulates from its first step


def test_quest_selects_largest_bounds():
    pol = make_policy("quest", 4 * P, P, dense_layers=0)  # top 3 pages + the current one
    h = Harness(pol)
    pages = h.admit(0, 9 * P + 2, max_new=8)
    q = torch.randn(1, HQ, D, generator=h.gen)
    _, read = h.step([0], q=q)
    assert read.shape == (1, HKV, 4)
    full = torch.tensor(pages[:9], dtype=torch.int32).view(1, 1, -1).expand(1, HKV, -1)
    scores = ops.page_scores(q, h.pool.kmin[0], h.pool.kmax[0], full)  # [1, Hkv, 9]
    for head in range(HKV):
        chosen = read[0, head, :3].tolist()
        assert read[0, head, 3] == pages[9]  # the current page
        got = sum(scores[0, head, pages.index(p)].item() for p in chosen)
        assert got == pytest.approx(scores[0, head].topk(3).values.sum().item())
    assert (h.pool.fill[0, pages[:10]] > 0).all()  # nothing evicted


# ---- invariants over long random runs ----
def _page_state(pool, pages):
    """Everything a write could change on `pages` (all layers and heads)."""
    idx = torch.tensor(pages, dtype=torch.long)
    return [t[:, idx].clone() for t in (pool.k_cache, pool.v_cache, pool.fill, pool.stamp, pool.logical,
                                        pool.pinned, pool.mass)]


@pytest.mark.parametrize("name", BOUNDED)
def test_bounded_invariants_long_run(name):
    budget = 6 * P
    h = Harness(make_policy(name, budget, P), num_layers=2)
    prompts = {0: 2 * P + 3, 1: 5, 2: 7 * P}  # slot 2 is over budget: 7 prompt pages + 2
    quota = {s: h.policy.quota_pages(n, 1000) for s, n in prompts.items()}
    for s, n in prompts.items():
        h.admit(s, n)
    assert quota == {0: 6, 1: 6, 2: 9}
    owned = [p for s in prompts for p in h.seqs[s]["pages"]]
    others = [p for p in range(h.pool.num_pages) if p not in owned]  # free pages: nobody may write them
    h.pool.k_cache[:, others] = float("nan")  # poisoned: a stray write or read would show
    outside_before = _page_state(h.pool, others)
    pinned_before = {s: (h.pool.pinned[:, h.seqs[s]["pages"]].clone(), h.pool.logical[:, h.seqs[s]["pages"]].clone())
                     for s in prompts}
    for _ in range(20 * P + 3):
        for layer in range(2):
            write, read = h.step(list(prompts), layer=layer)
            for row, s in enumerate(prompts):  # a sequence writes and reads only its own quota pages
                mine = set(h.seqs[s]["pages"][:quota[s]]) | {-1}
                assert set(write[row].tolist()) <= mine and set(read[row].flatten().tolist()) <= mine
        for s in prompts:
            fill = h.pool.fill[:, h.seqs[s]["pages"]]  # [Lyr, Q, Hkv]
            assert (fill.sum(1) <= quota[s] * P).all()
            pinned, logical = pinned_before[s]
            kept = h.pool.logical[:, h.seqs[s]["pages"]]
            assert (kept[pinned] == logical[pinned]).all(), "a pinned page was evicted"
    after = _page_state(h.pool, others)
    for before_t, after_t in zip(outside_before, after):
        assert torch.equal(before_t.nan_to_num(), after_t.nan_to_num()), "a page outside every quota was written"
    for s in prompts:
        peak, evicted = h.policy.seq_stats(s, h.seqs[s]["pages"])
        assert peak <= quota[s] * P and evicted > 0
        held = h.pool.fill[:, h.seqs[s]["pages"]].sum(1)  # [Lyr, Hkv]
        assert (h.policy.held[:, s] == held).all()
    assert h.policy.over_budget(7 * P, 1000) and not h.policy.over_budget(2 * P + 3, 1000)


FILTERS = [("raas", {"recent_pages": 1}), ("raas", {"recent_pages": 3}), ("raas", {"recent_pages": 2, "pin_prompt": False}),
           ("h2o", {}), ("h2o", {"pin_prompt": True}), ("streaming", {}), ("streaming", {"pin_prompt": True})]


@pytest.mark.parametrize("name,options", FILTERS)
def test_eviction_filter_is_never_dropped(name, options):
    """Every victim lies outside the policy's window (RaaS's recent pages, H2O's recent half) and is
    not a sink (StreamingLLM), also for prompts that fill the budget: the quota grows to fit."""
    h = Harness(make_policy(name, 5 * P, P, **options), num_layers=1)
    prompts = {0: 3 * P + 1, 1: 6 * P + 2, 2: 2}  # slot 1 is over budget
    for s, n in prompts.items():
        h.admit(s, n)
    evictions = 0
    for _ in range(24 * P):
        before = h.pool.logical[0].clone()  # [N, Hkv]
        positions = {s: h.seqs[s]["pos"] for s in prompts}
        write, _ = h.step(list(prompts))
        for row, s in enumerate(prompts):
            new_logical = positions[s] // P
            for head in range(HKV):
                page = int(write[row, head])
                old = int(before[page, head])
                if positions[s] % P or old < 0:
                    continue  # no page opened, or an empty slot was taken
                evictions += 1
                window = int(h.policy.window[s])
                assert old <= new_logical - window, (s, old, new_logical, window)
                assert old >= h.policy.min_logical
    assert evictions > 20


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_read_pages_is_pure(name):
    h = Harness(make_policy(name, None if name == "dense" else 4 * P, P))
    h.admit(0, 2 * P + 1, max_new=40)
    h.admit(1, 3, max_new=40)
    for _ in range(3 * P):
        h.step([0, 1])
    pool, ctx = h.pool, h.ctx([0, 1])
    state = [t.clone() for t in (pool.fill, pool.stamp, pool.logical, pool.pinned, pool.mass)]
    q = torch.randn(2, HQ, D, generator=h.gen)
    first = h.policy.read_pages(0, q, ctx)
    second = h.policy.read_pages(0, q, h.ctx([0, 1]))
    assert torch.equal(first, second)
    for before, now in zip(state, (pool.fill, pool.stamp, pool.logical, pool.pinned, pool.mass)):
        assert torch.equal(before, now)


def test_mixture_is_refused_with_cuda_graphs(tmp_path):
    from raas_batch.engine.engine import Engine
    from raas_batch.models.loader import load_model

    mixture = PolicyMixture({"raas": make_policy("raas", 64, 16), "h2o": make_policy("h2o", 64, 16)}, 16)
    loaded = load_model(None, torch.float32, torch.device("cpu"), hf_config=_tiny_config())
    with pytest.raises(ValueError, match="cannot run in CUDA graphs"):
        Engine(loaded.model, None, [], mixture, 16, 2, 1024, torch.device("cpu"), torch.float32, backend="torch",
               cuda_graphs=True)


def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def test_isinstance_bounded():
    assert all(isinstance(make_policy(n, 64), BoundedPolicy) for n in BOUNDED)


def test_pin_prompt_auto_pins_a_prompt_that_takes_at_most_half_the_budget():
    """pin_prompt="auto": per sequence, at admission; the choice reaches prefill's pinned flags."""
    h = Harness(make_policy("raas", 8 * P, P, pin_prompt="auto"))
    short = h.admit(0, 4 * P)  # 4 of 8 pages: pinned
    long_ = h.admit(1, 4 * P + 1)  # 5 pages: more than half, not pinned
    assert h.pool.pinned[0, short[:4]].all()
    assert not h.pool.pinned[0, long_[:5]].any()
    assert h.policy.window[0] == h.policy.window[1] == 1
    with pytest.raises(ValueError, match="pin_prompt"):
        make_policy("raas", 64, P, pin_prompt="sometimes")


@pytest.mark.parametrize("name,options", [("raas", {}), ("raas", {"pin_prompt": "auto"}), ("h2o", {}),
                                          ("streaming", {}), ("quest", {})])
def test_admitting_a_round_at_once_equals_one_by_one(name, options):
    """`on_admit_many` (the scheduler's round of admissions, written with one op a tensor) leaves every slot's
    state as `on_admit` one sequence at a time: the quota columns, window, refresh count, current page, counts
    and the pinning choice, for prompts of several lengths and a per-sequence budget."""
    admissions = [(2, list(range(10, 22)), 9, None), (0, list(range(30, 34)), 1, None),
                  (3, list(range(40, 52)), 23, 8), (1, list(range(60, 70)), 16, None)]
    states = []
    for together in (False, True):
        policy = make_policy(name, kv_budget=16, page_size=P, **options)
        Harness(policy, num_pages=80, num_layers=2)
        if together:
            policy.on_admit_many(admissions)
        else:
            for a in admissions:
                policy.on_admit(*a)
        tensors = {k: v.clone() for k, v in vars(policy).items() if isinstance(v, torch.Tensor)}
        states.append((tensors, dict(getattr(policy, "_pinned_slots", {}))))
    (one, pins_one), (many, pins_many) = states
    assert one.keys() == many.keys() and one
    for k in one:
        assert torch.equal(one[k], many[k]), k
    assert pins_one == pins_many
    if name == "raas" and not options:  # the values themselves: page of the prompt's last token, counts, top half
        assert (many["cur"][:, 2] == 12).all() and (many["cur"][:, 3] == 45).all() and (many["held"][:, 3] == 23).all()
        assert many["all_pages"][2] == 12 and many["top"][2] == 2 and many["top"][3] == 1
        assert (many["peak"][:, 0] == 1).all() and (many["evicted"] == 0).all()


def test_a_scheduling_round_resets_its_pages_and_writes_its_slots():
    """The scheduler admits a round at once: every page it takes is reset (fill 0, logical -1, stamp 0, unpinned,
    mass 0, in every layer) before the prefill, pages it does not take keep what they held, and the policy's slot
    state of each admitted sequence is written (on_admit_many)."""
    from raas_batch.engine.scheduler import Scheduler
    from raas_batch.engine.sequence import Sequence
    from raas_batch.sampling_params import SamplingParams

    policy = make_policy("raas", kv_budget=16, page_size=P)
    h = Harness(policy, num_pages=40, num_layers=2)
    pool = h.pool
    for t, dirty in ((pool.fill, 3), (pool.logical, 7), (pool.stamp, 9), (pool.pinned, True), (pool.mass, 2.5)):
        t.fill_(dirty)  # a previous owner's metadata on every page
    sched = Scheduler(pool, policy, max_num_seqs=4, max_prefill_tokens=10**6)
    params = SamplingParams(max_new_tokens=8)
    seqs = [Sequence(request_idx=i, sample_idx=0, prompt_token_ids=list(range(n)), params=params, seed_key=0, seed=0,
                     max_new_tokens=8) for i, n in enumerate((5, 9))]
    for s in seqs:
        sched.add(s)
    kind, admitted = sched.schedule()
    assert kind == "prefill" and admitted == seqs
    taken = sorted(p for s in seqs for p in s.pages)
    others = sorted(set(range(pool.num_pages)) - set(taken))
    assert len(taken) == len(set(taken)) > 0 and others
    for t, fresh, dirty in ((pool.fill, 0, 3), (pool.logical, -1, 7), (pool.stamp, 0, 9), (pool.pinned, False, True),
                            (pool.mass, 0.0, 2.5)):
        assert (t[:, taken] == fresh).all() and (t[:, others] == dirty).all()
    for s, n in zip(seqs, (5, 9)):
        assert (policy.held[:, s.slot] == n).all() and (policy.cur[:, s.slot] == s.pages[(n - 1) // P]).all()
        assert policy.all_pages[s.slot] == len(s.pages)
