"""Jobs' engine settings and the request core on a CUDA device (run on the GPU machine; skipped
elsewhere): `max_num_seqs="auto"` from the page pool, the default pool leaving the activations' reserve free
with RaaS's rings of queries, a stream closed early leaves the engine reusable
with CUDA graphs, a streaming job with shards of 1, 3 and 10 rows, and a batch-invariant job whose rows
do not depend on the shard size."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raas_batch import LLM, SamplingParams
from raas_batch.config import resolve
from raas_batch.engine.cuda_graph import BATCH_BUCKETS
from raas_batch.llm import dense_max_num_seqs
from raas_batch.runner import run_job

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def small_llm(policy: str, budget: int | None, **kw) -> LLM:
    from transformers import Qwen2Config

    cfg = Qwen2Config(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                      initializer_range=0.2)
    return LLM(hf_config=cfg, load_format="random", kv_policy=policy, kv_budget=budget, dtype="bf16",
               device="cuda", **kw)


def test_auto_max_num_seqs_fills_the_page_pool():
    llm = small_llm("raas", 256, num_kv_tokens=100 * 256)
    assert llm.max_num_seqs == 100 == llm.engine.scheduler.max_num_seqs
    assert small_llm("raas", 256, num_kv_tokens=10**7).max_num_seqs == BATCH_BUCKETS[-1]
    dense = small_llm("dense", None, num_kv_tokens=64 * 1024)
    assert dense.max_num_seqs == dense_max_num_seqs(dense.device) == dense.engine.scheduler.max_num_seqs
    name = torch.cuda.get_device_properties(dense.device).name
    if "H100" in name or "H200" in name:  # vLLM's default there (the rule on other GPUs: tests/test_runner_flags.py)
        assert dense.max_num_seqs == 1024


def test_the_default_pool_leaves_the_reserve_to_activations():
    """A raas LLM sized by default ("auto" batch, the pool from gpu_memory_utilization): its refresh once a page
    keeps a ring for every slot, and after the pool and the rings are allocated the memory kept for activations
    ((1 - utilization) of the GPU + 4 GiB) is still free, less small per-slot tensors (the rings alone: 67 MB)."""
    util = 0.5
    llm = small_llm("raas", 256, gpu_memory_utilization=util)
    window = llm.engine.runner.window
    assert window is not None and window.ring.shape[1] == llm.max_num_seqs + 1 == BATCH_BUCKETS[-1] + 1
    free, total = torch.cuda.mem_get_info()
    assert free >= (1 - util) * total + 4 * 2**30 - 32 * 2**20, (free, total)
    out = llm.generate({"prompt_token_ids": list(range(100, 140))},
                       SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 40


def test_stream_closed_early_leaves_the_engine_reusable_with_graphs():
    llm = small_llm("raas", 64, num_kv_tokens=64 * 1024, max_num_seqs=4)
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(100, 137))}
    ref = llm.generate(prompt, params)[0].outputs[0].token_ids
    stream = llm.generate_stream((i, {"prompt_token_ids": list(range(200 + i, 230 + i))}, params) for i in range(9))
    next(stream)
    stream.close()
    assert not llm.engine.has_work()
    assert llm.generate(prompt, params)[0].outputs[0].token_ids == ref


def test_streaming_job_on_the_gpu(tmp_path):
    llm = small_llm("raas", 64, num_kv_tokens=64 * 1024, max_num_seqs=8)
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(10, 4000, (int(n),), generator=gen).tolist() for n in (5, 40, 17, 90, 3, 64, 33, 8, 21, 50)]
    src = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(ids))], "prompt": ids}), src)
    for size in (1, 3, 10):
        cfg = resolve({"input": src, "output": str(tmp_path / f"out{size}"), "shard_size": size, "seed": 1,
                       "temperature": 0.8, "max_new_tokens": 24, "ignore_eos": True, "quiet": True})
        summary = run_job(cfg, engine=llm)
        assert summary["complete"] and summary["completion_tokens"] == 240 and summary["max_num_seqs"] == 8
        rows = pq.read_table(os.path.join(tmp_path, f"out{size}", "shards")).to_pylist()
        assert sorted(r["row_idx"] for r in rows) == list(range(10)) and all(r["e2e_s"] > 0 for r in rows)


@pytest.mark.parametrize("policy,budget", [("dense", None), ("raas", 64)])
def test_batch_invariant_job_gives_the_same_shards_for_any_shard_size(tmp_path, policy, budget):
    """`--batch-invariant`: the same 96 seeded rows (ragged prompts, 200 sampled tokens) in shards of 16
    and of 64 give the same tokens row by row (the batches differ: 16 rows at a time, or up to 64)."""
    llm = small_llm(policy, budget, num_kv_tokens=64 * 1024, max_num_seqs=64, batch_invariant=True)
    gen = torch.Generator().manual_seed(4)
    ids = [torch.randint(10, 4000, (int(n),), generator=gen).tolist() for n in torch.randint(3, 200, (96,), generator=gen)]
    src = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(ids))], "prompt": ids}), src)
    core = llm.llm_engine
    step, seen = core.step, {}

    def watched():  # the shards hold text, and this model has no tokenizer: keep each row's tokens
        done, num = step()
        for _, out in done:
            seen[tuple(out.prompt_token_ids)] = [c.token_ids for c in out.outputs]
        return done, num

    core.step = watched
    tokens = {}
    for size in (16, 64):
        seen.clear()
        cfg = resolve({"input": src, "output": str(tmp_path / f"out{size}"), "shard_size": size, "seed": 3,
                       "temperature": 0.9, "top_p": 0.95, "max_new_tokens": 200, "ignore_eos": True, "quiet": True,
                       "kv_policy": policy, "kv_budget": budget, "batch_invariant": True})
        assert run_job(cfg, engine=llm)["complete"]
        tokens[size] = dict(seen)
    assert len(tokens[16]) == 96 and tokens[16] == tokens[64]
