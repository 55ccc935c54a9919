"""Batch job runner: job checks, the output folder's lifecycle and the local driver loop. The shard
worker is `raas_batch.worker` (reused by the Ray actor); the Ray driver is `raas_batch.distributed`.

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

import json
import os
import time
from dataclasses import dataclass
from typing import Any

from raas_batch.config import JobConfig
from raas_batch.data.reader import InputError, ReaderSpec, detect_input, open_reader
from raas_batch.data.writer import fsync_dir, shard_file_name, verify_shard

# The worker part lives in raas_batch.worker; these names stay importable from here.
from raas_batch.worker import (  # noqa: F401
    ENGINE_ENV,
    RowJob,
    ShardPlan,
    ShardResult,
    ShardSpec,
    ShardWorker,
    derive_row_seed,
    make_engine,
    shard_stats,
    validate_prompt,
)


class JobError(Exception):
    """Job-level failure a user can fix: one sentence naming what and how; exit status 2."""


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
        make_policy(cfg.kv_policy, cfg.kv_budget, cfg.page_size, **(cfg.kv_policy_options or {}))
    except (ValueError, TypeError) as exc:
        options = f", --kv-policy-options {json.dumps(cfg.kv_policy_options)}" if cfg.kv_policy_options else ""
        raise JobError(f"--kv-policy {cfg.kv_policy} with --kv-budget {cfg.kv_budget}, --page-size "
                       f"{cfg.page_size}{options} cannot run: {exc}") from None


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
    """Check everything a user can get wrong at job level; write nothing. Raises JobError.

    The job's config (`Job.cfg`) has its unset sampling fields resolved from the model's
    generation_config: those values are fingerprinted and written to config.yaml."""
    from raas_batch.data.manifest import Manifest
    from raas_batch.generation_config import read_generation_defaults

    cfg = cfg.with_sampling_defaults(read_generation_defaults(cfg.model))

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

    run_record, adopted = begin_run(job, messages.append)
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
        summary = write_summary(job, run_record, engine, rows_now, tokens_now, run_s, load_s)
    return summary


def begin_run(job: Job, log) -> tuple[dict[str, Any], int]:
    """Start writing the output folder (after every job-level check passed and the engine loaded).

    The new manifest goes first: with --overwrite it atomically forgets the old job, so a kill while
    old files are deleted leaves only pending shards. Then config.yaml, then recovery of what a
    killed run left (`_recover`). Returns this run's record (in manifest.runs) and the number of
    adopted shards. Shared by the local and the Ray driver, so both leave the same layout."""
    manifest_path = os.path.join(job.out_dir, MANIFEST)
    os.makedirs(job.out_dir, exist_ok=True)
    run_record = {"started_at": time.time(), "pid": os.getpid(), "mode": job.mode}
    job.manifest.runs.append(run_record)
    job.manifest.save(manifest_path)
    if job.mode == "overwrite":
        _clear_outputs(job.out_dir)
    os.makedirs(os.path.join(job.out_dir, SHARDS), exist_ok=True)
    _atomic_write_text(os.path.join(job.out_dir, CONFIG), job.cfg.to_yaml())
    adopted = _recover(job, log)
    if adopted:
        job.manifest.save(manifest_path)
    return run_record, adopted


def write_summary(job: Job, run_record: dict[str, Any], engine, rows_now: int, tokens_now: int, run_s: float,
                  load_s: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build summary.json (plus `extra` keys, e.g. the Ray driver's per-worker figures) and write it."""
    summary = build_summary(job, run_record, engine, rows_now, tokens_now, run_s, load_s)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(summary.get(key), dict):
            summary[key].update(value)  # e.g. this_run: {retries, worker_restarts}
        else:
            summary[key] = value
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
        "failed_shards": [{"index": s.index, "rows": [s.start, s.end], "attempts": s.attempts, "error": s.error}
                          for s in m.shards if s.state != "done" and s.error],
        "this_run": {"mode": job.mode, "rows": rows_now, "completion_tokens": tokens_now,
                     "shards_done": run.get("shards_done", 0), "shards_adopted": run.get("shards_adopted", 0),
                     "shards_failed": run.get("shards_failed", 0), "wall_time_s": round(run.get("wall_s", 0.0), 3)},
        "num_runs": len(m.runs),
        "fingerprint": m.fingerprint_hash,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
