"""Token sampling in Triton: temperature, top-k, top-p and the counter-based exponential race, no sort.

Same contract as `kernels.reference.sample_tokens` (the specification): logits [B, V] float32, or
bfloat16 / float16 (the lm_head's own output: upcast on load, which is exact, so the tokens are those of
the float32 copy without the copy); temperature, top_p [B] float32; top_k, keys, steps [B] int64 ->
[B] int64.

The reference sorts each row to find the kept set; here the row is read a few times instead:
1. the race w = argmax over all tokens of s - log(-log U) (s = logits / temperature, U the hashed
   uniform of the token), the max m of s and Z = sum exp(s - m);
2. the mass and count of tokens with s > s_w. If mass / Z < top_p and count < top_k, w is in the kept
   set and, since the kept set is every token down to some s, w is also the winner of the race
   restricted to it: done. Otherwise no token with s <= s_w is kept: race again among the tokens with
   s > s_w (pivot = s_w), go to 2.
The race's winner lies in the kept set with probability >= top_p, so most rows end after step 2;
greedy rows (temperature 0) take the argmax in step 1.

The decode step's path (`split=True`) cuts each row into chunks of `chunk` tokens and runs three
kernels, so that a batch's rows are read by thousands of programs at once instead of one program a row
whose loop waits on each load in turn (0.13 ms for 512 rows x 49,152 bf16 logits on an H200, against
~0.03 ms for the bytes at copy bandwidth):
- `_chunk_kernel` (B x C programs): each chunk's race winner (its g and index), its max m_c and
  z_c = sum exp(s - m_c);
- `_mass_kernel` (B x C): each program combines its row's C partials into the winner w and s_w, and,
  only when its chunk holds a token above s_w (m_c > s_w), reads the chunk again for the mass (with the
  row's m) and count above s_w;
- `_finish_kernel` (B): Z = sum z_c exp(m_c - m), the acceptance test, and for the rare row that fails
  it the rejection rounds of the one-program path (`_reject`).
The winner is the same token either way (the first index of the largest g); Z and the mass are sums in
another order, which can only matter for a row whose mass lies within rounding of top_p.
`split=False` is the one-program-a-row kernel (`_sample_kernel`; within a read each lane of the block
keeps its own running best or sums and the block reduces once at the end).
Rejection in the spirit of FlashInfer's sorting-free top-p sampling (Ye et al., 2025,
https://flashinfer.ai/2025/03/10/sampling.html); the hash is the reference's, in 32-bit unsigned
arithmetic (which wraps as the reference's masks do), so the uniforms are bit-identical. No host
synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import lazy_jit, pdl_args


def _hash32(x):
    # uint32 arithmetic wraps modulo 2^32: the reference's int64 products masked to 32 bits, bit for bit,
    # at a third of the cost of 64-bit multiplies
    x = x.to(tl.uint32)
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


def _race(row, offs, V, inv_t, base, pivot, BLOCK_V: tl.constexpr):
    """One read of the row: the exponential race among tokens with s > pivot -> (winner, its s, max s).
    Each lane keeps its own best across chunks (the earliest index on ties: indices only grow along a
    lane) and the block reduces once at the end, not once per chunk."""
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    win = tl.zeros([BLOCK_V], tl.int32)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        s = tl.load(row + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_t
        m = tl.maximum(m, s)
        g = tl.where((idx < V) & (s > pivot), s + _noise(base, idx), float("-inf"))
        take = g > best
        best = tl.where(take, g, best)
        win = tl.where(take, idx, win)
    top = tl.max(best, axis=0)
    w = tl.min(tl.where(best == top, win, V), axis=0)
    w = tl.minimum(w, V - 1)  # (no candidate at all: only for rows of NaN logits)
    w_s = tl.load(row + w).to(tl.float32) * inv_t  # the winner's s, bit for bit as in the loop
    return w, w_s, tl.max(m, axis=0)


def _above(row, offs, V, inv_t, m, w_s, BLOCK_V: tl.constexpr):
    """One read of the row -> (Z = sum exp(s - m), mass and count of the tokens with s > w_s)."""
    z = tl.zeros([BLOCK_V], tl.float32)
    mass = tl.zeros([BLOCK_V], tl.float32)
    count = tl.zeros([BLOCK_V], tl.int32)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        s = tl.load(row + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_t
        e = tl.exp(s - m)
        above = s > w_s
        z += e
        mass += tl.where(above, e, 0.0)
        count += above.to(tl.int32)
    return tl.sum(z, axis=0), tl.sum(mass, axis=0), tl.sum(count, axis=0)


def _settings(inv_t_ptr, keys_ptr, steps_ptr, top_p_ptr, top_k_ptr, b, V):
    """A sampled row's settings -> (inv_t, base of its noise hash, top_p, top_k with 0 -> V)."""
    inv_t = tl.load(inv_t_ptr + b)  # computed by torch, as the reference does: the same bits
    step_h = _hash32((tl.load(steps_ptr + b) * 0x27D4EB2F + 0x165667B1) & 0xFFFFFFFF)
    base = _hash32((tl.load(keys_ptr + b) & 0xFFFFFFFF).to(tl.uint32) ^ step_h)
    k = tl.load(top_k_ptr + b)
    return inv_t, base, tl.load(top_p_ptr + b), tl.where(k > 0, k, V)


