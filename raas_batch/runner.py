"""The local run of a batch job: every pending shard streams through one engine in this process.

    run_job(cfg)                                        ShardStream (raas_batch.shard_stream)
    ------------                                        -------------------------------------
    prepare_job, load the engine, begin_run             one engine stream over all pending shards
    plans pulled as the batch has room:                 rows of the next shards are admitted while
        manifest: running (saved before the next step)  earlier rows decode
        read rows [start, end) from the source
    a shard's last row done -> queued to the     <----  on_done(plan, outputs), in any order
        writer thread: its file written atomically,
        then manifest: done (saved)
    every shard done -> the audit (--audit-rows; raas_batch.audit) on the same engine
    summary.json (tokens/s over this run's wall time)

Invariants: those of `raas_batch.job` (exactly-once: a shard is done only once its file is in place,
whatever order shards finish in; a kill at any instant leaves `running`/`pending` shards that
`--resume` redoes). An engine error fails the shards in flight (the job goes on with the others and
exits 1; `--resume` retries them); a shard whose rows cannot be read or whose file cannot be written
fails alone. The GPU running out of memory fails the shards in flight with a message naming
--max-num-seqs and --gpu-memory-utilization and stops the run at once (the other shards stay pending:
the next ones would only run out of memory again). Failures and repairs are logged even with --quiet.

Shard files are written on one writer thread, so the engine keeps decoding while a finished shard's
rows are converted, compressed and hashed (Parquet writing releases the GIL): at a shard boundary the
GPU does not wait for the file. The manifest is changed and saved under one lock, by either thread;
`_LocalRun.run` returns only once every queued file is written and recorded (also after an error or
an interrupt), so the summary and the audit see every shard the run finished.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from raas_batch.audit import audit_pending, decode_rows, run_audit
from raas_batch.config import JobConfig
from raas_batch.data.progress import JobProgress
from raas_batch.engine_factory import make_engine, out_of_memory_advice
from raas_batch.job import (
    MANIFEST,
    SHARDS,
    Job,
    JobError,
    begin_run,
    check_engine_settings,
    prepare_job,
)
from raas_batch.prompts import has_chat_template
from raas_batch.shard_stream import ShardStream
from raas_batch.shards import ShardPlan
from raas_batch.summary import write_summary


def load_engine(cfg: JobConfig):
    """Check the engine settings (in a second), then build the engine (minutes); JobError on failure."""
    check_engine_settings(cfg)
    try:
        return make_engine(cfg)
    except Exception as exc:  # noqa: BLE001  # the engine's own message says what was wrong
        advice = out_of_memory_advice(exc, cfg)
        if advice:
            raise JobError(f"Could not start the engine: {advice}.") from None
        raise JobError(f"Could not start the engine ({type(exc).__name__}: {exc}): check --model, "
                       "--kv-policy, --kv-budget, --dtype and --device.") from None


def run_job(cfg: JobConfig, stream=None, engine=None) -> dict[str, Any]:
    """Run (or resume) a whole job; return the summary (also written to DIR/summary.json).

    Raises JobError before writing anything when the job cannot start. `engine` overrides make_engine.
    """
    stream = stream if stream is not None else sys.stderr
    t_start = time.monotonic()
    job = prepare_job(cfg)
    notes = list(job.notes)  # damage found and repaired: printed even with --quiet
    messages: list[str] = []
    t_load = time.monotonic()
    if (job.manifest.todo() or audit_pending(job)) and engine is None:
        engine = load_engine(job.cfg)
    load_s = time.monotonic() - t_load

    run_record, adopted = begin_run(job, messages.append)
    if engine is not None and job.cfg.apply_chat_template and not has_chat_template(getattr(engine, "tokenizer", None)):
        messages.append("the model has no chat template: text prompts are sent as they are")
    progress = JobProgress(total_rows=job.manifest.num_rows, initial_rows=job.manifest.rows_done(),
                           quiet=job.cfg.quiet, stream=stream)
    for note in notes:
        progress.log(note, always=True)
    for message in messages:
        progress.log(message)
    local = _LocalRun(job, engine, progress) if engine is not None else None
    t_run = time.monotonic()
    try:
        if local is not None:
            local.run()
            if not job.manifest.todo() and audit_pending(job):  # the audit: after every shard is done
                run_audit(job, lambda specs: decode_rows(local.stream, specs), local.save, progress.log)
    except KeyboardInterrupt:
        for rec in job.manifest.shards:
            if rec.state == "running":
                job.manifest.fail(rec.index, "interrupted")
        raise
    finally:
        run_s = time.monotonic() - t_run
        done, failed, rows, tokens = (local.done, local.failed, local.rows, local.tokens) if local else (0, 0, 0, 0)
        run_record.update(finished_at=time.time(), wall_s=time.monotonic() - t_start, shards_done=done,
                          shards_adopted=adopted, shards_failed=failed, completion_tokens=tokens,
                          generate_s=run_s if local is not None else 0.0)
        job.manifest.save(os.path.join(job.out_dir, MANIFEST))
        progress.close()
        summary = write_summary(job, run_record, engine, rows, tokens, run_s, load_s)
    return summary


class _LocalRun:
    """One run's stream of shards (engine: this thread) and its manifest bookkeeping (this thread and
    the writer thread, under `_lock`)."""

    def __init__(self, job: Job, llm, progress: JobProgress):
        self.job, self.manifest, self.progress = job, job.manifest, progress
        self.manifest_path = os.path.join(job.out_dir, MANIFEST)
        self.stream = ShardStream(llm, self._on_done)
        self.done = self.failed = self.rows = self.tokens = 0
        self._unsaved = False  # shards marked running since the last save
        self._lock = threading.Lock()  # the manifest, its file, the counters and the log
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")

    def run(self) -> None:
        try:
            self._run()
        finally:  # every file handed to the writer is written and recorded before the run ends
            self._writer.shutdown(wait=True)

    def _run(self) -> None:
        plans = self._plans()
        while True:
            try:
                self.stream.run(plans, self._on_step)
                return
            except Exception as exc:  # noqa: BLE001 - an engine failure fails the shards in flight only
                failed = sorted(self.stream.active)
                self.stream.active.clear()
                advice = out_of_memory_advice(exc, self.job.cfg, getattr(self.stream.llm, "max_num_seqs", None))
                for index in failed:
                    self._fail(index, advice or f"{type(exc).__name__}: {exc}")
                if advice:
                    _release_gpu_cache()
                    self._log(f"shard(s) {', '.join(map(str, failed))} failed: {advice}; the run stops here "
                              "(the other shards stay pending)", always=True)
                    return
                self._log(f"the engine failed ({type(exc).__name__}: {exc}) with shard(s) "
                          f"{', '.join(map(str, failed))} in flight; they are marked failed (rerun with "
                          "--resume to retry them) and the job goes on", always=True)

    def _plans(self):
        """Pending shards in order, read when the stream has room for their rows."""
        for rec in self.manifest.todo():
            with self._lock:
                self.manifest.start(rec.index)
                self._unsaved = True
            try:
                plan = self.stream.plan(self.job.shard_spec(rec.index))
            except Exception as exc:  # noqa: BLE001 - reading this shard failed, not the engine
                self._fail(rec.index, f"reading shard {rec.index}: {type(exc).__name__}: {exc}")
                continue
            yield plan

    def save(self) -> None:
        with self._lock:
            self.manifest.save(self.manifest_path)

    def _log(self, message: str, always: bool = False) -> None:
        with self._lock:
            self.progress.log(message, always=always)

    def _on_step(self, num_tokens: int, num_rows: int) -> None:
        if self._unsaved:  # one save for every shard started since the last step
            with self._lock:
                self.manifest.save(self.manifest_path)
                self._unsaved = False
        self.progress.update(num_tokens, num_rows)

    def _on_done(self, plan: ShardPlan, outputs: dict[int, Any]) -> None:
        """The engine is done with the shard: its file is written on the writer thread."""
        self._writer.submit(self._write, plan, outputs)

    def _write(self, plan: ShardPlan, outputs: dict[int, Any]) -> None:  # writer thread
        index = plan.spec.index
        try:
            result = self.stream.write(plan, outputs)
        except Exception as exc:  # noqa: BLE001 - writing this shard failed; the others go on
            self._fail(index, f"writing shard {index}: {type(exc).__name__}: {exc}")
            return
        stats = result.stats
        with self._lock:
            self.manifest.finish(index, os.path.join(SHARDS, plan.spec.file_name), result.num_output_rows,
                                 result.sha256, result.stats, result.size)
            self.manifest.save(self.manifest_path)
            self._unsaved = False
            self.done += 1
            self.rows += plan.spec.num_rows
            self.tokens += stats["completion_tokens"]
            if not self.progress.is_bar:
                self.progress.log(f"shard {index} done ({self.manifest.counts()['done']}/{len(self.manifest.shards)} "
                                  f"shards): {plan.spec.num_rows} rows, {stats['completion_tokens']} tokens, "
                                  f"{stats['num_errors']} errors, {stats['wall_s']:.1f}s")

    def _fail(self, index: int, error: str) -> None:
        with self._lock:
            self.failed += 1
            rec = self.manifest.fail(index, error)
            self.manifest.save(self.manifest_path)
            self._unsaved = False
            self.progress.log(f"shard {index} failed (attempt {rec.attempts}): {error}; rerun with --resume to retry it",
                              always=True)


def _release_gpu_cache() -> None:
    """After an out-of-memory error: hand the allocator's cached blocks back (no-op without CUDA)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
