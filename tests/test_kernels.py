"""Triton kernels against their torch references (kernels/reference.py is the specification).

Without a CUDA device the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below; it
must be set before triton is first imported in the process, which is checked; the kernel modules
apply triton.jit lazily, at first launch, so importing them early does no harm). Sizes are kept small for the interpreter;
the `gpu`-marked cases run the real decode shape on a CUDA device.

Every case draws fresh random inputs from its own seed. Errors are relative: ||out - ref|| / ||ref||,
with per-dtype tolerances from TOL.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import sys
import zlib
from pathlib import Path

import pytest

try:
    from raas_batch.kernels import ops as kops
    from raas_batch.kernels import reference as ref
except ImportError:  # editable install without the raas_batch.kernels mapping: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import ops as kops
    from kernels import reference as ref

if not torch.cuda.is_available():
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    # triton.language's own jit helpers (tl.sum, ...) are bound when triton is first imported: if that
    # happened before TRITON_INTERPRET=1 was set, the interpreter cannot run any kernel.
    if not isinstance(tl.sum, InterpretedFunction):
        raise RuntimeError(
            "triton was imported before TRITON_INTERPRET=1 was set (by an earlier test module or plugin); "
            "export TRITON_INTERPRET=1 or set it in tests/conftest.py"
        )

TRI = kops.get_ops("triton")
dec_mod = sys.modules[TRI.paged_decode_attention.__module__]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# ONE tolerance table: relative error allowed per input dtype and quantity.
#   attn:   attention outputs (decode and prefill), rounded to the input dtype at the end
#   mass:   per-page softmax mass (always fp32 in the kernel; only q.k rounding differs)
#   scores: Quest page bounds (fp32 arithmetic on the stored kmin / kmax)
TOL = {
    torch.float32: {"attn": 2e-5, "mass": 2e-5, "scores": 1e-6},
    torch.float16: {"attn": 4e-3, "mass": 1e-4, "scores": 1e-6},
    torch.bfloat16: {"attn": 2e-2, "mass": 1e-4, "scores": 1e-6},
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _gen(*key) -> torch.Generator:
    """A generator seeded from the case parameters (fresh, reproducible inputs per case)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _rel(out: torch.Tensor, want: torch.Tensor) -> float:
    out, want = out.double(), want.double()
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).item()


def _randn(shape, g, dtype):
    return torch.randn(shape, generator=g).to(dtype).to(DEVICE)


# ----------------------------------------------------------------------------------------------
# paged decode attention
# ----------------------------------------------------------------------------------------------


