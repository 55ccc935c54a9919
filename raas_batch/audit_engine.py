"""The engine side of the fidelity audit (`--audit-rows`, `raas_batch.audit`): decode the audited rows
again with a dense KV cache beside the job's policy, and score both outputs teacher-forced under both.

    audit_decode(llm, items) -> [AuditDecode]          (LLM.audit_decode calls it)

1. One engine over the job's model (weights shared, not copied) whose policy is
   `PolicyMixture({"policy": a fresh copy of the job's policy, "dense": dense})`. Each item is decoded
   twice with the same prompt, seed and SamplingParams: kv_override ("policy", None) and ("dense", None).
   Per-row seeds and the batch-invariant sampler make the policy's decode the job's own output for
   that row (the audit records whether it is: `raas_batch.audit`).
2. Every sample's two outputs are replayed teacher-forced through both members: along the policy's
   output (the audit's top-1 agreement and KL) and along dense's (the fidelity benchmark's reading).
   A trajectory's dense and policy replays are added side by side, so they step together; at every
   step the full next-token distributions give top-1 agreement (the argmaxes are equal) and the exact
   KL(dense || policy) over the whole vocabulary.

Invariants:
- The job's own engine is left as it was on the CPU; on CUDA its page pool is released first (the audit
  is the job's last step) and the LLM keeps the audit's engine afterwards.
- Scores are of the model's raw next-token distributions (log_softmax of the logits), whatever the
  sampling settings: temperature, top-p and top-k change what is drawn, not what is measured.
"""

from __future__ import annotations

import dataclasses
import gc
import math
from dataclasses import dataclass, field
from typing import Any

from raas_batch.outputs import RequestOutput
from raas_batch.sampling_params import SamplingParams


@dataclass
class AuditItem:
    """One audited input row: `prompt` as the engine takes it, `params` with the row's seed set."""

    key: Any
    prompt: Any
    params: SamplingParams


@dataclass
class PathScore:
    """Teacher-forced comparison along one trajectory: `positions` steps, `agree` of them with equal
    argmax under dense and under the policy, `kl_sum` the sum over steps of KL(dense || policy)."""

    positions: int = 0
    agree: int = 0
    kl_sum: float = 0.0

    @property
    def agreement(self) -> float | None:
        return self.agree / self.positions if self.positions else None

    @property
    def mean_kl(self) -> float | None:
        return self.kl_sum / self.positions if self.positions else None


@dataclass
class AuditDecode:
    """Both decodes of an item, and per sample (index = sample_idx) the scores along each output."""

    key: Any
    policy: RequestOutput
    dense: RequestOutput
    policy_path: list[PathScore] = field(default_factory=list)  # along the policy's output
    dense_path: list[PathScore] = field(default_factory=list)  # along dense's output


POLICY, DENSE = "policy", "dense"


