"""The engine a job runs on: `LLM(...)` from the job's config, or a substitute for tests and benchmarks.

`RAAS_BATCH_ENGINE=module:attr` builds that class instead (tests use `tests/fake_llm.py:FakeLLM`,
the Ray benchmark a random-weight model). A substitute whose constructor lacks a keyword (an older
signature) is built without it while the job leaves that setting at its default; a setting it cannot
take raises TypeError naming the flag.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys

from raas_batch.config import JobConfig

ENGINE_ENV = "RAAS_BATCH_ENGINE"  # "module:attr" of an LLM-compatible class (tests use a fake)


def make_engine(cfg: JobConfig):
    """Build the job's engine (see the module doc)."""
    target = os.environ.get(ENGINE_ENV)
    if target:
        module, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module), attr or "LLM")
    else:
        from raas_batch.llm import LLM as cls
    kwargs = cfg.engine_kwargs()
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return cls(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return cls(**kwargs)
    defaults = JobConfig().engine_kwargs()
    for name in [k for k in kwargs if k not in params]:
        if kwargs[name] != defaults[name]:
            flag = {"policy_options": "kv-policy-options"}.get(name, name.replace("_", "-"))
            raise TypeError(f"{target} does not take {name}={kwargs[name]!r}; leave --{flag} at its default "
                            "with this engine")
        del kwargs[name]
    return cls(**kwargs)


_OOM_MARKERS = ("CUDA out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def out_of_memory_advice(exc: BaseException, cfg: JobConfig, max_num_seqs=None) -> str | None:
    """One sentence naming the knobs, when `exc` is the GPU running out of memory; None otherwise.

    torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same class), or an error whose text says
    an allocation on the GPU failed (a kernel launch's `CUDA error: out of memory`, cuBLAS failing to
    allocate its workspace). Without torch imported no exception can be torch's."""
    torch = sys.modules.get("torch")
    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None),
                              getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if k is not None)
    text = str(exc)
    if not (kinds and isinstance(exc, kinds)) and not any(marker in text for marker in _OOM_MARKERS):
        return None
    seqs = max_num_seqs if max_num_seqs is not None else cfg.max_num_seqs
    first = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
    return (f"the GPU ran out of memory ({first}): lower --max-num-seqs (now {seqs}) or --gpu-memory-utilization "
            f"(now {cfg.gpu_memory_utilization}; what it leaves free holds the activations), then rerun with --resume")
