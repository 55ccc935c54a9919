"""The job manifest (`DIR/manifest.json`): the shard plan, each shard's state, and the fingerprint.

Shard lifecycle (`attempts` counts entries into `running`):

    pending --start--> running --finish--> done          (file written, then the manifest)
                          |
                          +----fail-----> failed --start--> running ...   (next run, or --resume)
    running (found on load: the run that set it died) is treated like failed: redone on --resume.

Several shards may be running at once (a streaming run), and they finish in any order.

Invariants:
- The plan covers rows [0, num_rows) with consecutive, non-overlapping ranges of `shard_size` rows
  (the last may be shorter); shard i holds rows [i*shard_size, min((i+1)*shard_size, num_rows)).
- A shard is `done` only after its file was renamed into place; `file`, `sha256` and
  `num_output_rows` of a done shard describe that file and are never changed afterwards.
- `save` replaces manifest.json atomically (temp file, fsync, rename, fsync of the folder): after a
  crash the manifest is the last saved one, whole. The save before it stays beside it as
  `manifest.prev.json` (hard-linked, else copied, before the rename), so damage done to manifest.json
  afterwards (a bad copy, a sync tool, a filesystem without atomic renames) leaves one good copy.
- A done shard goes back to pending only through `reopen` (its file failed verification or vanished).
- `problems()` lists what makes a loaded manifest inconsistent (a plan that does not tile the rows, an
  unknown state, a done shard without its file's record); a manifest with problems is not trusted
  (`raas_batch.integrity` falls back to the previous copy, else rebuilds it from the shard files).
- The fingerprint holds everything that changes the output (input identity and the settings of
  `JobConfig.output_settings`); `diff` names each differing setting.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from raas_batch.data.writer import fsync_dir

# 2: shard files carry the input columns and kv_over_budget; runs record generate_s.
MANIFEST_VERSION = 2
STATES = ("pending", "running", "done", "failed")


class ManifestVersionError(ValueError):
    """The manifest was written by another version of raas_batch, whose shard files differ."""


@dataclass
class ShardRecord:
    """One shard: input rows [start, end), its state and, once done, its output file."""

    index: int
    start: int
    end: int
    state: str = "pending"
    attempts: int = 0
    file: str | None = None  # relative to the output folder
    num_output_rows: int | None = None
    sha256: str | None = None
    size: int | None = None  # bytes of the done shard's file (None in manifests written before it was kept)
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # tokens, errors, wall time of this shard

    @property
    def num_rows(self) -> int:
        return self.end - self.start


def previous_path(path: str) -> str:
    """Where `save` keeps the manifest it replaces: manifest.json -> manifest.prev.json."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def _keep_copy(path: str, dest: str) -> None:
    """Make `dest` a whole copy of `path` (a hard link, else a byte copy), replacing it atomically."""
    tmp = f"{dest}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        os.link(path, tmp)
    except OSError:  # a filesystem without hard links
        with open(path, "rb") as src, open(tmp, "wb") as f:
            f.write(src.read())
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, dest)


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """[(what, old value, new value)] for each part of two fingerprints that differs (see Manifest.diff)."""
    out = []
    for section, prefix in (("settings", "--"), ("input", "input ")):
        before, after = old.get(section, {}), new.get(section, {})
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                name = prefix + key.replace("_", "-") if section == "settings" else prefix + key
                out.append((name, before.get(key), after.get(key)))
    return out


