"""Batch job runner: the shard worker (reusable by a Ray actor) and the local driver loop.

    driver (run_job)                                    worker (ShardWorker.run)
    ----------------                                    ------------------------
    detect + open input, check output folder            read rows [start, end) from the source
    fingerprint; plan or load + compare the manifest    validate prompts (null/empty/malformed)
    adopt verified files left by a killed run           llm.generate(valid prompts, per-row seeds)
    for each shard not done:                            one output row per (row, sample)
        manifest: running (saved)  ------ ShardSpec --> write the shard file atomically
        manifest: done / failed (saved) <-- ShardResult
    summary.json

Invariants (exactly-once):
- Shard i's file holds exactly the samples of input rows [start, end): (end - start) * n rows, one per
  (row_idx, sample_idx), whatever happened to the rows (a row that cannot run gives n error rows).
- A done shard's file is never rewritten; a shard becomes done only after its file is in place, so
  after a kill at any instant, `--resume` redoes exactly the shards not recorded done.
- A shard file found on disk but not recorded done (killed between the rename and the manifest
  update) is adopted only if `verify_shard` proves it complete and from this very job (same
  fingerprint, range and n); otherwise it is deleted and regenerated.
- With --seed S, row r's seed depends only on (S, id of r): output does not depend on shard size or order.
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
from raas_batch.data.reader import ROW_ERROR, InputError, ReaderSpec, detect_input, open_reader
from raas_batch.data.writer import fsync_dir, shard_file_name, verify_shard, write_shard
from raas_batch.sampling_params import SamplingParams

ENGINE_ENV = "RAAS_BATCH_ENGINE"  # "module:attr" of an LLM-compatible class (tests use a fake)


class JobError(Exception):
    """Job-level failure a user can fix: one sentence naming what and how; exit status 2."""


def derive_row_seed(base_seed: int, row_id: str) -> int:
    """A stable 63-bit seed from the job seed and the row id (independent of shards and order)."""
    digest = hashlib.sha256(f"{base_seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ================================================================================================
# Worker: given a shard spec and an engine, produce the shard file.
# ================================================================================================
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


class ShardWorker:
    """Runs shards on one engine. Holds no job state besides the engine and open readers, so a Ray
    actor can wrap it (`actor.run.remote(spec)`) and the local driver calls it directly."""

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
        t0 = time.monotonic()
        rows = self._reader(spec.reader).read(spec.start, spec.end)
        n = int(spec.sampling.get("n", 1))
        jobs = []  # (row_idx, id, prompt text, engine prompt or None, error or None, seed)
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
            jobs.append((row_idx, row_id, _prompt_text(value), prompt, error, seed))

        runnable = [j for j in jobs if j[4] is None]
        outputs = self._generate(runnable, spec, progress_callback) if runnable else []
        by_row = {j[0]: out for j, out in zip(runnable, outputs)}
        out_rows = []
        for row_idx, row_id, text, prompt, error, seed in jobs:
            out = by_row.get(row_idx)
            if isinstance(prompt, dict) and out is not None and isinstance(out.prompt, str):
                text = out.prompt  # token-id prompts are stored as the engine's decoded text
            for s in range(n):
                out_rows.append(self._row(spec, row_idx, row_id, text, error, seed, out, s))
        gen_s = time.monotonic() - t0
        digest = write_shard(spec.path, out_rows, spec.file_meta())
        stats = shard_stats(out_rows)
        stats.update(wall_s=time.monotonic() - t0, generate_s=gen_s)
        return ShardResult(spec.index, spec.path, len(out_rows), digest, stats)

    def _generate(self, runnable, spec: ShardSpec, progress_callback):
        prompts = [j[3] for j in runnable]
        if spec.base_seed is None:
            params: Any = SamplingParams(**spec.sampling)
        else:
            params = [SamplingParams(**spec.sampling, seed=j[5]) for j in runnable]
        kwargs = {"use_tqdm": False}
        if progress_callback is not None and self._has_callback:
            kwargs["progress_callback"] = progress_callback
        outputs = self.llm.generate(prompts, params, **kwargs)
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


# ================================================================================================
# Engine construction
# ================================================================================================
def check_engine_settings(cfg: JobConfig) -> None:
    """Refuse an unknown policy or an impossible budget in a second, before a model load of minutes.

    Only for the real engine: a substitute engine (RAAS_BATCH_ENGINE) validates its own settings.
    """
    if os.environ.get(ENGINE_ENV):
        return
    from raas_batch.policies import make_policy

    try:
        make_policy(cfg.kv_policy, cfg.kv_budget, cfg.page_size)
    except (ValueError, TypeError) as exc:
        raise JobError(f"--kv-policy {cfg.kv_policy} with --kv-budget {cfg.kv_budget} and --page-size "
                       f"{cfg.page_size} cannot run: {exc}") from None


def make_engine(cfg: JobConfig):
    """LLM(...) from the config; `RAAS_BATCH_ENGINE=module:attr` substitutes a compatible class."""
    target = os.environ.get(ENGINE_ENV)
    if target:
        module, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module), attr or "LLM")
    else:
        from raas_batch.llm import LLM as cls
    return cls(**cfg.engine_kwargs())


# ================================================================================================
# Driver: plan -> skip done -> run the rest -> summary.
# ================================================================================================
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
SHARDS = "shards"


@dataclass
class Job:
    """A checked job: every job-level error has been raised before one of these exists."""

    cfg: JobConfig
    out_dir: str
    reader_spec: ReaderSpec
    prompt_column: str
    id_column: str | None
    num_rows: int
    fingerprint: dict[str, Any]
    manifest: Any  # Manifest: the loaded one (resume) or a fresh plan
    mode: str  # "fresh" | "resume" | "overwrite"

    def shard_spec(self, index: int) -> ShardSpec:
        rec = self.manifest.shards[index]
        return ShardSpec(index=rec.index, start=rec.start, end=rec.end, reader=self.reader_spec,
                         prompt_column=self.prompt_column, id_column=self.id_column,
                         shards_dir=os.path.join(self.out_dir, SHARDS),
                         fingerprint_hash=self.manifest.fingerprint_hash,
                         sampling=self.cfg.sampling_kwargs(), base_seed=self.cfg.seed,
                         kv_policy=self.cfg.kv_policy, kv_budget=self.cfg.kv_budget)


def _resolve_prompt_column(cfg: JobConfig, reader, shown: str) -> str:
    names = reader.column_names
    if cfg.prompt_column in names:
        return cfg.prompt_column
    if cfg.prompt_column == "prompt" and "messages" in names:
        return "messages"
    listed = ", ".join(names) if names else "none"
    raise JobError(f"Input {shown} has no column {cfg.prompt_column!r} (columns: {listed}): pass "
                   "--prompt-column NAME with the column holding the prompts.")


def prepare_job(cfg: JobConfig) -> Job:
    """Check everything a user can get wrong at job level; write nothing. Raises JobError."""
    from raas_batch.data.manifest import Manifest

    try:
        spec = detect_input(cfg.input)
        reader = open_reader(spec)
    except InputError as exc:
        raise JobError(str(exc)) from None
    prompt_column = _resolve_prompt_column(cfg, reader, cfg.input)
    id_column = cfg.id_column if cfg.id_column in reader.column_names else None
    spec = spec.with_columns([prompt_column] + ([id_column] if id_column else []))
    num_rows = reader.num_rows if cfg.limit is None else min(cfg.limit, reader.num_rows)
    fingerprint = {"input": reader.identity(), "settings": cfg.output_settings()}

    out_dir = os.path.abspath(os.path.expanduser(cfg.output))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise JobError(f"Output {cfg.output} is a file, not a folder: choose a folder for --output.")
    entries = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    # Temp files and an empty shards/ are what a run killed before its first manifest save leaves.
    entries = [e for e in entries if ".tmp-" not in e
               and not (e == SHARDS and not os.listdir(os.path.join(out_dir, SHARDS)))]
    manifest_path = os.path.join(out_dir, MANIFEST)
    mode = "fresh"
    manifest = None
    if entries:
        ours = os.path.exists(manifest_path)
        if not (cfg.resume or cfg.overwrite):
            raise JobError(f"Output folder {cfg.output} is not empty: pass --resume to continue the job "
                           "in it, --overwrite to start it over, or choose another --output.")
        if not ours:
            raise JobError(f"Output folder {cfg.output} is not empty and holds no {MANIFEST} of a raas_batch "
                           "job, so it is neither resumed nor overwritten: choose another --output or empty it.")
        if cfg.overwrite:
            mode = "overwrite"
        else:
            mode = "resume"
            try:
                manifest = Manifest.load(manifest_path)
            except (OSError, ValueError, TypeError, KeyError) as exc:
                raise JobError(f"{manifest_path} is unreadable ({exc}): pass --overwrite to start the job "
                               "over.") from None
            diffs = manifest.diff(fingerprint)
            if diffs:
                parts = "; ".join(f"{name} was {old!r}, now {new!r}" for name, old, new in diffs)
                raise JobError(f"Cannot resume {cfg.output}: the job there differs ({parts}). Rerun with the "
                               "same settings, or pass --overwrite to start over.")
    if manifest is None:
        manifest = Manifest.plan(num_rows, cfg.shard_size, fingerprint)
    return Job(cfg=cfg, out_dir=out_dir, reader_spec=spec, prompt_column=prompt_column,
               id_column=id_column, num_rows=num_rows, fingerprint=fingerprint, manifest=manifest, mode=mode)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def _clear_outputs(out_dir: str) -> None:
    """--overwrite: remove what a raas_batch job wrote (and only that), except manifest.json, which
    the caller has already replaced by the new plan (so no old shard is ever seen as done)."""
    shards = os.path.join(out_dir, SHARDS)
    if os.path.isdir(shards):
        for name in os.listdir(shards):
            if name.startswith(("part-", ".part-")):
                os.unlink(os.path.join(shards, name))
    for name in os.listdir(out_dir):
        if name in (SUMMARY, CONFIG) or ".tmp-" in name:
            os.unlink(os.path.join(out_dir, name))


def _reopen_missing(job: Job) -> list[str]:
    """Done shards whose file has vanished (deleted by hand) become pending again (in memory only)."""
    messages = []
    for rec in job.manifest.shards:
        if rec.state == "done" and not os.path.exists(os.path.join(job.out_dir, rec.file)):
            rec.state, rec.file, rec.sha256, rec.num_output_rows = "pending", None, None, None
            messages.append(f"shard {rec.index}: {shard_file_name(rec.index)} is missing; it will be regenerated")
    return messages


def _recover(job: Job, log) -> int:
    """Before running: drop temp files of killed writes, and adopt or delete shard files that exist
    but are not recorded done. Returns the number of adopted shards."""
    import pyarrow.parquet as pq

    shards_dir = os.path.join(job.out_dir, SHARDS)
    for folder in (job.out_dir, shards_dir):
        for name in os.listdir(folder):
            if ".tmp-" in name:
                os.unlink(os.path.join(folder, name))
    adopted = 0
    for rec in job.manifest.todo():
        spec = job.shard_spec(rec.index)
        if not os.path.exists(spec.path):
            continue
        if verify_shard(spec.path, spec.file_meta()):
            from raas_batch.data.writer import file_sha256

            rows = pq.read_table(spec.path).to_pylist()
            job.manifest.finish(rec.index, os.path.join(SHARDS, spec.file_name), len(rows),
                                file_sha256(spec.path), {**shard_stats(rows), "adopted": True})
            adopted += 1
            log(f"shard {rec.index}: adopted {spec.file_name} (complete on disk, not yet recorded done)")
        else:
            os.unlink(spec.path)
            log(f"shard {rec.index}: removed incomplete or foreign {spec.file_name}; it will be regenerated")
    return adopted


def run_job(cfg: JobConfig, stream=None, engine=None) -> dict[str, Any]:
    """Run (or resume) a whole job; return the summary (also written to DIR/summary.json).

    Raises JobError before writing anything when the job cannot start. `engine` overrides make_engine.
    """
    import sys

    from raas_batch.data.progress import JobProgress

    stream = stream if stream is not None else sys.stderr
    t_start = time.monotonic()
    job = prepare_job(cfg)
    manifest = job.manifest
    manifest_path = os.path.join(job.out_dir, MANIFEST)
    messages = _reopen_missing(job) if job.mode == "resume" else []
    todo_before = manifest.todo()

    t_load = time.monotonic()
    if todo_before and engine is None:
        check_engine_settings(cfg)
        try:
            engine = make_engine(cfg)
        except Exception as exc:  # noqa: BLE001  # the engine's own message says what was wrong
            raise JobError(f"Could not start the engine ({type(exc).__name__}: {exc}): check --model, "
                           "--kv-policy, --kv-budget, --dtype and --device.") from None
    load_s = time.monotonic() - t_load

    # From here on the output folder is written. The new manifest goes first: with --overwrite it
    # atomically forgets the old job, so a kill while old files are deleted leaves only pending shards.
    os.makedirs(job.out_dir, exist_ok=True)
    run_record = {"started_at": time.time(), "pid": os.getpid(), "mode": job.mode}
    manifest.runs.append(run_record)
    manifest.save(manifest_path)
    if job.mode == "overwrite":
        _clear_outputs(job.out_dir)
    os.makedirs(os.path.join(job.out_dir, SHARDS), exist_ok=True)
    _atomic_write_text(os.path.join(job.out_dir, CONFIG), cfg.to_yaml())

    adopted = _recover(job, messages.append)
    if adopted:
        manifest.save(manifest_path)
    progress = JobProgress(total_rows=manifest.num_rows, initial_rows=manifest.rows_done(), quiet=cfg.quiet,
                           stream=stream)
    for message in messages:
        progress.log(message)
    worker = ShardWorker(engine) if engine is not None else None
    done_now, failed_now, tokens_now, rows_now = 0, 0, 0, 0
    t_run = time.monotonic()
    try:
        for rec in manifest.todo():
            manifest.start(rec.index)
            manifest.save(manifest_path)
            spec = job.shard_spec(rec.index)
            rows_before, tokens_before = progress.rows, progress.tokens
            try:
                result = worker.run(spec, progress_callback=progress.update)
            except Exception as exc:  # noqa: BLE001 - any engine failure fails this shard only
                failed_now += 1
                manifest.fail(rec.index, f"{type(exc).__name__}: {exc}")
                manifest.save(manifest_path)
                progress.log(f"shard {rec.index} failed (attempt {rec.attempts}): {type(exc).__name__}: "
                             f"{exc}; rerun with --resume to retry it")
                continue
            manifest.finish(rec.index, os.path.join(SHARDS, spec.file_name), result.num_output_rows,
                            result.sha256, result.stats)
            manifest.save(manifest_path)
            done_now += 1
            rows_now += rec.num_rows
            tokens_now += result.stats["completion_tokens"]
            # Reconcile with what the engine's callback reported (or did not).
            missing_tokens = result.stats["completion_tokens"] - (progress.tokens - tokens_before)
            progress.update(max(0, missing_tokens), 0)
            progress.advance_to(rows_before + rec.num_rows)
            if not progress.is_bar:
                progress.log(f"shard {rec.index + 1}/{len(manifest.shards)} done: {rec.num_rows} rows, "
                             f"{result.stats['completion_tokens']} tokens, {result.stats['num_errors']} "
                             f"errors, {result.stats['wall_s']:.1f}s")
    except KeyboardInterrupt:
        for rec in manifest.shards:
            if rec.state == "running":
                manifest.fail(rec.index, "interrupted")
        raise
    finally:
        run_s = time.monotonic() - t_run
        run_record.update(finished_at=time.time(), wall_s=time.monotonic() - t_start, shards_done=done_now,
                          shards_adopted=adopted, shards_failed=failed_now, completion_tokens=tokens_now)
        manifest.save(manifest_path)
        progress.close()
        summary = build_summary(job, run_record, engine, rows_now, tokens_now, run_s, load_s)
        _atomic_write_text(os.path.join(job.out_dir, SUMMARY), json.dumps(summary, indent=2) + "\n")
    return summary


def build_summary(job: Job, run: dict[str, Any], engine, rows_now: int, tokens_now: int, run_s: float,
                  load_s: float) -> dict[str, Any]:
    """summary.json: whole-job totals from the manifest, plus what this run did."""
    m, cfg = job.manifest, job.cfg
    t = m.totals()
    counts = m.counts()
    samples = t.get("num_samples", 0)
    ok_samples = samples - t.get("num_errors", 0)
    shard_s = t.get("wall_s", 0.0)
    return {
        "complete": counts["done"] == len(m.shards),
        "output": job.out_dir,
        "input": cfg.input,
        "model": t.get("model") or getattr(engine, "model_name", None) or cfg.model,
        "kv_policy": cfg.kv_policy,
        "kv_budget": cfg.kv_budget,
        "rows": t.get("num_rows", 0),
        "rows_total": m.num_rows,
        "samples": samples,
        "errors": t.get("num_errors", 0),
        "finish_reasons": t.get("finish_reasons", {}),
        "prompt_tokens": t.get("prompt_tokens", 0),
        "completion_tokens": t.get("completion_tokens", 0),
        "reasoning_tokens": t.get("reasoning_tokens", 0),
        "tokens_per_s": round(tokens_now / run_s, 3) if run_s > 0 and tokens_now else 0.0,
        "wall_time_s": round(run.get("wall_s", 0.0), 3),
        "engine_load_s": round(load_s, 3),
        "job_tokens_per_s": round(t.get("completion_tokens", 0) / shard_s, 3) if shard_s > 0 else 0.0,
        "job_shard_time_s": round(shard_s, 3),
        "mean_peak_kv_tokens": round(t.get("peak_kv_tokens_sum", 0) / ok_samples, 1) if ok_samples else 0.0,
        "max_peak_kv_tokens": t.get("peak_kv_tokens_max", 0),
        "evicted_pages": t.get("evicted_pages", 0),
        "mean_e2e_s": round(t.get("e2e_s_sum", 0.0) / ok_samples, 4) if ok_samples else 0.0,
        "shards": {"total": len(m.shards), **counts},
        "this_run": {"mode": job.mode, "rows": rows_now, "completion_tokens": tokens_now,
                     "shards_done": run.get("shards_done", 0), "shards_adopted": run.get("shards_adopted", 0),
                     "shards_failed": run.get("shards_failed", 0), "wall_time_s": round(run.get("wall_s", 0.0), 3)},
        "num_runs": len(m.runs),
        "fingerprint": m.fingerprint_hash,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