def make_decode_case(g, B, Hq, Hkv, D, P, S, budget, dtype, max_len=None, poison_v=1e4):
    """A scattered page pool plus page lists.

    Each (sequence, KV head) has its own length (so its own page count, last page partly filled);
    its pages lie at random places in the pool. `budget` "small": S*P below the length, the list is
    a random subset of the pages; "large": all pages listed, the remaining slots -1. The list is then
    shuffled (so -1 entries sit anywhere) and some pages get odd fills (as after sparse eviction) or
    fill 0. Slots past a page's fill hold garbage: NaN in K (and poison_v-scaled noise in V; the
    reference turns NaN V into NaN output via 0 * NaN, so V garbage is kept finite here).
    """
    if max_len is None:
        max_len = S * P * 2 if budget == "small" else max(P, S * P - 2 * P)
    min_len = S * P + 1 if budget == "small" else 1
    M = -(-max_len // P) + 2  # page ids owned by one sequence (shared by its KV heads, as in the pool)
    N = B * M + 3
    perm = torch.randperm(N, generator=g)
    k_cache = torch.randn((N, Hkv, P, D), generator=g)
    v_cache = torch.randn((N, Hkv, P, D), generator=g)
    fill = torch.randint(0, P + 1, (N, Hkv), generator=g, dtype=torch.int32)  # unlisted pages: anything
    ids = torch.full((B, Hkv, S), -1, dtype=torch.int32)
    for b in range(B):
        own = perm[b * M:(b + 1) * M]
        for h in range(Hkv):
            L = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            n = -(-L // P)
            pages = own[torch.randperm(M, generator=g)[:n]]  # the head's pages, scattered in the pool
            f = torch.full((n,), P, dtype=torch.int32)
            f[-1] = L - (n - 1) * P
            odd = torch.rand(n, generator=g) < 0.3  # evicted / odd pages
            f[odd] = torch.randint(0, P + 1, (int(odd.sum()),), generator=g, dtype=torch.int32)
            f[-1] = max(int(f[-1]), 1)  # at least one non-empty page (kept in every subset below)
            fill[pages, h] = f
            keep = torch.randperm(n - 1, generator=g)[: min(n, S) - 1]
            chosen = torch.cat([pages[keep], pages[-1:]])
            if b == B - 1 and h == 0 and S > 2:  # one (seq, head) with far fewer pages
                chosen = chosen[-2:]
            row = torch.full((S,), -1, dtype=torch.int32)
            row[: len(chosen)] = chosen.to(torch.int32)
            ids[b, h] = row[torch.randperm(S, generator=g)]
    off = torch.arange(P).view(1, 1, P)
    invalid = off >= fill.unsqueeze(-1)  # [N, Hkv, P]
    k_cache[invalid] = float("nan")
    v_cache[invalid] = poison_v * torch.randn((int(invalid.sum()), D), generator=g)
    q = torch.randn((B, Hq, D), generator=g)
    to = lambda x: x.to(dtype).to(DEVICE)
    return to(q), to(k_cache), to(v_cache), ids.to(DEVICE), fill.to(DEVICE)


def _check_decode(q, k_cache, v_cache, ids, fill, scale, dtype, **launch):
    want, want_mass = ref.paged_decode_attention(q, k_cache, v_cache, ids, fill, scale, return_mass=True)
    assert torch.isfinite(want.float()).all()
    out, mass = dec_mod.paged_decode_attention_impl(q, k_cache, v_cache, ids, fill, scale, True, **launch)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert mass.dtype == torch.float32 and mass.shape == ids.shape
    tol = TOL[dtype]
    assert _rel(out, want) < tol["attn"], (_rel(out, want), launch)
    assert _rel(mass, want_mass) < tol["mass"], (_rel(mass, want_mass), launch)
    assert torch.all(mass[ids < 0] == 0)
    # the mass is a probability per page: summed over pages it is 1 for G = 1, and in [1, G] otherwise
    tot = mass.sum(-1)
    assert torch.all(tot > 1 - 1e-3) and torch.all(tot < q.shape[1] // ids.shape[1] + 1e-3)
    out2 = TRI.paged_decode_attention(q, k_cache, v_cache, ids, fill, scale)  # public entry, no mass
    assert _rel(out2, want) < tol["attn"]
    out1 = dec_mod.paged_decode_attention_impl(q, k_cache, v_cache, ids, fill, scale, num_splits=1)  # stage 1 only
    assert _rel(out1, want) < tol["attn"]


DECODE_CASES = [
    # (P, G, budget, dtype, num_splits)  G = Hq // Hkv; None = the host heuristic
    (P, G, budget, dtype, ns)
    for P in (16, 64)
    for G in (1, 4, 7)
    for budget in ("small", "large")
    for dtype, ns in ((torch.float32, 3), (torch.float16, None), (torch.bfloat16, 2))
]


@pytest.mark.parametrize(
    "P,G,budget,dtype,ns", DECODE_CASES,
    ids=[f"P{c[0]}-G{c[1]}-{c[2]}-{DT_NAME[c[3]]}-ns{c[4]}" for c in DECODE_CASES],
)
def test_paged_decode_attention(P, G, budget, dtype, ns):
    g = _gen("decode", P, G, budget, dtype, ns)
    Hkv, D = 2, 32
    S = 7 if P == 16 else 3
    args = make_decode_case(g, B=3, Hq=G * Hkv, Hkv=Hkv, D=D, P=P, S=S, budget=budget, dtype=dtype)
    _check_decode(*args, scale=D ** -0.5, dtype=dtype, num_splits=ns)


@pytest.mark.parametrize("ns,ppi", [(1, 1), (2, 4), (5, 2), (9, 1)])
def test_decode_split_and_tile_layouts(ns, ppi):
    """Same inputs through several split counts / pages-per-tile (incl. splits of a single page)."""
    dtype = torch.float32
    g = _gen("decode-splits", ns, ppi)
    args = make_decode_case(g, B=2, Hq=8, Hkv=2, D=64, P=16, S=9, budget="large", dtype=dtype)
    _check_decode(*args, scale=0.125, dtype=dtype, num_splits=ns, pages_per_iter=ppi)


@pytest.mark.parametrize("ns", [1, 3])
def test_decode_reads_only_the_first_num_pages(ns):
    """num_pages[b]: entries from that index on are not read (as if -1), with and without mass; a row
    may stop inside a split or before a whole split."""
    dtype = torch.float32
    g = _gen("decode-num-pages", ns)
    q, k_cache, v_cache, ids, fill = make_decode_case(g, B=3, Hq=8, Hkv=2, D=32, P=16, S=9, budget="large",
                                                      dtype=dtype)
    ids = ids.sort(dim=-1, descending=True).values  # listed pages first, -1 last, as a dense table
    num_pages = torch.tensor([9, 2, 5], dtype=torch.int32, device=DEVICE)
    cut = torch.where(torch.arange(9, device=DEVICE).view(1, 1, -1) < num_pages.view(-1, 1, 1), ids, -1)
    assert (cut >= 0).flatten(1).any(1).all()
    want, want_mass = ref.paged_decode_attention(q, k_cache, v_cache, cut, fill, 0.2, return_mass=True)
    for got_out, got_mass in (dec_mod.paged_decode_attention_impl(q, k_cache, v_cache, ids, fill, 0.2, True, num_pages,
                                                                   num_splits=ns),
                              ref.paged_decode_attention(q, k_cache, v_cache, ids, fill, 0.2, True, num_pages)):
        assert _rel(got_out, want) < TOL[dtype]["attn"] and _rel(got_mass, want_mass) < TOL[dtype]["mass"]
        assert torch.all(got_mass[cut < 0] == 0)


def _bounds_case(g, limit: bool, S: int = 9):
    """3 bounded-policy rows (listed pages first) of S entries, bf16, Hq 12 / Hkv 2 / D 32 / pages of 16,
    with integer-valued q, kmin and kmax: Quest bounds exact in fp32 whatever the order of the sums.
    S > 16: every entry listed, so a row crosses the bounds pass's blocks (16 or 32 pages).
    -> (q, k_cache, v_cache, ids, fill, kmin, kmax, num_pages or None)."""
    dtype = torch.bfloat16
    q, k_cache, v_cache, ids, fill = make_decode_case(g, B=3, Hq=12, Hkv=2, D=32, P=16, S=S,
                                                      budget="large" if S <= 16 else "small", dtype=dtype)
    ids = ids.sort(dim=-1, descending=True).values
    N, Hkv, _, D = k_cache.shape
    kmin = torch.randint(-4, 1, (N, Hkv, D), generator=g).to(dtype).to(DEVICE)
    kmax = kmin + torch.randint(0, 4, (N, Hkv, D), generator=g).to(dtype).to(DEVICE)
    qi = torch.randint(-3, 4, q.shape, generator=g).to(dtype).to(DEVICE)
    num_pages = torch.tensor([9, 2, 5], dtype=torch.int32, device=DEVICE) if limit else None
    return qi, k_cache, v_cache, ids, fill, kmin, kmax, num_pages


@pytest.mark.parametrize("ns,ppi,mass,limit,S,bounds_pages", [
    (1, 4, False, False, 9, None), (1, 1, True, True, 9, None), (3, 2, False, True, 9, None),
    (4, 1, True, False, 9, None), (1, 8, False, True, 9, None),
    (1, 4, False, False, 40, 16), (1, 4, True, False, 40, 32), (2, 4, False, True, 40, 16)])
def test_decode_returns_quest_bounds(ns, ppi, mass, limit, S, bounds_pages):
    """key_bounds=(kmin, kmax): the kernel also returns each entry's Quest bound, equal to page_scores
    over the pages read (-inf for -1 entries and for entries past num_pages), in every split / tile
    layout and bounds-pass block (rows of 40 entries: blocks of 16 + 16 + 8, or 32 + 8), alone or with
    the mass; the output and mass are unchanged by it."""
    g = _gen("decode-bounds", ns, ppi, mass, limit, S)
    qi, k_cache, v_cache, ids, fill, kmin, kmax, num_pages = _bounds_case(g, limit, S)
    cut = ref._limit_pages(ids, num_pages)
    assert (cut >= 0).flatten(1).any(1).all()
    if S > 32 and not limit:
        assert (cut >= 0).sum(-1).max() > 32  # a row reaches the last block
    want_bounds = ref.page_scores(qi, kmin, kmax, cut)
    plain = dec_mod.paged_decode_attention_impl(qi, k_cache, v_cache, ids, fill, 0.2, mass, num_pages,
                                                num_splits=ns, pages_per_iter=ppi)
    got = dec_mod.paged_decode_attention_impl(qi, k_cache, v_cache, ids, fill, 0.2, mass, num_pages, (kmin, kmax),
                                              num_splits=ns, pages_per_iter=ppi, bounds_pages=bounds_pages)
    assert len(got) == (3 if mass else 2)
    assert torch.equal(got[-1], want_bounds)
    assert torch.isneginf(got[-1][cut < 0]).all() and torch.isfinite(got[-1][cut >= 0]).all()
    plain = plain if isinstance(plain, tuple) else (plain,)
    for a, b in zip(plain, got[:-1]):
        assert torch.equal(a, b)
    # the reference and the CPU path return the same tuple
    for ops in (kops.get_ops("torch"), kops.get_ops("cpu")):
        other = ops.paged_decode_attention(qi, k_cache, v_cache, ids, fill, 0.2, mass, num_pages, (kmin, kmax))
        assert len(other) == len(got) and torch.equal(other[-1], want_bounds)


def test_bounds_pages_must_be_a_power_of_two_of_at_least_16():
    """The bounds pass's block is a tl.dot tile: any other value is refused by name before a launch."""
    qi, k_cache, v_cache, ids, fill, kmin, kmax, _ = _bounds_case(_gen("bounds-pages"), False)
    for bad in (8, 24):
        with pytest.raises(ValueError, match="bounds_pages"):
            dec_mod.paged_decode_attention_impl(qi, k_cache, v_cache, ids, fill, 0.2, False, None, (kmin, kmax),
                                                bounds_pages=bad)


@pytest.mark.parametrize("rule,refresh_pinned,ns,limit,S", [
    ("top_half", False, 1, False, 9), ("top_half", True, 1, True, 9), ("alpha", False, 1, True, 9),
    ("alpha", True, 1, False, 9), ("top_half", False, 3, True, 9), ("mass", False, 1, False, 9),
    ("top_half", False, 1, False, 40), ("alpha", True, 1, False, 40)])
def test_decode_runs_the_refresh(rule, refresh_pinned, ns, limit, S, monkeypatch):
    """refresh=Refresh(...): the op leaves the stamps that the reference attention followed by the
    reference bounded_update leaves, whether the stage-1 program runs the refresh on the bounds it has
    just written (one split, the engine's case), or the bounded_update kernel runs after the attention
    (several splits, the mass rule, or fuse_refresh=False); output and bounds are unchanged by it, by
    where the bounds pass runs (before the main loop on even rows, stagger_bounds, or after it), by its
    block (16 or 32 pages: a row of 40 entries gathers its bounds from several blocks) and by masking
    the K loads by the pages' fill (k_fill_mask, the kernel up to run 66)."""
    g = _gen("decode-refresh", rule, refresh_pinned, ns, limit, S)
    qi, k_cache, v_cache, ids, fill, kmin, kmax, num_pages = _bounds_case(g, limit, S)  # (integer bounds: ties)
    N, Hkv, _, D = k_cache.shape
    pinned = (torch.rand(N, Hkv, generator=g) < 0.3).to(DEVICE)
    stamp0 = torch.randint(0, 50, (N, Hkv), generator=g).to(DEVICE)
    slots = torch.tensor([4, 0, 2], device=DEVICE)
    cur = torch.full((5, Hkv), -1, dtype=torch.int64, device=DEVICE)
    cur[slots] = ids[:, :, 0].long()  # each row's current page (its largest id), never refreshed
    top = torch.tensor([2, 1, 3, 9, 4], device=DEVICE)
    mass_rule = rule == "mass"

    def refresh_of(stamp):
        return ref.Refresh(cur, slots, torch.tensor([100, 101, 102], device=DEVICE), top, pinned, stamp,
                           torch.zeros(N, Hkv, device=DEVICE), rule, refresh_pinned, alpha=0.05, scale=D ** -0.5)

    def run(attention, update=None, **kw):
        stamp = stamp0.clone()
        refresh = refresh_of(stamp)
        if update is None:
            out = attention(qi, k_cache, v_cache, ids, fill, D ** -0.5, mass_rule, num_pages, (kmin, kmax),
                            refresh, **kw)
        else:  # the policy's own op after the attention (RaasPolicy.after_attention)
            out = attention(qi, k_cache, v_cache, ids, fill, D ** -0.5, mass_rule, num_pages, (kmin, kmax), **kw)
            ref.refresh_after(update, out, ids, fill, refresh, num_pages)
        return out, stamp

    impl = dec_mod.paged_decode_attention_impl
    if mass_rule:  # the mass comes out of stage 2: the kernel's own mass, then the bounded_update kernel
        want_out, want = run(impl, TRI.bounded_update, num_splits=ns)
    else:
        want_out, want = run(ref.paged_decode_attention, ref.bounded_update)
        _, composed = run(ref.paged_decode_attention)  # the reference op with refresh= means the same
        assert torch.equal(composed, want)
    assert (want != stamp0).any()  # some page was refreshed
    plain, unfused = run(impl, num_splits=ns, fuse_refresh=False)
    assert torch.equal(unfused, want)
    if ns == 1 and not mass_rule:  # the stage-1 program runs the refresh: no bounded_update launch
        monkeypatch.setattr(dec_mod, "bounded_update", lambda *a, **k: pytest.fail("refresh not fused"))
    fused, got = run(impl, num_splits=ns, stagger_bounds=True)  # the bounds pass first on rows 0 and 2
    last, got_last = run(impl, num_splits=ns, stagger_bounds=False)  # after the main loop on every row
    small, got_small = run(impl, num_splits=ns, bounds_pages=16)
    masked, got_masked = run(impl, num_splits=ns, k_fill_mask=True)
    monkeypatch.undo()
    assert torch.equal(got, want) and torch.equal(got_last, want)
    assert torch.equal(got_small, want) and torch.equal(got_masked, want)
    for a, b, c, d, e in zip(plain, fused, last, small, masked):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d) and torch.equal(a, e)
    assert torch.equal(fused[-1], want_out[-1])  # the bounds
    if not mass_rule:
        assert torch.equal(run(kops.get_ops("cpu").paged_decode_attention)[1], want)
        # the refresh alone (a step runs it beside an attention without bounds, on a second stream): the
        # fused program's bounds pass and rule, so its bounds bit for bit, and the same stamps; the reference
        for ops in (TRI, kops.get_ops("torch")):
            stamp = stamp0.clone()
            bounds = ops.bounds_refresh(qi, kmin, kmax, ids, fill, refresh_of(stamp), num_pages)
            assert torch.equal(stamp, want) and torch.equal(bounds, want_out[-1])


@pytest.mark.parametrize("refresh_pinned,limit,S,Hq,prefetch,steps", [
    (False, False, 9, 12, True, None), (True, True, 40, 8, True, None), (False, True, 9, 2, True, None),
    (True, True, 40, 8, False, None), (False, True, 40, 12, True, 2), (True, False, 9, 8, False, 4)])
def test_window_refresh_leaves_the_per_step_stamps(refresh_pinned, limit, S, Hq, prefetch, steps):
    """window_refresh (RaaS's refresh deferred to the step that fills a row's current page): over 14 steps
    of 3 rows whose pages fill at different steps and whose windows start at their first decode position,
    every row whose current page has just filled holds, on each of its pages, the stamp that the refresh at
    every step (bounds_refresh) leaves; rows whose page is not full are left alone; the Triton kernel and
    the reference keep the same ring of queries and stamps. Integer-valued q and bounds: exact scores. Groups
    of 6, 4 and 1 query heads: by default 8, 8 and 16 steps in one product of the kernel (the window's 4 and
    padding), or 2 and 4 steps (two products and one); each product's queries loaded before the product ahead
    of it (prefetch, the default) or after it.
    Rule top_half only: with alpha (its softmax spans the current page, whose fill changes every step) the
    stamps would differ, which this case found; the engine keeps alpha's refresh per step."""
    rule = "top_half"
    g = _gen("window-refresh", refresh_pinned, limit, S, Hq, prefetch)
    dtype = torch.bfloat16
    B, Hkv, D, P, T = 3, 2, 32, 4, 14
    N = B * S
    ids = torch.stack([torch.stack([torch.randperm(S, generator=g) + b * S for _ in range(Hkv)]) for b in range(B)])
    ids[1, :, S - 2:] = -1  # unlisted entries
    ids = ids.to(torch.int32).to(DEVICE)
    fill = torch.randint(0, P + 1, (N, Hkv), generator=g).to(torch.int32).to(DEVICE)
    pinned = (torch.rand(N, Hkv, generator=g) < 0.3).to(DEVICE)
    kmin = torch.randint(-4, 1, (N, Hkv, D), generator=g).to(dtype).to(DEVICE)
    kmax = kmin + torch.randint(0, 4, (N, Hkv, D), generator=g).to(dtype).to(DEVICE)
    slots = torch.tensor([4, 0, 2], device=DEVICE)
    cur = torch.full((5, Hkv), -1, dtype=torch.int64, device=DEVICE)
    cur[slots] = ids[:, :, 0].long()  # each row's current page
    first_pos = torch.tensor([3, 0, 9, 0, 6], device=DEVICE)  # rows 0, 1, 2: first decode positions 6, 3, 9
    lead = torch.tensor([2, 0, 3], device=DEVICE)  # prompt tokens in each row's current page at its first step
    top = torch.tensor([2, 1, 3, 9, 4], device=DEVICE)
    num_pages = torch.tensor([S, 5, 3], dtype=torch.int32, device=DEVICE) if limit else None
    stamp0 = torch.randint(0, 5, (N, Hkv), generator=g).to(DEVICE)
    stamps = {k: stamp0.clone() for k in ("step", "window", "reference")}
    rings = {k: torch.zeros(5, P, Hq, D, dtype=dtype, device=DEVICE) for k in ("window", "reference")}
    heads = torch.arange(Hkv, device=DEVICE).view(1, -1)
    closes = 0
    for t in range(T):
        pos = first_pos[slots] + t
        fill[cur[slots], heads] = ((lead + t) % P + 1).to(torch.int32).view(-1, 1)  # this step's append
        q = torch.randint(-3, 4, (B, Hq, D), generator=g).to(dtype).to(DEVICE)
        before = stamps["window"].clone()

        def refresh_of(stamp, pos=pos):
            return ref.Refresh(cur, slots, pos, top, pinned, stamp, torch.zeros(N, Hkv, device=DEVICE), rule,
                               refresh_pinned, alpha=0.05, scale=D ** -0.5)

        TRI.bounds_refresh(q, kmin, kmax, ids, fill, refresh_of(stamps["step"]), num_pages)
        TRI.window_refresh(q, kmin, kmax, ids, fill, refresh_of(stamps["window"]), num_pages, rings["window"],
                           first_pos, prefetch=prefetch, steps_a_product=steps)
        ref.window_refresh(q, kmin, kmax, ids, fill, refresh_of(stamps["reference"]), num_pages,
                           rings["reference"], first_pos)
        assert torch.equal(rings["window"], rings["reference"])
        assert torch.equal(rings["window"][slots, pos % P], q)
        assert torch.equal(stamps["window"], stamps["reference"])
        closing = (lead + t) % P == P - 1
        for b in range(B):
            pages = ids[b].long()
            listed = pages >= 0
            window = stamps["window"][pages.clamp(min=0), heads.T][listed]
            if closing[b]:
                closes += 1
                assert torch.equal(window, stamps["step"][pages.clamp(min=0), heads.T][listed])
            else:  # deferred: what this row's pages had before the step
                assert torch.equal(window, before[pages.clamp(min=0), heads.T][listed])
    assert closes >= 6 and not torch.equal(stamps["window"], stamp0)


def test_decode_ignores_garbage_and_strided_q():
    """NaN in V past the fill (which the reference cannot take) changes nothing; q may be a strided
    view (e.g. a slice of a fused qkv projection); head dim not a power of two."""
    dtype = torch.float32
    g = _gen("decode-garbage")
    q, k_cache, v_cache, ids, fill = make_decode_case(
        g, B=2, Hq=6, Hkv=2, D=40, P=16, S=5, budget="large", dtype=dtype)
    qkv = torch.randn((2, 6 + 4, 40), generator=g).to(DEVICE)
    qkv[:, :6] = q
    qv = qkv[:, :6]  # non-contiguous
    want, want_mass = ref.paged_decode_attention(q, k_cache, v_cache, ids, fill, 0.2, return_mass=True)
    out, mass = TRI.paged_decode_attention(qv, k_cache, v_cache, ids, fill, 0.2, return_mass=True)
    assert _rel(out, want) < TOL[dtype]["attn"] and _rel(mass, want_mass) < TOL[dtype]["mass"]
    invalid = torch.arange(16, device=DEVICE).view(1, 1, 16) >= fill.unsqueeze(-1)
    v_nan = v_cache.clone()
    v_nan[invalid] = float("nan")
    out_nan, mass_nan = TRI.paged_decode_attention(qv, k_cache, v_nan, ids, fill, 0.2, return_mass=True)
    assert torch.equal(out_nan, out) and torch.equal(mass_nan, mass)


# ----------------------------------------------------------------------------------------------
# page scores (Quest bound)
# ----------------------------------------------------------------------------------------------

SCORE_CASES = [(G, dtype) for G in (1, 4, 7) for dtype in DTYPES]


@pytest.mark.parametrize("G,dtype", SCORE_CASES, ids=[f"G{G}-{DT_NAME[d]}" for G, d in SCORE_CASES])
def test_page_scores(G, dtype):
    g = _gen("scores", G, dtype)
    B, Hkv, D, N, S, topk = 3, 2, 48, 50, 37, 4
    q = _randn((B, G * Hkv, D), g, dtype)
    kmin = torch.randn((N, Hkv, D), generator=g)
    kmax = kmin + torch.rand((N, Hkv, D), generator=g)
    kmin, kmax = kmin.to(dtype).to(DEVICE), kmax.to(dtype).to(DEVICE)
    ids = torch.stack([torch.randperm(N, generator=g)[:S] for _ in range(B * Hkv)]).view(B, Hkv, S)
    drop = torch.rand((B, Hkv, S), generator=g) < 0.3
    drop[..., :topk] = False  # at least topk valid entries per row
    ids = ids.masked_fill(drop, -1).to(torch.int32)
    ids = ids.gather(-1, torch.argsort(torch.rand((B, Hkv, S), generator=g), -1)).to(DEVICE)

    want = ref.page_scores(q, kmin, kmax, ids)
    out = TRI.page_scores(q, kmin, kmax, ids)
    assert out.dtype == torch.float32 and out.shape == (B, Hkv, S)
    assert torch.equal(torch.isneginf(out), ids < 0) and torch.equal(torch.isneginf(want), ids < 0)
    ok = ids >= 0
    assert _rel(out[ok], want[ok]) < TOL[dtype]["scores"]
    # top-k selection: the reference scores of the kernel's picks sum to the reference's best sum
    best = want.topk(topk, dim=-1).values.sum(-1)
    picked = want.gather(-1, out.topk(topk, dim=-1).indices).sum(-1)
    assert torch.allclose(picked, best, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# kv append
# ----------------------------------------------------------------------------------------------


def _bits(x: torch.Tensor) -> torch.Tensor:
    """Bit pattern (so NaN == NaN and -0 != +0)."""
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


APPEND_CASES = [(P, dtype) for P in (16, 64) for dtype in DTYPES]


@pytest.mark.parametrize("P,dtype", APPEND_CASES, ids=[f"P{P}-{DT_NAME[d]}" for P, d in APPEND_CASES])
def test_kv_append(P, dtype):
    g = _gen("append", P, dtype)
    B, Hkv, D, N = 5, 3, 40, 23
    # pool: valid prefix of every page is random data with consistent min/max; the rest is NaN poison
    fill = torch.randint(0, P, (N, Hkv), generator=g, dtype=torch.int32)
    fill[:4] = 0  # first write into a fresh page (kmin / kmax hold NaN garbage there)
    fill[4:7] = P - 1  # last free slot
    k_cache = torch.randn((N, Hkv, P, D), generator=g).to(dtype)
    v_cache = torch.randn((N, Hkv, P, D), generator=g).to(dtype)
    invalid = torch.arange(P).view(1, 1, P) >= fill.unsqueeze(-1)
    k_cache[invalid] = float("nan")
    v_cache[invalid] = float("nan")
    kmin = torch.where(invalid.unsqueeze(-1), torch.inf, k_cache.float()).amin(2).to(dtype)
    kmax = torch.where(invalid.unsqueeze(-1), -torch.inf, k_cache.float()).amax(2).to(dtype)
    kmin[fill == 0] = float("nan")
    kmax[fill == 0] = float("nan")
    # distinct pages per head; every head writes one fresh page (fill 0) and one into its last slot
    write_page = torch.empty((B, Hkv), dtype=torch.int32)
    for h in range(Hkv):
        col = torch.cat([torch.tensor([h % 4, 4 + h % 3]), 7 + torch.randperm(N - 7, generator=g)[: B - 2]])
        write_page[:, h] = col[torch.randperm(B, generator=g)].to(torch.int32)
    k = torch.randn((B, Hkv, D), generator=g).to(dtype)
    v = torch.randn((B, Hkv, D), generator=g).to(dtype)

    state = [t.to(DEVICE) for t in (k_cache, v_cache, kmin, kmax, fill)]
    k, v, write_page = k.to(DEVICE), v.to(DEVICE), write_page.to(DEVICE)
    want = [t.clone() for t in state]
    ref.kv_append(k, v, *want, write_page)
    got = [t.clone() for t in state]
    assert TRI.kv_append(k, v, *got, write_page) is None
    for name, a, b in zip(("k_cache", "v_cache", "kmin", "kmax", "fill"), got, want):
        assert torch.equal(_bits(a), _bits(b)), name
    # untouched: everything except the written (page, head) rows is bit-identical to before
    touched = torch.zeros((N, Hkv), dtype=torch.bool, device=DEVICE)
    touched[write_page.long(), torch.arange(Hkv, device=DEVICE).expand(B, Hkv)] = True
    for a, before in zip(got, state):
        assert torch.equal(_bits(a[~touched]), _bits(before[~touched]))


@pytest.mark.parametrize("dtype", DTYPES, ids=[DT_NAME[d] for d in DTYPES])
@pytest.mark.parametrize("bounded", [False, True], ids=["append", "bounded_write_append"])
def test_append_with_rope_equals_rotary_then_append(dtype, bounded):
    """The decode step's fused append (kv_append / bounded_write_append with `rope`): q rotated in place
    and the rotated key appended, bit for bit as kernels/rotary.py then the plain append; k itself and
    v untouched; the same pages as the reference write step; the reference ops with `rope` (the
    specification) agree."""
    from raas_batch.kernels.rotary import apply_rotary

    g = _gen("rope-append", dtype, bounded)
    B, Hkv, G, D, N, P = 6, 2, 3, 32, 40, 4
    qkv = torch.randn((B, (Hkv * G + 2 * Hkv) * D), generator=g).to(dtype).to(DEVICE)
    q = qkv[:, :Hkv * G * D].view(B, Hkv * G, D)  # strided views, as the model passes them
    k = qkv[:, Hkv * G * D:(Hkv * G + Hkv) * D].view(B, Hkv, D)
    v = qkv[:, (Hkv * G + Hkv) * D:].view(B, Hkv, D)
    angles = torch.rand(64, D // 2, generator=g) * 6.28
    cos = torch.cat([angles.cos()] * 2, -1).to(DEVICE)
    sin = torch.cat([angles.sin()] * 2, -1).to(DEVICE)
    # rows at page starts (a page opens: the write step chooses it) and mid-page
    positions = torch.tensor([0, 4, 9, 13, 22, 63])[:B].to(DEVICE)
    fill = torch.zeros((N, Hkv), dtype=torch.int32)
    caches = [torch.randn((N, Hkv, P, D), generator=g).to(dtype) for _ in range(2)]
    bounds = [torch.randn((N, Hkv, D), generator=g).to(dtype) for _ in range(2)]
    # each row owns pages 6b..6b+5; its current page holds pos % P tokens
    table = (torch.arange(B).unsqueeze(1) * 6 + torch.arange(6)).to(torch.int32)
    cur = torch.zeros((B, Hkv), dtype=torch.int64)
    for b, pos in enumerate(positions.tolist()):
        logical = pos // P
        cur[b] = int(table[b, min(logical, 5)]) if pos % P else int(table[b, max(logical - 1, 0)])
        if pos % P:
            fill[table[b, min(logical, 5)]] = pos % P
    state = [t.to(DEVICE) for t in (*caches, *bounds, fill)]

    def policy_state():
        dev = {"device": DEVICE}
        return {"table": table.to(DEVICE), "slot_ids": torch.arange(B, **dev), "positions": positions,
                    "sparse_pages": torch.full((B,), 6, dtype=torch.int64, **dev),
                    "window": torch.ones(B, dtype=torch.int64, **dev), "cur": cur.clone().to(DEVICE),
                    "held": torch.zeros((B, Hkv), dtype=torch.int64, **dev),
                    "peak": torch.zeros((B, Hkv), dtype=torch.int64, **dev),
                    "evicted": torch.zeros((B, Hkv), dtype=torch.int64, **dev)}

    def run(fused: bool, ops=TRI):
        st = [t.clone() for t in state]
        kc, vc, kmin, kmax, fl = st
        qq, kk = q.clone(), k.clone()
        ps = policy_state()
        meta = [torch.zeros((N, Hkv), dtype=dt, device=DEVICE) for dt in (torch.int32, torch.bool, torch.int64,
                                                                            torch.float32)]
        write = (ps["table"], ps["slot_ids"], positions, ps["sparse_pages"], ps["window"], ps["cur"], ps["held"],
                 ps["peak"], ps["evicted"], fl, *meta, P)
        if fused:
            rope = (qq, cos, sin, positions)
            if bounded:
                pages = ops.bounded_write_append(kk, v, kc, vc, kmin, kmax, *write, rope=rope)
            else:
                pages = ps["table"].gather(1, (positions // P).clamp(max=5).unsqueeze(1)).expand(B, Hkv).contiguous()
                ops.kv_append(kk, v, kc, vc, kmin, kmax, fl, pages, rope=rope)
            assert torch.equal(kk, k)  # the argument is read, not rotated in place
        else:
            apply_rotary(qq, kk, cos, sin, positions)
            if bounded:
                pages = ref.bounded_write(*write)
            else:
                pages = ps["table"].gather(1, (positions // P).clamp(max=5).unsqueeze(1)).expand(B, Hkv).contiguous()
            TRI.kv_append(kk, v, kc, vc, kmin, kmax, fl, pages)
        return pages, qq, st, ps, meta

    got, want = run(True), run(False)
    assert torch.equal(got[0], want[0])
    assert torch.equal(_bits(got[1]), _bits(want[1]))
    for a, b in zip(got[2], want[2]):
        assert torch.equal(_bits(a), _bits(b))
    for name in got[3]:
        assert torch.equal(got[3][name], want[3][name]), name
    for a, b in zip(got[4], want[4]):
        assert torch.equal(a, b)
    # the specification (kernels/reference.py, torch's rotation): the same pages, state and metadata; the
    # rotated values within rounding (the interpreter rounds fp32 -> bf16 by truncation)
    spec = run(True, ref)
    assert torch.equal(spec[0], want[0]) and torch.equal(spec[2][4], want[2][4])
    for name in spec[3]:
        assert torch.equal(spec[3][name], want[3][name]), name
    for a, b in zip(spec[4], want[4]):
        assert torch.equal(a, b)
    for a, b in [(spec[1], want[1]), *zip(spec[2][:4], want[2][:4])]:
        assert _rel(a, b) <= TOL[dtype]["attn"]


# ----------------------------------------------------------------------------------------------
# prefill attention
# ----------------------------------------------------------------------------------------------

PREFILL_CASES = [(G, dtype, given) for G in (1, 4, 7) for dtype in DTYPES for given in (True, False)
                 if given or dtype == torch.float32]


@pytest.mark.parametrize(
    "G,dtype,given", PREFILL_CASES,
    ids=[f"G{G}-{DT_NAME[d]}-{'maxlen' if m else 'auto'}" for G, d, m in PREFILL_CASES],
)
def test_prefill_attention(G, dtype, given):
    g = _gen("prefill", G, dtype, given)
    Hkv, D = 2, 32
    lens = [1, 37, 16, 70, 5]
    lens = [lens[i] for i in torch.randperm(len(lens), generator=g).tolist()]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    T = sum(lens)
    q, k, v = (_randn((T, h, D), g, dtype) for h in (G * Hkv, Hkv, Hkv))
    want = ref.prefill_attention(q, k, v, cu, D ** -0.5)
    if given:
        out = TRI.prefill_attention(q, k, v, cu, D ** -0.5, max_seqlen=max(lens))
    else:
        out = TRI.prefill_attention(q, k, v, cu, D ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    assert _rel(out, want) < TOL[dtype]["attn"]


# ----------------------------------------------------------------------------------------------
# dispatcher and real-size GPU cases
# ----------------------------------------------------------------------------------------------


def test_get_ops():
    t = kops.get_ops("torch")
    assert t.paged_decode_attention is ref.paged_decode_attention and t.kv_append is ref.kv_append
    for name in ("paged_decode_attention", "page_scores", "kv_append", "prefill_attention"):
        assert callable(getattr(TRI, name)) and getattr(TRI, name) is not getattr(ref, name)
    with pytest.raises(ValueError):
        kops.get_ops("nope")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DT_NAME.get)
@pytest.mark.parametrize("budget", ["small", "large"])
def test_paged_decode_attention_gpu_real_size(dtype, budget):
    """B=64, S*P=4096, D=128, Hq=28, Hkv=4, P=16, with the host's split heuristic."""
    g = _gen("decode-gpu", dtype, budget)
    P, S, D = 16, 256, 128
    args = make_decode_case(g, B=64, Hq=28, Hkv=4, D=D, P=P, S=S, budget=budget, dtype=dtype,
                            max_len=S * P + 700 if budget == "small" else S * P - 50)
    _check_decode(*args, scale=D ** -0.5, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_page_scores_and_prefill_gpu_real_size():
    g = _gen("other-gpu")
    dtype = torch.bfloat16
    q = _randn((64, 28, 128), g, dtype)
    kmin = _randn((20000, 4, 128), g, dtype)
    kmax = kmin + torch.rand((20000, 4, 128), generator=g).to(dtype).to(DEVICE)
    ids = torch.randint(-1, 20000, (64, 4, 256), generator=g, dtype=torch.int32).to(DEVICE)
    ok = ids >= 0
    assert _rel(TRI.page_scores(q, kmin, kmax, ids)[ok], ref.page_scores(q, kmin, kmax, ids)[ok]) < 1e-5
    lens = [1000, 17, 2048, 333]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    qp, kp, vp = (_randn((sum(lens), h, 128), g, dtype) for h in (28, 4, 4))
    want = ref.prefill_attention(qp, kp, vp, cu, 128 ** -0.5)
    assert _rel(TRI.prefill_attention(qp, kp, vp, cu, 128 ** -0.5), want) < TOL[dtype]["attn"]