@dataclass
class Manifest:
    fingerprint: dict[str, Any]  # {"input": {...identity...}, "settings": {...}}
    num_rows: int
    shard_size: int
    shards: list[ShardRecord]
    version: int = MANIFEST_VERSION
    runs: list[dict[str, Any]] = field(default_factory=list)  # one record per run (start, resumed, end)
    # the fidelity audit step (--audit-rows; raas_batch.audit): state running | done | failed, its
    # settings, rows, file and sha256, and its summary; None when never asked for
    audit: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    # --- planning and loading -------------------------------------------------------------------
    @classmethod
    def plan(cls, num_rows: int, shard_size: int, fingerprint: dict[str, Any]) -> Manifest:
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        shards = [ShardRecord(index=i, start=s, end=min(s + shard_size, num_rows))
                  for i, s in enumerate(range(0, num_rows, shard_size))]
        return cls(fingerprint=fingerprint, num_rows=num_rows, shard_size=shard_size, shards=shards)

    @classmethod
    def load(cls, path: str) -> Manifest:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("version") != MANIFEST_VERSION:
            raise ManifestVersionError(f"its manifest is version {data.get('version')!r}, written by another "
                                       f"raas_batch (this one writes version {MANIFEST_VERSION}, whose shard "
                                       "files differ)")
        shards = [ShardRecord(**s) for s in data.pop("shards")]
        stored_hash = data.pop("fingerprint_hash", None)
        manifest = cls(shards=shards, **data)
        manifest.stored_hash = stored_hash
        return manifest

    def save(self, path: str, keep_previous: bool = True) -> None:
        """Replace `path` atomically; the file it replaces becomes `previous_path(path)` (keep_previous)."""
        self.updated_at = time.time()
        data = asdict(self)
        data["fingerprint_hash"] = self.fingerprint_hash
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and os.path.exists(path):
            _keep_copy(path, previous_path(path))
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))

    @property
    def fingerprint_hash(self) -> str:
        return fingerprint_hash(self.fingerprint)

    def problems(self, num_samples: int | None = None) -> list[str]:
        """What makes this manifest inconsistent ([] when sound): the plan must tile rows [0, num_rows)
        in shards of shard_size, states must be known, and a done shard must record its file, sha256
        and `num_samples` rows per input row (the job's n; None: not checked)."""
        out = []
        if getattr(self, "stored_hash", None) not in (None, self.fingerprint_hash):
            out.append("its fingerprint_hash does not match its fingerprint")
        if not isinstance(self.num_rows, int) or not isinstance(self.shard_size, int) or self.shard_size < 1:
            return out + [f"num_rows {self.num_rows!r} / shard_size {self.shard_size!r} are not a plan"]
        want = [(i, s, min(s + self.shard_size, self.num_rows))
                for i, s in enumerate(range(0, self.num_rows, self.shard_size))]
        got = [(s.index, s.start, s.end) for s in self.shards]
        if got != want:
            out.append(f"its {len(got)} shards do not tile rows [0, {self.num_rows}) in shards of {self.shard_size}")
        for s in self.shards:
            if s.state not in STATES:
                out.append(f"shard {s.index} has the unknown state {s.state!r}")
            elif s.state == "done":
                rows = None if num_samples is None else (s.end - s.start) * num_samples
                if (s.file != os.path.join("shards", f"part-{s.index:05d}.parquet") or not isinstance(s.sha256, str)
                        or len(s.sha256) != 64 or (rows is not None and s.num_output_rows != rows)):
                    out.append(f"shard {s.index} is done but its file, sha256 or row count is not recorded right")
        return out

    # --- comparing ------------------------------------------------------------------------------
    def diff(self, fingerprint: dict[str, Any]) -> list[tuple[str, Any, Any]]:
        """[(what, recorded value, new value)] for each differing part; [] when they match.

        Settings are named by their flag (`--temperature`); input parts as `input <key>`.
        """
        return fingerprint_diff(self.fingerprint, fingerprint)

    # --- state transitions ----------------------------------------------------------------------
    def todo(self) -> list[ShardRecord]:
        """Shards to (re)run, in order: every shard not done (pending, failed, or running left by a crash)."""
        return [s for s in self.shards if s.state != "done"]

    def start(self, index: int) -> ShardRecord:
        s = self.shards[index]
        assert s.state != "done", f"shard {index} is done; done shards are never rerun"
        s.state, s.attempts, s.started_at, s.error = "running", s.attempts + 1, time.time(), None
        return s

    def finish(self, index: int, file: str, num_output_rows: int, sha256: str,
               stats: dict[str, Any] | None = None, size: int | None = None) -> ShardRecord:
        s = self.shards[index]
        assert s.state != "done", f"shard {index} is already done"
        s.state, s.file, s.num_output_rows, s.sha256, s.size = "done", file, num_output_rows, sha256, size
        s.finished_at, s.error, s.stats = time.time(), None, dict(stats or {})
        return s

    def reopen(self, index: int, error: str) -> ShardRecord:
        """A done shard whose file is gone or damaged becomes pending again (its record is cleared)."""
        s = self.shards[index]
        assert s.state == "done", f"shard {index} is not done"
        s.state, s.file, s.sha256, s.size, s.num_output_rows = "pending", None, None, None, None
        s.error, s.stats = error, {}
        return s

    def fail(self, index: int, error: str) -> ShardRecord:
        s = self.shards[index]
        assert s.state != "done", f"shard {index} is done"
        s.state, s.error, s.finished_at = "failed", error, time.time()
        return s

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for s in self.shards:
            out[s.state] += 1
        return out

    def rows_done(self) -> int:
        return sum(s.num_rows for s in self.shards if s.state == "done")

    def totals(self) -> dict[str, Any]:
        """Sum of the `stats` of done shards (keys as produced by runner.shard_stats)."""
        out: dict[str, Any] = {"finish_reasons": {}}
        for s in self.shards:
            if s.state != "done":
                continue
            for key, value in s.stats.items():
                if key == "finish_reasons":
                    for reason, count in value.items():
                        out["finish_reasons"][reason] = out["finish_reasons"].get(reason, 0) + count
                elif key.endswith("_max"):
                    out[key] = max(out.get(key, 0), value)
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[key] = out.get(key, 0) + value
                elif value is not None:
                    out.setdefault(key, value)
        return out
