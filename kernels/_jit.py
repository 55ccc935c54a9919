"""Shared helper of the kernel files."""

from __future__ import annotations

import functools
import os

import torch
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

    helpers: plain functions that the kernel calls, directly or through another helper (they may live
    in another module of the package); each is jitted once, at the first use of a kernel that lists it,
    and bound to its name in its own module and in the kernel's, so kernel and helpers run in the same
    mode."""
    holder: dict = {}

    def get():
        if "k" not in holder:
            for helper in helpers:
                # (a helper imported from a module whose kernel was jitted first is already jitted: its function)
                helper = getattr(helper, "fn", helper)
                name = helper.__name__
                jitted = helper.__globals__.get(name)
                if jitted is helper:  # not jitted yet (another kernel may have done it)
                    jitted = helper.__globals__[name] = triton.jit(helper)
                fn.__globals__[name] = jitted
            holder["k"] = triton.jit(fn)
        return holder["k"]

    return get


@functools.cache
def _pdl_device(index: int) -> bool:
    cuda = getattr(getattr(triton.language, "extra", None), "cuda", None)
    return torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(cuda, "gdc_wait")


def pdl_args(device: torch.device) -> dict:
    """Launch keywords for programmatic dependent launch (PDL, sm_90 and later): {"PDL": True,
    "launch_pdl": True} on such a GPU, else {"PDL": False}. Every kernel of this package takes the
    constexpr PDL and, when it is set, waits at its first instruction for the kernel before it in the
    stream to finish (griddepcontrol.wait), so nothing it reads or writes can race with that kernel;
    what the launch attribute buys is that the GPU sets the next kernel's programs up while the one
    before drains, instead of after (bench_step_kernels.py: 1.55 -> 1.02 us a link in a chain of small
    kernels, 0.33 us after a cuBLAS product). CUDA graphs keep the dependency. RAAS_BATCH_PDL=0 turns
    it off; the interpreter and the CPU never use it."""
    if (device.type != "cuda" or interpreting() or os.environ.get("RAAS_BATCH_PDL", "1") == "0"
            or not _pdl_device(device.index if device.index is not None else torch.cuda.current_device())):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}