def _reject(row, offs, V, inv_t, base, m, z, mass, count, win, win_s, top_p, k,
            BLOCK_V: tl.constexpr, MAX_ROUNDS: tl.constexpr):
    """While the race's winner is outside the kept set (mass / Z above it >= top_p, or top_k tokens above
    it), no token with s <= s_w is kept either: race again above it. -> the winner. The top token always
    passes, so this ends; the cap only guards rows of NaN logits."""
    rounds = 1
    go = ((mass / z >= top_p) | (count >= k)) & (rounds < MAX_ROUNDS)
    while go:
        win, win_s, _ = _race(row, offs, V, inv_t, base, win_s, BLOCK_V)
        _, mass, count = _above(row, offs, V, inv_t, m, win_s, BLOCK_V)
        rounds += 1
        go = ((mass / z >= top_p) | (count >= k)) & (rounds < MAX_ROUNDS)
    return win


def _noise(base, idx):
    """-log(-log U) of each token: the race's Gumbel noise, from the reference's hash."""
    h = _hash32(base + idx.to(tl.uint32) * 0x9E3779B9)
    u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return -tl.log(-tl.log(u))


def _sample_kernel(
    logits_ptr, temp_ptr, inv_t_ptr, top_p_ptr, top_k_ptr, keys_ptr, steps_ptr, out_ptr,
    stride_b, V,
    BLOCK_V: tl.constexpr, MAX_ROUNDS: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program a row (`split=False`)."""
    if PDL:  # programmatic dependent launch (kernels/_jit.py): the kernel before must have finished
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    row = logits_ptr + b.to(tl.int64) * stride_b
    offs = tl.arange(0, BLOCK_V)
    if tl.load(temp_ptr + b) > 0:
        inv_t, base, top_p, k = _settings(inv_t_ptr, keys_ptr, steps_ptr, top_p_ptr, top_k_ptr, b, V)
        # read 1: the race over every token, and the max m; read 2: Z, and the mass and count above s_w
        win, win_s, m = _race(row, offs, V, inv_t, base, float("-inf"), BLOCK_V)
        z, mass, count = _above(row, offs, V, inv_t, m, win_s, BLOCK_V)
        win = _reject(row, offs, V, inv_t, base, m, z, mass, count, win, win_s, top_p, k, BLOCK_V, MAX_ROUNDS)
        tl.store(out_ptr + b, win.to(tl.int64))
    else:  # (names of their own: Triton merges a name bound in both branches, so the types must agree)
        lane_best = tl.full([BLOCK_V], float("-inf"), tl.float32)
        lane_win = tl.zeros([BLOCK_V], tl.int32)
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + offs
            x = tl.load(row + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
            take = x > lane_best
            lane_best = tl.where(take, x, lane_best)
            lane_win = tl.where(take, idx, lane_win)
        top_x = tl.max(lane_best, axis=0)
        tl.store(out_ptr + b, tl.min(tl.where(lane_best == top_x, lane_win, V), axis=0).to(tl.int64))


def _chunk_kernel(
    logits_ptr, temp_ptr, inv_t_ptr, top_p_ptr, top_k_ptr, keys_ptr, steps_ptr, part_ptr, win_ptr,
    stride_b, V, C,
    CHUNK: tl.constexpr, PDL: tl.constexpr,
):
    """Program (b, c): chunk c of row b -> part[0..2, b, c] = (race's best g, max s, sum exp(s - max s)),
    win[0, b, c] = the index of the best g (its first index). Greedy rows race on the logits themselves."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    c = tl.program_id(1)
    idx = c * CHUNK + tl.arange(0, CHUNK)
    ok = idx < V
    x = tl.load(logits_ptr + b.to(tl.int64) * stride_b + idx, mask=ok, other=float("-inf")).to(tl.float32)
    if tl.load(temp_ptr + b) > 0:
        inv_t, base, _, _ = _settings(inv_t_ptr, keys_ptr, steps_ptr, top_p_ptr, top_k_ptr, b, V)
        s = x * inv_t
        g = tl.where(ok & (s > float("-inf")), s + _noise(base, idx), float("-inf"))
    else:
        s = x
        g = x
    m = tl.max(s, axis=0)
    z = tl.where(m > float("-inf"), tl.sum(tl.exp(s - m), axis=0), 0.0)
    top = tl.max(g, axis=0)
    at = b * C + c
    plane = tl.num_programs(0) * C
    tl.store(part_ptr + at, top)
    tl.store(part_ptr + plane + at, m)
    tl.store(part_ptr + 2 * plane + at, z)
    tl.store(win_ptr + at, tl.min(tl.where(g == top, idx, V), axis=0))


def _winner(part_ptr, win_ptr, b, C, V, CP: tl.constexpr):
    """The row's race winner from its chunks' partials: the first index of the largest g."""
    cs = tl.arange(0, CP)
    gs = tl.load(part_ptr + b * C + cs, mask=cs < C, other=float("-inf"))
    ws = tl.load(win_ptr + b * C + cs, mask=cs < C, other=V)
    top = tl.max(gs, axis=0)
    return tl.minimum(tl.min(tl.where(gs == top, ws, V), axis=0), V - 1)  # (V: rows of NaN logits)


def _row_max(part_ptr, b, C, plane, CP: tl.constexpr):
    """The row's max s and Z = sum exp(s - max) from its chunks' partials -> (m, Z)."""
    cs = tl.arange(0, CP)
    ms = tl.load(part_ptr + plane + b * C + cs, mask=cs < C, other=float("-inf"))
    zs = tl.load(part_ptr + 2 * plane + b * C + cs, mask=cs < C, other=0.0)
    m = tl.max(ms, axis=0)
    return m, tl.sum(tl.where(ms > float("-inf"), zs * tl.exp(ms - m), 0.0), axis=0)


def _mass_kernel(
    logits_ptr, temp_ptr, inv_t_ptr, part_ptr, win_ptr,
    stride_b, V, C,
    CHUNK: tl.constexpr, CP: tl.constexpr, PDL: tl.constexpr,
):
    """Program (b, c) of a sampled row: part[3, b, c] = the mass sum exp(s - m) of chunk c's tokens with
    s > s_w, win[1, b, c] = their count; the chunk is read only when its max is above s_w."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    c = tl.program_id(1)
    if tl.load(temp_ptr + b) > 0:
        plane = tl.num_programs(0) * C
        row = logits_ptr + b.to(tl.int64) * stride_b
        inv_t = tl.load(inv_t_ptr + b)
        w_s = tl.load(row + _winner(part_ptr, win_ptr, b, C, V, CP)).to(tl.float32) * inv_t
        m, _ = _row_max(part_ptr, b, C, plane, CP)
        idx = c * CHUNK + tl.arange(0, CHUNK)
        # only a chunk whose max is above s_w is read (else the mask is all off: no load is issued)
        end = tl.where(tl.load(part_ptr + plane + b * C + c) > w_s, V, 0)
        s = tl.load(row + idx, mask=idx < end, other=float("-inf")).to(tl.float32) * inv_t
        above = s > w_s
        mass = tl.sum(tl.where(above, tl.exp(s - m), 0.0), axis=0)
        count = tl.sum(above.to(tl.int32), axis=0)
        tl.store(part_ptr + 3 * plane + b * C + c, mass)
        tl.store(win_ptr + plane + b * C + c, count)


def _finish_kernel(
    logits_ptr, temp_ptr, inv_t_ptr, top_p_ptr, top_k_ptr, keys_ptr, steps_ptr, part_ptr, win_ptr, out_ptr,
    stride_b, V, C,
    CP: tl.constexpr, BLOCK_V: tl.constexpr, MAX_ROUNDS: tl.constexpr, PDL: tl.constexpr,
):
    """Program b: the acceptance test on the chunks' sums; a row that fails it races again above s_w on
    its own (the one-program path's rounds)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    win = _winner(part_ptr, win_ptr, b, C, V, CP)
    if tl.load(temp_ptr + b) > 0:
        plane = tl.num_programs(0) * C
        row = logits_ptr + b.to(tl.int64) * stride_b
        inv_t, base, top_p, k = _settings(inv_t_ptr, keys_ptr, steps_ptr, top_p_ptr, top_k_ptr, b, V)
        m, z = _row_max(part_ptr, b, C, plane, CP)
        cs = tl.arange(0, CP)
        mass = tl.sum(tl.load(part_ptr + 3 * plane + b * C + cs, mask=cs < C, other=0.0), axis=0)
        count = tl.sum(tl.load(win_ptr + plane + b * C + cs, mask=cs < C, other=0), axis=0)
        win_s = tl.load(row + win).to(tl.float32) * inv_t
        win = _reject(row, tl.arange(0, BLOCK_V), V, inv_t, base, m, z, mass, count, win, win_s, top_p, k,
                      BLOCK_V, MAX_ROUNDS)
    tl.store(out_ptr + b, win.to(tl.int64))


_HELPERS = (_hash32, _noise, _race, _above, _settings, _reject)
_kernel = lazy_jit(_sample_kernel, helpers=_HELPERS)
_chunk = lazy_jit(_chunk_kernel, helpers=_HELPERS)
_mass = lazy_jit(_mass_kernel, helpers=(_winner, _row_max))
_finish = lazy_jit(_finish_kernel, helpers=_HELPERS + (_winner, _row_max))


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                  keys: torch.Tensor, steps: torch.Tensor, *, split: bool = True, chunk: int = 2048,
                  chunk_warps: int = 4, block_v: int = 2048, num_warps: int = 16,
                  num_stages: int | None = None) -> torch.Tensor:
    """One token per row -> [B] int64. See `kernels.reference.sample_tokens` for the contract. The
    keywords are launch settings (benchmarks/bench_step_kernels.py tries others); they never change a
    token: `split` the three-kernel path over chunks of `chunk` tokens (`chunk_warps` a program), else
    one program a row; `block_v`, `num_warps`, `num_stages`: the one-program path's loop (and the
    split path's rejection rounds)."""
    B, V = logits.shape
    assert logits.dtype in (torch.float32, torch.bfloat16, torch.float16) and logits.stride(1) == 1
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    temperature = temperature.float()
    inv_t = 1.0 / temperature.clamp(min=1e-5)
    settings = (temperature, inv_t, top_p.float(), top_k, keys, steps)
    pdl = pdl_args(logits.device)
    stages = {} if num_stages is None else {"num_stages": num_stages}
    if not split:
        _kernel()[(B,)](logits, *settings, out, logits.stride(0), V,
                        BLOCK_V=block_v, MAX_ROUNDS=64, num_warps=num_warps, **stages, **pdl)
        return out
    C = triton.cdiv(V, chunk)
    CP = triton.next_power_of_2(C)
    part = torch.empty((4, B, C), dtype=torch.float32, device=logits.device)  # best g, max s, Z part, mass
    wins = torch.empty((2, B, C), dtype=torch.int32, device=logits.device)  # best g's index, count above
    _chunk()[(B, C)](logits, *settings, part, wins, logits.stride(0), V, C,
                     CHUNK=chunk, num_warps=chunk_warps, **pdl)
    _mass()[(B, C)](logits, temperature, inv_t, part, wins, logits.stride(0), V, C,
                    CHUNK=chunk, CP=CP, num_warps=chunk_warps, **pdl)
    _finish()[(B,)](logits, *settings, part, wins, out, logits.stride(0), V, C,
                    CP=CP, BLOCK_V=block_v, MAX_ROUNDS=64, num_warps=num_warps, **stages, **pdl)
    return out


__all__ = ["sample_tokens"]
