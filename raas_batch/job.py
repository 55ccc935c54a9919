"""A batch job before and around its run: job-level checks, the shard plan, and the output folder's
lifecycle (shared by the local runner, `raas_batch.runner`, and the Ray driver, `raas_batch.distributed`).

    prepare_job(cfg)    detect + open the input, check the output folder, resolve sampling defaults from
                        the model's generation_config, fingerprint, plan or load + compare the manifest
                        (a damaged one: the previous copy, else rebuilt), check every done shard's file
                        and reopen the damaged ones (writes nothing; every user error raises JobError)
    begin_run(job)      manifest first, config.yaml, then recovery of what a killed run left and the
                        removal of damaged files (raas_batch.integrity has the checks)

Invariants (exactly-once):
- Shard i's file holds exactly the samples of input rows [start, end): (end - start) * n rows, one per
  (row_idx, sample_idx), whatever happened to the rows (a row that cannot run gives n error rows).
- A done shard's file is never rewritten; a shard becomes done only after its file is in place, so
  after a kill at any instant, `--resume` redoes exactly the shards not recorded done, in whatever
  order they had completed.
- A shard file found on disk but not recorded done (killed between the rename and the manifest
  update) is adopted only if `verify_shard` proves it complete and from this very job (same schema,
  fingerprint, range and n); otherwise it is deleted and regenerated.
- With --seed S, row r's seed depends only on (S, id of r): its random draws do not depend on shard size or
  order; its tokens do not either where its logits do not depend on the batch (the CPU; the GPU with
  --batch-invariant: README "Reproducible rows").
- A resume trusts no file blindly: a done shard whose file is missing or damaged is regenerated, a
  manifest that cannot be trusted is replaced by its previous copy or rebuilt (`raas_batch.integrity`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from raas_batch.config import JobConfig
from raas_batch.data.reader import InputError, ReaderSpec, detect_input, open_reader
from raas_batch.data.writer import carried_columns, file_sha256, fsync_dir, job_schema, shard_problem
from raas_batch.engine_factory import ENGINE_ENV
from raas_batch.shards import ShardSpec, shard_stats


class JobError(Exception):
    """Job-level failure a user can fix: one sentence naming what and how; exit status 2."""


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


MANIFEST = "manifest.json"
PREVIOUS = "manifest.prev.json"  # the save before the last (Manifest.save keeps it)
DAMAGED = "manifest.damaged.json"  # a manifest.json that could not be trusted, kept for inspection
SUMMARY = "summary.json"
CONFIG = "config.yaml"
SHARDS = "shards"
AUDIT_FILE = "audit.parquet"  # raas_batch.audit writes it (--audit-rows)


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
    schema: pa.Schema  # every shard file's: OUTPUT_SCHEMA + the carried input columns
    carried: tuple[tuple[str, str], ...]  # (input column, output column)
    notes: list[str] = field(default_factory=list)  # damage found and repaired: logged even with --quiet
    repairs: list[dict[str, Any]] = field(default_factory=list)  # done shards reopened (integrity.check_done_shards)
    manifest_damaged: bool = False  # manifest.json could not be trusted: begin_run keeps it aside

    def shard_spec(self, index: int) -> ShardSpec:
        rec = self.manifest.shards[index]
        cfg = self.cfg
        return ShardSpec(index=rec.index, start=rec.start, end=rec.end, reader=self.reader_spec,
                         prompt_column=self.prompt_column, id_column=self.id_column,
                         shards_dir=os.path.join(self.out_dir, SHARDS),
                         fingerprint_hash=self.manifest.fingerprint_hash, sampling=cfg.sampling_kwargs(),
                         base_seed=cfg.seed, kv_policy=cfg.kv_policy, kv_budget=cfg.kv_budget, schema=self.schema,
                         carried=self.carried, apply_chat_template=cfg.apply_chat_template,
                         system_prompt=cfg.system_prompt)


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
    if cfg.reference_column and cfg.reference_column not in reader.column_names:
        listed = ", ".join(reader.column_names) or "none"
        raise JobError(f"Input {cfg.input} has no column {cfg.reference_column!r} (columns: {listed}): pass "
                       "--reference-column NAME with the column holding the reference answers.")
    carried = carried_columns(reader.column_names, prompt_column, id_column)
    spec = spec.with_columns(reader.column_names)
    num_rows = reader.num_rows if cfg.limit is None else min(cfg.limit, reader.num_rows)
    fingerprint = {"input": reader.identity(), "settings": cfg.output_settings()}

    out_dir = os.path.abspath(os.path.expanduser(cfg.output))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise JobError(f"Output {cfg.output} is a file, not a folder: choose a folder for --output.")
    entries = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    # Temp files and an empty shards/ are what a run killed before its first manifest save leaves.
    entries = [e for e in entries if ".tmp-" not in e
               and not (e == SHARDS and not os.listdir(os.path.join(out_dir, SHARDS)))]
    mode = "fresh"
    manifest = None
    damaged, notes = False, []
    if entries:
        ours = any(os.path.exists(os.path.join(out_dir, name)) for name in (MANIFEST, PREVIOUS, CONFIG))
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
            manifest, notes, damaged = _open_manifest(cfg, out_dir, fingerprint, num_rows)
    if manifest is None:
        manifest = Manifest.plan(num_rows, cfg.shard_size, fingerprint)
    job = Job(cfg=cfg, out_dir=out_dir, reader_spec=spec, prompt_column=prompt_column,
              id_column=id_column, num_rows=num_rows, fingerprint=fingerprint, manifest=manifest, mode=mode,
              schema=job_schema(reader.schema, carried), carried=carried, notes=notes, manifest_damaged=damaged)
    if mode == "resume":
        from raas_batch.integrity import check_done_shards, repair_message

        job.repairs = check_done_shards(job, full=cfg.verify)
        job.notes.extend(map(repair_message, job.repairs))
    return job


def _open_manifest(cfg: JobConfig, out_dir: str, fingerprint: dict[str, Any], num_rows: int):
    """The manifest to resume from (integrity.open_manifest), its refusals as JobError."""
    from raas_batch.config import ConfigError, resolve
    from raas_batch.data.manifest import ManifestVersionError
    from raas_batch.integrity import JobDiffers, RebuildRefused, open_manifest

    try:  # the settings config.yaml records, read as `--config DIR/config.yaml` would read them
        recorded = resolve({"config": os.path.join(out_dir, CONFIG)}).output_settings()
    except (ConfigError, TypeError, ValueError):
        recorded = None  # no readable config.yaml: the shard files' fingerprints still guard the rebuild
    try:
        return open_manifest(out_dir, fingerprint, num_rows, cfg.shard_size, cfg.n, recorded)
    except ManifestVersionError as exc:
        raise JobError(f"Cannot resume {cfg.output}: {exc}; pass --overwrite to start the job over.") from None
    except RebuildRefused as exc:
        raise JobError(f"Cannot resume {cfg.output}: its {MANIFEST} is unreadable and {exc}. Rerun with the same "
                       "input and settings, or pass --overwrite to start over.") from None
    except JobDiffers as exc:
        parts = "; ".join(f"{name} was {old!r}, now {new!r}" for name, old, new in exc.args[0])
        raise JobError(f"Cannot resume {cfg.output}: the job there differs ({parts}). Rerun with the "
                       "same settings, or pass --overwrite to start over.") from None


def atomic_write_text(path: str, text: str) -> None:
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
        if name in (SUMMARY, CONFIG, PREVIOUS, DAMAGED, AUDIT_FILE) or ".tmp-" in name:
            os.unlink(os.path.join(out_dir, name))


def recover(job: Job, log) -> int:
    """Before running: drop temp files of killed writes and shard files outside the plan, and adopt or
    delete shard files that exist but are not recorded done. Returns the number of adopted shards."""
    import pyarrow.parquet as pq

    shards_dir = os.path.join(job.out_dir, SHARDS)
    for folder in (job.out_dir, shards_dir):
        for name in os.listdir(folder):
            if ".tmp-" in name:
                os.unlink(os.path.join(folder, name))
    from raas_batch.integrity import PART_RE

    for name in os.listdir(shards_dir):
        match = PART_RE.match(name)
        if match and int(match.group(1)) >= len(job.manifest.shards):  # no shard of this plan has that name
            os.unlink(os.path.join(shards_dir, name))
            log(f"removed {SHARDS}/{name}: this job has no shard {int(match.group(1))} (its samples would be read twice)")
    adopted = 0
    for rec in job.manifest.todo():
        spec = job.shard_spec(rec.index)
        if not os.path.exists(spec.path):
            continue
        problem = shard_problem(spec.path, spec.file_meta(), spec.schema)
        if problem is None:
            rows = pq.read_table(spec.path).to_pylist()
            job.manifest.finish(rec.index, os.path.join(SHARDS, spec.file_name), len(rows), file_sha256(spec.path),
                                {**shard_stats(rows), "adopted": True}, size=os.path.getsize(spec.path))
            adopted += 1
            log(f"shard {rec.index}: adopted {spec.file_name} (complete on disk, not yet recorded done)")
        else:
            os.unlink(spec.path)
            log(f"shard {rec.index}: removed incomplete or foreign {spec.file_name} ({problem}); it will be "
                "regenerated")
    return adopted



def begin_run(job: Job, log) -> tuple[dict[str, Any], int]:
    """Start writing the output folder (after every job-level check passed and the engine loaded).

    A resume first puts an untrusted manifest.json aside (manifest.damaged.json, so it never becomes
    the previous copy) and deletes the files of the done shards it reopened (integrity). The new
    manifest goes next: with --overwrite it atomically forgets the old job, so a kill while old files
    are deleted leaves only pending shards. Then config.yaml, then recovery of what a killed run left
    (`recover`). Returns this run's record (in manifest.runs) and the number of
    adopted shards. Shared by the local and the Ray driver, so both leave the same layout."""
    manifest_path = os.path.join(job.out_dir, MANIFEST)
    os.makedirs(job.out_dir, exist_ok=True)
    run_record = {"started_at": time.time(), "pid": os.getpid(), "mode": job.mode}
    if job.repairs:
        run_record["repaired"] = job.repairs
    if job.manifest_damaged and os.path.exists(manifest_path):
        os.replace(manifest_path, os.path.join(job.out_dir, DAMAGED))  # kept aside, never the previous copy
    for repair in job.repairs:  # before the save that reopens them: a kill between leaves them missing
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(job.out_dir, repair["file"]))
    job.manifest.runs.append(run_record)
    job.manifest.save(manifest_path)
    if job.mode == "overwrite":
        _clear_outputs(job.out_dir)
    os.makedirs(os.path.join(job.out_dir, SHARDS), exist_ok=True)
    atomic_write_text(os.path.join(job.out_dir, CONFIG), job.cfg.to_yaml())
    adopted = recover(job, log)
    if adopted:
        job.manifest.save(manifest_path)
    return run_record, adopted
