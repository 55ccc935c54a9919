"""The paged KV cache: one pool of pages per engine, with the per-page metadata sparse policies need.

Layout (docs/architecture.md): k_cache / v_cache [layers, pages, kv_heads, page_size, head_dim], keys
stored after RoPE. Metadata per (layer, page, kv head): kmin / kmax [.., head_dim] (Quest's channel-wise
key bounds: kept up to date when the KV policy reads them, `uses_key_bounds`, and always on the Triton
path, whose fused append keeps them at no cost), fill (valid tokens), stamp (last decode position that
wrote or refreshed the page), pinned (never evicted), logical (which page of its sequence it holds, -1 when empty) and mass
(accumulated attention mass, for H2O).

Invariants:
- A physical page belongs to at most one sequence (its quota), from admission to retirement.
- `reset(pages)` runs at admission, so a sequence never sees a previous owner's metadata; with
  `zero_on_admit` (set by the engine for backend `cpu`, which skips masking V) also not its keys and
  values: slots past a page's fill hold zeros or what this sequence wrote there earlier (finite unless
  the sequence itself produced non-finite values). The other backends mask every slot past the fill,
  so they skip the zeroing (for a dense sequence of 6K tokens it writes ~170 MB per admission).
- Within a (layer, kv head), a page's valid tokens are offsets [0, fill) and hold the positions
  [logical * page_size, logical * page_size + fill) of its sequence.
"""

from __future__ import annotations

from collections import deque

import torch


