"""The fidelity audit (`--audit-rows N`): how far the job's KV policy moved its outputs from dense, measured
inside the job on the user's own model and data.

    after the job's shards are all done:
    pick_rows(num_rows, N)                   N input rows spread evenly over the input
    manifest.audit = {state: running, ...}   saved before any work (a kill leaves it running)
    decode_rows(stream, specs)               on the engine's host (local runner or a Ray worker): each row
                                             decoded under the job's policy and dense, same prompt, seed
                                             and sampling, both outputs scored teacher-forced under both
                                             (raas_batch.audit_engine)
    write DIR/audit.parquet atomically, then manifest.audit = {state: done, sha256, summary}
    summary.json "audit": the block of manifest.audit

Per audited sample (one row of audit.parquet): both completions and token counts, the first position
where they differ, top-1 agreement (share of positions along the policy's own output where dense and the
policy predict the same most likely next token), mean KL(dense || policy) along that output, the same
two along dense's output, both final answers (`extract_answer`) and whether they match, with
`--reference-column` whether each is correct, and whether the audit's policy decode reproduced the job's
own output row (`policy_reproduced`; it does when sampling is batch-invariant, as on the CPU).

Invariants:
- The audit never touches the shards or their manifest records: the job's output is the same with or
  without it, byte for byte.
- The audit is one resumable step: it is `done` only once audit.parquet is in place and its sha256 is in
  the manifest; a kill at any instant leaves it `running` (or absent), and `--resume` redoes it whole
  (the shards stay done). A resume with other audit settings (rows, pattern, reference column) redoes it.
- Rows without --seed are audited with a seed derived from their id (seed 0), the same for both decodes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raas_batch.data.writer import file_sha256, fsync_dir
from raas_batch.job import AUDIT_FILE
from raas_batch.shards import RowJob, ShardSpec, derive_row_seed

AUDIT_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("row_idx", pa.int64(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("seed", pa.int64()),
    pa.field("policy_completion", pa.string()),
    pa.field("dense_completion", pa.string()),
    pa.field("policy_tokens", pa.int64()),
    pa.field("dense_tokens", pa.int64()),
    pa.field("identical", pa.bool_()),
    pa.field("first_divergence", pa.int64()),  # first token index where they differ; null when identical
    pa.field("top1_agreement", pa.float64()),  # along the policy's output
    pa.field("mean_kl", pa.float64()),  # KL(dense || policy) along the policy's output
    pa.field("dense_path_agreement", pa.float64()),  # the same two along dense's output
    pa.field("dense_path_mean_kl", pa.float64()),
    pa.field("policy_answer", pa.string()),
    pa.field("dense_answer", pa.string()),
    pa.field("answer_match", pa.bool_()),
    pa.field("reference", pa.string()),
    pa.field("policy_correct", pa.bool_()),
    pa.field("dense_correct", pa.bool_()),
    pa.field("policy_reproduced", pa.bool_()),  # the audit's policy decode equals the job's output row
    pa.field("error", pa.string()),
])


# ---- which rows, and with which settings ---------------------------------------------------------
def pick_rows(num_rows: int, num_audit: int) -> list[int]:
    """`num_audit` row indices spread evenly over [0, num_rows): the middle of each of num_audit equal
    parts (every row when num_audit >= num_rows)."""
    if num_audit >= num_rows:
        return list(range(num_rows))
    return [int((i + 0.5) * num_rows / num_audit) for i in range(num_audit)]


def audit_settings(cfg) -> dict[str, Any]:
    return {"audit_rows": cfg.audit_rows, "answer_pattern": cfg.answer_pattern,
            "reference_column": cfg.reference_column}


def audit_pending(job) -> bool:
    """Whether this run must (re)do the audit: asked for, and not done with these settings and file."""
    if not job.cfg.audit_rows:
        return False
    rec = job.manifest.audit or {}
    if rec.get("state") != "done" or rec.get("settings") != audit_settings(job.cfg):
        return True
    path = os.path.join(job.out_dir, rec.get("file") or AUDIT_FILE)
    return not os.path.exists(path) or file_sha256(path) != rec.get("sha256")


def row_specs(job) -> list[ShardSpec]:
    """One single-row ShardSpec per audited row (read by the engine's host like a shard's rows)."""
    size = job.manifest.shard_size
    return [dataclasses.replace(job.shard_spec(r // size), start=r, end=r + 1)
            for r in pick_rows(job.manifest.num_rows, job.cfg.audit_rows)]


# ---- on the engine's host ------------------------------------------------------------------------
def decode_rows(stream, specs: list[ShardSpec]) -> list[tuple[RowJob, Any]]:
    """Read each spec's row through `stream` (a ShardStream: the chat-template choice is the engine's) and
    run the audit's decodes -> [(row, AuditDecode or None when the row could not be read)]."""
    from raas_batch.audit_engine import AuditItem
    from raas_batch.sampling_params import SamplingParams

    llm = stream.llm
    if not hasattr(llm, "audit_decode"):
        raise RuntimeError(f"the engine {type(llm).__name__} cannot run the audit (it has no audit_decode)")
    rows: list[RowJob] = []
    items = []
    for spec in specs:
        row = stream.plan(spec).jobs[0]
        if row.seed is None:
            row = dataclasses.replace(row, seed=derive_row_seed(0, row.row_id))
        rows.append(row)
        if row.error is None:
            items.append(AuditItem(row.row_idx, row.prompt, SamplingParams(**spec.sampling, seed=row.seed)))
    decodes = {d.key: d for d in llm.audit_decode(items)} if items else {}
    return [(row, decodes.get(row.row_idx)) for row in rows]


