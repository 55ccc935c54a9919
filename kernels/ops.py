"""Kernel-op dispatcher: `get_ops("torch")` -> the references, `get_ops("triton")` -> the Triton kernels.

Both namespaces carry the four ops of docs/architecture.md with the same signatures:
paged_decode_attention, page_scores, kv_append, prefill_attention. Triton modules are imported only
when asked for, so the torch backend works where Triton cannot run.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

# op name -> module of this package that holds its Triton version
_TRITON_MODULES = {
    "paged_decode_attention": "decode_attention",
    "page_scores": "page_scores",
    "kv_append": "kv_append",
    "prefill_attention": "prefill_attention",
}
OP_NAMES = tuple(_TRITON_MODULES)


def get_ops(backend: str) -> SimpleNamespace:
    """Return a namespace with the four kernel ops of `backend` ("torch" or "triton")."""
    if backend == "torch":
        from . import reference

        return SimpleNamespace(backend="torch", **{n: getattr(reference, n) for n in OP_NAMES})
    if backend == "triton":
        fns = {n: getattr(importlib.import_module(f".{m}", __package__), n) for n, m in _TRITON_MODULES.items()}
        return SimpleNamespace(backend="triton", **fns)
    raise ValueError(f"unknown kernel backend {backend!r} (expected 'torch' or 'triton')")


def get_layer_ops(backend: str) -> SimpleNamespace | None:
    """Fused layer kernels (rms_norm with residual add, apply_rotary) for "triton"; None for "torch"
    (the model's own torch code is then the path, and the reference)."""
    if backend != "triton":
        return None
    from .rmsnorm import rms_norm
    from .rotary import apply_rotary

    return SimpleNamespace(rms_norm=rms_norm, apply_rotary=apply_rotary)
