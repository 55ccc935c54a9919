"""The Triton kernels compile for the GPU (an H100 / H200, sm_90) on this CPU machine.

The interpreter (TRITON_INTERPRET=1, the other kernel tests) runs a kernel as numpy code and misses what
only the compiler checks: a name bound in both branches of an `if` on a runtime value must have one
type, constexpr branches must type-check, shapes must be powers of two. Triton's own compiler (front end
to cubin, with the ptxas it ships) needs no GPU, so a kernel that would fail on the device fails here
(run 36: a sampler whose greedy branch rebound `win` as a vector cost a GPU session's call).
The decode step's kernels are compiled in every constexpr combination the engine launches; the others
(norms, rotary, prefill, the policies' bookkeeping, the batch-invariant product) at the engine's
settings. Operand types are the engine's.
"""

from __future__ import annotations

import inspect
import json
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
    assert "kernel variants for sm_90" in proc.stdout, proc.stdout[-2000:]


SM90 = None  # GPUTarget("cuda", 90, 32), set by main()
FLOATS = {"qk_scale_log2", "alpha", "scale", "eps", "refresh_alpha", "refresh_scale"}
OPTIONS = ("num_warps", "num_stages")  # launch options, given with the constexprs


def compile_sm90(getter, pointers: dict[str, str], constexprs: dict) -> str:
    """Compile a lazy_jit kernel for sm_90: pointers name -> element type ('bf16', 'i32', ...; every
    other *_ptr is bf16), scalars i32 (fp32 for FLOATS), constexprs by value (num_warps / num_stages
    among them are the launch's options)."""
    fn = getter()
    options = {k: constexprs[k] for k in OPTIONS if k in constexprs}
    constexprs = {k: v for k, v in constexprs.items() if k not in OPTIONS}
    params = inspect.signature(fn.fn).parameters
    names = list(params)
    # a constexpr with a default (MAIN of decode_attention's stage 1): its default unless given
    constexprs = {**{n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty},
                  **constexprs}
    assert "PDL" in names, f"{fn.fn.__name__}: every kernel takes PDL and waits on it (kernels/_jit.py)"
    # as the engine launches them on an H100 / H200: with programmatic dependent launch
    constexprs, options = {"PDL": True, **constexprs}, {**options, "launch_pdl": True}
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

    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=SM90, options=options)
    assert compiled.asm["cubin"]
    return compiled.asm["ptx"]


def ptx_fingerprint(ptx: str) -> str:
    """The PTX's sha256 without its line tables (.loc / .file lines, comments, labels, debug sections), which
    follow the source's line numbers: equal before and after a refactor that changes no instruction."""
    import hashlib

    body = ptx.split(".section\t.debug")[0]
    kept = [line for line in body.splitlines() if not line.strip().startswith((".loc", ".file", "$L__", "//"))]
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()[:16]


def sampler_variants():
    from raas_batch.kernels import sample

    for dtype, screen in (("bf16", True), ("fp32", True), ("bf16", False)):
        yield (sample._kernel, {"logits_ptr": dtype, "temp_ptr": "fp32", "inv_t_ptr": "fp32", "top_p_ptr": "fp32",
                                "top_k_ptr": "i64", "keys_ptr": "i64", "steps_ptr": "i64", "out_ptr": "i64"},
               {"BLOCK_V": 2048, "MAX_ROUNDS": 64, "SCREEN": screen, "num_warps": 16})


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
                    "CHOOSE": choose, "BLOCK_W": 128, "KEY": key, "STAMP_ON_WRITE": True, "num_warps": 1})


