"""Token sampling in Triton: temperature, top-k, top-p and the counter-based exponential race, one
program per row, no sort.

Same contract as `kernels.reference.sample_tokens` (the specification): logits [B, V] float32, or
bfloat16 / float16 (the lm_head's own output: upcast on load, which is exact, so the tokens are those of
the float32 copy without the copy); temperature, top_p [B] float32; top_k, keys, steps [B] int64 ->
[B] int64.

The reference sorts each row to find the kept set; here a program reads its row a few times instead:
1. one read: the race w = argmax over all tokens of s - log(-log U) (s = logits / temperature, U the
   hashed uniform of the token), and the max m of s;
2. one read: Z = sum exp(s - m), and the mass and count of tokens with s > s_w. If mass / Z < top_p
   and count < top_k, w is in the kept set and, since the kept set is every token down to some s, w
   is also the winner of the race restricted to it: done. Otherwise no token with s <= s_w is kept: race again among the tokens
   with s > s_w (pivot = s_w), go to 2.
The race's winner lies in the kept set with probability >= top_p, so most rows take 2 reads of the
row; greedy rows (temperature 0) take one argmax pass. A token's exact race value costs two accurate
logarithms (the reference's bits need them): a cheap screen (`_may_beat`, two fast exponentials)
computes them only for the chunks where some token might beat the best value so far, a few chunks a
row. On the GPU this shortens the rejection rounds of the few rows that run them (one program alone,
bound by its arithmetic); the common passes over all rows are bound by neither arithmetic nor
occupancy (run 115 in docs/gpu-notes.md: at top-p 1, 0.092 ms with or without the screen). Within a read each lane of the block keeps its
own running best (or sums) and the block reduces once at the end, instead of once per chunk (each
reduction is a barrier across the block's warps).
Rejection in the spirit of FlashInfer's sorting-free top-p sampling (Ye et al., 2025,
https://flashinfer.ai/2025/03/10/sampling.html); the hash is the reference's, in 32-bit unsigned
arithmetic (which wraps as the reference's masks do), so the uniforms are bit-identical. No host
synchronisation.
"""

from __future__ import annotations

import torch
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


def _chunk(row, idx, V):
    """A chunk of the row in its own dtype (-inf past the vocabulary)."""
    return tl.load(row + idx, mask=idx < V, other=float("-inf"))


def _race(row, offs, V, inv_t, base, pivot, BLOCK_V: tl.constexpr, SCREEN: tl.constexpr):
    """One read of the row: the exponential race among tokens with s > pivot -> (winner, its s, max s).
    Each lane keeps its own best across chunks (the earliest index on ties: indices only grow along a
    lane) and the block reduces once at the end, not once per chunk.

    SCREEN: a chunk's exact race values (two accurate logarithms a token: the race's arithmetic) are
    computed only when one of its tokens might beat `top`, the best exact value of the chunks before it
    (`_may_beat`, a cheap test with a safe margin). A skipped token's value is below `top`, so it can be
    neither the winner nor tied with it: the same winner, bit for bit. After the first chunk few chunks
    pass (a chunk of C tokens after n: about C / (n + C)), so the row costs a few exact chunks and cheap
    tests for the rest."""
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    win = tl.zeros([BLOCK_V], tl.int32)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    top = tl.max(best, axis=0)  # the best exact race value so far (SCREEN): -inf before the first chunk
    nxt = _chunk(row, offs, V)  # each chunk's loads are issued one chunk ahead of its work
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        x = nxt
        nxt = _chunk(row, idx + BLOCK_V, V)
        s = x.to(tl.float32) * inv_t
        m = tl.maximum(m, s)
        h = _hash32(base + idx.to(tl.uint32) * 0x9E3779B9)
        u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        live = (idx < V) & (s > pivot)
        if SCREEN:
            if tl.max(_may_beat(live, s, u, top).to(tl.int32), axis=0) > 0:
                g = tl.where(live, s - tl.log(-tl.log(u)), float("-inf"))
                take = g > best
                best = tl.where(take, g, best)
                win = tl.where(take, idx, win)
                top = tl.max(best, axis=0)
        else:
            g = tl.where(live, s - tl.log(-tl.log(u)), float("-inf"))
            take = g > best
            best = tl.where(take, g, best)
            win = tl.where(take, idx, win)
    top = tl.max(best, axis=0)
    w = tl.min(tl.where(best == top, win, V), axis=0)
    w = tl.minimum(w, V - 1)  # (no candidate at all: only for rows of NaN logits)
    w_s = tl.load(row + w).to(tl.float32) * inv_t  # the winner's s, bit for bit as in the loop
    return w, w_s, tl.max(m, axis=0)


