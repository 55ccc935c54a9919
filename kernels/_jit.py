"""Shared helper of the kernel files."""

from __future__ import annotations

import triton


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
