"""The CPU decode path: the reference ops (kernels/reference.py) rewritten as fewer, larger torch ops.

On a CPU every torch op costs a few microseconds of dispatch whatever its size, and a small model runs
dozens of them per layer, so op count, not arithmetic, sets the decode speed. These versions compute
the same values as the references (tests/test_kernels_cpu.py checks them against each other) with:
- pages gathered by `index_select` on a flat (page, head) row index, computed once per page table
  (the dense policy hands every layer of a step the same table) instead of once per layer;
- no masking of V: the pool zeroes a sequence's pages at admission, so slots past `fill` hold zeros or
  what the same sequence wrote there (finite), and their softmax weight is exactly 0;
- K/V appends as `index_copy_` on flat rows, and the page bounds updated by one min/max each.
They may synchronise with the host (free on a CPU), so they are not for CUDA-graph capture: they are the
default on the CPU, and the engine refuses them with CUDA graphs. Prefill, Quest scores and the bounded
policies' bookkeeping (bounded_write, bounded_update) are the references' own; bounded_write_append
is the references' write step with this module's append.
"""

from __future__ import annotations

import torch

from . import reference
from .reference import (  # noqa: F401  (other ops)
    _limit_pages,
    bounded_update,
    page_scores,
    prefill_attention,
    refresh_after,
    with_key_bounds,
)

backend = "cpu"

# Per kind ("read" / "write"): the last page table seen, with what was derived from it.
_memo: dict = {}
_arange_cache: dict = {}


def _arange(n: int, device) -> torch.Tensor:
    key = (n, device)
    out = _arange_cache.get(key)
    if out is None:
        out = _arange_cache[key] = torch.arange(n, device=device)
    return out


def _memoised(kind: str, pages: torch.Tensor, derive):
    """derive(pages), memoised on the table's contents: a policy that hands every layer of a step the
    same table (the dense policy does) pays one comparison per layer instead of the derivation."""
    last = _memo.get(kind)
    if (last is not None and last[0].shape == pages.shape and last[0].device == pages.device
            and torch.equal(last[0], pages)):
        return last[1]
    out = derive(pages)
    _memo[kind] = (pages.clone(), out)
    return out


def _read_rows(page_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """page_ids [B, Hkv, S] -> (rows [B*Hkv*S] int64 into a [N*Hkv, ...] view of a per-layer cache,
    missing [B, Hkv, S, 1] bool, or None when every entry names a page)."""
    Hkv = page_ids.shape[1]
    heads = _arange(Hkv, page_ids.device).view(1, Hkv, 1)
    rows = (page_ids.clamp(min=0).long() * Hkv + heads).reshape(-1)
    missing = page_ids < 0
    return rows, (missing.unsqueeze(-1) if bool(missing.any()) else None)


def _write_rows(write_page: torch.Tensor) -> torch.Tensor:
    """write_page [B, Hkv] -> rows [B*Hkv] int64 into a [N*Hkv, ...] view."""
    Hkv = write_page.shape[1]
    return (write_page.long() * Hkv + _arange(Hkv, write_page.device)).reshape(-1)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def paged_decode_attention(q, k_cache, v_cache, page_ids, fill, scale, return_mass=False, num_pages=None,
                           key_bounds=None, refresh=None):
    """Same contract as reference.paged_decode_attention, except that slots past a page's fill must hold
    finite values (true of the engine's pool)."""
    result = _decode_attention(q, k_cache, v_cache, page_ids, fill, scale, return_mass, num_pages)
    result = with_key_bounds(result, return_mass, q, page_ids, num_pages, key_bounds)
    refresh_after(bounded_update, result, page_ids, fill, refresh, num_pages)
    return result


def _decode_attention(q, k_cache, v_cache, page_ids, fill, scale, return_mass, num_pages):
    page_ids = _limit_pages(page_ids, num_pages)
    B, Hq, D = q.shape
    N, Hkv, P = k_cache.shape[:3]
    S = page_ids.shape[2]
    rows, missing = _memoised("read", page_ids, _read_rows)
    k = k_cache.view(N * Hkv, P, D).index_select(0, rows).view(B, Hkv, S * P, D)
    v = v_cache.view(N * Hkv, P, D).index_select(0, rows).view(B, Hkv, S * P, D)
    page_fill = fill.view(-1).index_select(0, rows).view(B, Hkv, S, 1)
    if missing is not None:
        page_fill = page_fill.masked_fill(missing, 0)
    valid = (_arange(P, q.device) < page_fill).view(B, Hkv, 1, S * P)
    qg = _as(q, torch.float32).view(B, Hkv, Hq // Hkv, D)
    k, v = _as(k, torch.float32), _as(v, torch.float32)
    if not return_mass:
        out = torch.nn.functional.scaled_dot_product_attention(qg, k, v, attn_mask=valid, scale=scale)
        return _as(out.reshape(B, Hq, D), q.dtype)
    scores = (qg @ k.transpose(-1, -2)).mul_(scale).masked_fill_(~valid, float("-inf"))  # [B, Hkv, G, S*P]
    probs = torch.softmax(scores, dim=-1)
    out = _as((probs @ v).reshape(B, Hq, D), q.dtype)
    mass = probs.view(B, Hkv, -1, S, P).sum(-1).amax(dim=2)  # [B, Hkv, S]
    return out, mass


def kv_append(k, v, k_cache, v_cache, kmin, kmax, fill, write_page, rope=None) -> None:
    """Same contract as reference.kv_append."""
    if rope is not None:
        q, cos, sin, positions = rope
        q_rot, k = reference.apply_rotary(q, k, cos, sin, positions)
        q.copy_(q_rot)
    D = k.shape[2]
    P = k_cache.shape[2]
    rows = _memoised("write", write_page, _write_rows)  # [B*Hkv] (page, head) rows
    flat_fill = fill.view(-1)
    offsets = flat_fill.index_select(0, rows)
    slots = rows * P + offsets
    kc = _as(k.reshape(-1, D), k_cache.dtype)
    k_cache.view(-1, D).index_copy_(0, slots, kc)
    v_cache.view(-1, D).index_copy_(0, slots, _as(v.reshape(-1, D), v_cache.dtype))
    flat_fill.index_copy_(0, rows, offsets + 1)
    if kmin is None:  # bounds not kept (no policy reads them)
        return
    kb = _as(kc, kmin.dtype)
    lo, hi = kmin.view(-1, D), kmax.view(-1, D)
    opening = offsets == 0
    if bool(opening.any()):  # a page opens: its bounds start from this key
        first = opening.unsqueeze(1)
        lo.index_copy_(0, rows, torch.where(first, kb, torch.minimum(lo.index_select(0, rows), kb)))
        hi.index_copy_(0, rows, torch.where(first, kb, torch.maximum(hi.index_select(0, rows), kb)))
    else:
        lo.index_copy_(0, rows, torch.minimum(lo.index_select(0, rows), kb))
        hi.index_copy_(0, rows, torch.maximum(hi.index_select(0, rows), kb))


bounded_write_append = reference.write_then_append(kv_append)  # the references' write step, this append
