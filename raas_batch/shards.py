"""Shards of a job: what one is (`ShardSpec`), its rows ready for the engine (`ShardPlan`), and its
output file (`write_shard_file`). No engine here: `raas_batch.shard_stream` runs plans through one.

    plan = plan_shard(reader, spec, use_chat)     rows [start, end) read from the source; each row's
                                                  prompt (text as one user message when use_chat),
                                                  seed and carried input columns
    outputs = {row_idx: RequestOutput}            from the engine, in any order (ShardStream)
    result = write_shard_file(plan, outputs, model_name)   one output row per (row, sample), atomically

Invariants:
- Shard i's file holds exactly the samples of input rows [start, end): (end - start) * n rows, one per
  (row_idx, sample_idx), whatever happened to the rows (a row that cannot run gives n error rows).
- With --seed S, row r's seed depends only on (S, id of r): its random draws do not depend on shard
  size, order, batch, or which worker ran the shard; its tokens do not either where the logits do not
  depend on the batch (the CPU; the GPU with --batch-invariant: README "Reproducible rows").
- Every input column is carried into its rows' output (`ShardSpec.carried`), under its own name or,
  when that is an output column's, as `input_<name>`; the file's schema is `ShardSpec.schema`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from raas_batch.data.reader import ROW_ERROR, ReaderSpec
from raas_batch.data.writer import carried_value, shard_file_name, write_shard
from raas_batch.prompts import check_prompt, text_as_chat
from raas_batch.sampling_params import SamplingParams


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
    reader: ReaderSpec  # columns: every input column
    prompt_column: str
    id_column: str | None  # None: ids are the row numbers
    shards_dir: str
    fingerprint_hash: str
    sampling: dict[str, Any]  # SamplingParams kwargs without seed (fully resolved)
    base_seed: int | None
    kv_policy: str
    kv_budget: int | None
    schema: pa.Schema  # the shard file's columns: OUTPUT_SCHEMA, then the carried input columns
    carried: tuple[tuple[str, str], ...] = ()  # (input column, output column)
    apply_chat_template: bool = True  # text prompts go through the chat template (when the model has one)
    system_prompt: str | None = None

    @property
    def file_name(self) -> str:
        return shard_file_name(self.index)

    @property
    def path(self) -> str:
        return os.path.join(self.shards_dir, self.file_name)

    @property
    def num_rows(self) -> int:
        return self.end - self.start

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
    size: int | None = None  # bytes of the file (the manifest records it: a resume compares it)


@dataclass
class RowJob:
    """One input row of a shard, ready for the engine (or rejected before it)."""

    row_idx: int
    row_id: str
    text: str | None  # the prompt as stored in the output (messages as JSON)
    prompt: Any  # what the engine gets (the core validates it); None when the row was rejected here
    error: str | None  # rejected before the engine (an unreadable JSONL line)
    seed: int | None
    carried: dict[str, Any] = field(default_factory=dict)  # output column -> input value


@dataclass
class ShardPlan:
    """A shard's rows read, waiting for the engine's outputs."""

    spec: ShardSpec
    jobs: list[RowJob]
    t0: float  # when the shard was started (monotonic)

    @property
    def runnable(self) -> list[RowJob]:
        return [j for j in self.jobs if j.error is None]

    def requests(self) -> list[tuple[int, Any, SamplingParams]]:
        """(row_idx, engine prompt, params) of every runnable row. Without --seed the engine draws a
        seed per row; with it each row carries its derived seed."""
        return [(j.row_idx, j.prompt, SamplingParams(**self.spec.sampling, seed=j.seed)) for j in self.runnable]


def plan_shard(reader, spec: ShardSpec, use_chat: bool) -> ShardPlan:
    """Read the shard's rows from `reader` (opened on spec.reader) and turn each into a RowJob.
    use_chat: text prompts become one user message (after spec.system_prompt) for the chat template."""
    t0 = time.monotonic()
    rows = reader.read(spec.start, spec.end)
    jobs = []
    for k, row in enumerate(rows):
        row_idx = spec.start + k
        raw_id = row.get(spec.id_column) if spec.id_column else None
        row_id = str(raw_id) if raw_id is not None else str(row_idx)
        value = row.get(spec.prompt_column)
        carried = {out: carried_value(row.get(name), spec.schema.field(out).type) for name, out in spec.carried}
        seed = derive_row_seed(spec.base_seed, row_id) if spec.base_seed is not None else None
        if ROW_ERROR in row:
            error = f"row {row_idx} (id {row_id!r}): {row[ROW_ERROR]}; fix or drop that line"
            jobs.append(RowJob(row_idx, row_id, None, None, error, seed, carried))
            continue
        prompt = text_as_chat(value, spec.system_prompt) if use_chat else value
        jobs.append(RowJob(row_idx, row_id, _prompt_text(value), prompt, None, seed, carried))
    return ShardPlan(spec, jobs, t0)


def _is_token_ids(value: Any) -> bool:
    normal, _ = check_prompt(value)
    return isinstance(normal, list) and bool(normal) and not isinstance(normal[0], dict)


def _prompt_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def write_shard_file(plan: ShardPlan, outputs: dict[int, Any], model_name: str | None) -> ShardResult:
    """Write the shard file from the engine's outputs (row_idx -> RequestOutput of a runnable row)."""
    spec = plan.spec
    n = int(spec.sampling.get("n", 1))
    rows = []
    for j in plan.jobs:
        out = outputs.get(j.row_idx) if j.error is None else None
        if j.error is None and out is None:
            raise RuntimeError(f"shard {spec.index}: the engine returned no output for row {j.row_idx}")
        text = j.text
        if _is_token_ids(j.prompt) and out is not None and isinstance(out.prompt, str):
            text = out.prompt  # token-id prompts are stored as the engine's decoded text
        rows.extend(_output_row(spec, j, text, out, s, model_name) for s in range(n))
    gen_s = time.monotonic() - plan.t0
    digest = write_shard(spec.path, rows, spec.file_meta(), spec.schema)
    stats = shard_stats(rows)
    stats.update(wall_s=time.monotonic() - plan.t0, generate_s=gen_s)
    return ShardResult(spec.index, spec.path, len(rows), digest, stats, os.path.getsize(spec.path))


