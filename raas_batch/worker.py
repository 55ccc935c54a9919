"""The shard worker: given a shard spec and an engine, produce the shard file.

Used in-process by the local driver (`raas_batch.runner.run_job`) and, wrapped by a Ray actor, by the
distributed driver (`raas_batch.distributed`). It holds no job state besides the engine and its open
readers: what to do comes in a picklable `ShardSpec`, what was done goes back in a `ShardResult`.

A shard is processed in three steps so that a streaming caller can overlap shards on one engine:

    plan = worker.plan(spec)                  read rows [start, end) from the source, validate prompts,
                                              derive per-row seeds -> engine requests
    outputs = {row_idx: RequestOutput}        by `llm.generate` (run) or `llm.generate_stream` (Ray)
    result = worker.assemble(plan, outputs)   one output row per (row, sample), written atomically

Invariants:
- Shard i's file holds exactly the samples of input rows [start, end): (end - start) * n rows, one per
  (row_idx, sample_idx), whatever happened to the rows (a row that cannot run gives n error rows).
- With --seed S, row r's seed depends only on (S, id of r): output does not depend on shard size,
  order, batch, or which worker ran the shard.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raas_batch.config import JobConfig
from raas_batch.data.reader import ROW_ERROR, ReaderSpec, open_reader
from raas_batch.data.writer import shard_file_name, write_shard
from raas_batch.sampling_params import SamplingParams

ENGINE_ENV = "RAAS_BATCH_ENGINE"  # "module:attr" of an LLM-compatible class (tests use a fake)


def derive_row_seed(base_seed: int, row_id: str) -> int:
    """A stable 63-bit seed from the job seed and the row id (independent of shards and order)."""
    digest = hashlib.sha256(f"{base_seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class ShardSpec:
    """Everything a worker needs for one shard (picklable; no engine, no open files)."""

    index: int
    start: int
    end: int
    reader: ReaderSpec  # columns = (prompt column[, id column])
    prompt_column: str
    id_column: str | None  # None: ids are the row numbers
    shards_dir: str
    fingerprint_hash: str
    sampling: dict[str, Any]  # SamplingParams kwargs without seed
    base_seed: int | None
    kv_policy: str
    kv_budget: int | None

    @property
    def file_name(self) -> str:
        return shard_file_name(self.index)

    @property
    def path(self) -> str:
        return os.path.join(self.shards_dir, self.file_name)

    def file_meta(self) -> dict[str, Any]:
        """What the shard file's metadata must say for the file to be this shard's."""
        return {"index": self.index, "start": self.start, "end": self.end,
                "n": self.sampling.get("n", 1), "fingerprint": self.fingerprint_hash}


@dataclass
class ShardResult:
    index: int
    path: str
    num_output_rows: int
    sha256: str
    stats: dict[str, Any] = field(default_factory=dict)


def validate_prompt(value: Any) -> tuple[Any, str | None]:
    """(what to give the engine, None) or (None, why the prompt cannot run)."""
    if value is None:
        return None, "the prompt is null"
    if isinstance(value, str):
        return (value, None) if value.strip() else (None, "the prompt is empty")
    if isinstance(value, dict):
        if "prompt_token_ids" in value:
            return validate_prompt(list(value["prompt_token_ids"] or []))
        return None, "the prompt is a single object; expected a string or a list of {role, content} messages"
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            return None, "the prompt is an empty list of messages"
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return {"prompt_token_ids": [int(t) for t in value]}, None
        messages = []
        for k, m in enumerate(value):
            if not isinstance(m, dict):
                return None, f"message {k} is a {type(m).__name__}, expected an object with role and content"
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str) or not role.strip():
                return None, f"message {k} has role {role!r}; expected a string such as 'user' or 'system'"
            if not isinstance(content, str):
                return None, f"message {k} has content of type {type(content).__name__}, expected a string"
            messages.append({"role": role, "content": content})
        if not any(m["content"].strip() for m in messages):
            return None, "every message has empty content"
        return messages, None
    return None, f"the prompt is a {type(value).__name__}; expected a string or a list of {{role, content}} messages"


def _prompt_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def shard_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals of one shard's output rows (stored in the manifest; summed into summary.json)."""
    finish = Counter(r["finish_reason"] for r in rows)
    return {
        "num_rows": len({r["row_idx"] for r in rows}),
        "num_samples": len(rows),
        "num_errors": finish.get("error", 0),
        "finish_reasons": dict(finish),
        "prompt_tokens": sum(r["num_prompt_tokens"] for r in rows if r["sample_idx"] == 0),
        "completion_tokens": sum(r["num_completion_tokens"] for r in rows),
        "reasoning_tokens": sum(r["num_reasoning_tokens"] for r in rows),
        "peak_kv_tokens_sum": sum(r["peak_kv_tokens"] for r in rows if r["finish_reason"] != "error"),
        "peak_kv_tokens_max": max((r["peak_kv_tokens"] for r in rows), default=0),
        "evicted_pages": sum(r["evicted_pages"] for r in rows),
        "e2e_s_sum": sum(r["e2e_s"] or 0.0 for r in rows if r["finish_reason"] != "error"),
        "model": next((r["model"] for r in rows if r["model"]), None),
    }