def attention_variants():
    from raas_batch.kernels import decode_attention

    ptrs = {"ids_ptr": "i32", "fill_ptr": "i32", "npages_ptr": "i32", "acc_ptr": "fp32", "m_ptr": "fp32",
            "l_ptr": "fp32", "lse_ptr": "fp32", "bounds_ptr": "fp32", "cur_ptr": "i64", "slot_ptr": "i64",
            "pos_ptr": "i64", "top_ptr": "i64", "pinned_ptr": "u8", "stamp_ptr": "i64"}
    no_refresh = {"REFRESH": False, "RULE": 0, "REFRESH_PINNED": False, "BLOCK_S": 16}
    # (bounds, mass, direct, refresh settings): the last three are RaaS's refresh run in the program
    for bounds, mass, direct, refresh in (
            (True, False, True, no_refresh), (False, False, True, no_refresh), (False, True, False, no_refresh),
            (True, True, False, no_refresh), (True, False, False, no_refresh),
            (True, False, True, {"REFRESH": True, "RULE": 0, "REFRESH_PINNED": False, "BLOCK_S": 64}),
            (True, False, True, {"REFRESH": True, "RULE": 1, "REFRESH_PINNED": True, "BLOCK_S": 128}),
            (True, True, False, {"REFRESH": True, "RULE": 0, "REFRESH_PINNED": True, "BLOCK_S": 64})):
        # stagger: the bounds pass first on even rows; the bounds pass's pages a block (32 the engine's, the
        # others bench_step_kernels.py's)
        settings = [(stagger, 32, False) for stagger in ((False, True) if bounds else (False,))]
        if bounds and direct and refresh["REFRESH"]:
            settings += [(True, 16, False), (True, 64, False), (True, 16, True)]
        for stagger, bounds_pages, k_fill_mask in settings:
            yield (decode_attention._stage1, ptrs,
                   {"HQ": 12, "HKV": 2, "G": 6, "GP": 16, "D": 128, "BLOCK_D": 128, "BLOCK_P": 16, "PPI": 4,
                    "RETURN_MASS": mass, "DOT_PREC": "tf32", "DOT_F32": False, "HAS_NUM_PAGES": False,
                    "DIRECT": direct, "RETURN_BOUNDS": bounds, **refresh, "STAGGER": stagger,
                    "BOUNDS_PAGES": bounds_pages, "K_FILL_MASK": k_fill_mask, "num_warps": 2, "num_stages": 2})


def bounds_refresh_variants():
    """Stage 1 with its page loop compiled out: RaaS's refresh alone (decode_attention.bounds_refresh)."""
    from raas_batch.kernels import decode_attention

    ptrs = {"ids_ptr": "i32", "fill_ptr": "i32", "npages_ptr": "i32", "acc_ptr": "fp32", "m_ptr": "fp32",
            "l_ptr": "fp32", "lse_ptr": "fp32", "out_ptr": "fp32", "bounds_ptr": "fp32", "cur_ptr": "i64",
            "slot_ptr": "i64", "pos_ptr": "i64", "top_ptr": "i64", "pinned_ptr": "u8", "stamp_ptr": "i64"}
    for rule, block_s in ((0, 128), (1, 64)):
        yield (decode_attention._stage1, ptrs,
               {"HQ": 12, "HKV": 2, "G": 6, "GP": 16, "D": 128, "BLOCK_D": 128, "BLOCK_P": 16, "PPI": 1,
                "RETURN_MASS": False, "DOT_PREC": "tf32", "DOT_F32": False, "HAS_NUM_PAGES": False, "DIRECT": True,
                "RETURN_BOUNDS": True, "REFRESH": True, "RULE": rule, "REFRESH_PINNED": False, "BLOCK_S": block_s,
                "STAGGER": False, "BOUNDS_PAGES": 32, "K_FILL_MASK": False, "MAIN": False, "num_warps": 2,
                "num_stages": 2})


def window_refresh_variants():
    """RaaS's top_half refresh once per page (kernels/window_refresh.py), with and without pinned pages in it."""
    from raas_batch.kernels import window_refresh

    ptrs = {"ids_ptr": "i32", "fill_ptr": "i32", "npages_ptr": "i32", "first_ptr": "i64", "bounds_ptr": "fp32",
            "cur_ptr": "i64", "slot_ptr": "i64", "pos_ptr": "i64", "top_ptr": "i64", "pinned_ptr": "u8",
            "stamp_ptr": "i64"}
    for refresh_pinned, has_num_pages in ((False, True), (True, False)):
        yield (window_refresh._kernel, ptrs,
               {"P": 16, "HKV": 2, "G": 6, "GW": 8, "GP": 64, "D": 128, "BLOCK_D": 128, "HAS_NUM_PAGES": has_num_pages,
                "DOT_PREC": "tf32", "DOT_F32": False, "RULE": 0, "REFRESH_PINNED": refresh_pinned, "BLOCK_S": 64,
                "BOUNDS_PAGES": 32, "PREFETCH": True, "num_warps": 4, "num_stages": 2})