def _audit_engine(llm, items: list[AuditItem]):
    """A PolicyMixture engine over llm's model whose page pool holds `max_num_seqs` of the longest
    sequences the items can make, dense: at most one per audited sample and member, at most the job's
    batch, and on CUDA at most what the free memory holds (after the job's pool is given back)."""
    from raas_batch.engine.engine import Engine
    from raas_batch.llm_engine import LLMEngine
    from raas_batch.policies import PolicyMixture, make_policy

    old = llm.engine
    policy = dataclasses.replace(old.policy)  # same settings, fresh state
    page_size = policy.page_size
    mixture = PolicyMixture({POLICY: policy, DENSE: make_policy("dense", None, page_size)}, page_size)
    core = llm.llm_engine
    longest, num_samples = 1, 0
    for item in items:
        params = item.params.with_defaults(core.generation_defaults)
        num_samples += params.n
        _, ids, error = core.prepare(item.prompt)
        if not error:
            longest = max(longest, min(len(ids) + params.max_new_tokens, core.max_model_len))
    per_seq = math.ceil(longest / page_size) * page_size  # KV tokens of the longest sequence, dense
    max_num_seqs = min(llm.max_num_seqs, 2 * max(1, num_samples))
    backend = getattr(old.runner.ops, "backend", "torch")
    if backend not in ("torch", "cpu", "triton"):
        backend = "torch"
    invariant = getattr(old, "batch_invariant", False)  # the job's own arithmetic, so its rows replay
    if llm.device.type == "cuda":  # the audit is the job's last step: give the job's pool back first
        import torch

        core.engine = None
        del old
        gc.collect()
        torch.cuda.empty_cache()
        max_num_seqs = min(max_num_seqs, llm._default_kv_tokens(page_size, 0.9) // per_seq)
    max_num_seqs = max(2, max_num_seqs - max_num_seqs % 2)  # even: a replay pair steps together
    num_kv_tokens = max_num_seqs * per_seq
    engine = Engine(llm.model, llm.tokenizer, llm.eos_token_ids, mixture, page_size, max_num_seqs, num_kv_tokens,
                    llm.device, llm.dtype, backend, cuda_graphs=False, batch_invariant=invariant)
    audit_core = LLMEngine(engine, llm.tokenizer, core.max_model_len, core.chat_template_kwargs,
                           core.generation_defaults)
    if llm.device.type == "cuda":
        core.engine = engine
    return audit_core, max_num_seqs


def audit_decode(llm, items: list[AuditItem]) -> list[AuditDecode]:
    """Decode every item under the job's policy and dense, then score both outputs (module doc)."""
    import torch

    from raas_batch.engine.scoring import ScoreRequest, run_scored

    core, max_num_seqs = _audit_engine(llm, items)
    outputs: dict[tuple[int, str], RequestOutput] = {}
    for i, item in enumerate(items):
        for member in (POLICY, DENSE):
            core.add_request((i, member), item.prompt, item.params, kv_override=(member, None))
    while core.has_unfinished_requests():
        finished, _ = core.step()
        for key, out in finished:
            outputs[key] = out
    results = [AuditDecode(item.key, outputs[(i, POLICY)], outputs[(i, DENSE)]) for i, item in enumerate(items)]

    # Replays: (result, path, sample) -> a dense and a policy request, side by side.
    pairs: list[tuple[PathScore, list[int], list[int]]] = []  # (score, prompt ids, continuation)
    for res in results:
        for path, source in (("policy_path", res.policy), ("dense_path", res.dense)):
            scores = getattr(res, path)
            for comp in source.outputs:
                score = PathScore()
                scores.append(score)
                if comp.finish_reason != "error" and comp.token_ids:
                    pairs.append((score, list(source.prompt_token_ids), list(comp.token_ids)))
    per_run = max(1, max_num_seqs // 2)
    for start in range(0, len(pairs), per_run):
        chunk = pairs[start:start + per_run]
        requests = []
        for _, prompt, continuation in chunk:
            requests += [ScoreRequest(prompt, continuation_ids=continuation, kv_override=(DENSE, None)),
                         ScoreRequest(prompt, continuation_ids=continuation, kv_override=(POLICY, None))]
        waiting: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}  # (pair, step) -> (member, logprobs)

        def observe(rows, steps, logprobs, chunk=chunk, waiting=waiting):
            for b, (r, t) in enumerate(zip(rows, steps)):
                pair, member = divmod(r, 2)
                other = waiting.pop((pair, t), None)
                if other is None:
                    waiting[(pair, t)] = (member, logprobs[b].detach().float().cpu())
                    continue
                mine = logprobs[b].detach().float().cpu()
                dense, sparse = (mine, other[1]) if member == 0 else (other[1], mine)
                score = chunk[pair][0]
                score.positions += 1
                score.agree += int(dense.argmax() == sparse.argmax())
                # KL(dense || policy); exp(dense) is 0 where dense is -inf, so those terms vanish.
                p = dense.exp()
                score.kl_sum += max(0.0, float((p * (dense - sparse)).nan_to_num(0.0).sum()))

        run_scored(core, requests, observe)
    return results