@dataclass
class RowJob:
    """One input row of a shard, ready for the engine (or rejected before it)."""

    row_idx: int
    row_id: str
    text: str | None  # the prompt as stored in the output (messages as JSON)
    prompt: Any  # what the engine gets; None when the row cannot run
    error: str | None
    seed: int | None


@dataclass
class ShardPlan:
    """A shard's rows read and validated, waiting for the engine's outputs."""

    spec: ShardSpec
    jobs: list[RowJob]
    t0: float  # when the shard was started (monotonic)

    @property
    def runnable(self) -> list[RowJob]:
        return [j for j in self.jobs if j.error is None]

    def params(self) -> SamplingParams | list[SamplingParams]:
        """One SamplingParams for every runnable row (no --seed: the engine draws a seed per row), or
        one per runnable row carrying the row's derived seed."""
        if self.spec.base_seed is None:
            return SamplingParams(**self.spec.sampling)
        return [SamplingParams(**self.spec.sampling, seed=j.seed) for j in self.runnable]

    def requests(self) -> list[tuple[int, Any, SamplingParams]]:
        """(row_idx, engine prompt, params) of every runnable row, for `LLM.generate_stream`."""
        runnable = self.runnable
        params = self.params()
        per_row = params if isinstance(params, list) else [params] * len(runnable)
        return [(j.row_idx, j.prompt, p) for j, p in zip(runnable, per_row)]