class PagePool:
    def __init__(self, num_layers: int, num_pages: int, num_kv_heads: int, page_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_layers, self.num_pages, self.num_kv_heads = num_layers, num_pages, num_kv_heads
        self.page_size, self.head_dim = page_size, head_dim
        shape = (num_layers, num_pages, num_kv_heads)
        self.k_cache = torch.zeros(*shape, page_size, head_dim, dtype=dtype, device=device)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.kmin = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        self.kmax = torch.zeros_like(self.kmin)
        # The pages' metadata is allocated for a multiple of 16 pages and sliced to num_pages, so that
        # every layer's slice (the kernels get one layer at a time) starts 16-byte aligned. Triton builds
        # a kernel variant per pointer alignment, and the page count follows the GPU's free memory: with
        # unpadded rows a layer's slice was aligned on some layers only, and a job built variants again
        # whenever the free memory moved the count (run 68: 2.2-4.3 s of compiles inside a measured job
        # whose warm-up had built them for another count).
        rows = -(-num_pages // 16) * 16
        padded = (num_layers, rows, num_kv_heads)
        self.fill = torch.zeros(padded, dtype=torch.int32, device=device)[:, :num_pages]
        self.stamp = torch.zeros(padded, dtype=torch.int64, device=device)[:, :num_pages]
        self.pinned = torch.zeros(padded, dtype=torch.bool, device=device)[:, :num_pages]
        self.logical = torch.full(padded, -1, dtype=torch.int32, device=device)[:, :num_pages]
        self.mass = torch.zeros(padded, dtype=torch.float32, device=device)[:, :num_pages]
        self._free = deque(range(num_pages))
        self.zero_on_admit = True  # the engine turns it off for backends that mask slots past the fill
        # per layer: (k_cache, v_cache, kmin, kmax, fill) views, sliced once (a decode step uses them
        # in every layer, and on the CPU each slice is an op)
        self.layer_views = [(self.k_cache[i], self.v_cache[i], self.kmin[i], self.kmax[i], self.fill[i])
                            for i in range(num_layers)]

    @staticmethod
    def bytes_per_page(num_layers: int, num_kv_heads: int, page_size: int, head_dim: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        kv = 2 * page_size * head_dim * elem
        bounds = 2 * head_dim * elem
        meta = 4 + 8 + 1 + 4 + 4
        return num_layers * num_kv_heads * (kv + bounds + meta)

    # ---- ownership (host side) ----
    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, num: int, reset: bool = True) -> list[int] | None:
        """Reserve `num` pages, reset them (reset False: the caller resets them, with others, before any use), and
        return their ids; None when too few are free."""
        if num > len(self._free):
            return None
        pages = [self._free.popleft() for _ in range(num)]
        if reset:
            self.reset(pages)
        return pages

    def release(self, pages: list[int]) -> None:
        self._free.extend(pages)

    def reset(self, pages: list[int]) -> None:
        if not pages:
            return
        idx = torch.tensor(pages, dtype=torch.long, device=self.fill.device)
        if self.zero_on_admit:  # a previous owner's non-finite values must not reach this sequence
            self.k_cache[:, idx] = 0
            self.v_cache[:, idx] = 0
        self.fill[:, idx] = 0
        self.stamp[:, idx] = 0
        self.pinned[:, idx] = False
        self.logical[:, idx] = -1
        self.mass[:, idx] = 0

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """Copy pages src[i] -> dst[i] whole (keys, values, bounds and metadata, every layer and head):
        a sample of a request takes its own copy of prompt pages prefilled once (PromptGroup)."""
        if not src:
            return
        s = torch.tensor(src, dtype=torch.long, device=self.fill.device)
        d = torch.tensor(dst, dtype=torch.long, device=self.fill.device)
        for t in (self.k_cache, self.v_cache, self.kmin, self.kmax, self.fill, self.stamp, self.pinned,
                  self.logical, self.mass):
            t[:, d] = t[:, s]

    # ---- prefill writes ----
    def write_prefill_pages(self, meta: PrefillPages) -> None:
        """The metadata of the pages a prefill batch fills, in every layer at once (the same in each): fill,
        logical index, stamp, pinned. meta.pages / fills / logical / stamps / pinned: [M] for each page touched.
        (Once a prefill rather than once a layer: a small prefill is bound by its launches.)"""
        pages = meta.pages
        self.fill[:, pages] = meta.fills.view(1, -1, 1).to(torch.int32)
        self.logical[:, pages] = meta.logical.view(1, -1, 1).to(torch.int32)
        self.stamp[:, pages] = meta.stamps.view(1, -1, 1).to(self.stamp.dtype)
        self.pinned[:, pages] = meta.pinned.view(1, -1, 1)

    def write_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: PrefillPages,
                      bounds: bool = True) -> None:
        """Write a prefill batch's keys and values into one layer's pages (and the pages' key bounds kmin / kmax if
        `bounds`); the pages' metadata is `write_prefill_pages`'s, once for all layers.

        k, v: [T, Hkv, D]; meta.token_pages / token_offsets: [T] (page and offset of every token).
        """
        self.k_cache[layer][meta.token_pages, :, meta.token_offsets] = k.to(self.k_cache.dtype)
        self.v_cache[layer][meta.token_pages, :, meta.token_offsets] = v.to(self.v_cache.dtype)
        if bounds:
            pages = meta.pages
            keys = self.k_cache[layer, pages]  # [M, Hkv, P, D]
            empty = meta.empty_slots(self.page_size)  # [M, 1, P, 1]: past each page's fill
            big = torch.finfo(keys.dtype).max
            self.kmin[layer, pages] = keys.masked_fill(empty, big).amin(dim=2)
            self.kmax[layer, pages] = keys.masked_fill(empty, -big).amax(dim=2)

    def held_tokens(self, pages: list[int]) -> int:
        """Largest number of tokens a (layer, kv head) holds now in these pages (host sync)."""
        idx = torch.tensor(pages, dtype=torch.long, device=self.fill.device)
        return int(self.fill[:, idx].sum(dim=1).max().item())


class PrefillPages:
    """Where a prefill batch's tokens go, as device tensors (built by the model runner)."""

    def __init__(self, token_pages, token_offsets, pages, fills, logical, stamps, pinned):
        self.token_pages, self.token_offsets = token_pages, token_offsets  # [T], [T]
        self.pages, self.fills, self.logical, self.stamps, self.pinned = pages, fills, logical, stamps, pinned  # [M]
        self._empty: torch.Tensor | None = None

    def empty_slots(self, page_size: int) -> torch.Tensor:
        """[M, 1, P, 1] bool: the token slots past each page's fill (the key bounds skip them); built once and
        shared by every layer's write."""
        if self._empty is None or self._empty.shape[2] != page_size:
            offsets = torch.arange(page_size, device=self.fills.device).view(1, -1)
            self._empty = (offsets >= self.fills.view(-1, 1)).view(-1, 1, page_size, 1)
        return self._empty
