"""Damage after the fact: what `--resume` checks and repairs, and what `--verify` reports.

    open_manifest(...)        resume: manifest.json if it is sound, else the save before it
                              (manifest.prev.json), else a fresh plan rebuilt from config.yaml and the
                              shard files' own metadata (`recover` adopts every sound file)
    check_done_shards(job)    resume: every shard recorded done must still have its file, whole; a
                              shard that fails goes back to pending and is regenerated
    verify_folder(out_dir)    --verify: read-only check of a folder; no input, engine or model needed

What a resume checks on each done shard (cheap, so a 10,000-shard job resumes in seconds; README
"Damage and repair" has the figures): the file exists, its size is the size recorded when it was
written, and its Parquet footer (a few KiB at the end of the file) is readable, has this job's
columns, names this shard and job in its metadata (index, row range, n, fingerprint) and counts
(end - start) x n rows. Truncation, deletion, a foreign or half-copied file all fail it. With
`--resume --verify` (and always in `--verify`) each file is also read whole: its sha256 must be the
recorded one and its (row_idx, sample_idx) pairs exactly its range's, each once; that finds a flipped
bit inside the data too, at the cost of reading every byte.

Invariants:
- A done shard is never rewritten while it is sound; one that fails a check has its file deleted
  before the manifest that reopens it is saved, so a kill in between leaves a done shard whose file
  is missing (found again by the next resume), never a damaged file that a later resume could adopt
  as the file of a pending shard. The repair is named in the log (even with --quiet) and in summary.json.
- A manifest that cannot be read or is inconsistent is never trusted and never discarded: it is kept
  as manifest.damaged.json, and no shard file of another job is ever deleted by a rebuild (a file
  whose metadata names another fingerprint makes the resume refuse instead).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from raas_batch.data.manifest import Manifest, ManifestVersionError, fingerprint_diff, previous_path
from raas_batch.data.writer import file_sha256, read_footer, shard_file_name, shard_problem
from raas_batch.job import CONFIG, DAMAGED, MANIFEST, SHARDS

PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")


class JobDiffers(Exception):
    """A sound manifest of another job (other settings or input): args[0] holds Manifest.diff's list."""


class RebuildRefused(Exception):
    """The manifest must be rebuilt but the folder holds another job's shard files (or config.yaml)."""


# --- one done shard -------------------------------------------------------------------------------------
def done_shard_problem(out_dir: str, rec, expected_meta: dict[str, Any], schema, full: bool) -> str | None:
    """None if done shard `rec`'s file is sound (see the module doc for cheap vs full), else what is wrong,
    as a phrase that follows the file's name ("is missing", "has 100 bytes, ...")."""
    path = os.path.join(out_dir, rec.file or os.path.join(SHARDS, shard_file_name(rec.index)))
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "is missing"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if rec.size is not None and size != rec.size:
        return f"has {size} bytes, the manifest recorded {rec.size}"
    if full:
        try:
            if file_sha256(path) != rec.sha256:
                return "has another sha256 than the manifest recorded (its bytes changed)"
        except OSError as exc:
            return f"cannot be read ({exc.strerror})"
    problem = shard_problem(path, expected_meta, schema, full=full)
    return f"is damaged: {problem}" if problem else None


def check_done_shards(job, full: bool) -> list[dict[str, Any]]:
    """Reopen (in memory) every done shard whose file fails the check; return one record per repair:
    {"index", "rows": [start, end], "file", "problem"}. `begin_run` deletes the damaged files, then
    saves the manifest."""
    repairs = []
    for rec in job.manifest.shards:
        if rec.state != "done":
            continue
        spec = job.shard_spec(rec.index)
        problem = done_shard_problem(job.out_dir, rec, spec.file_meta(), spec.schema, full)
        if problem is None:
            continue
        repairs.append({"index": rec.index, "rows": [rec.start, rec.end], "file": rec.file, "problem": problem})
        job.manifest.reopen(rec.index, f"{spec.file_name} {problem}; to be regenerated")
    return repairs


def repair_message(repair: dict[str, Any]) -> str:
    return (f"shard {repair['index']}: {os.path.basename(repair['file'])} {repair['problem']}; it will be "
            "regenerated")


# --- the manifest ----------------------------------------------------------------------------------------
def load_checked(path: str, num_samples: int | None) -> tuple[Manifest | None, str | None]:
    """(manifest, None) if `path` holds a sound manifest, else (None, why not). A manifest of another
    raas_batch version raises ManifestVersionError (its shard files differ: never repaired)."""
    try:
        manifest = Manifest.load(path)
    except ManifestVersionError:
        raise
    except FileNotFoundError:
        return None, "it is missing"
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        return None, f"{type(exc).__name__}: {str(exc)[:160]}"
    problems = manifest.problems(num_samples)
    if problems:
        return None, "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    return manifest, None