# ---- answers -------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            if depth == 0:
                return text[i:j].strip()
            depth -= 1
    return None


def extract_answer(text: str | None, pattern: str | None = None) -> str | None:
    """The final answer of a completion's answer part: the last match of `pattern` (its first group if it
    has one), else the last \\boxed{...}, else the last number; None when there is none."""
    if not text:
        return None
    if pattern:
        matches = list(re.finditer(pattern, text))
        if not matches:
            return None
        last = matches[-1]
        return (last.group(1) if last.re.groups else last.group(0)).strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def reference_answer(value: Any) -> str | None:
    """A reference column's answer: a short value as it is; a worked solution's last \\boxed{...}, its
    text after the last '####' (GSM8K), else its last number."""
    if value is None:
        return None
    text = str(value).strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    if len(text.split()) == 1 and "\\boxed{" not in text:
        return text
    return extract_answer(text)


def normalize(answer: str | None) -> str | None:
    """Comparable form: no spaces, $ or thousands commas, no trailing period; numbers as numbers."""
    if answer is None:
        return None
    text = answer.strip().replace(" ", "").replace("$", "").rstrip(".")
    plain = text.replace(",", "")
    try:
        value = float(plain)
    except ValueError:
        return text
    return repr(int(value)) if value.is_integer() else repr(value)


def _same(a: str | None, b: str | None) -> bool | None:
    return None if a is None or b is None else normalize(a) == normalize(b)


# ---- the table and its summary -------------------------------------------------------------------
def build_rows(decoded, cfg, reference_values: dict[int, Any], job_outputs: dict[tuple[int, int], str]):
    """-> the audit table's rows (dicts in AUDIT_SCHEMA order) and the pooled counts for the summary."""
    rows = []
    for row, dec in decoded:
        base = {"id": row.row_id, "row_idx": row.row_idx, "seed": row.seed}
        ref = reference_answer(reference_values.get(row.row_idx)) if cfg.reference_column else None
        if dec is None:
            rows.append({**base, "sample_idx": 0, "error": row.error})
            continue
        for j, (pol, den) in enumerate(zip(dec.policy.outputs, dec.dense.outputs)):
            error = pol.error or den.error
            pol_ids, den_ids = list(pol.token_ids), list(den.token_ids)
            diverge = next((t for t, (a, b) in enumerate(zip(pol_ids, den_ids)) if a != b), None)
            if diverge is None and len(pol_ids) != len(den_ids):
                diverge = min(len(pol_ids), len(den_ids))
            ppath, dpath = dec.policy_path[j], dec.dense_path[j]
            pol_answer = extract_answer(pol.answer or pol.text, cfg.answer_pattern)
            den_answer = extract_answer(den.answer or den.text, cfg.answer_pattern)
            job_text = job_outputs.get((row.row_idx, j))
            rows.append({
                **base, "sample_idx": j, "policy_completion": pol.text, "dense_completion": den.text,
                "policy_tokens": len(pol_ids), "dense_tokens": len(den_ids), "identical": diverge is None,
                "first_divergence": diverge, "top1_agreement": ppath.agreement, "mean_kl": ppath.mean_kl,
                "dense_path_agreement": dpath.agreement, "dense_path_mean_kl": dpath.mean_kl,
                "policy_answer": pol_answer, "dense_answer": den_answer,
                "answer_match": _same(pol_answer, den_answer) if (pol_answer or den_answer) else None,
                "reference": ref, "policy_correct": _same(pol_answer, ref) if ref is not None else None,
                "dense_correct": _same(den_answer, ref) if ref is not None else None,
                "policy_reproduced": None if job_text is None else job_text == pol.text,
                "error": error, "_scores": (ppath, dpath),
            })
    return rows


