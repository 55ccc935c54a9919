"""Attention over the paged KV cache, driven by the step's metadata (raas_batch.engine.step_context).

In prefill the layer writes the prompt's keys and values into their pages and attends causally
within each prompt; in decode the KV policy picks the page to write and the pages to read, and the
kernel reads only those:

    append (write_pages + kv_append) -> read_pages -> paged_decode_attention -> after_attention

(or the policy's `attention_refresh` handed to paged_decode_attention, which runs it: RaaS's refresh)

(the bounded policies' append is one kernel on the Triton backend: kernels/kv_append.py).
"""

from __future__ import annotations

import torch

from raas_batch.engine.step_context import get_context
from raas_batch.kernels.reference import prefill_page_mass


def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           rotary: tuple | None = None) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D]. q and k come rotated (RoPE), or unrotated with
    rotary = (RotaryEmbedding, positions [T]): a Triton decode step then rotates them inside its append
    kernel (kernels/kv_append.py: q in place, k on its way to the cache); elsewhere they are rotated
    here first."""
    ctx = get_context()
    pool, ops = ctx.pool, ctx.ops
    policy = ctx.policy
    triton_ops = getattr(ops, "backend", "torch") == "triton"
    if rotary is not None and (ctx.is_prefill or not triton_ops):
        q, k = rotary[0](rotary[1], q, k)
        rotary = None
    # Key bounds cost ~9 small ops per layer on the CPU and nothing in Triton's fused append: skipped on
    # the torch backends when no policy reads them.
    keep_bounds = policy.uses_key_bounds or triton_ops
    if ctx.is_prefill:
        pool.write_prefill(layer, k, v, ctx.prefill, bounds=keep_bounds)
        if policy.needs_prefill_mass:
            # H2O scores a page by the attention it has received: the prompt's own queries count too.
            # [M, Hkv] in PrefillPages.pages order (written after write_prefill, which leaves mass alone).
            pool.mass[layer, ctx.prefill.pages] = prefill_page_mass(q, k, ctx.cu_seqlens, scale, pool.page_size)
        # the longest prompt from the host: the kernel would otherwise read it back (a host sync every layer)
        return ops.prefill_attention(q, k, v, ctx.cu_seqlens, scale, max_seqlen=ctx.max_seqlen or None)
    dec = ctx.decode
    k_cache, v_cache, kmin, kmax, fill = pool.layer_views[layer]
    if not keep_bounds:
        kmin = kmax = None
    rope = None if rotary is None else (q, *rotary[0].tables(q.device), rotary[1])
    policy.append(layer, dec, k, v, bounds=keep_bounds, rope=rope)  # the page, then the token (and RoPE)
    page_ids = policy.read_pages(layer, q, dec)  # [B, Hkv, S]
    limit = policy.read_limit(layer, dec)  # [B] leading entries that can hold tokens, or None
    # RaaS ranks pages by their Quest bounds: the kernel computes them from kmin / kmax while it reads
    # the pages (1/page_size more bytes), instead of a scoring kernel per layer.
    bounds = (kmin, kmax) if policy.needs_bounds and kmin is not None else None
    # The policy's update after attention (RaaS's refresh), given to the op when the values it reads come
    # out of this call: the Triton kernel runs it in the program that has them.
    refresh = policy.attention_refresh(layer, dec)
    if refresh is not None and not (policy.needs_mass if refresh.on_mass else bounds is not None):
        refresh = None  # its values do not come out of this call: after_attention runs it
    if ctx.side is not None and refresh is not None and not refresh.on_mass and not policy.needs_mass:
        # The refresh by the bounds on the side stream (CUDA; RAAS_BATCH_REFRESH_STREAM=0 keeps it inside
        # the attention's program): it waits for the append only and runs beside this attention, which then
        # reads no bounds; nothing in this step reads the stamps it writes (the next step's page choice does,
        # after the join). The same bounds and stamps as inside the program (ops.bounds_refresh). The fixed
        # 1.5B job's decode gained 0.75-0.9% (runs 71-72, docs/gpu-notes.md) and the 7B step 1.8% (run 75);
        # a layer of attention and products alone was 0.9% slower (run 73), so (inferred) the gain comes from
        # the step's other kernels and the attention's last wave leaving SMs to the bounds pass.
        ctx.side.fork()
        out = ops.paged_decode_attention(q, k_cache, v_cache, page_ids, fill, scale, num_pages=limit)
        if ctx.window is not None:  # top_half, once a page (the runner keeps a window for that rule only)
            ctx.side.run(ops.window_refresh, q, kmin, kmax, page_ids, fill, refresh, limit, ctx.window.ring[layer],
                         ctx.window.first_pos)
        else:
            ctx.side.run(ops.bounds_refresh, q, kmin, kmax, page_ids, fill, refresh, limit)
        return out
    result = ops.paged_decode_attention(q, k_cache, v_cache, page_ids, fill, scale, return_mass=policy.needs_mass,
                                        num_pages=limit, key_bounds=bounds, refresh=refresh)
    if not isinstance(result, tuple):
        result = (result,)
    if refresh is None:
        mass = result[1] if policy.needs_mass else None
        scores = result[-1] if bounds is not None else None
        policy.after_attention(layer, q, dec, page_ids, mass, scores)
    return result[0]
