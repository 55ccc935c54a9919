"""The engine: one device, one model, one page pool; knows nothing of Ray or files.

    while engine.has_work(): finished, num_tokens = engine.step()

Each step either prefills newly admitted sequences or decodes every running one, then retires the
finished sequences and frees their quota.

Overlapped decoding (`overlap`, on by default on CUDA; vLLM's async scheduling, SGLang's overlap
scheduler): a decode step is launched before the host records the previous one's tokens, so the
host's share of a step (appending tokens, stop checks, detokenisation, retirement, building the next
step) runs while the device computes. The device does not wait for the host: each step reads its
rows' last tokens from the device (raas_batch/engine/model_runner.py). The cost is that a sequence
that stops (EOS, a stop token or string) is seen one step late: it decodes one more token, which is
discarded (its KV pages are its own until it is retired, and its statistics are those of the step
it stopped in). Steps run in lock step instead (record, then launch) whenever a running sequence
may have its next token replaced by the host (thinking budget, teacher forcing) or the runner has a
logits hook. Both orders give the same tokens (tests/test_engine_overlap.py).

    host:   launch t+1 | record t      | launch t+2 | record t+1 | ...
    device:    [ step t      ][ step t+1             ][ step t+2  ...
"""

from __future__ import annotations

import os

import torch

from raas_batch.engine.model_runner import DecodeLaunch, ModelRunner
from raas_batch.engine.page_pool import PagePool
from raas_batch.engine.scheduler import Scheduler
from raas_batch.engine.sequence import Sequence
from raas_batch.kernels.ops import get_layer_ops, get_ops
from raas_batch.policies.base import KVPolicy

# A prefill step of a few rows costs about this many decode steps on the GPU: the scheduler's refill rule. 4 was
# the best of 1, 4 and 16 on the 2,048-row job (run 124, docs/gpu-notes.md), when such a step took ~30 ms against
# 5-9 ms a decode step on an H200 at the 1.5B shape. Since run 132 it takes 17-21 ms; measured again at the default
# batch (run 135), R = 2, 4 and 8 gave the job within 0.9% of each other (prefill ~1.5 s of 86 s), so 4 stays.
DEFAULT_PREFILL_COST_STEPS = 4.0
PREFILL_COST_ENV = "RAAS_BATCH_PREFILL_COST_STEPS"  # the default's override (benchmarks' A/B runs)


