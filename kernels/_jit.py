"""Shared helper of the kernel files."""

from __future__ import annotations

import triton


def lazy_jit(fn):
    """Apply triton.jit on first use, so TRITON_INTERPRET is read when the kernel is first launched
    (tests set it before that), not when its module happens to be imported. Returns a getter."""
    holder: dict = {}

    def get():
        if "k" not in holder:
            holder["k"] = triton.jit(fn)
        return holder["k"]

    return get
