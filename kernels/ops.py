"""Kernel-op dispatcher: `get_ops("torch")` -> the references, `get_ops("cpu")` -> the CPU decode path,
`get_ops("triton")` -> the Triton kernels.

All namespaces carry the ops of docs/architecture.md with the same signatures: paged_decode_attention,
bounds_refresh (RaaS's refresh by the Quest bounds without the attention), window_refresh (the same, run
once per page: kernels/window_refresh.py), page_scores, kv_append,
prefill_attention, and the bounded policies' bookkeeping, bounded_write, bounded_write_append (the write
and the append in one op) and bounded_update, and the sampler, sample_tokens. Triton modules are imported only
when asked for, so the torch backend works where Triton cannot run.
"""

from __future__ import annotations

import functools
import importlib
from types import SimpleNamespace

# op name -> module of this package that holds its Triton version
_TRITON_MODULES = {
    "paged_decode_attention": "decode_attention",
    "bounds_refresh": "decode_attention",
    "window_refresh": "window_refresh",
    "page_scores": "page_scores",
    "kv_append": "kv_append",
    "prefill_attention": "prefill_attention",
    "bounded_write": "bounded_write",
    "bounded_write_append": "kv_append",
    "bounded_update": "bounded_update",
    "sample_tokens": "sample",
}
OP_NAMES = tuple(_TRITON_MODULES)


BACKENDS = ("torch", "cpu", "triton")


def get_ops(backend: str, batch_invariant: bool = False) -> SimpleNamespace:
    """Return a namespace with the kernel ops of `backend`: "torch" (the references: plain, any
    device), "cpu" (the references rewritten as fewer torch ops; may synchronise with the host, so not
    for CUDA graphs) or "triton" (CUDA). batch_invariant (triton): the attention ops whose rows do not
    depend on the rest of the batch (the other backends compute each row on its own already)."""
    if backend in ("torch", "cpu"):
        from . import cpu, reference

        module = reference if backend == "torch" else cpu
        return SimpleNamespace(backend=backend, **{n: getattr(module, n, None) or getattr(reference, n)
                                                   for n in OP_NAMES})
    if backend == "triton":
        fns = {n: getattr(importlib.import_module(f".{m}", __package__), n) for n, m in _TRITON_MODULES.items()}
        if batch_invariant:  # launch settings that depend on the row alone (README "Reproducible rows")
            from .decode_attention import paged_decode_attention_impl

            fns.update(paged_decode_attention=functools.partial(paged_decode_attention_impl, batch_invariant=True),
                       prefill_attention=functools.partial(fns["prefill_attention"], batch_invariant=True))
        return SimpleNamespace(backend="triton", batch_invariant=batch_invariant, **fns)
    raise ValueError(f"attention backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}.")


def get_layer_ops(backend: str, batch_invariant: bool = False) -> SimpleNamespace | None:
    """Fused layer kernels (rms_norm with residual add, apply_rotary, silu_mul) for "triton"; None for "torch"
    (the model's own torch code is then the path, and the reference). batch_invariant adds `matmul`,
    the fixed-tile product the Linear layers then use instead of cuBLAS (kernels/matmul.py)."""
    if backend != "triton":
        return None
    from .rmsnorm import rms_norm
    from .rotary import apply_rotary
    from .silu_mul import silu_mul

    ops = SimpleNamespace(rms_norm=rms_norm, apply_rotary=apply_rotary, silu_mul=silu_mul, matmul=None)
    if batch_invariant:
        from .matmul import matmul

        ops.matmul = matmul
    return ops