def summarize(rows: list[dict], cfg, num_input_rows: int) -> dict[str, Any]:
    """The summary.json "audit" block: pooled over positions (agreement, KL), over samples (answers)."""
    ok = [r for r in rows if r.get("error") is None and "_scores" in r]
    ppos = sum(r["_scores"][0].positions for r in ok)
    dpos = sum(r["_scores"][1].positions for r in ok)

    def share(key):
        vals = [r[key] for r in ok if r.get(key) is not None]
        return round(sum(vals) / len(vals), 4) if vals else None

    dense_tokens = sum(r["dense_tokens"] for r in ok)
    diverged = [r["first_divergence"] for r in ok if r["first_divergence"] is not None]
    block = {
        "rows": len({r["row_idx"] for r in rows}),
        "samples": len(ok),
        "errors": len(rows) - len(ok),
        "kv_policy": cfg.kv_policy,
        "kv_budget": cfg.kv_budget,
        "top1_agreement": round(sum(r["_scores"][0].agree for r in ok) / ppos, 4) if ppos else None,
        "mean_kl": round(sum(r["_scores"][0].kl_sum for r in ok) / ppos, 6) if ppos else None,
        "dense_path_top1_agreement": round(sum(r["_scores"][1].agree for r in ok) / dpos, 4) if dpos else None,
        "dense_path_mean_kl": round(sum(r["_scores"][1].kl_sum for r in ok) / dpos, 6) if dpos else None,
        "identical": share("identical"),
        "mean_first_divergence": round(sum(diverged) / len(diverged), 1) if diverged else None,
        "answer_match": share("answer_match"),
        "length_ratio": round(sum(r["policy_tokens"] for r in ok) / dense_tokens, 4) if dense_tokens else None,
        "policy_reproduced": share("policy_reproduced"),
        "file": AUDIT_FILE,
        "input_rows": num_input_rows,
    }
    if cfg.reference_column:
        block["reference_column"] = cfg.reference_column
        block["policy_accuracy"] = share("policy_correct")
        block["dense_accuracy"] = share("dense_correct")
    return block


def _job_outputs(job, row_idxs: set[int]) -> dict[tuple[int, int], str]:
    """(row_idx, sample_idx) -> completion of the job's own output rows (from the done shards)."""
    out = {}
    size = job.manifest.shard_size
    for index in sorted({r // size for r in row_idxs}):
        rec = job.manifest.shards[index]
        if rec.state != "done" or not rec.file:
            continue
        table = pq.read_table(os.path.join(job.out_dir, rec.file), columns=["row_idx", "sample_idx", "completion"])
        for r in table.to_pylist():
            if r["row_idx"] in row_idxs:
                out[(r["row_idx"], r["sample_idx"])] = r["completion"]
    return out


def _reference_values(job, specs: list[ShardSpec]) -> dict[int, Any]:
    if not job.cfg.reference_column:
        return {}
    from raas_batch.data.reader import open_reader

    reader = open_reader(job.reader_spec)
    return {s.start: reader.read(s.start, s.end)[0].get(job.cfg.reference_column) for s in specs}


def _write_table(rows: list[dict], path: str) -> str:
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
                                 schema=AUDIT_SCHEMA)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))
    return file_sha256(path)


def run_audit(job, decode, save_manifest, log) -> dict[str, Any]:
    """The audit step of a job whose shards are all done. decode(specs) -> decode_rows' result, run where
    the engine is. Records the step in the manifest (running, then done or failed) and returns the
    manifest's audit record."""
    specs = row_specs(job)
    rec = {"state": "running", "settings": audit_settings(job.cfg), "rows": [s.start for s in specs],
           "file": AUDIT_FILE, "started_at": time.time(),
           "attempts": (job.manifest.audit or {}).get("attempts", 0) + 1}
    job.manifest.audit = rec
    save_manifest()
    log(f"audit: decoding {len(specs)} rows again with a dense cache and scoring both outputs")
    try:
        decoded = decode(specs)
        rows = build_rows(decoded, job.cfg, _reference_values(job, specs),
                          _job_outputs(job, {s.start for s in specs}))
        sha = _write_table(rows, os.path.join(job.out_dir, AUDIT_FILE))
    except Exception as exc:  # noqa: BLE001 - the shards are done; the audit alone failed
        rec.update(state="failed", error=f"{type(exc).__name__}: {exc}", finished_at=time.time())
        save_manifest()
        log(f"audit failed ({rec['error']}); rerun with --resume to retry it")
        return rec
    rec.update(state="done", sha256=sha, finished_at=time.time(),
               summary=summarize(rows, job.cfg, job.manifest.num_rows))
    save_manifest()
    s = rec["summary"]
    log(f"audit done: {s['samples']} samples, top-1 agreement {s['top1_agreement']}, mean KL {s['mean_kl']}, "
        f"answer match {s['answer_match']} -> {AUDIT_FILE}")
    return rec


def summary_block(job) -> dict[str, Any] | None:
    """summary.json's "audit": the done audit's figures, or its state and error; None when not asked."""
    if not job.cfg.audit_rows:
        return None
    rec = job.manifest.audit or {}
    if rec.get("state") == "done" and rec.get("settings") == audit_settings(job.cfg):
        return dict(rec["summary"])
    return {"state": rec.get("state", "pending"), "error": rec.get("error")}