def default_prefill_cost_steps(device: torch.device) -> float:
    """$RAAS_BATCH_PREFILL_COST_STEPS if set, else DEFAULT_PREFILL_COST_STEPS on CUDA and 0 (every row admitted
    as soon as it fits, as before) on the CPU."""
    value = os.environ.get(PREFILL_COST_ENV)
    if value is not None:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{PREFILL_COST_ENV}={value!r} is not a number of decode steps (e.g. 4; 0: admit at "
                             "once)") from None
    return DEFAULT_PREFILL_COST_STEPS if device.type == "cuda" else 0.0


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer, eos_token_ids: list[int], policy: KVPolicy,
                 page_size: int, max_num_seqs: int, num_kv_tokens: int, device: torch.device, dtype: torch.dtype,
                 backend: str = "torch", max_prefill_tokens: int = 8192, cuda_graphs: bool | None = None,
                 overlap: bool | None = None, share_prompts: bool = True, batch_invariant: bool = False,
                 prefill_cost_steps: float | None = None):
        spec = model.spec
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        num_pages = max(2, num_kv_tokens // page_size + 1)
        self.pool = PagePool(spec.num_layers, num_pages, spec.num_kv_heads, page_size, spec.head_dim, dtype, device)
        self.pool.zero_on_admit = backend == "cpu"  # the only backend that reads V past a page's fill
        # One scratch page and one padding slot (index max_num_seqs) serve the padding rows of
        # CUDA-graph batches; the scheduler never hands either to a sequence.
        scratch_page = self.pool.allocate(1)[0]
        self.policy = policy
        policy.bind(self.pool, max_num_seqs + 1)
        policy.on_admit(max_num_seqs, [scratch_page], 1)
        if prefill_cost_steps is None:  # refills in groups on CUDA (engine/scheduler.py); the CPU path as it was
            prefill_cost_steps = default_prefill_cost_steps(device)
        self.scheduler = Scheduler(self.pool, policy, max_num_seqs, max_prefill_tokens, prefill_cost_steps)
        max_pages = -(-spec.max_positions // page_size) + 1
        self.runner = ModelRunner(model, self.pool, policy, get_ops(backend, batch_invariant), device,
                                  max_num_seqs + 1, max_pages)
        self.runner.set_slot_pages(max_num_seqs, [scratch_page])
        policy.use_ops(self.runner.ops)
        # batch_invariant (Triton): products and attention whose rows do not depend on the batch
        # (README "Reproducible rows"); the torch and cpu backends are left as they are
        self.batch_invariant = batch_invariant and backend == "triton"
        layer_ops = get_layer_ops(backend, self.batch_invariant)
        for module in model.modules():  # fused norm / rotary kernels on the Triton path
            if hasattr(type(module), "kernels"):
                module.kernels = layer_ops
        self.overlap = device.type == "cuda" if overlap is None else overlap
        # the n samples of a request prefill once and share their prompt pages (engine/sequence.py
        # PromptGroup); LLMEngine reads this when it adds a request
        self.share_prompts = share_prompts
        self.in_flight: DecodeLaunch | None = None  # a decode step launched and not yet recorded
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
        if seq.params.unset():  # a caller below LLM (benchmarks, tests): fallback values for unset fields
            seq.params = seq.params.with_defaults()
        seq.start_tracking(self.tokenizer)
        self.scheduler.add(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.in_flight is not None

    def step(self) -> tuple[list[Sequence], int]:
        """One prefill or decode step -> (sequences finished in it, tokens recorded in it)."""
        kind, seqs = self.scheduler.schedule()
        num_tokens = 0
        if kind == "prefill":
            num_tokens += self._record_in_flight()
            tokens = self.runner.prefill(seqs)
            self.scheduler.prefilled(seqs)
            for seq, token in zip(seqs, tokens):
                seq.append(token, self.eos_token_ids, self.tokenizer)
            self._recorded(seqs, tokens, None)
            num_tokens += len(seqs)
        else:
            rows = [s for s in seqs if s.can_decode]
            overlap = self.overlap and self.runner.logits_hook is None and not any(s.host_picks_next for s in rows)
            if not overlap:
                num_tokens += self._record_in_flight()
                rows = [s for s in rows if s.can_decode]
            launch = None
            if rows:
                launch = self.runner.launch_decode(rows, [s.num_tokens - 1 + s.num_in_flight for s in rows])
                for seq in rows:
                    seq.num_in_flight += 1
            num_tokens += self._record_in_flight()  # the previous step, while this one runs
            self.in_flight = launch
            if not overlap or (launch is not None and all(s.finished for s in launch.seqs)):
                num_tokens += self._record_in_flight()  # (nothing in it will be kept: clear it now)
        finished = self.scheduler.retire_finished()
        for seq in finished:
            self.scheduler.release(seq)
        return finished, num_tokens

    def abort(self) -> None:
        """Drop every sequence (after an engine error, or a stream closed early): wait for a decode step
        in flight (its buffers are reused by the next step; its tokens are discarded) and release every
        running sequence's slot and pages. The engine is then idle and reusable."""
        launch, self.in_flight = self.in_flight, None
        if launch is not None:
            try:
                launch.wait()
            except Exception:  # noqa: BLE001, S110 - the engine failed: its tokens are of no use
                pass
        self.scheduler.abort()

    def _record_in_flight(self) -> int:
        """Wait for the in-flight decode step and record its tokens -> tokens recorded."""
        launch, self.in_flight = self.in_flight, None
        if launch is None:
            return 0
        tokens, stats = launch.wait()
        recorded = []
        for seq, token in zip(launch.seqs, tokens):
            seq.num_in_flight -= 1
            if seq.finished:  # it stopped in the step before: this token is discarded
                continue
            seq.append(token, self.eos_token_ids, self.tokenizer)
            recorded.append((seq, token))
        self._recorded([s for s, _ in recorded], [t for _, t in recorded], stats)
        return len(recorded)

    def _recorded(self, seqs: list[Sequence], tokens: list[int], stats) -> None:
        """After the host appended a step's tokens to `seqs` (each recorded once, unfinished before):
        - a sequence that stopped in this step gets peak_kv_tokens / evicted_pages as of this step: from
          the policy's counters copied with the step's tokens (`stats`), or, when the policy evicts
          nothing (stats None or -1 for the slot, and every prefill), every token written to the cache;
        - a sequence whose recorded token is not the sampled one (a forced token) gets the device's copy
          of its last token overwritten before the next step reads it."""
        changed = []
        for seq, token in zip(seqs, tokens):
            if seq.finished:
                if stats is not None and int(stats[0, seq.slot]) >= 0:
                    seq.peak_kv_tokens, seq.evicted_pages = int(stats[0, seq.slot]), int(stats[1, seq.slot])
                else:
                    seq.peak_kv_tokens, seq.evicted_pages = seq.num_tokens - 1, 0
            elif seq.last_token != token:
                changed.append(seq)
        if changed:
            self.runner.set_last_tokens(changed)
