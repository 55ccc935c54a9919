"""The decode step's Triton kernels compile for the GPU (an H100 / H200, sm_90) on this CPU machine.

The interpreter (TRITON_INTERPRET=1, the other kernel tests) runs a kernel as numpy code and misses what
only the compiler checks: a name bound in both branches of an `if` on a runtime value must have one
type, constexpr branches must type-check, shapes must be powers of two. Triton's own compiler (front end
to cubin, with the ptxas it ships) needs no GPU, so a kernel that would fail on the device fails here
(run 36: a sampler whose greedy branch rebound `win` as a vector cost a GPU session's call).
Every constexpr combination the engine launches is compiled, with the engine's operand types.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_compile_for_sm90():
    """Compiled in a process of its own: this one runs kernels in the interpreter (conftest), where
    triton.jit gives interpreted functions that the compiler cannot take."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "compiled 16 kernel variants" in proc.stdout, proc.stdout[-2000:]


SM90 = None  # GPUTarget("cuda", 90, 32), set by main()
FLOATS = {"qk_scale_log2", "alpha", "scale"}


def compile_sm90(getter, pointers: dict[str, str], constexprs: dict) -> None:
    """Compile a lazy_jit kernel for sm_90: pointers name -> element type ('bf16', 'i32', ...; every
    other *_ptr is bf16), scalars i32 (fp32 for FLOATS), constexprs by value."""
    fn = getter()
    names = list(inspect.signature(fn.fn).parameters)
    sig = {}
    for name in names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointers.get(name, "bf16")
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    import triton
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=SM90)
    assert compiled.asm["cubin"]


def sampler_variants():
    from raas_batch.kernels import sample

    for dtype in ("bf16", "fp32"):
        yield (sample._kernel, {"logits_ptr": dtype, "temp_ptr": "fp32", "inv_t_ptr": "fp32", "top_p_ptr": "fp32",
                                "top_k_ptr": "i64", "keys_ptr": "i64", "steps_ptr": "i64", "out_ptr": "i64"},
               {"BLOCK_V": 2048, "MAX_ROUNDS": 64})


APPEND_INTS = {"fill_ptr": "i32", "wp_ptr": "i32", "pos_ptr": "i64", "table_ptr": "i32", "slot_ptr": "i64",
               "sparse_pages_ptr": "i64", "window_ptr": "i64", "cur_ptr": "i64", "held_ptr": "i64", "peak_ptr": "i64",
               "evicted_ptr": "i64", "logical_ptr": "i32", "pinned_ptr": "u8", "stamp_ptr": "i64", "mass_ptr": "fp32",
               "cos_ptr": "fp32", "sin_ptr": "fp32"}


def append_variants():
    from raas_batch.kernels import kv_append

    for rope in (False, True):
        for choose, key in ((False, 0), (True, 0), (True, 1), (True, 2)):
            yield (kv_append._kernel, APPEND_INTS,
                   {"D": 128, "BLOCK_D": 128, "ROPE": rope, "G": 6, "GP": 8, "HALF": 64, "BLOCK_HALF": 64,
                    "CHOOSE": choose, "BLOCK_W": 128, "KEY": key, "STAMP_ON_WRITE": True})


def attention_variants():
    from raas_batch.kernels import decode_attention

    ptrs = {"ids_ptr": "i32", "fill_ptr": "i32", "npages_ptr": "i32", "acc_ptr": "fp32", "m_ptr": "fp32",
            "l_ptr": "fp32", "lse_ptr": "fp32", "bounds_ptr": "fp32"}
    for bounds, in_loop, mass, direct in ((True, True, False, True), (True, False, False, True),
                                          (False, True, False, True), (False, True, True, False),
                                          (True, True, True, False), (True, True, False, False)):
        yield (decode_attention._stage1, ptrs,
               {"HQ": 12, "HKV": 2, "G": 6, "GP": 16, "D": 128, "BLOCK_D": 128, "BLOCK_P": 16, "PPI": 4,
                "RETURN_MASS": mass, "DOT_PREC": "tf32", "DOT_F32": False, "HAS_NUM_PAGES": False,
                "DIRECT": direct, "RETURN_BOUNDS": bounds, "BOUNDS_IN_LOOP": in_loop})


def main() -> int:
    global SM90
    import triton  # noqa: F401  (a process without TRITON_INTERPRET: real JIT functions)
    from triton.backends.compiler import GPUTarget

    SM90 = GPUTarget("cuda", 90, 32)
    n = 0
    for variants in (sampler_variants, append_variants, attention_variants):
        for getter, pointers, constexprs in variants():
            compile_sm90(getter, pointers, constexprs)
            n += 1
    print(f"compiled {n} kernel variants for sm_90")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