def _output_row(spec: ShardSpec, j: RowJob, text: str | None, out, s: int, model_name: str | None) -> dict[str, Any]:
    row = {"id": j.row_id, "row_idx": j.row_idx, "sample_idx": s, "prompt": text,
           "kv_policy": spec.kv_policy, "kv_budget": spec.kv_budget, "seed": j.seed,
           "model": model_name, "num_prompt_tokens": 0, "num_completion_tokens": 0,
           "num_reasoning_tokens": 0, "thinking_budget_hit": False, "peak_kv_tokens": 0,
           "evicted_pages": 0, "kv_over_budget": False, "ttft_s": None, "e2e_s": None, **j.carried}
    if out is None:
        row.update(finish_reason="error", error=j.error)
        return row
    c = out.outputs[s]
    row["num_prompt_tokens"] = len(out.prompt_token_ids or [])
    if c.finish_reason == "error":
        msg = c.error or "the engine could not run this prompt"
        row.update(finish_reason="error",
                   error=f"row {j.row_idx} (id {j.row_id!r}): {msg}; fix column {spec.prompt_column!r} of "
                         "this row or drop it")
        return row  # texts stay null, as for rows rejected before the engine
    row.update(finish_reason=c.finish_reason, error=c.error)
    row.update(completion=c.text, reasoning=c.reasoning or None, answer=c.answer,
               num_completion_tokens=len(c.token_ids or []),
               num_reasoning_tokens=int(c.num_reasoning_tokens or 0),
               thinking_budget_hit=bool(c.thinking_budget_hit),
               peak_kv_tokens=int(c.peak_kv_tokens or 0), evicted_pages=int(c.evicted_pages or 0),
               kv_over_budget=bool(c.kv_over_budget), ttft_s=c.ttft_s, e2e_s=c.e2e_s,
               seed=c.seed if c.seed is not None else j.seed)
    return row


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
        "kv_over_budget": sum(bool(r.get("kv_over_budget")) for r in rows),
        "e2e_s_sum": sum(r["e2e_s"] or 0.0 for r in rows if r["finish_reason"] != "error"),
        "model": next((r["model"] for r in rows if r["model"]), None),
    }