class ShardWorker:
    """Runs shards on one engine. Holds no job state besides the engine and open readers, so a Ray
    actor can wrap it and the local driver calls it directly."""

    def __init__(self, llm, model_name: str | None = None):
        self.llm = llm
        self.model_name = model_name or getattr(llm, "model_name", None)
        self._readers: dict[ReaderSpec, Any] = {}
        try:
            params = inspect.signature(llm.generate).parameters
            self._has_callback = "progress_callback" in params or any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        except (TypeError, ValueError):
            self._has_callback = False

    def _reader(self, spec: ReaderSpec):
        if spec not in self._readers:
            self._readers[spec] = open_reader(spec)
        return self._readers[spec]

    def run(self, spec: ShardSpec,
            progress_callback: Callable[[int, int], None] | None = None) -> ShardResult:
        """Produce spec's shard file (atomically) and return what it holds. Engine errors raise."""
        plan = self.plan(spec)
        runnable = plan.runnable
        outputs = self._generate(plan, progress_callback) if runnable else []
        return self.assemble(plan, {j.row_idx: out for j, out in zip(runnable, outputs)})

    def plan(self, spec: ShardSpec) -> ShardPlan:
        """Read the shard's rows from the source and turn each into a RowJob (no engine involved)."""
        t0 = time.monotonic()
        rows = self._reader(spec.reader).read(spec.start, spec.end)
        jobs = []
        for k, row in enumerate(rows):
            row_idx = spec.start + k
            raw_id = row.get(spec.id_column) if spec.id_column else None
            row_id = str(raw_id) if raw_id is not None else str(row_idx)
            value = row.get(spec.prompt_column)
            if ROW_ERROR in row:
                prompt, error = None, f"row {row_idx} (id {row_id!r}): {row[ROW_ERROR]}; fix or drop that line"
            else:
                prompt, error = validate_prompt(value)
                if error is not None:
                    error = (f"row {row_idx} (id {row_id!r}): {error}; fix column "
                             f"{spec.prompt_column!r} of this row or drop it")
            seed = derive_row_seed(spec.base_seed, row_id) if spec.base_seed is not None else None
            jobs.append(RowJob(row_idx, row_id, _prompt_text(value), prompt, error, seed))
        return ShardPlan(spec, jobs, t0)

    def assemble(self, plan: ShardPlan, outputs: dict[int, Any]) -> ShardResult:
        """Write the shard file from the engine's outputs (row_idx -> RequestOutput of a runnable row)."""
        spec = plan.spec
        n = int(spec.sampling.get("n", 1))
        out_rows = []
        for j in plan.jobs:
            out = outputs.get(j.row_idx) if j.error is None else None
            if j.error is None and out is None:
                raise RuntimeError(f"shard {spec.index}: the engine returned no output for row {j.row_idx}")
            text = j.text
            if isinstance(j.prompt, dict) and out is not None and isinstance(out.prompt, str):
                text = out.prompt  # token-id prompts are stored as the engine's decoded text
            for s in range(n):
                out_rows.append(self._row(spec, j.row_idx, j.row_id, text, j.error, j.seed, out, s))
        gen_s = time.monotonic() - plan.t0
        digest = write_shard(spec.path, out_rows, spec.file_meta())
        stats = shard_stats(out_rows)
        stats.update(wall_s=time.monotonic() - plan.t0, generate_s=gen_s)
        return ShardResult(spec.index, spec.path, len(out_rows), digest, stats)

    def _generate(self, plan: ShardPlan, progress_callback):
        prompts = [j.prompt for j in plan.runnable]
        kwargs = {"use_tqdm": False}
        if progress_callback is not None and self._has_callback:
            kwargs["progress_callback"] = progress_callback
        outputs = self.llm.generate(prompts, plan.params(), **kwargs)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"engine returned {len(outputs)} outputs for {len(prompts)} prompts")
        return outputs

    def _row(self, spec, row_idx, row_id, text, error, seed, out, s) -> dict[str, Any]:
        row = {"id": row_id, "row_idx": row_idx, "sample_idx": s, "prompt": text,
               "kv_policy": spec.kv_policy, "kv_budget": spec.kv_budget, "seed": seed,
               "model": self.model_name, "num_prompt_tokens": 0, "num_completion_tokens": 0,
               "num_reasoning_tokens": 0, "thinking_budget_hit": False, "peak_kv_tokens": 0,
               "evicted_pages": 0, "ttft_s": None, "e2e_s": None}
        if out is None:
            row.update(finish_reason="error", error=error)
            return row
        c = out.outputs[s]
        row["num_prompt_tokens"] = len(out.prompt_token_ids or [])
        if c.finish_reason == "error":
            msg = c.error or "the engine could not run this prompt"
            row.update(finish_reason="error", error=f"row {row_idx} (id {row_id!r}): {msg}")
            return row  # texts stay null, as for rows rejected before the engine
        row.update(finish_reason=c.finish_reason, error=c.error)
        row.update(completion=c.text, reasoning=c.reasoning or None, answer=c.answer,
                   num_completion_tokens=len(c.token_ids or []),
                   num_reasoning_tokens=int(c.num_reasoning_tokens or 0),
                   thinking_budget_hit=bool(c.thinking_budget_hit),
                   peak_kv_tokens=int(c.peak_kv_tokens or 0), evicted_pages=int(c.evicted_pages or 0),
                   ttft_s=c.ttft_s, e2e_s=c.e2e_s,
                   seed=c.seed if c.seed is not None else seed)
        return row


def make_engine(cfg: JobConfig):
    """LLM(...) from the config; `RAAS_BATCH_ENGINE=module:attr` substitutes a compatible class.

    A substitute whose constructor lacks a keyword (an older signature, e.g. a benchmark's engine) is
    built without it while the job leaves that setting at its default; a setting it cannot take raises.
    """
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