def other_variants():
    """The rest of the kernels, at the shapes and settings the engine launches them with."""
    from raas_batch.kernels import (
        bounded_update,
        bounded_write,
        decode_attention,
        matmul,
        page_scores,
        prefill_attention,
        rmsnorm,
        rotary,
        silu_mul,
    )

    for has_res in (False, True):
        yield rmsnorm._kernel, {"w_ptr": "bf16"}, {"HAS_RES": has_res, "BLOCK": 2048}
    yield silu_mul._kernel, {}, {"BLOCK": 1024}
    yield rotary._kernel, {"cos_ptr": "fp32", "sin_ptr": "fp32", "pos_ptr": "i64"}, {"HALF": 64, "BLOCK": 64, "num_warps": 1}
    meta = {"cur_ptr": "i64", "slot_ptr": "i64", "pos_ptr": "i64", "top_ptr": "i64", "fill_ptr": "i32",
            "pinned_ptr": "u8", "stamp_ptr": "i64", "mass_ptr": "fp32", "ids_ptr": "i32", "val_ptr": "fp32"}
    for rule in range(4):
        for refresh_pinned in (False, True):
            yield (bounded_update._kernel, meta,
                   {"RULE": rule, "REFRESH_PINNED": refresh_pinned, "BLOCK_S": 128, "num_warps": 4})
    for key in range(3):
        yield (bounded_write._kernel, dict(APPEND_INTS, out_ptr="i32"),
               {"HKV": 2, "BLOCK_W": 128, "KEY": key, "STAMP_ON_WRITE": key == 0, "num_warps": 1})
    yield (page_scores._kernel, {"ids_ptr": "i32", "out_ptr": "fp32"},
           {"HKV": 2, "G": 6, "D": 128, "BLOCK_D": 128, "BLOCK_S": 32})
    for block_m, block_n in ((64, 32), (16, 16)):
        yield (prefill_attention._kernel, {"cu_ptr": "i32"},
               {"G": 6, "D": 128, "BLOCK_D": 128, "BLOCK_M": block_m, "BLOCK_N": block_n, "DOT_PREC": "tf32",
                "DOT_F32": False})
    for mass in (False, True):
        yield (decode_attention._stage2, {"acc_ptr": "fp32", "m_ptr": "fp32", "l_ptr": "fp32", "lse_ptr": "fp32",
                                          "mass_ptr": "fp32", "npages_ptr": "i32"},
               {"HQ": 12, "HKV": 2, "G": 6, "GP": 16, "D": 128, "BLOCK_D": 128, "NSP": 4, "BLOCK_S": 128 if mass else 16,
                "RETURN_MASS": mass, "HAS_NUM_PAGES": True})
    for cfg in {matmul.config_for(m, 1536, 8960) for m in (1, 64, 512)} | {matmul.config_for(512, 2048, 1536)}:
        for partial in (False, True):
            yield (matmul._kernel, {"b_ptr": "bf16", "y_ptr": "fp32" if partial else "bf16"},
                   {"HAS_BIAS": not partial, "PARTIAL": partial, "UPCAST": False, "DOT_PREC": "tf32",
                    "BM": cfg.bm, "BN": cfg.bn, "BK": cfg.bk, "num_warps": cfg.warps, "num_stages": cfg.stages})
    yield matmul._reduce, {"p_ptr": "fp32"}, {"SPLIT": 4, "HAS_BIAS": True, "BM": 32, "BN": 128}


def main() -> int:
    global SM90
    import triton  # noqa: F401  (a process without TRITON_INTERPRET: real JIT functions)
    from triton.backends.compiler import GPUTarget

    SM90 = GPUTarget("cuda", 90, 32)
    n, fingerprints = 0, {}
    for variants in (sampler_variants, append_variants, attention_variants, bounds_refresh_variants,
                     window_refresh_variants, other_variants):
        for getter, pointers, constexprs in variants():
            ptx = compile_sm90(getter, pointers, constexprs)
            fingerprints[f"{n:02d} {getter().fn.__name__}"] = ptx_fingerprint(ptx)
            n += 1
    print(f"compiled {n} kernel variants for sm_90")
    if len(sys.argv) > 1:  # `python tests/test_kernels_compile.py FILE.json`: each variant's PTX fingerprint,
        with open(sys.argv[1], "w") as f:  # to compare two versions of the kernels (docs/gpu-notes.md)
            json.dump(fingerprints, f, indent=0)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