def _may_beat(live, s, u, top):
    """False only where a token's exact race value s - log(-log u) is certainly below `top`.

    s - log(-log u) < top  <=>  -log(-log u) < x = top - s  <=>  u < exp(-exp(-x)), for x > 0. The test
    runs on x less a margin (1e-5 + 1e-6 |top|: a few ulps of the exact value's rounding, at any
    temperature's scale) and on u plus 4e-6 (the fast exponentials' error is below 1e-6 there), so a token
    it rules out is below `top` by more than the exact value's rounding can move it. x <= 0, NaN s, top =
    -inf (the first chunk): the token may beat it."""
    x = (top - s) - (1e-5 + 1e-6 * tl.abs(top))
    thr = tl.exp2(-tl.exp2(-x * 1.4426950408889634) * 1.4426950408889634)
    return live & ~((x > 0) & (u + 4e-6 < thr))


def _above(row, offs, V, inv_t, m, w_s, BLOCK_V: tl.constexpr):
    """One read of the row -> (Z = sum exp(s - m), mass and count of the tokens with s > w_s)."""
    z = tl.zeros([BLOCK_V], tl.float32)
    mass = tl.zeros([BLOCK_V], tl.float32)
    count = tl.zeros([BLOCK_V], tl.int32)
    nxt = _chunk(row, offs, V)  # each chunk's loads are issued one chunk ahead of its work
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        x = nxt
        nxt = _chunk(row, idx + BLOCK_V, V)
        s = x.to(tl.float32) * inv_t
        e = tl.exp(s - m)
        above = s > w_s
        z += e
        mass += tl.where(above, e, 0.0)
        count += above.to(tl.int32)
    return tl.sum(z, axis=0), tl.sum(mass, axis=0), tl.sum(count, axis=0)


def _sample_kernel(
    logits_ptr, temp_ptr, inv_t_ptr, top_p_ptr, top_k_ptr, keys_ptr, steps_ptr, out_ptr,
    stride_b, V,
    BLOCK_V: tl.constexpr, MAX_ROUNDS: tl.constexpr, SCREEN: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # programmatic dependent launch (kernels/_jit.py): the kernel before must have finished
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    row = logits_ptr + b.to(tl.int64) * stride_b
    offs = tl.arange(0, BLOCK_V)
    temp = tl.load(temp_ptr + b)
    if temp > 0:
        inv_t = tl.load(inv_t_ptr + b)  # computed by torch, as the reference does: the same bits
        step_h = _hash32((tl.load(steps_ptr + b) * 0x27D4EB2F + 0x165667B1) & 0xFFFFFFFF)
        base = _hash32((tl.load(keys_ptr + b) & 0xFFFFFFFF).to(tl.uint32) ^ step_h)
        top_p = tl.load(top_p_ptr + b)
        k = tl.load(top_k_ptr + b)
        k = tl.where(k > 0, k, V)
        # read 1: the race over every token, and the max m; read 2: Z, and the mass and count above s_w
        win, win_s, m = _race(row, offs, V, inv_t, base, float("-inf"), BLOCK_V, SCREEN)
        z, mass, count = _above(row, offs, V, inv_t, m, win_s, BLOCK_V)
        rounds = 1
        # The top token always passes, so this ends; the cap only guards rows of NaN logits.
        go = ((mass / z >= top_p) | (count >= k)) & (rounds < MAX_ROUNDS)
        while go:  # w is not in the kept set, nor is any token with s <= s_w: race again above it
            win, win_s, _ = _race(row, offs, V, inv_t, base, win_s, BLOCK_V, SCREEN)
            _, mass, count = _above(row, offs, V, inv_t, m, win_s, BLOCK_V)
            rounds += 1
            go = ((mass / z >= top_p) | (count >= k)) & (rounds < MAX_ROUNDS)
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


_kernel = lazy_jit(_sample_kernel, helpers=(_hash32, _chunk, _race, _may_beat, _above))


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                  keys: torch.Tensor, steps: torch.Tensor, *, block_v: int = 2048, num_warps: int = 16,
                  num_stages: int | None = None, screen: bool = True, maxnreg: int | None = None) -> torch.Tensor:
    """One token per row -> [B] int64. See `kernels.reference.sample_tokens` for the contract. The
    keywords are launch settings (benchmarks/bench_step_kernels.py tries others); they never change a token.
    screen=False computes every token's exact race value (the kernel of run 112 computed them all, and
    without its loads a chunk ahead); maxnreg caps a thread's registers. For 512 x 49,152 bf16 logits at
    top-p 0.95: 0.107 ms as set, 0.129 for run 112's kernel (run 116, docs/gpu-notes.md)."""
    B, V = logits.shape
    assert logits.dtype in (torch.float32, torch.bfloat16, torch.float16) and logits.stride(1) == 1
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    temperature = temperature.float()
    inv_t = 1.0 / temperature.clamp(min=1e-5)
    _kernel()[(B,)](
        logits, temperature, inv_t, top_p.float(), top_k, keys, steps, out,
        logits.stride(0), V,
        BLOCK_V=block_v, MAX_ROUNDS=64, SCREEN=screen, num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}),
        **({} if maxnreg is None else {"maxnreg": maxnreg}),
        **pdl_args(logits.device),
    )
    return out


__all__ = ["sample_tokens"]
