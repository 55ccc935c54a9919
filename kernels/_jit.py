"""Shared helper of the kernel files."""

from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1: the CPU tests). The
    interpreter multiplies bf16 dot operands as their raw bits, so kernels upcast them there."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older ones read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def lazy_jit(fn, helpers=()):
    """Apply triton.jit on first use, so TRITON_INTERPRET is read when the kernel is first launched
    (tests set it before that), not when its module happens to be imported. Returns a getter.

    helpers: plain functions of the same module that the kernel calls; they are jitted at the same
    moment and bound to their names in the module, so kernel and helpers run in the same mode."""
    holder: dict = {}

    def get():
        if "k" not in holder:
            for helper in helpers:
                fn.__globals__[helper.__name__] = triton.jit(helper)
            holder["k"] = triton.jit(fn)
        return holder["k"]

    return get
