"""Distributed runs on Ray: `python -m raas_batch --ray` and `ray job submit ... jobs/run.py`.

    driver (this process, alone writes the manifest)          GenerationWorker actors (one per GPU)
    ------------------------------------------------          ---------------------------------------
    same checks as a local run (prepare_job), then start       load the engine once
    the actors; the first one ready -> begin_run (manifest,
    config.yaml, recovery: the local run's layout)
    loop: each ready worker gets shards while its   --spec-->  read rows from the source itself,
          unfinished rows are fewer than it wants              stream every shard it holds through
          (2 x its batch; ShardQueue), manifest:               one engine batch, write each shard
          running (saved)                                      file itself as soon as it is done
          result: done (saved) / failed -> retry   <--------  (in any order)
          actor died -> replace it, retry its shards
          poll counters -> one progress bar
    every shard done, --audit-rows: the audit  --specs-->  one worker stops its engine thread and
          (raas_batch.audit: audit.parquet and <--------  decodes the audited rows (policy + dense)
          manifest.audit written here)
    summary.json (+ per-worker figures), exit 1 naming shards given up

Invariants:
- The output folder is exactly a local run's (same manifest, files, config.yaml, summary.json keys
  plus "workers" and "distributed"), so `--resume` continues a Ray job locally and the other way.
- Only this process writes manifest.json; a shard is done only after its worker wrote its file.
- Job-level errors (bad input, bad settings, no engine could start on any worker) raise JobError
  before anything is written, as in a local run.
- A shard that fails (its worker died, its engine broke, its file could not be written) is retried on
  any worker, isolated, up to --max-attempts tries in this run; then it is marked failed with its
  error and the job finishes the rest (exit 1; --resume retries it).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

from raas_batch.audit import audit_pending, run_audit
from raas_batch.config import JobConfig
from raas_batch.data.progress import JobProgress
from raas_batch.job import (
    MANIFEST,
    SHARDS,
    Job,
    JobError,
    begin_run,
    check_engine_settings,
    prepare_job,
)
from raas_batch.summary import write_summary

# Most shards one worker holds at once (each waits in a thread of the actor); the rows it is sent are
# bounded first by what it asks for (2 x its batch), so this only matters for very small shards.
MAX_SHARDS_PER_WORKER = 64
POLL_S = 0.5  # progress poll interval
START_TIMEOUT_ENV = "RAAS_BATCH_WORKER_START_TIMEOUT_S"  # give up if no worker is ready after this long


def run_job_ray(cfg: JobConfig, stream=None, wait_for_all_workers: bool = False) -> dict[str, Any]:
    """Run (or resume) a whole job on a Ray cluster; return the summary (also in DIR/summary.json).

    Work starts as soon as one worker is ready (the others join when their engine is loaded), unless
    wait_for_all_workers (benchmarks: this run's tokens/s then counts only time with every worker up)."""
    stream = stream if stream is not None else sys.stderr
    t_start = time.monotonic()
    job = prepare_job(cfg)
    messages: list[str] = []
    todo = job.manifest.todo()
    if not todo and not audit_pending(job):  # a resume of a finished job: nothing to distribute, no cluster needed
        from raas_batch.runner import run_job

        return run_job(cfg, stream)
    check_engine_settings(cfg)
    import ray

    from raas_batch.distributed.pool import WorkerPool

    started_ray = _connect(cfg)
    pool = None
    try:
        resources = ray.cluster_resources()
        num_gpus = int(resources.get("GPU", 0))
        use_gpu = num_gpus > 0 and (cfg.device or "cuda").startswith("cuda")
        num_workers = cfg.num_workers or (num_gpus if use_gpu else 1)
        if use_gpu and num_workers > num_gpus:
            messages.append(f"{num_workers} workers asked for, the cluster has {num_gpus} GPUs: the others "
                            "wait for GPUs to appear (autoscaling)")
        pool = WorkerPool(cfg, num_workers, use_gpu, MAX_SHARDS_PER_WORKER)
        t_load = time.monotonic()
        pool.start_all()
        _wait_ready(pool, wait_for_all_workers)
        load_s = time.monotonic() - t_load
        run_record, adopted = begin_run(job, messages.append)
        run_record["distributed"] = {"backend": "ray", "address": _address(), "num_workers": num_workers,
                                     "gpu": use_gpu, "max_shards_per_worker": MAX_SHARDS_PER_WORKER,
                                     "max_attempts": cfg.max_attempts}
        run_record["workers"] = [dict(s.info, worker=s.index) for s in pool.ready_seats()]
        return _RayRun(job, pool, run_record, adopted, stream, messages).run(t_start, load_s)
    finally:
        if pool is not None:
            pool.kill_all()
        if started_ray:
            ray.shutdown()


def _connect(cfg: JobConfig) -> bool:
    """Join the cluster (inside `ray job submit`, RAY_ADDRESS names it). True if we called ray.init."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    try:
        ray.init(address=cfg.ray_address, logging_level=logging.WARNING, log_to_driver=not cfg.quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = cfg.ray_address or os.environ.get("RAY_ADDRESS") or "the default address"
        raise JobError(f"Could not connect to the Ray cluster at {where} ({exc}): start one with `ray start "
                       "--head`, pass --ray-address, or --ray-address local for a one-machine cluster (a cluster "
                       "with token authentication also needs RAY_AUTH_MODE=token here).") from None
    return True


def _address() -> str | None:
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - informational only
        return None


def _wait_ready(pool, wait_for_all: bool) -> None:
    """Block until one worker is ready (or every seat has settled, wait_for_all); JobError when every
    seat failed to start or on timeout."""
    import ray

    timeout = float(os.environ.get(START_TIMEOUT_ENV, "1800"))
    t0 = time.monotonic()
    while not pool.ready_seats() or (wait_for_all and pool.starting()):
        starting = pool.starting()
        if not starting and not pool.ready_seats():
            raise JobError(f"Could not start the engine on any Ray worker ({pool.last_error()}): check --model, "
                           "--kv-policy, --kv-budget, --dtype and --device.")
        if time.monotonic() - t0 > timeout:
            if pool.ready_seats():
                return  # the late ones join when (if) they start
            raise JobError(f"No Ray worker started within {timeout:.0f} s (the cluster may lack the GPUs or CPUs "
                           f"asked for): check `ray status`, --num-workers, or set {START_TIMEOUT_ENV}.")
        done, _ = ray.wait(list(starting), num_returns=1, timeout=1.0)
        for ref in done:
            pool.on_ready(starting[ref])


class _RayRun:
    """The dispatch loop of one run, after begin_run."""

    def __init__(self, job: Job, pool, run_record: dict[str, Any], adopted: int, stream, messages):
        from raas_batch.distributed.dispatch import ShardQueue

        self.job, self.pool, self.run_record, self.adopted = job, pool, run_record, adopted
        self.manifest = job.manifest
        self.manifest_path = os.path.join(job.out_dir, MANIFEST)
        self.queue = ShardQueue([rec.index for rec in self.manifest.todo()], job.cfg.max_attempts,
                                MAX_SHARDS_PER_WORKER)
        self.inflight: dict[Any, tuple[Any, int]] = {}  # run_shard ref -> (seat, shard index)
        self.progress = JobProgress(total_rows=self.manifest.num_rows, initial_rows=self.manifest.rows_done(),
                                    quiet=job.cfg.quiet, stream=stream)
        for note in job.notes:  # damage found and repaired: printed even with --quiet
            self.progress.log(note, always=True)
        for message in messages:
            self.progress.log(message)
        for seat in pool.ready_seats():
            self._log_ready(seat)
        self.rows_now = self.tokens_now = 0
        self._last_poll = 0.0

    def run(self, t_start: float, load_s: float) -> dict[str, Any]:
        t_run = time.monotonic()
        try:
            self._loop()
            if not self.manifest.todo() and audit_pending(self.job):  # the audit: after every shard is done
                self._audit()
        except KeyboardInterrupt:
            for rec in self.manifest.shards:
                if rec.state == "running":
                    self.manifest.fail(rec.index, "interrupted")
            raise
        finally:
            run_s = time.monotonic() - t_run
            self._poll(0.5)
            q = self.queue
            restarts = sum(max(0, s.generation - 1) for s in self.pool.seats)
            self.run_record.update(finished_at=time.time(), wall_s=time.monotonic() - t_start,
                                   shards_done=len(q.done), shards_adopted=self.adopted,
                                   shards_failed=len(q.given_up), completion_tokens=self.tokens_now,
                                   generate_s=run_s,
                                   retries=q.num_retries, worker_restarts=restarts)
            self.manifest.save(self.manifest_path)
            self.progress.close()
            workers = [s.figures() for s in self.pool.seats]
            extra = {"distributed": self.run_record["distributed"], "workers": workers,
                     "this_run": {"retries": q.num_retries, "worker_restarts": restarts}}
            summary = write_summary(self.job, self.run_record, None, self.rows_now, self.tokens_now, run_s, load_s,
                                    extra)
            self._print_workers(workers)
        return summary

    def _audit(self) -> None:
        """The audit's decodes on one ready worker (GenerationWorker.audit); the table, its file and the
        manifest record are written here, as in a local run."""
        import ray

        seats = self.pool.ready_seats()
        if not seats:
            self.progress.log("audit: no Ray worker is ready to run it; rerun with --resume to do it")
            return

        def decode(specs):
            reply = ray.get(seats[0].actor.audit.remote(specs))
            if not reply["ok"]:
                raise RuntimeError(reply["error"])
            return reply["result"]

        run_audit(self.job, decode, lambda: self.manifest.save(self.manifest_path), self.progress.log)

    # --- the loop ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        import ray

        while self.queue.has_work():
            self._dispatch()
            if not self.pool.any_open():
                error = f"no Ray worker left to run it (last error: {self.pool.last_error()})"
                for index in self.queue.give_up_waiting(error):
                    self.manifest.fail(index, error)
                self.manifest.save(self.manifest_path)
                self.progress.log(f"every worker seat is closed: {error}", always=True)
                break
            starting = self.pool.starting()
            refs = list(self.inflight) + list(starting)
            if refs:
                done, _ = ray.wait(refs, num_returns=1, timeout=POLL_S)
                if done:
                    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                for ref in done:
                    if ref in self.inflight:
                        self._on_result(ref)
                    elif ref in starting:
                        self._on_started(starting[ref])
            if time.monotonic() - self._last_poll >= POLL_S:
                self._poll(0.2)

    def _dispatch(self) -> None:
        changed = False
        for seat in self.pool.ready_seats():
            while seat.rows_wanted() > 0 and (index := self.queue.take(seat.index)) is not None:
                self.manifest.start(index)
                changed = True
                spec = self.job.shard_spec(index)
                ref = seat.actor.run_shard.remote(spec)
                seat.sent_rows.append(spec.num_rows)
                self.inflight[ref] = (seat, index)
        if changed:
            self.manifest.save(self.manifest_path)

    def _on_result(self, ref) -> None:
        import ray

        from raas_batch.distributed.pool import short_error

        seat, index = self.inflight.pop(ref)
        try:
            res = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the actor died: killed, out of memory, node lost
            who = f"pid {seat.info.get('pid')} on {seat.info.get('host')}"
            self._worker_lost(seat, f"worker {seat.index} ({who}): {short_error(exc)}")
            return
        if res["ok"]:
            self._shard_done(seat, index, res["result"])
        elif res["broken"]:
            self._worker_lost(seat, res["error"])
        else:
            self._shard_failed(seat, index, res["error"])
            self.manifest.save(self.manifest_path)

    def _on_started(self, seat) -> None:
        info = self.pool.on_ready(seat)
        if info is not None:
            self.run_record.setdefault("workers", []).append(dict(info, worker=seat.index))
            self._log_ready(seat)
        elif seat.state == "closed":
            self.queue.remove_seat(seat.index)
            self.progress.log(f"worker {seat.index} could not start and is given up: {seat.last_error}")
        else:
            self.progress.log(f"worker {seat.index} failed to start ({seat.last_error}); starting another")

    def _shard_done(self, seat, index: int, result) -> None:
        rec = self.manifest.shards[index]
        self.queue.finish(seat.index, index)
        self.manifest.finish(index, os.path.join(SHARDS, os.path.basename(result.path)), result.num_output_rows,
                             result.sha256, dict(result.stats, worker=seat.index), result.size)
        self.manifest.save(self.manifest_path)
        tokens = result.stats["completion_tokens"]
        seat.shards_done += 1
        seat.rows += rec.num_rows
        seat.completion_tokens += tokens
        self.rows_now += rec.num_rows
        self.tokens_now += tokens
        self.progress.advance_to(self._rows_shown({}))
        if not self.progress.is_bar:
            counts = self.manifest.counts()
            self.progress.log(f"shard {index} done on worker {seat.index} ({counts['done']}/{len(self.manifest.shards)} "
                              f"shards): {rec.num_rows} rows, {tokens} tokens, {result.stats['num_errors']} errors, "
                              f"{result.stats['wall_s']:.1f}s")

    def _shard_failed(self, seat, index: int, error: str) -> None:
        retried = self.queue.fail(seat.index, index, error)
        attempts = self.queue.attempts[index]
        self.manifest.fail(index, error)
        if retried:
            self.progress.log(f"shard {index} failed on worker {seat.index} (try {attempts} of "
                              f"{self.queue.max_attempts}): {error}; retrying it")
        else:
            self.progress.log(f"shard {index} failed {attempts} times and is given up: {error}; rerun with "
                              "--resume to retry it", always=True)

    def _worker_lost(self, seat, error: str) -> None:
        """Every shard the seat held failed; its actor is replaced."""
        for ref, (s, _) in list(self.inflight.items()):
            if s is seat:
                del self.inflight[ref]
        for index in sorted(self.queue.inflight(seat.index)):
            self._shard_failed(seat, index, error)
        self.manifest.save(self.manifest_path)
        self._remove_temp_files(seat.info.get("pid"))
        self.pool.replace(seat, error)
        self.progress.log(f"worker {seat.index} is replaced ({error})")

    def _remove_temp_files(self, pid) -> None:
        """A killed writer leaves `.part-*.tmp-PID` behind (never a partial part-* file: writes are renames)."""
        if pid is None:
            return
        folder = os.path.join(self.job.out_dir, SHARDS)
        for name in os.listdir(folder):
            if name.startswith(".part-") and name.endswith(f".tmp-{pid}"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))

    # --- progress ------------------------------------------------------------------------------------
    def _poll(self, timeout_s: float) -> None:
        self._last_poll = time.monotonic()
        new_tokens, rows = self.pool.poll(timeout_s)
        self.progress.update(new_tokens, 0)
        self.progress.advance_to(self._rows_shown(rows))

    def _rows_shown(self, rows: dict[int, dict[int, int]]) -> int:
        """Rows of done shards plus rows finished in shards still in flight (never above a shard's size)."""
        shown = self.manifest.rows_done()
        for seat_index, per_shard in rows.items():
            held = self.queue.inflight(seat_index)
            for index, num in per_shard.items():
                if index in held:
                    shown += min(num, self.manifest.shards[index].num_rows)
        return shown

    def _log_ready(self, seat) -> None:
        i = seat.info
        self.progress.log(f"worker {seat.index} ready: pid {i.get('pid')} on {i.get('host')}, "
                          f"{i.get('gpu') or i.get('device')}, engine loaded in {i.get('load_s')} s")

    def _print_workers(self, workers: list[dict[str, Any]]) -> None:
        if self.job.cfg.quiet:
            return
        for w in workers:
            print(f"[raas_batch] worker {w['worker']}: {w['shards_done']} shards, {w['rows']} rows, "
                  f"{w['completion_tokens']} tokens, {w['tokens_per_s']:.1f} tok/s over {w['busy_s']:.1f} s busy, "
                  f"{w['failures']} failures, {w['restarts']} restarts ({w['device']}, pid {w['pid']})",
                  file=self.progress.stream, flush=True)
