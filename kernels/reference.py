"""Torch reference implementations of every kernel op: the specification the Triton kernels are tested
against, and the path the engine runs on the CPU.

Plain and obviously right on purpose: no fusion, fp32 accumulation, loops where they make the meaning
plain. Shapes (see docs/architecture.md): B sequences, Hq query heads, Hkv KV heads, D head dim,
P page size, N physical pages, S pages listed per (sequence, KV head), T prompt tokens.
Page id lists use -1 for "no page".
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch


def _gather_pages(cache: torch.Tensor, page_ids: torch.Tensor) -> torch.Tensor:
    """cache: [N, Hkv, P, D]; page_ids: [B, Hkv, S] (-1 allowed, read as page 0) -> [B, Hkv, S, P, D]."""
    heads = torch.arange(cache.shape[1], device=cache.device).view(1, -1, 1)  # broadcasts over [B, Hkv, S]
    return cache[page_ids.clamp(min=0).long(), heads]


def _limit_pages(page_ids: torch.Tensor, num_pages: torch.Tensor | None) -> torch.Tensor:
    """page_ids [B, Hkv, S] with the entries from index num_pages[b] on replaced by -1."""
    if num_pages is None:
        return page_ids
    cols = torch.arange(page_ids.shape[2], device=page_ids.device).view(1, 1, -1)
    return torch.where(cols < num_pages.view(-1, 1, 1), page_ids, -1)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_ids: torch.Tensor,
    fill: torch.Tensor,
    scale: float,
    return_mass: bool = False,
    num_pages: torch.Tensor | None = None,
    key_bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    refresh: Refresh | None = None,
):
    """Exact softmax attention of one query token per sequence over the listed pages.

    q: [B, Hq, D]; k_cache, v_cache: [N, Hkv, P, D]; page_ids: [B, Hkv, S] int32 (-1 = none);
    fill: [N, Hkv] int32 (valid tokens per page); num_pages: [B] int or None: entries of row b from
    index num_pages[b] on count as -1. Query head h reads KV head h // (Hq // Hkv).
    Returns out [B, Hq, D] in q's dtype and, if return_mass, mass [B, Hkv, S] float32: the softmax
    probability each listed page received (sum over its tokens), max over the query heads of the
    group; 0 for -1 entries. Every (sequence, KV head) must list at least one non-empty page.
    key_bounds = (kmin, kmax) [N, Hkv, D]: also the Quest bound of every entry,
    page_scores(q, kmin, kmax, page_ids limited by num_pages) (what RaaS's refresh ranks; a kernel reads
    the bounds with the pages). Returns out, or (out, mass), (out, bounds), (out, mass, bounds).
    refresh: a bounded policy's update after attention (`Refresh`), run on this call's mass or bounds
    before returning: `refresh_after` is the meaning; the Triton kernel runs RaaS's refresh inside.
    """
    result = _decode_attention(q, k_cache, v_cache, page_ids, fill, scale, return_mass, num_pages)
    result = with_key_bounds(result, return_mass, q, page_ids, num_pages, key_bounds)
    refresh_after(bounded_update, result, page_ids, fill, refresh, num_pages)
    return result


def with_key_bounds(result, return_mass: bool, q, page_ids, num_pages, key_bounds):
    """Append the Quest bounds of the pages read to an attention result (see paged_decode_attention)."""
    if key_bounds is None:
        return result
    bounds = page_scores(q, key_bounds[0], key_bounds[1], _limit_pages(page_ids, num_pages))
    return (*result, bounds) if return_mass else (result, bounds)


@dataclass(frozen=True)
class Refresh:
    """A bounded policy's state update after attention, handed to the attention op so that a kernel can
    run it where it has the values at hand (RaaS: the Quest bounds of a row's pages, in the decode
    attention's program for that row). The fields are `bounded_update`'s arguments other than page_ids,
    values and fill, which the attention call supplies (values: its mass for the rules mass and
    accumulate, its bounds for top_half and alpha)."""

    cur: torch.Tensor
    slot_ids: torch.Tensor
    positions: torch.Tensor
    top: torch.Tensor
    pinned: torch.Tensor
    stamp: torch.Tensor
    mass: torch.Tensor
    rule: str
    refresh_pinned: bool = False
    alpha: float = 0.0
    scale: float = 1.0

    @property
    def on_mass(self) -> bool:
        """Whether the rule reads the attention's mass (else its Quest bounds)."""
        return self.rule in ("mass", "accumulate")

    def run(self, update, page_ids, values, fill, **scoring) -> None:
        """`update` (a backend's bounded_update) with these fields; scoring: q, kmin, kmax for values None."""
        update(page_ids, values, self.cur, self.slot_ids, self.positions, self.top, fill, self.pinned, self.stamp,
               self.mass, rule=self.rule, refresh_pinned=self.refresh_pinned, alpha=self.alpha, scale=self.scale,
               **scoring)


def refresh_after(update, result, page_ids, fill, refresh: Refresh | None, num_pages=None) -> None:
    """Run `refresh` with `update` (a backend's bounded_update) on an attention call's result: its mass
    (the result's second entry) or its Quest bounds (the last), over the pages the call read (entries
    past num_pages count as -1). What paged_decode_attention(refresh=...) means on every backend."""
    if refresh is not None:
        refresh.run(update, _limit_pages(page_ids, num_pages), result[1] if refresh.on_mass else result[-1], fill)


def bounds_refresh(q, kmin, kmax, page_ids, fill, refresh: Refresh, num_pages=None) -> torch.Tensor:
    """A refresh by the Quest bounds (rules top_half and alpha) without the attention: what
    `paged_decode_attention(..., key_bounds=(kmin, kmax), refresh=refresh)` does to the stamps, alone.
    Returns the bounds [B, Hkv, S] (-inf for unlisted entries and those past num_pages)."""
    assert not refresh.on_mass
    page_ids = _limit_pages(page_ids, num_pages)
    bounds = page_scores(q, kmin, kmax, page_ids)
    refresh.run(bounded_update, page_ids, bounds, fill)
    return bounds


def window_refresh(q, kmin, kmax, page_ids, fill, refresh: Refresh, num_pages, ring, first_pos) -> None:
    """RaaS's refresh by the Quest bounds deferred to the step that fills a row's current page (the
    reasoning is in kernels/window_refresh.py). ring [num_slots, P, Hq, D] keeps each slot's queries of its
    last P steps; first_pos [num_slots] is the position of each slot's first decode step. This step's q
    goes into ring[slot, position % P]; then each row whose current page is now full runs, oldest first,
    the refresh (`bounds_refresh`) of every step of the page's window, positions
    max(position - P + 1, first_pos[slot]) .. position, with that step's query from the ring and its position
    as the stamp. At a window's close the stamps are then those that a refresh at every step leaves. Rule
    top_half only: alpha's softmax also runs over the current page, whose fill and bounds change every step."""
    assert refresh.rule == "top_half"
    P = ring.shape[1]
    slots, positions = refresh.slot_ids, refresh.positions
    ring[slots, positions % P] = q.to(ring.dtype)
    Hkv = kmin.shape[1]
    heads = torch.arange(Hkv, device=q.device).view(1, -1)
    cur = refresh.cur[slots]  # [B, Hkv]
    closing = ((cur >= 0) & (fill[cur.clamp(min=0), heads] >= P)).any(dim=1)  # [B] (every head fills alike)
    first = torch.maximum(positions - P + 1, first_pos[slots])
    for j in range(P):  # oldest first: a later refresh of a page overwrites an earlier one
        x = positions - P + 1 + j
        rows = torch.nonzero(closing & (x >= first)).flatten()
        if rows.numel() == 0:
            continue
        r = replace(refresh, slot_ids=slots[rows], positions=x[rows])
        bounds_refresh(ring[slots[rows], x[rows] % P].to(q.dtype), kmin, kmax, page_ids[rows], fill, r,
                       None if num_pages is None else num_pages[rows])


def _decode_attention(q, k_cache, v_cache, page_ids, fill, scale, return_mass, num_pages):
    B, Hq, D = q.shape
    Hkv, P = k_cache.shape[1], k_cache.shape[2]
    S = page_ids.shape[2]
    G = Hq // Hkv
    page_ids = _limit_pages(page_ids, num_pages)
    k = _gather_pages(k_cache, page_ids).float().view(B, Hkv, S * P, D)
    v = _gather_pages(v_cache, page_ids).float().view(B, Hkv, S * P, D)
    page_fill = torch.where(page_ids >= 0, _gather_pages(fill.unsqueeze(-1), page_ids).squeeze(-1), 0)  # [B, Hkv, S]
    valid = torch.arange(P, device=q.device) < page_fill.unsqueeze(-1)  # [B, Hkv, S, P]
    valid = valid.view(B, Hkv, 1, S * P)
    v = torch.where(valid.view(B, Hkv, S * P, 1), v, 0.0)  # slots past fill may hold garbage (even NaN)
    qg = q.float().view(B, Hkv, G, D)
    if not return_mass:
        out = torch.nn.functional.scaled_dot_product_attention(qg, k, v, attn_mask=valid, scale=scale)
        return out.reshape(B, Hq, D).to(q.dtype)
    scores = (qg @ k.transpose(-1, -2)) * scale  # [B, Hkv, G, S*P]
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    out = (probs @ v).reshape(B, Hq, D).to(q.dtype)
    mass = probs.view(B, Hkv, G, S, P).sum(-1).amax(dim=2)  # [B, Hkv, S]
    return out, mass


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, page_ids: torch.Tensor) -> torch.Tensor:
    """Quest upper bound of q.k over each listed page, max over the query heads of a KV head's group.

    q: [B, Hq, D]; kmin, kmax: [N, Hkv, D]; page_ids: [B, Hkv, S] int32 (-1 = none).
    Returns [B, Hkv, S] float32: sum_d max(q_d * kmax_d, q_d * kmin_d), -inf for -1 entries.
    """
    B, Hq, D = q.shape
    Hkv = kmin.shape[1]
    G = Hq // Hkv
    safe = page_ids.clamp(min=0).long()
    heads = torch.arange(Hkv, device=q.device).view(1, -1, 1).expand_as(safe)
    lo = kmin[safe, heads].float()  # [B, Hkv, S, D]
    hi = kmax[safe, heads].float()
    qg = q.float().view(B, Hkv, G, 1, D)
    bound = torch.maximum(qg * hi.unsqueeze(2), qg * lo.unsqueeze(2)).sum(-1)  # [B, Hkv, G, S]
    bound = bound.amax(dim=2)
    return bound.masked_fill(page_ids < 0, float("-inf"))


