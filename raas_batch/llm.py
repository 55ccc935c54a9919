"""The Python API: `LLM(...).generate(prompts, params)`, vLLM-like."""

from __future__ import annotations

from collections.abc import Callable

import torch

from raas_batch.engine.engine import Engine
from raas_batch.generation_config import read_generation_defaults
from raas_batch.llm_engine import LLMEngine
from raas_batch.models.loader import load_model
from raas_batch.outputs import RequestOutput
from raas_batch.policies import make_policy
from raas_batch.sampling_params import SamplingParams
from raas_batch.streaming import collect, generate_stream

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
# "auto" for policies whose memory grows with the sequence (dense, quest, a bounded policy with dense layers): vLLM's
# default batch for its LLM class, which depends on the GPU: 1,024 sequences on one of 70 GiB or more (H100, H200,
# MI300X; A100s excepted), 256 on the others. The page pool still admits a sequence only when its pages fit.
DENSE_MAX_NUM_SEQS = 256
LARGE_GPU_MAX_NUM_SEQS = 1024
LARGE_GPU_BYTES = 70 * 2**30


def dense_max_num_seqs(device: torch.device) -> int:
    """What max_num_seqs="auto" gives, on CUDA, a policy whose memory grows with the sequence (see above)."""
    props = torch.cuda.get_device_properties(device)
    if props.total_memory >= LARGE_GPU_BYTES and "a100" not in props.name.lower():
        return LARGE_GPU_MAX_NUM_SEQS
    return DENSE_MAX_NUM_SEQS


