"""The GPU running out of memory mid-job (run on the GPU machine; skipped elsewhere): the shards in flight
fail at once with a message naming --max-num-seqs and --gpu-memory-utilization, the run stops instead of
hanging or grinding through every other shard, and once memory is back `--resume` completes the job on
the same engine. The CPU twin (torch's error raised by the fake engine) is
tests/test_runner_repair.py::test_out_of_memory_fails_fast_naming_the_knobs."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raas_batch import LLM
from raas_batch.config import resolve
from raas_batch.data.manifest import Manifest
from raas_batch.runner import run_job

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _fill_gpu() -> list[torch.Tensor]:
    """Allocate every byte the GPU has left (from 1 GiB pieces down to 1 MiB ones)."""
    torch.cuda.empty_cache()
    hog, piece = [], 1 << 30
    while piece >= 1 << 20:
        try:
            hog.append(torch.empty(piece, dtype=torch.uint8, device="cuda"))
        except torch.OutOfMemoryError:
            piece //= 2
    return hog


def _run_with_watchdog(cfg, llm, limit_s: float = 300.0):
    """run_job in a thread: a hang fails the test (the job must return), rather than blocking the suite."""
    result: dict = {}

    def target():
        try:
            result["summary"] = run_job(cfg, engine=llm)
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), "the job hung after the GPU ran out of memory"
    if "error" in result:
        raise result["error"]
    return result["summary"]


def test_out_of_memory_fails_the_shards_fast_and_resume_completes(tmp_path):
    from transformers import Qwen2Config

    hf = Qwen2Config(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                     initializer_range=0.2)
    llm = LLM(hf_config=hf, load_format="random", kv_policy="dense", dtype="bf16", device="cuda",
              num_kv_tokens=64 * 1024, max_num_seqs=8, enforce_eager=True)
    gen = torch.Generator().manual_seed(0)
    # Long prompts: a prefill of 8 x 2,000 tokens needs tens of MiB of activations the GPU no longer has.
    ids = [torch.randint(10, 4000, (2000,), generator=gen).tolist() for _ in range(24)]
    src = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(ids))], "prompt": ids}), src)
    out = str(tmp_path / "out")
    settings = {"input": src, "output": out, "shard_size": 4, "seed": 1, "max_new_tokens": 8, "ignore_eos": True,
                "quiet": True, "max_num_seqs": 8, "gpu_memory_utilization": 0.9}

    hog = _fill_gpu()
    try:
        summary = _run_with_watchdog(resolve(settings), llm)
    finally:
        del hog
        torch.cuda.empty_cache()
    assert not summary["complete"]
    failed = summary["failed_shards"]
    assert failed, summary
    for f in failed:
        assert "ran out of memory" in f["error"] and "--max-num-seqs (now 8)" in f["error"]
        assert "--gpu-memory-utilization (now 0.9" in f["error"]
    m = Manifest.load(f"{out}/manifest.json")
    assert sum(s.state == "pending" and s.attempts == 0 for s in m.shards) >= 1  # the run stopped at the error

    summary = _run_with_watchdog(resolve({**settings, "resume": True}), llm)
    assert summary["complete"] and summary["samples"] == 24
