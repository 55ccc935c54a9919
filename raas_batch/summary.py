"""summary.json: whole-job totals from the manifest, plus what this run did (local and Ray runs).

Invariants:
- `tokens_per_s` is this run's completion tokens over this run's generation wall time (real time,
  never a sum of per-shard times, which overlap when shards stream through one batch).
- `job_tokens_per_s` is the same over every run of the job that recorded its generation time.
- `repaired_shards` names every done shard this run found missing or damaged (and whether it is
  regenerated now); `complete` is true only when every shard is done after those repairs.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from raas_batch.audit import summary_block
from raas_batch.job import SUMMARY, Job, atomic_write_text


def write_summary(job: Job, run_record: dict[str, Any], engine, rows_now: int, tokens_now: int, run_s: float,
                  load_s: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build summary.json (plus `extra` keys, e.g. the Ray driver's per-worker figures) and write it."""
    summary = build_summary(job, run_record, engine, rows_now, tokens_now, run_s, load_s)
    audit = summary_block(job)
    if audit is not None:
        summary["audit"] = audit
        # an audit asked for and not done leaves the job incomplete (exit 1; --resume finishes it)
        summary["complete"] = summary["complete"] and "state" not in audit
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(summary.get(key), dict):
            summary[key].update(value)  # e.g. this_run: {retries, worker_restarts}
        else:
            summary[key] = value
    atomic_write_text(os.path.join(job.out_dir, SUMMARY), json.dumps(summary, indent=2) + "\n")
    return summary


def build_summary(job: Job, run: dict[str, Any], engine, rows_now: int, tokens_now: int, run_s: float,
                  load_s: float) -> dict[str, Any]:
    """summary.json: whole-job totals from the manifest, plus what this run did."""
    m, cfg = job.manifest, job.cfg
    t = m.totals()
    counts = m.counts()
    samples = t.get("num_samples", 0)
    ok_samples = samples - t.get("num_errors", 0)
    timed = [r for r in m.runs if r.get("generate_s")]
    job_tokens, job_s = sum(r.get("completion_tokens", 0) for r in timed), sum(r["generate_s"] for r in timed)
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
        "job_tokens_per_s": round(job_tokens / job_s, 3) if job_s > 0 else 0.0,
        "job_generate_s": round(job_s, 3),
        "max_num_seqs": getattr(engine, "max_num_seqs", None) or cfg.max_num_seqs,
        "mean_peak_kv_tokens": round(t.get("peak_kv_tokens_sum", 0) / ok_samples, 1) if ok_samples else 0.0,
        "max_peak_kv_tokens": t.get("peak_kv_tokens_max", 0),
        "evicted_pages": t.get("evicted_pages", 0),
        "kv_over_budget": t.get("kv_over_budget", 0),
        "mean_e2e_s": round(t.get("e2e_s_sum", 0.0) / ok_samples, 4) if ok_samples else 0.0,
        "shards": {"total": len(m.shards), **counts},
        "failed_shards": [{"index": s.index, "rows": [s.start, s.end], "attempts": s.attempts, "error": s.error}
                          for s in m.shards if s.state != "done" and s.error],
        # Done shards this run found missing or damaged and reopened (regenerated if now done).
        "repaired_shards": [dict(r, regenerated=m.shards[r["index"]].state == "done") for r in run.get("repaired", [])],
        "this_run": {"mode": job.mode, "rows": rows_now, "completion_tokens": tokens_now,
                     "shards_done": run.get("shards_done", 0), "shards_adopted": run.get("shards_adopted", 0),
                     "shards_failed": run.get("shards_failed", 0),
                     "shards_repaired": len(run.get("repaired", [])), "wall_time_s": round(run.get("wall_s", 0.0), 3)},
        "num_runs": len(m.runs),
        "fingerprint": m.fingerprint_hash,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