def auto_max_num_seqs(device: torch.device, policy, kv_budget: int | None, page_size: int,
                      num_kv_tokens: int) -> int:
    """`max_num_seqs="auto"`: the batch the page pool can hold.

    On CUDA a bounded policy (RaaS, H2O, StreamingLLM: a sequence's quota is about kv_budget /
    page_size pages whatever its length) gets as many sequences as the pool holds at that quota, capped
    at the largest CUDA-graph batch bucket; dense and Quest (memory grows with the sequence) get
    vLLM's default for the GPU, `dense_max_num_seqs` (as does a bounded policy with dense layers). The CPU gets 8.
    """
    if device.type != "cuda":
        return CPU_MAX_NUM_SEQS
    if not _batch_from_pool(policy, kv_budget):
        return dense_max_num_seqs(device)
    from raas_batch.engine.cuda_graph import BATCH_BUCKETS

    pages_per_seq = max(1, kv_budget // page_size)
    return max(1, min(BATCH_BUCKETS[-1], (num_kv_tokens // page_size) // pages_per_seq))


def _batch_from_pool(policy, kv_budget: int | None) -> bool:
    """Whether auto_max_num_seqs sizes the batch from the pool (a bounded policy with a budget) on CUDA."""
    from raas_batch.policies.bounded import BoundedPolicy

    return isinstance(policy, BoundedPolicy) and bool(kv_budget) and policy.dense_layers == 0


def kv_pool_tokens(free: int, reserve: float, per_page: int, page_size: int, ring_per_slot: int = 0,
                   num_seqs: int | None = None, pages_per_seq: int = 1) -> int:
    """The page pool's default size in tokens: the pages that `free` bytes less `reserve` hold, less the rings of
    the refresh once a page (`ring_per_slot` bytes a slot, model_runner.window_ring_bytes; 0 without them) of the
    engine's slots: num_seqs and the padding slot, or with num_seqs None (max_num_seqs "auto" for a bounded
    policy) as many as the memory holds at pages_per_seq pages and a ring each, at most the largest CUDA-graph
    batch (auto_max_num_seqs then picks at most that many from the pool)."""
    avail = free - reserve
    if ring_per_slot:
        if num_seqs is None:
            from raas_batch.engine.cuda_graph import BATCH_BUCKETS

            num_seqs = min(BATCH_BUCKETS[-1], max(1, int(avail // (per_page * pages_per_seq + ring_per_slot))))
        avail -= (num_seqs + 1) * ring_per_slot
    return max(page_size, int(avail // per_page) * page_size)


class LLM:
    """Loads a model once and generates for batches of prompts.

    model: None (the embedded SmolLM2-135M-Instruct), a hub id, a local directory or a .gguf file.
    kv_policy / kv_budget / page_size: the KV cache (`raas_batch.policies`); kv_budget in tokens.
    max_num_seqs: sequences decoded at once, or "auto" (`auto_max_num_seqs`). num_kv_tokens: the page
    pool's size in tokens (default: on the GPU what gpu_memory_utilization leaves free, on the CPU 32K
    tokens). max_model_len: the context in tokens (prompt + generated; default and upper bound: the
    model's). On CUDA, decode steps run as captured CUDA graphs unless enforce_eager. backend:
    "triton" (default on CUDA), "cpu" (default on the CPU: kernels/cpu.py) or "torch" (the plain
    references of kernels/reference.py, any device). share_prompts: the n samples of a request
    prefill their prompt once and read its pages from one copy where the policy allows (README
    "Samples of one prompt"); False prefills and stores each sample's prompt separately.
    batch_invariant (Triton backend): every row's logits bit-identical whatever else is in the batch
    (fixed-tile products, one attention split per row; README "Reproducible rows"); the torch and cpu
    backends ignore it. prefill_cost_steps: while rows decode, waiting rows are admitted in groups, once
    the slots left empty since the last prefill add up to this many full decode steps (what a prefill
    step costs; raas_batch/engine/scheduler.py); None: 4 on CUDA, 0 (each row at once) elsewhere.
    """

    def __init__(self, model: str | None = None, kv_policy: str = "dense", kv_budget: int | None = None,
                 page_size: int = 16, max_num_seqs: int | str = "auto", dtype=None, device=None,
                 chat_template_kwargs: dict | None = None, num_kv_tokens: int | None = None,
                 backend: str | None = None, policy_options: dict | None = None, load_format: str = "auto",
                 hf_config=None, max_prefill_tokens: int = 8192, gpu_memory_utilization: float = 0.9,
                 enforce_eager: bool = False, max_model_len: int | None = None, share_prompts: bool = True,
                 batch_invariant: bool = False, prefill_cost_steps: float | None = None):
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
        if backend is None:
            backend = "triton" if self.device.type == "cuda" else "cpu"
        if num_kv_tokens is None:
            num_kv_tokens = self._default_kv_tokens(page_size, gpu_memory_utilization, policy, backend,
                                                    None if max_num_seqs in (None, "auto") else int(max_num_seqs))
        if max_num_seqs in (None, "auto"):
            max_num_seqs = auto_max_num_seqs(self.device, policy, kv_budget, page_size, num_kv_tokens)
        self.max_num_seqs = int(max_num_seqs)
        engine = Engine(self.model, self.tokenizer, self.eos_token_ids, policy, page_size, self.max_num_seqs,
                        num_kv_tokens, self.device, self.dtype, backend, max_prefill_tokens,
                        cuda_graphs=self.device.type == "cuda" and not enforce_eager, share_prompts=share_prompts,
                        batch_invariant=batch_invariant, prefill_cost_steps=prefill_cost_steps)
        defaults = {} if hf_config is not None else read_generation_defaults(model)
        self.llm_engine = LLMEngine(engine, self.tokenizer, self.max_model_len, self.chat_template_kwargs, defaults)

    @property
    def engine(self) -> Engine:
        """The engine the request core runs on (tests and benchmarks may swap in another one while idle)."""
        return self.llm_engine.engine

    @engine.setter
    def engine(self, engine: Engine) -> None:
        if self.llm_engine.has_unfinished_requests():
            raise RuntimeError("cannot swap the engine while requests are running")
        self.llm_engine.engine = engine

    def _default_kv_tokens(self, page_size: int, utilization: float, policy=None, backend: str = "",
                           max_num_seqs: int | None = None) -> int:
        """What gpu_memory_utilization leaves free for pages, after the rings of RaaS's refresh once a page
        (`kv_pool_tokens`) that an engine of `policy` with `backend` keeps, for max_num_seqs slots (None: "auto").
        policy None: no rings (the audit's engine, raas_batch/audit_engine.py, whose mixture keeps none)."""
        if self.device.type != "cuda":
            return 32768
        from raas_batch.engine.model_runner import refresh_placement, window_ring_bytes
        from raas_batch.engine.page_pool import PagePool

        spec = self.model.spec
        free, total = torch.cuda.mem_get_info(self.device)
        reserve = (1 - utilization) * total + 4 * 2**30  # activations, logits, sampling buffers
        per_page = PagePool.bytes_per_page(spec.num_layers, spec.num_kv_heads, page_size, spec.head_dim, self.dtype)
        if policy is None or not refresh_placement(policy, self.device, backend)[1]:
            return kv_pool_tokens(free, reserve, per_page, page_size)
        if max_num_seqs is None and not _batch_from_pool(policy, self.kv_budget):
            max_num_seqs = dense_max_num_seqs(self.device)  # what "auto" gives this policy whatever the pool
        return kv_pool_tokens(free, reserve, per_page, page_size, window_ring_bytes(spec, page_size, self.dtype),
                              max_num_seqs, max(1, (self.kv_budget or 0) // page_size))

    def get_default_sampling_params(self) -> SamplingParams:
        """The sampling settings a request gets for every field it leaves unset: the model's
        generation_config values (e.g. temperature 0.6, top_p 0.95), else raas_batch's fallbacks."""
        return SamplingParams().with_defaults(self.llm_engine.generation_defaults)

    def _prepare(self, prompt) -> tuple[str | None, list[int], str | None]:
        """-> (prompt text, token ids, error): the request core's check (benchmarks call it directly)."""
        return self.llm_engine.prepare(prompt)

    # ---- generation ----
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = False,
                 progress_callback: Callable[[int, int], None] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; returns one RequestOutput per prompt in input order (a stream,
        collected: `raas_batch.streaming.collect`). Fields of `params` left unset take
        `get_default_sampling_params()`'s values. progress_callback(num_new_tokens,
        num_finished_prompts) is called after every engine step.
        """
        single = isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], dict) and "role" in prompts[0])
        prompts = [prompts] if single else list(prompts)
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts; pass one or one per prompt.")
        return collect(self.llm_engine, prompts, per_prompt, use_tqdm, progress_callback)

    def generate_stream(self, requests, progress_callback: Callable[[int, int], None] | None = None,
                        max_waiting: int | None = None):
        """Like `generate`, for requests that keep arriving: `requests` is an iterator of
        (key, prompt, SamplingParams) or None ("nothing new yet"), pulled whenever the waiting queue
        is short; yields (key, RequestOutput) as each request finishes. See raas_batch.streaming."""
        return generate_stream(self.llm_engine, requests, progress_callback, max_waiting)

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
        return run_scored(self.llm_engine, requests, on_logprobs)

    def audit_decode(self, items):
        """The fidelity audit's engine work (`raas_batch.audit_engine.audit_decode`): each item
        (`AuditItem`) decoded under this LLM's KV policy and dense, both outputs scored teacher-forced
        under both. On CUDA this LLM runs on the audit's engine afterwards."""
        from raas_batch.audit_engine import audit_decode

        return audit_decode(self, items)