def kv_append(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    fill: torch.Tensor,
    write_page: torch.Tensor,
    rope: tuple | None = None,
) -> None:
    """Append one token per (sequence, KV head) to its page, in place.

    k, v: [B, Hkv, D]; k_cache, v_cache: [N, Hkv, P, D]; kmin, kmax: [N, Hkv, D]; fill: [N, Hkv] int32;
    write_page: [B, Hkv] int32. The token goes to offset fill[p, h] of page p = write_page[b, h]
    (the caller guarantees fill < P there); kmin/kmax become k at offset 0 and take the elementwise
    min/max otherwise (kmin = kmax = None: bounds not kept); fill increments. No two (b, h) may name
    the same (page, head). rope = (q [B, Hq, D], cos, sin, positions [B]): first rotate q in place and
    k (a copy: the argument is left as is) with `apply_rotary`; the key written is the rotated one.
    """
    if rope is not None:
        q, cos, sin, positions = rope
        q_rot, k = apply_rotary(q, k, cos, sin, positions)
        q.copy_(q_rot)
    B, Hkv, _ = k.shape
    pages = write_page.long()  # [B, Hkv]
    heads = torch.arange(Hkv, device=k.device).view(1, -1).expand(B, Hkv)
    offsets = fill[pages, heads].long()  # [B, Hkv]
    k_cache[pages, heads, offsets] = k.to(k_cache.dtype)
    v_cache[pages, heads, offsets] = v.to(v_cache.dtype)
    if kmin is not None:
        first = (offsets == 0).unsqueeze(-1)  # [B, Hkv, 1]
        kc = k.to(kmin.dtype)
        kmin[pages, heads] = torch.where(first, kc, torch.minimum(kmin[pages, heads], kc))
        kmax[pages, heads] = torch.where(first, kc, torch.maximum(kmax[pages, heads], kc))
    fill[pages, heads] = (offsets + 1).to(fill.dtype)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Causal attention within each of several concatenated sequences.

    q: [T, Hq, D]; k, v: [T, Hkv, D]; cu_seqlens: [num_seqs + 1] int32 (start offsets, last = T).
    Returns [T, Hq, D] in q's dtype; fp32 softmax. max_seqlen (the longest sequence) is the Triton
    kernel's, which sizes its grid with it; unused here.
    """
    Hq, Hkv = q.shape[1], k.shape[1]
    G = Hq // Hkv
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        n = end - start
        qs = q[start:end].float().transpose(0, 1)  # [Hq, n, D]
        ks = k[start:end].float().transpose(0, 1).repeat_interleave(G, dim=0)  # [Hq, n, D]
        vs = v[start:end].float().transpose(0, 1).repeat_interleave(G, dim=0)
        scores = qs @ ks.transpose(1, 2) * scale  # [Hq, n, n]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out[start:end] = (torch.softmax(scores, dim=-1) @ vs).transpose(0, 1).to(q.dtype)
    return out


def prefill_page_mass(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, page_size: int,
                      chunk: int = 256, max_elements: int = 1 << 26) -> torch.Tensor:
    """Attention mass each prompt page receives during the causal prefill (H2O's starting scores).

    q: [T, Hq, D]; k: [T, Hkv, D]; cu_seqlens: [num_seqs + 1] int32. Returns [M, Hkv] float32, M the
    prompt pages of all sequences in order (sequence 0's pages 0.., then sequence 1's, as the model
    runner lists them in PrefillPages.pages). Entry (page, h) = the sum over the sequence's query
    positions t of max over the query heads of KV head h's group of the softmax probability (causal,
    fp32) that query t puts on the page's tokens: the same per-step quantity the decode kernel emits,
    accumulated over the prompt's own queries, as H2O accumulates it over every query seen.
    Sequences are padded to a common length and batched, as many at a time as keep one chunk's scores
    under `max_elements` floats; query rows `chunk` at a time, so memory is O(chunk * n) per head, not
    O(n^2). (One sequence at a time cost ~7 s per 512 short prompts of a 28-layer model on the GPU:
    docs/gpu-notes.md run 22.) Plain torch on any device: only policies that accumulate mass
    (`needs_prefill_mass`) call it.
    """
    Hq, Hkv = q.shape[1], k.shape[1]
    G, P, dev = Hq // Hkv, page_size, q.device
    starts = cu_seqlens.tolist()
    lengths = [e - s for s, e in itertools.pairwise(starts)]
    out = []
    i = 0
    while i < len(lengths):
        j, longest = i + 1, lengths[i]
        while j < len(lengths):  # add sequences while the padded chunk of scores stays in budget
            padded = -(-max(longest, lengths[j]) // P) * P
            if (j - i + 1) * Hq * min(chunk, padded) * padded > max_elements:
                break
            longest = max(longest, lengths[j])
            j += 1
        S, L = j - i, -(-longest // P) * P
        lens = torch.tensor(lengths[i:j], device=dev)
        offs = torch.arange(L, device=dev)
        valid = offs.view(1, -1) < lens.view(-1, 1)  # [S, L]
        rows = (torch.tensor(starts[i:j], device=dev).view(-1, 1) + offs).clamp(max=q.shape[0] - 1)
        qs = q[rows].float().permute(0, 2, 1, 3)  # [S, Hq, L, D]
        ks = k[rows].float().masked_fill(~valid.view(S, L, 1, 1), 0.0).permute(0, 2, 1, 3)
        ks = ks.repeat_interleave(G, dim=1)  # [S, Hq, L, D]
        acc = torch.zeros(S, Hkv, L // P, dtype=torch.float32, device=dev)
        for r0 in range(0, longest, chunk):
            r1 = min(longest, r0 + chunk)
            scores = qs[:, :, r0:r1] @ ks.transpose(-1, -2) * scale  # [S, Hq, c, L]
            r = torch.arange(r0, r1, device=dev).view(1, -1, 1)
            keep = (offs.view(1, 1, -1) <= r) & valid.view(S, 1, L)  # [S, c, L]: causal, inside the sequence
            probs = torch.softmax(scores.masked_fill(~keep.unsqueeze(1), float("-inf")), dim=-1)
            live = (r < lens.view(-1, 1, 1)).unsqueeze(1)  # [S, 1, c, 1]: query rows of the sequence
            probs = torch.where(live, probs, 0.0)  # (padding rows are all -inf: NaN, dropped)
            per_page = probs.view(S, Hkv, G, r1 - r0, L // P, P).sum(-1)  # [S, Hkv, G, c, pages]
            acc += per_page.amax(dim=2).sum(dim=2)
        pages = (lens + P - 1) // P
        has = torch.arange(L // P, device=dev).view(1, -1) < pages.view(-1, 1)  # [S, pages]
        out.append(acc.transpose(1, 2)[has])  # [sum pages, Hkv], sequence-major
        i = j
    return torch.cat(out) if out else torch.zeros(0, Hkv, dtype=torch.float32, device=dev)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """(Residual add +) RMSNorm with the Llama/Qwen rounding. x: [T, N]; weight: [N]; residual: [T, N]
    or None. With a residual, the sum x + residual (rounded to x's dtype) is written into `residual`
    and normalised; returns (out, residual). Without, returns out. Normalisation in fp32, the result
    rounded to x's dtype before the weight multiplies it."""
    if residual is not None:
        residual.copy_(x + residual)
        x = residual
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = weight * normed
    return out if residual is None else (out, residual)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation: x [T, 2I] (gate | up) -> silu(gate) * up, [T, I] in x's dtype."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor):
    """Rotary embedding (rotate-half layout) at absolute positions, computed in fp32.

    q: [T, Hq, D]; k: [T, Hkv, D]; cos, sin: [max_pos, D] fp32; positions: [T]. Returns new (q, k)."""

    def rotate(x: torch.Tensor) -> torch.Tensor:
        c = cos[positions].unsqueeze(1)  # [T, 1, D]
        s = sin[positions].unsqueeze(1)
        xf = x.float()
        half = x.shape[-1] // 2
        rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
        return (xf * c + rotated * s).to(x.dtype)

    return rotate(q), rotate(k)


# ---- KV policy bookkeeping (the bounded policies of raas_batch/policies/bounded.py) ----
EVICTION_KEYS = ("stamp", "mass", "logical")
UPDATE_RULES = ("top_half", "alpha", "mass", "accumulate")


def _argmin_older(key: torch.Tensor, logical: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """key, logical: [..., W]; cand: [..., W] bool -> [...] index of the candidate with the lowest key,
    ties broken towards the smaller logical page (the older one). Rows without candidates give 0."""
    big = torch.finfo(torch.float64).max
    k = torch.where(cand, key.double(), big)
    best = k.amin(dim=-1, keepdim=True)
    tied = cand & (k == best)
    lg = torch.where(tied, logical.long(), torch.iinfo(torch.int64).max)
    return lg.argmin(dim=-1)


def bounded_write(table, slot_ids, positions, sparse_pages, window, cur, held, peak, evicted,
                  fill, logical, pinned, stamp, mass, page_size: int, key: str = "stamp",
                  min_logical: int = 0, stamp_on_write: bool = True) -> torch.Tensor:
    """Choose the page each (sequence, KV head) appends this step's token to, evicting where a page opens.

    table: [B, W] int32 each sequence's quota pages (-1 padded); slot_ids, positions: [B] int64;
    sparse_pages, window: [num_slots] int64 (per sequence: usable quota columns, eviction window);
    cur, held, peak, evicted: [num_slots, Hkv] int64, this layer's per-sequence state (in/out);
    fill, logical: [N, Hkv] int32, pinned: [N, Hkv] bool, stamp: [N, Hkv] int64, mass: [N, Hkv] float32,
    this layer's page metadata (in/out). Returns [B, Hkv] int32.

    A page opens when positions % page_size == 0. Then the new page is the first empty usable column
    (column < sparse_pages, page >= 0, fill == 0) or, when none is empty, the victim: among held (fill > 0),
    unpinned pages with logical <= positions // page_size - window and logical >= min_logical, the one
    with the lowest key (stamp, mass or logical), ties to the smaller logical page. If that filter
    leaves no page (the policies size their quotas so that it cannot), any held unpinned page may be
    the victim. The opened page's fill, pinned and mass are reset and its logical set. Otherwise the
    page is cur. Stamp = position on the written page (every step with stamp_on_write, else only when
    it opens). held += 1 - (tokens of the evicted page); peak = max(peak, held); evicted += 1 on eviction.
    """
    P = page_size
    B, W = table.shape
    Hkv = fill.shape[1]
    dev = table.device
    heads = torch.arange(Hkv, device=dev).unsqueeze(0).expand(B, Hkv)  # [B, Hkv]
    pos = positions.long()
    cur_b = cur[slot_ids]  # [B, Hkv]
    opening = (pos % P == 0).unsqueeze(1).expand(B, Hkv)
    new_logical = (pos // P).view(-1, 1, 1)
    cols = torch.arange(W, device=dev).unsqueeze(0)
    tbl = torch.where(cols < sparse_pages[slot_ids].unsqueeze(1), table.long(), -1)  # [B, W]
    safe = tbl.clamp(min=0)

    def meta(t: torch.Tensor) -> torch.Tensor:  # [N, Hkv] -> [B, Hkv, W]
        return t[safe].transpose(1, 2)

    usable = (tbl >= 0).unsqueeze(1)  # [B, 1, W]
    f, lg, pin = meta(fill), meta(logical), meta(pinned)
    empty = usable & (f == 0)
    base = usable & (f > 0) & ~pin
    cand = base & (lg <= new_logical - window[slot_ids].view(-1, 1, 1)) & (lg >= min_logical)
    cand = torch.where(cand.any(-1, keepdim=True), cand, base)
    keys = {"stamp": stamp, "mass": mass, "logical": logical}[key]
    victim = _argmin_older(meta(keys), lg, cand)
    has_empty = empty.any(-1)
    col = torch.where(has_empty, empty.int().argmax(-1), victim)  # [B, Hkv]
    new_page = tbl.unsqueeze(1).expand(B, Hkv, W).gather(2, col.unsqueeze(-1)).squeeze(-1)
    evict = opening & ~has_empty
    freed = torch.where(evict, f.gather(2, col.unsqueeze(-1)).squeeze(-1).long(), 0)
    page = torch.where(opening, new_page, cur_b)  # [B, Hkv]

    def put(t: torch.Tensor, mask: torch.Tensor, value) -> None:
        # Pages are distinct per (b, head): no write conflicts. A Python scalar goes to torch.where as
        # is (a device tensor made from it would be a host copy: a sync, not capturable in a graph).
        t[page, heads] = torch.where(mask, value.to(t.dtype) if isinstance(value, torch.Tensor) else value,
                                     t[page, heads])

    put(fill, opening, 0)
    put(logical, opening, (pos // P).unsqueeze(1))
    put(pinned, opening, False)
    put(mass, opening, 0.0)
    put(stamp, torch.ones_like(opening) if stamp_on_write else opening, pos.unsqueeze(1))
    cur[slot_ids] = page
    held_now = held[slot_ids] + 1 - freed
    held[slot_ids] = held_now
    peak[slot_ids] = torch.maximum(peak[slot_ids], held_now)
    evicted[slot_ids] += evict.long()
    return page.to(torch.int32)


def write_then_append(append):
    """The op `bounded_write_append` built on an append op (this module's `kv_append`, or the CPU path's):
    `bounded_write` (the page of each (sequence, KV head), evicting where one opens), then `append` of
    k, v (with `rope`) to those pages -> the pages [B, Hkv] int32. The decode step's write for the
    bounded policies, one kernel on the Triton backend (whose rope positions must be `positions`)."""

    def bounded_write_append(k, v, k_cache, v_cache, kmin, kmax, table, slot_ids, positions, sparse_pages, window,
                             cur, held, peak, evicted, fill, logical, pinned, stamp, mass, page_size: int,
                             key: str = "stamp", min_logical: int = 0, stamp_on_write: bool = True,
                             rope: tuple | None = None) -> torch.Tensor:
        pages = bounded_write(table, slot_ids, positions, sparse_pages, window, cur, held, peak, evicted, fill,
                              logical, pinned, stamp, mass, page_size, key=key, min_logical=min_logical,
                              stamp_on_write=stamp_on_write)
        append(k, v, k_cache, v_cache, kmin, kmax, fill, pages, rope=rope)
        return pages

    return bounded_write_append


bounded_write_append = write_then_append(kv_append)


def bounded_update(page_ids, values, cur, slot_ids, positions, top, fill, pinned, stamp, mass,
                   rule: str, refresh_pinned: bool = False, alpha: float = 0.0, scale: float = 1.0,
                   q=None, kmin=None, kmax=None) -> None:
    """After attention: refresh page stamps (RaaS) or accumulate attention mass (H2O), in place.

    page_ids: [B, Hkv, S] int32 the pages read (-1 = none, distinct per row); values: [B, Hkv, S]
    float32 (Quest bounds for rules top_half / alpha, the attention mass for mass / accumulate);
    cur: [num_slots, Hkv] int64 page being written; slot_ids, positions: [B] int64; top: [num_slots]
    int64 refresh slots (top_half); fill [N, Hkv] int32, pinned [N, Hkv] bool, stamp [N, Hkv] int64,
    mass [N, Hkv] float32: this layer's metadata. values None (top_half, alpha): the Quest bounds
    page_scores(q, kmin, kmax, page_ids) (q [B, Hq, D], kmin / kmax [N, Hkv, D]).

    Refreshable: listed, fill > 0, not the current page, unpinned unless refresh_pinned. A pinned page's
    stamp and mass are never written (it is never a victim, so they would not be read; and a prompt page
    shared by the samples of a request, engine/sequence.py PromptGroup, is pinned and read by several rows
    of one step). Rules:
    - top_half: the refreshable pages ranked by value (descending; ties to the earlier column) below
      top[slot] get stamp = position;
    - alpha: softmax over listed non-empty pages of (value * scale + log fill) > alpha -> stamp;
    - mass: value > alpha -> stamp;
    - accumulate: mass[page] += value for every listed page (no stamps).
    """
    if values is None:
        values = page_scores(q, kmin, kmax, page_ids)
    safe = page_ids.clamp(min=0).long()
    Hkv = page_ids.shape[1]
    heads = torch.arange(Hkv, device=page_ids.device).view(1, -1, 1).expand_as(safe)
    listed = page_ids >= 0
    unpinned = ~pinned[safe, heads]
    if rule == "accumulate":
        # values are 0 for -1 entries' clamped index when masked: accumulating them is harmless
        mass.index_put_((safe, heads), torch.where(listed & unpinned, values, 0.0), accumulate=True)
        return
    f = fill[safe, heads]
    ok = listed & (f > 0) & (safe != cur[slot_ids].unsqueeze(-1))
    if not refresh_pinned:
        ok &= unpinned
    if rule == "top_half":
        s = values.masked_fill(~ok, float("-inf"))
        order = s.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
        refresh = ok & (rank < top[slot_ids].view(-1, 1, 1))
    elif rule == "alpha":
        logit = values * scale + f.float().clamp(min=1).log()
        logit = logit.masked_fill(~listed | (f == 0), float("-inf"))
        refresh = ok & (torch.softmax(logit, dim=-1) > alpha)
    elif rule == "mass":
        refresh = ok & (values > alpha)
    else:
        raise ValueError(f"bounded_update rule {rule!r} is unknown; choose one of {', '.join(UPDATE_RULES)}.")
    delta = torch.where(refresh & unpinned, positions.view(-1, 1, 1) - stamp[safe, heads], 0)
    stamp.index_put_((safe, heads), delta, accumulate=True)  # zero deltas make -1 padding harmless


# ---- sampling ----
MASK32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors (values kept in [0, 2^32)); wrapping products keep
    the low 32 bits exact."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def uniform_noise(keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B] keys and steps -> [B, vocab] float32 uniforms in (0, 1), a pure function of its inputs."""
    base = hash32(keys ^ hash32(steps * 0x27D4EB2F + 0x165667B1))  # [B]
    idx = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    h = hash32(base.unsqueeze(1) + idx.unsqueeze(0) * 0x9E3779B9)  # [B, V]
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                  keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One token per row, with per-row settings and per-row counter-based randomness.

    logits [B, V] float32 (bfloat16 / float16 are upcast first, exactly); temperature, top_p [B]
    float32; top_k, keys, steps [B] int64 -> [B] int64.
    temperature 0: the argmax (first index on ties). Otherwise, with s = logits * (1 / temperature)
    and p = softmax(s), the kept set is every token with (mass of tokens with a strictly larger s)
    < top_p and (count of them) < top_k (top_k 0 = off); the top token is always kept, tokens tied
    with a kept one are kept. The token is argmax over the kept set of s - log(E) with
    E = -log(uniform_noise(keys, steps)): the exponential race argmax p / E, which draws token i with
    probability p_i renormalised over the kept set; ties to the first index.
    """
    V = logits.shape[1]
    x = logits.float()
    greedy = x.argmax(dim=-1)
    if not bool((temperature > 0).any()):  # all greedy: no noise to draw (a host read: not for CUDA graphs)
        return greedy
    inv_t = 1.0 / temperature.float().clamp(min=1e-5)
    s = x * inv_t.unsqueeze(1)
    race = s - torch.log(-torch.log(uniform_noise(keys, steps, V)))
    filtered = (top_p < 1) | (top_k > 0)
    if bool(filtered.any()):
        sorted_s, order = s.sort(dim=-1, descending=True)
        e = torch.exp(sorted_s - sorted_s[:, :1])
        # the number of tokens with a strictly larger s: the first index of each token's tie group
        above = torch.searchsorted(-sorted_s, -sorted_s, side="left")  # [B, V]
        excl = torch.cat([torch.zeros_like(e[:, :1]), e.cumsum(dim=-1)], dim=1).gather(1, above)
        k = torch.where(top_k > 0, top_k, V).unsqueeze(1)
        keep_sorted = (excl / e.sum(-1, keepdim=True) < top_p.unsqueeze(1)) & (above < k)
        keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
        race = race.masked_fill(~keep, float("-inf"))
    sampled = race.argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)
