"""The Python API: `LLM(...).generate(prompts, params)`, vLLM-like."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC

import torch

from raas_batch.engine.engine import Engine
from raas_batch.engine.sequence import Sequence
from raas_batch.models.loader import load_model
from raas_batch.outputs import CompletionOutput, RequestOutput
from raas_batch.policies import make_policy
from raas_batch.reasoning import count_reasoning_tokens, split_reasoning
from raas_batch.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is unknown; choose one of auto, bf16, fp16, fp32.")
    return _DTYPES[dtype]


CPU_MAX_NUM_SEQS = 8  # a CPU decodes a few sequences at a time: more only adds latency
DENSE_MAX_NUM_SEQS = 256  # vLLM's default on a GPU, for policies whose memory grows with the sequence


def auto_max_num_seqs(device: torch.device, policy, kv_budget: int | None, page_size: int,
                      num_kv_tokens: int) -> int:
    """`max_num_seqs="auto"`: the batch the page pool can hold.

    On CUDA a bounded policy (RaaS, H2O, StreamingLLM: a sequence's quota is about kv_budget /
    page_size pages whatever its length) gets as many sequences as the pool holds at that quota, capped
    at the largest CUDA-graph batch bucket; dense and Quest (memory grows with the sequence) get
    vLLM's 256 (as does a bounded policy with dense layers). The CPU gets 8.
    """
    if device.type != "cuda":
        return CPU_MAX_NUM_SEQS
    from raas_batch.policies.bounded import BoundedPolicy

    if not isinstance(policy, BoundedPolicy) or not kv_budget or policy.dense_layers > 0:
        return DENSE_MAX_NUM_SEQS
    from raas_batch.engine.cuda_graph import BATCH_BUCKETS

    pages_per_seq = max(1, kv_budget // page_size)
    return max(1, min(BATCH_BUCKETS[-1], (num_kv_tokens // page_size) // pages_per_seq))


class LLM:
    """Loads a model once and generates for batches of prompts.

    model: None (the embedded SmolLM2-135M-Instruct), a hub id, a local directory or a .gguf file.
    kv_policy / kv_budget / page_size: the KV cache (`raas_batch.policies`); kv_budget in tokens.
    max_num_seqs: sequences decoded at once, or "auto" (`auto_max_num_seqs`). num_kv_tokens: the page
    pool's size in tokens (default: on the GPU what gpu_memory_utilization leaves free, on the CPU 32K
    tokens). max_model_len: the context in tokens (prompt + generated; default and upper bound: the
    model's). On CUDA, decode steps run as captured CUDA graphs unless enforce_eager. backend:
    "triton" (default on CUDA), "cpu" (default on the CPU: kernels/cpu.py) or "torch" (the plain
    references of kernels/reference.py, any device).
    """

    def __init__(self, model: str | None = None, kv_policy: str = "dense", kv_budget: int | None = None,
                 page_size: int = 16, max_num_seqs: int | str = "auto", dtype=None, device=None,
                 chat_template_kwargs: dict | None = None, num_kv_tokens: int | None = None,
                 backend: str | None = None, policy_options: dict | None = None, load_format: str = "auto",
                 hf_config=None, max_prefill_tokens: int = 8192, gpu_memory_utilization: float = 0.9,
                 enforce_eager: bool = False, max_model_len: int | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(dtype, self.device)
        loaded = load_model(model, self.dtype, self.device, load_format=load_format, hf_config=hf_config)
        self.model, self.tokenizer, self.hf_config = loaded.model, loaded.tokenizer, loaded.hf_config
        self.model_name = loaded.name
        self.eos_token_ids = loaded.eos_token_ids
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.kv_policy, self.kv_budget, self.page_size = kv_policy, kv_budget, page_size
        self.max_model_len = self.model.spec.max_positions
        if max_model_len is not None:
            if not 0 < max_model_len <= self.max_model_len:
                raise ValueError(f"max_model_len {max_model_len} is outside the model's context of "
                                 f"{self.max_model_len} tokens; pass at most {self.max_model_len}.")
            self.max_model_len = max_model_len
        policy = make_policy(kv_policy, kv_budget, page_size, **(policy_options or {}))
        if num_kv_tokens is None:
            num_kv_tokens = self._default_kv_tokens(page_size, gpu_memory_utilization)
        if backend is None:
            backend = "triton" if self.device.type == "cuda" else "cpu"
        if max_num_seqs in (None, "auto"):
            max_num_seqs = auto_max_num_seqs(self.device, policy, kv_budget, page_size, num_kv_tokens)
        self.max_num_seqs = int(max_num_seqs)
        self.engine = Engine(self.model, self.tokenizer, self.eos_token_ids, policy, page_size, self.max_num_seqs,
                             num_kv_tokens, self.device, self.dtype, backend, max_prefill_tokens,
                             cuda_graphs=self.device.type == "cuda" and not enforce_eager)

    def _default_kv_tokens(self, page_size: int, utilization: float) -> int:
        if self.device.type != "cuda":
            return 32768
        from raas_batch.engine.page_pool import PagePool

        spec = self.model.spec
        free, total = torch.cuda.mem_get_info(self.device)
        reserve = (1 - utilization) * total + 4 * 2**30  # activations, logits, sampling buffers
        per_page = PagePool.bytes_per_page(spec.num_layers, spec.num_kv_heads, page_size, spec.head_dim, self.dtype)
        return max(page_size, int((free - reserve) // per_page) * page_size)

    # ---- prompts ----
    def _prepare(self, prompt) -> tuple[str | None, list[int], str | None]:
        """-> (prompt text, token ids, error). A prompt that cannot run gets an error, not an exception."""
        try:
            if isinstance(prompt, dict):
                if "prompt_token_ids" not in prompt:
                    return None, [], "a dict prompt needs the key 'prompt_token_ids'"
                ids = [int(t) for t in prompt["prompt_token_ids"]]
                text = self.tokenizer.decode(ids) if self.tokenizer is not None else None
            elif isinstance(prompt, str):
                if not prompt.strip():
                    return prompt, [], "the prompt is empty"
                text = prompt
                ids = self.tokenizer.encode(prompt)
            elif isinstance(prompt, SequenceABC):
                error = _check_messages(prompt)
                if error:
                    return None, [], error
                text = self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True,
                                                          **self.chat_template_kwargs)
                ids = self.tokenizer.encode(text, add_special_tokens=False)
            else:
                return None, [], f"a prompt must be a string, a list of chat messages or a dict, not {type(prompt).__name__}"
        except Exception as exc:  # a tokenizer or template failure is this row's problem only
            return None, [], f"the prompt could not be tokenized: {exc}"
        if not ids:
            return text, ids, "the prompt has no tokens"
        if len(ids) >= self.max_model_len:
            return text, ids, (f"the prompt has {len(ids)} tokens but the model's context is {self.max_model_len}; "
                               "shorten it")
        return text, ids, None

    # ---- generation ----
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = False,
                 progress_callback: Callable[[int, int], None] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; returns one RequestOutput per prompt in input order.

        progress_callback(num_new_tokens, num_finished_prompts) is called after every engine step.
        """
        single = isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], dict) and "role" in prompts[0])
        if single:
            prompts = [prompts]
        prompts = list(prompts)
        if params is None:
            params = SamplingParams()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts; pass one or one per prompt.")
        results: list[RequestOutput] = []
        remaining: dict[int, int] = {}
        from raas_batch.streaming import start_request

        for i, (prompt, p) in enumerate(zip(prompts, per_prompt)):
            result, added = start_request(self, i, prompt, p)  # error outputs already filled
            results.append(result)
            if added:
                remaining[i] = added
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(remaining), desc="prompts", unit="prompt")
        while self.engine.has_work():
            finished, num_tokens = self.engine.step()
            done_prompts = 0
            for seq in finished:
                self._fill_output(results[seq.request_idx].outputs[seq.sample_idx], seq)
                remaining[seq.request_idx] -= 1
                done_prompts += remaining[seq.request_idx] == 0
            if bar is not None and done_prompts:
                bar.update(done_prompts)
            if progress_callback is not None:
                progress_callback(num_tokens, done_prompts)
        if bar is not None:
            bar.close()
        over = sum(o.kv_over_budget for r in results for o in r.outputs)
        if over:
            log.warning("%d sequence(s) had prompts longer than kv_budget=%s allows; they kept their prompt "
                        "pages plus a small decode allowance (CompletionOutput.kv_over_budget).", over, self.kv_budget)
        return results

    def score_continuations(self, prompt_ids_list: list[list[int]], continuation_ids_list: list[list[int]],
                            kv_budgets: list[int | None] | None = None, on_logprobs=None):
        """Teacher-forced scoring through this engine's KV policy: feed each continuation token by
        token (decode steps with the sampled token overridden) and return, per sequence, a
        `ScoreResult` with the log-probability of each continuation token and the greedy token at
        each step. kv_budgets: per-sequence budget override. on_logprobs(request_indices, steps,
        logprobs [B, V] float32) sees every step's full distribution. See raas_batch.engine.scoring."""
        from raas_batch.engine.scoring import ScoreRequest, run_scored

        budgets = kv_budgets or [None] * len(prompt_ids_list)
        requests = [ScoreRequest(list(p), continuation_ids=list(c), kv_override=b)
                    for p, c, b in zip(prompt_ids_list, continuation_ids_list, budgets)]
        return run_scored(self.engine, requests, on_logprobs)

    def generate_stream(self, requests, progress_callback: Callable[[int, int], None] | None = None,
                        max_waiting: int | None = None):
        """Like `generate`, for requests that keep arriving: `requests` is an iterator of
        (key, prompt, SamplingParams) or None ("nothing new yet"), pulled whenever the waiting queue
        is short; yields (key, RequestOutput) as each request finishes. See raas_batch.streaming."""
        from raas_batch.streaming import generate_stream

        return generate_stream(self, requests, progress_callback, max_waiting)

    def _fill_output(self, out: CompletionOutput, seq: Sequence) -> None:
        out.token_ids = list(seq.output_token_ids)
        if seq.detok is not None:
            text = seq.detok.text if seq.stop_text_end is None else seq.detok.text[:seq.stop_text_end]
        elif self.tokenizer is None:  # random weights from a config (benchmarks): tokens only
            text = ""
        else:
            text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        out.text = text
        out.reasoning, out.answer = split_reasoning(text, seq.starts_in_think)
        if seq.params.thinking_budget is not None:
            out.num_reasoning_tokens = seq.num_reasoning_tokens
        elif seq.starts_in_think or "<think>" in text:
            out.num_reasoning_tokens = count_reasoning_tokens(self.tokenizer, out.token_ids, seq.starts_in_think)
        out.thinking_budget_hit = seq.thinking_budget_hit
        out.finish_reason = seq.finish_reason or "length"
        out.peak_kv_tokens, out.evicted_pages = seq.peak_kv_tokens, seq.evicted_pages
        out.kv_over_budget = seq.kv_over_budget
        out.ttft_s = (seq.t_first_token or time.perf_counter()) - seq.t_arrival
        out.e2e_s = (seq.t_finish or time.perf_counter()) - seq.t_arrival


def _check_messages(messages) -> str | None:
    if not messages:
        return "the chat messages are empty"
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"chat message {k} must be a dict with 'role' and 'content'"
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            return f"chat message {k} needs string 'role' and 'content'"
    if not any(m["content"].strip() for m in messages):
        return "the chat messages have no content"
    return None