def open_manifest(out_dir: str, fingerprint: dict[str, Any], num_rows: int, shard_size: int,
                  num_samples: int, config_settings: dict[str, Any] | None) -> tuple[Manifest, list[str], bool]:
    """The manifest to resume from -> (manifest, notes for the log, whether manifest.json was damaged).

    A sound manifest.json of another job raises JobDiffers with the differences (the caller refuses
    the resume); config_settings: the output settings config.yaml records (None: none readable)."""
    path = os.path.join(out_dir, MANIFEST)
    manifest, why = load_checked(path, num_samples)
    if manifest is not None and manifest.diff(fingerprint):
        raise JobDiffers(manifest.diff(fingerprint))
    if manifest is not None and manifest.num_rows != num_rows:
        manifest, why = None, f"it plans {manifest.num_rows} rows, the input has {num_rows} for this job"
    if manifest is not None:
        return manifest, [], False
    notes = [f"{MANIFEST} cannot be trusted ({why})" + (f"; it is kept as {DAMAGED}" if os.path.exists(path) else "")]
    try:
        prev, prev_why = load_checked(previous_path(path), num_samples)
    except ManifestVersionError as exc:
        prev, prev_why = None, str(exc)
    if prev is not None and prev.num_rows == num_rows and not prev.diff(fingerprint):
        notes.append(f"continuing from {os.path.basename(previous_path(path))} (the save before it); shards "
                     "finished since are adopted from their files")
        return prev, notes, True
    if config_settings is not None:
        diffs = fingerprint_diff({"settings": config_settings}, {"settings": fingerprint["settings"]})
        if diffs:
            raise RebuildRefused("its config.yaml records another job (" + "; ".join(
                f"{name} was {old!r}, now {new!r}" for name, old, new in diffs) + ")")
    want = Manifest.plan(num_rows, shard_size, fingerprint)
    foreign = [name for name, meta in _shard_files_meta(os.path.join(out_dir, SHARDS))
               if meta is not None and meta.get("fingerprint") != want.fingerprint_hash]
    if foreign:
        raise RebuildRefused(f"{len(foreign)} shard file(s) there ({', '.join(foreign[:3])}) belong to another "
                             "job (another input or settings)")
    notes.append(f"no sound previous copy ({prev_why or 'another job'}): the manifest is rebuilt from config.yaml "
                 "and the shard files (every sound file is adopted, the rest regenerated)")
    return want, notes, True


def _shard_files_meta(shards_dir: str) -> list[tuple[str, dict[str, Any] | None]]:
    """(name, metadata or None) of every part-*.parquet file in shards_dir, from their footers."""
    if not os.path.isdir(shards_dir):
        return []
    return [(name, read_footer(os.path.join(shards_dir, name), None)[0])
            for name in sorted(os.listdir(shards_dir)) if PART_RE.match(name)]


# --- --verify ---------------------------------------------------------------------------------------------
@dataclass
class FolderReport:
    """What `--verify` found: `problems` (missing or damaged samples), `notes` (harmless), and the
    totals of the sound part."""

    out_dir: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    num_shards: int = 0
    num_samples: int = 0
    needs_full_resume: bool = False  # some damage only a full check finds: repair with --resume --verify

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        lines = [f"problem: {p}" for p in self.problems] + [f"note: {n}" for n in self.notes]
        config = os.path.join(self.out_dir, CONFIG)
        if self.ok:
            lines.append(f"OK: {self.out_dir}: {self.num_shards} shards, {self.num_samples} samples, every sample "
                         "present exactly once (sizes, sha256 and rows checked)")
        else:
            fix = f"python -m raas_batch --config {config} --resume" + (" --verify" if self.needs_full_resume else "")
            lines.append(f"NOT OK: {self.out_dir}: {len(self.problems)} problem(s); to repair (regenerates only "
                         f"what is missing or damaged): {fix}")
        return "\n".join(lines)


def verify_folder(out_dir: str) -> FolderReport:
    """Check a job's output folder without the input, the engine or the model (see module doc).
    Raises FileNotFoundError when out_dir is not a job's folder."""
    report = FolderReport(out_dir)
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isdir(out_dir) or not any(os.path.exists(p) for p in (path, previous_path(path))):
        raise FileNotFoundError(out_dir)
    try:
        manifest, why = load_checked(path, None)
    except ManifestVersionError as exc:
        report.problems.append(f"{MANIFEST}: {exc}")
        return report
    if manifest is None:
        prev, _ = load_checked(previous_path(path), None)
        report.problems.append(f"{MANIFEST} cannot be trusted ({why}); --resume repairs it"
                               + (" from manifest.prev.json" if prev is not None else
                                  " from config.yaml and the shard files"))
        manifest = prev
        if manifest is None:
            return report
    settings = manifest.fingerprint.get("settings", {})
    n = settings.get("n", 1)
    problems = manifest.problems(n)
    report.problems.extend(f"{MANIFEST}: {p}" for p in problems)
    if problems:
        return report
    done_files = set()
    for rec in manifest.shards:
        rows = f"shard {rec.index} (rows {rec.start}-{rec.end - 1})"
        if rec.state != "done":
            why = f", last error: {rec.error}" if rec.error else ""
            report.problems.append(f"{rows}: {rec.state}, its {rec.num_rows * n} samples are missing{why}")
            continue
        meta = {"index": rec.index, "start": rec.start, "end": rec.end, "n": n,
                "fingerprint": manifest.fingerprint_hash}
        problem = done_shard_problem(out_dir, rec, meta, None, full=True)
        done_files.add(os.path.basename(rec.file))
        if problem:
            cheap = done_shard_problem(out_dir, rec, meta, None, full=False)
            report.needs_full_resume |= cheap is None
            report.problems.append(f"{rows}: {rec.file} {problem}")
        else:
            report.num_shards += 1
            report.num_samples += rec.num_output_rows
    shards_dir = os.path.join(out_dir, SHARDS)
    for name in sorted(os.listdir(shards_dir)) if os.path.isdir(shards_dir) else []:
        if name in done_files:
            continue
        if ".tmp-" in name:
            report.notes.append(f"shards/{name} is a temporary file of a killed write (hidden from readers; "
                                "--resume removes it)")
        elif PART_RE.match(name):
            report.problems.append(f"shards/{name} is not recorded done: a run was killed before recording it, or "
                                   "it is not this job's (--resume adopts it if it is sound, else deletes it)")
        else:
            report.notes.append(f"shards/{name} is not a raas_batch file (left alone)")
    return report
