"""The engine: one device, one model, one page pool; knows nothing of Ray or files.

    while engine.has_work(): finished = engine.step()

Each step either prefills newly admitted sequences or decodes every running one, then retires the
finished sequences and frees their quota.
"""

from __future__ import annotations

import torch

from raas_batch.engine.model_runner import ModelRunner
from raas_batch.engine.page_pool import PagePool
from raas_batch.engine.scheduler import Scheduler
from raas_batch.engine.sequence import Sequence
from raas_batch.kernels.ops import get_layer_ops, get_ops
from raas_batch.policies.base import KVPolicy


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer, eos_token_ids: list[int], policy: KVPolicy,
                 page_size: int, max_num_seqs: int, num_kv_tokens: int, device: torch.device, dtype: torch.dtype,
                 backend: str = "torch", max_prefill_tokens: int = 8192, cuda_graphs: bool | None = None):
        spec = model.spec
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        num_pages = max(2, num_kv_tokens // page_size + 1)
        self.pool = PagePool(spec.num_layers, num_pages, spec.num_kv_heads, page_size, spec.head_dim, dtype, device)
        # One scratch page and one padding slot (index max_num_seqs) serve the padding rows of
        # CUDA-graph batches; the scheduler never hands either to a sequence.
        scratch_page = self.pool.allocate(1)[0]
        self.policy = policy
        policy.bind(self.pool, max_num_seqs + 1)
        policy.on_admit(max_num_seqs, [scratch_page], 1)
        self.scheduler = Scheduler(self.pool, policy, max_num_seqs, max_prefill_tokens)
        max_pages = -(-spec.max_positions // page_size) + 1
        self.runner = ModelRunner(model, self.pool, policy, get_ops(backend), device, max_num_seqs + 1, max_pages)
        self.runner.set_slot_pages(max_num_seqs, [scratch_page])
        policy.use_ops(self.runner.ops)
        layer_ops = get_layer_ops(backend)
        for module in model.modules():  # fused norm / rotary kernels on the Triton path
            if hasattr(type(module), "kernels"):
                module.kernels = layer_ops
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda"
        if cuda_graphs:
            if not policy.supports_cuda_graphs:
                raise ValueError(f"KV policy {policy.name!r} cannot run in CUDA graphs (it splits each step's "
                                 "batch on the host); turn CUDA graphs off (LLM(enforce_eager=True)).")
            if backend == "cpu":
                raise ValueError("backend 'cpu' synchronises with the host, so it cannot run in CUDA graphs; "
                                 "use backend 'triton' or 'torch', or turn CUDA graphs off (enforce_eager).")
            from raas_batch.engine.cuda_graph import DecodeGraphs

            self.runner.graphs = DecodeGraphs(self.runner, max_num_seqs, max_pages, max_num_seqs, scratch_page)

    def add(self, seq: Sequence) -> None:
        seq.start_tracking(self.tokenizer)
        self.scheduler.add(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> tuple[list[Sequence], int]:
        """One prefill or decode step -> (sequences finished in it, tokens generated in it)."""
        kind, seqs = self.scheduler.schedule()
        tokens = self.runner.prefill(seqs) if kind == "prefill" else self.runner.decode(seqs)
        for seq, token in zip(seqs, tokens):
            seq.append(token, self.eos_token_ids, self.tokenizer)
        finished = self.scheduler.retire_finished()
        for seq in finished:
            seq.peak_kv_tokens, seq.evicted_pages = self.policy.seq_stats(seq.slot, seq.pages)
            self.scheduler.release(seq)
        return finished, len(seqs)
