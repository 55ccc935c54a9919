"""Input readers: every supported input format behind one small interface.

A reader is built from a `ReaderSpec` (a small picklable dataclass: where, which format, which
columns), so a worker on another machine can open the same source itself and read only its shard:

    spec = detect_input("data/train.parquet")          # job-level errors raise InputError here
    reader = open_reader(spec)                         # cheap: metadata only
    reader.num_rows                                    # rows in the source
    reader.schema                                      # pa.Schema of every column (types of the output)
    rows = reader.read(start, end)                     # list[dict], only spec.columns

Invariants:
- `read(start, end)` returns exactly `end - start` dicts, in source order, for 0 <= start <= end <=
  num_rows, each with exactly the keys `spec.columns` (a key absent from a row maps to None).
- Reading a range touches only what holds it: Parquet row groups, memory-mapped Arrow IPC record
  batches, a memory-mapped `datasets` table, the JSONL lines between two byte offsets.
- A JSONL line that is not a JSON object does not stop the job: its row carries the key
  `ROW_ERROR` with a sentence naming the line, and the runner turns it into an error row.
- `schema` gives every column an Arrow type: the file's own, or for JSONL the type pyarrow infers
  from the first 1000 lines; a JSONL column with no single type there (or only nulls) is a string
  column. Values are always returned as they are in the source (never converted to that type).
- `identity()` changes when the content changes (size, row count, hashes of the first and last
  bytes or the `datasets` fingerprint) and does not depend on the path, so a moved file still resumes.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import os
from array import array
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ROW_ERROR = "__row_error__"

FORMATS = ("parquet", "arrow", "datasets", "jsonl", "hf")
_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".feather": "arrow",
             ".ipc": "arrow", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_SUPPORTED = ("a .parquet file or a folder of them, an Arrow IPC file (.arrow/.feather), a folder "
              "written by datasets' save_to_disk, a .jsonl file, or hf:NAME[:SPLIT]")


class InputError(ValueError):
    """The input cannot be used at all (job-level); the message names the input and the fix."""


@dataclass(frozen=True)
class ReaderSpec:
    """Where to read from. Picklable; `open_reader(spec)` on any machine that sees `path`.

    For `hf`, path is the dataset name, `config_name`/`split` select the part.
    """

    path: str
    format: str
    columns: tuple[str, ...] = ()
    split: str | None = None
    config_name: str | None = None
    files: tuple[str, ...] = field(default=())  # parquet: the files, in order

    def with_columns(self, columns) -> ReaderSpec:
        return replace(self, columns=tuple(columns))


def detect_input(text: str) -> ReaderSpec:
    """Turn the --input string into a spec, or raise InputError naming the input and the fix."""
    if text.startswith("hf:"):
        parts = text[3:].split(":")
        if not parts[0]:
            raise InputError(f"Input {text!r} names no dataset: write hf:NAME, hf:NAME:SPLIT or "
                             "hf:NAME:CONFIG:SPLIT.")
        if len(parts) == 1:
            return ReaderSpec(path=parts[0], format="hf", split="train")
        if len(parts) == 2:
            return ReaderSpec(path=parts[0], format="hf", split=parts[1] or "train")
        if len(parts) == 3:
            return ReaderSpec(path=parts[0], format="hf", config_name=parts[1] or None,
                              split=parts[2] or "train")
        raise InputError(f"Input {text!r} has too many ':' parts: write hf:NAME[:SPLIT] or "
                         "hf:NAME:CONFIG:SPLIT.")
    path = os.path.abspath(os.path.expanduser(text))
    if not os.path.exists(path):
        raise InputError(f"Input {text} does not exist: check the --input path.")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")):
            splits = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
            raise InputError(f"Input {text} is a datasets DatasetDict with splits {splits}: pass one "
                             f"split's folder, e.g. --input {os.path.join(text, splits[0] if splits else 'train')}.")
        if os.path.exists(os.path.join(path, "state.json")) and os.path.exists(
                os.path.join(path, "dataset_info.json")):
            return ReaderSpec(path=path, format="datasets")
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
        if not files:
            raise InputError(f"Input folder {text} holds no .parquet files and is not a datasets "
                             f"save_to_disk folder: pass {_SUPPORTED}.")
        return ReaderSpec(path=path, format="parquet", files=tuple(files))
    suffix = os.path.splitext(path)[1].lower()
    fmt = _SUFFIXES.get(suffix)
    if fmt is None:
        raise InputError(f"Input {text} has an unknown format ({suffix or 'no extension'}): pass {_SUPPORTED}.")
    if fmt == "parquet":
        return ReaderSpec(path=path, format="parquet", files=(path,))
    return ReaderSpec(path=path, format=fmt)


def open_reader(spec: ReaderSpec):
    """Open the source described by `spec` (metadata only); raise InputError if it is unreadable."""
    cls = {"parquet": ParquetReader, "arrow": ArrowReader, "datasets": DatasetsReader,
           "hf": DatasetsReader, "jsonl": JsonlReader}.get(spec.format)
    if cls is None:
        raise InputError(f"Unknown input format {spec.format!r}; known: {', '.join(FORMATS)}.")
    return cls(spec)


class _Reader:
    """Shared behaviour: range checks, column projection, row dicts."""

    spec: ReaderSpec
    num_rows: int
    column_names: list[str]
    schema: pa.Schema

    def read(self, start: int, end: int) -> list[dict[str, Any]]:
        if not 0 <= start <= end <= self.num_rows:
            raise IndexError(f"row range [{start}, {end}) outside [0, {self.num_rows})")
        if start == end:
            return []
        return self._read(start, end)

    def _present(self) -> list[str]:
        return [c for c in self.spec.columns if c in self.column_names]

    def _table_rows(self, table: pa.Table) -> list[dict[str, Any]]:
        rows = table.to_pylist()
        missing = [c for c in self.spec.columns if c not in table.column_names]
        for row in rows:
            for c in missing:
                row[c] = None
        return rows

    def _read(self, start: int, end: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError


def _file_digest(paths) -> dict[str, Any]:
    """Size and a hash of the first and last MiB of each file: cheap, and changes with the content."""
    h = hashlib.sha256()
    size = 0
    for p in paths:
        n = os.path.getsize(p)
        size += n
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if n > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
        h.update(str(n).encode())
    return {"size": size, "sha256_head_tail": h.hexdigest()}


class ParquetReader(_Reader):
    """One .parquet file or the sorted .parquet files of a folder, read by row group."""

    def __init__(self, spec: ReaderSpec):
        self.spec = spec
        files = spec.files or (spec.path,)
        self._files = list(files)
        self._pf: dict[int, pq.ParquetFile] = {}
        self._groups: list[tuple[int, int]] = []  # (file index, row group index)
        self._offsets: list[int] = [0]  # global start row of each group, then num_rows
        schema = None
        for fi, path in enumerate(self._files):
            try:
                meta = pq.read_metadata(path)
            except (pa.ArrowInvalid, OSError) as exc:
                raise InputError(f"Input {path} is not a readable Parquet file ({_short(exc)}): check it "
                                 "was written completely, or re-export it.") from None
            if schema is None:
                schema = meta.schema.to_arrow_schema()
            for gi in range(meta.num_row_groups):
                self._groups.append((fi, gi))
                self._offsets.append(self._offsets[-1] + meta.row_group(gi).num_rows)
        self.num_rows = self._offsets[-1]
        self.schema = schema if schema is not None else pa.schema([])
        self.column_names = list(self.schema.names)

    def _file(self, fi: int) -> pq.ParquetFile:
        if fi not in self._pf:
            self._pf[fi] = pq.ParquetFile(self._files[fi], memory_map=True)
        return self._pf[fi]

    def _read(self, start, end):
        first = bisect.bisect_right(self._offsets, start) - 1
        pieces = []
        g = first
        while g < len(self._groups) and self._offsets[g] < end:
            fi, gi = self._groups[g]
            try:
                t = self._file(fi).read_row_group(gi, columns=self._present())
            except (pa.ArrowInvalid, OSError) as exc:
                raise InputError(f"Input {self._files[fi]} row group {gi} is unreadable "
                                 f"({_short(exc)}): re-export the file.") from None
            lo = max(start, self._offsets[g]) - self._offsets[g]
            hi = min(end, self._offsets[g + 1]) - self._offsets[g]
            pieces.append(t.slice(lo, hi - lo))
            g += 1
        return self._table_rows(pa.concat_tables(pieces))

    def identity(self):
        return {"format": "parquet", "num_rows": self.num_rows, "num_files": len(self._files),
                **_file_digest(self._files)}


class ArrowReader(_Reader):
    """Arrow IPC file (random access by record batch) or stream, memory-mapped."""

    def __init__(self, spec: ReaderSpec):
        self.spec = spec
        try:
            self._source = pa.memory_map(spec.path, "r")
            try:
                self._file = pa.ipc.open_file(self._source)
                self._table = None
                counts = [self._file.get_batch(i).num_rows for i in range(self._file.num_record_batches)]
                schema = self._file.schema
            except pa.ArrowInvalid:
                # IPC stream format (e.g. a datasets cache file): no footer; the map makes reading cheap.
                self._source.seek(0)
                self._file = None
                self._table = pa.ipc.open_stream(self._source).read_all()
                counts = [self._table.num_rows]
                schema = self._table.schema
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"Input {spec.path} is not a readable Arrow IPC file ({_short(exc)}): write "
                             "it with pyarrow.ipc.new_file or pyarrow.feather.write_feather.") from None
        self._offsets = [0]
        for c in counts:
            self._offsets.append(self._offsets[-1] + c)
        self.num_rows = self._offsets[-1]
        self.schema = schema
        self.column_names = list(schema.names)

    def _read(self, start, end):
        cols = self._present()
        if self._table is not None:
            return self._table_rows(self._table.select(cols).slice(start, end - start))
        pieces = []
        b = bisect.bisect_right(self._offsets, start) - 1
        while b < len(self._offsets) - 1 and self._offsets[b] < end:
            batch = self._file.get_batch(b).select(cols)
            lo = max(start, self._offsets[b]) - self._offsets[b]
            hi = min(end, self._offsets[b + 1]) - self._offsets[b]
            pieces.append(pa.Table.from_batches([batch.slice(lo, hi - lo)]))
            b += 1
        return self._table_rows(pa.concat_tables(pieces))

    def identity(self):
        return {"format": "arrow", "num_rows": self.num_rows, **_file_digest([self.spec.path])}


class DatasetsReader(_Reader):
    """A `datasets` folder (load_from_disk, memory-mapped) or hf:NAME (load_dataset, cached)."""

    def __init__(self, spec: ReaderSpec):
        import datasets

        self.spec = spec
        datasets.disable_progress_bars()
        try:
            if spec.format == "datasets":
                ds = datasets.load_from_disk(spec.path)
            else:
                ds = datasets.load_dataset(spec.path, spec.config_name, split=spec.split)
        except Exception as exc:  # noqa: BLE001  # datasets raises many types; all mean "cannot use this input"
            where = spec.path if spec.format == "datasets" else _hf_name(spec)
            fix = ("check the folder was written by save_to_disk" if spec.format == "datasets" else
                   "check the dataset name, config and split, and that it is cached or reachable")
            raise InputError(f"Input {where} could not be loaded ({_short(exc)}): {fix}.") from None
        if isinstance(ds, datasets.DatasetDict):
            raise InputError(f"Input {_hf_name(spec)} has splits {list(ds)}: name one, e.g. "
                             f"hf:{spec.path}:{next(iter(ds), 'train')}.")
        self._ds = ds
        self.num_rows = ds.num_rows
        self.column_names = list(ds.column_names)
        self.schema = ds.features.arrow_schema
        self._view = None

    def _read(self, start, end):
        if self._view is None:
            self._view = self._ds.select_columns(self._present()).with_format("arrow")
        return self._table_rows(self._view[start:end])

    def identity(self):
        ident = {"format": self.spec.format, "num_rows": self.num_rows,
                 "fingerprint": getattr(self._ds, "_fingerprint", None)}
        if self.spec.format == "hf":
            ident.update(name=self.spec.path, config=self.spec.config_name, split=self.spec.split)
        return ident


class JsonlReader(_Reader):
    """JSON Lines: a one-pass index of line byte offsets, then seek-and-parse per range."""

    _SCHEMA_PROBE_LINES = 1000

    def __init__(self, spec: ReaderSpec):
        self.spec = spec
        self._offsets = array("q")  # byte offset of each non-blank line
        self._line_numbers = array("q")  # 1-based line number, for error messages
        names: dict[str, None] = {}
        probe: list[dict] = []
        try:
            with open(spec.path, "rb") as f:
                pos = 0
                for lineno, line in enumerate(f, start=1):
                    if line.strip():
                        self._offsets.append(pos)
                        self._line_numbers.append(lineno)
                        if len(self._offsets) <= self._SCHEMA_PROBE_LINES:
                            try:
                                obj = json.loads(line)
                                if isinstance(obj, dict):
                                    names.update(dict.fromkeys(obj))
                                    probe.append(obj)
                            except ValueError:
                                pass
                    pos += len(line)
        except OSError as exc:
            raise InputError(f"Input {spec.path} cannot be read ({_short(exc)}): check its permissions.") from None
        if self._offsets and not names:
            raise InputError(f"Input {spec.path} has no JSON object in its first lines: write one JSON "
                             "object per line, e.g. {\"prompt\": \"...\"}.")
        self.num_rows = len(self._offsets)
        self.column_names = list(names)
        self.schema = _infer_schema(self.column_names, probe)

    def _read(self, start, end):
        rows = []
        with open(self.spec.path, "rb") as f:
            f.seek(self._offsets[start])
            i = start
            while i < end:
                line = f.readline()
                if not line.strip():
                    continue
                rows.append(self._parse(line, self._line_numbers[i]))
                i += 1
        return rows

    def _parse(self, line: bytes, lineno: int) -> dict[str, Any]:
        row: dict[str, Any] = dict.fromkeys(self.spec.columns)
        try:
            obj = json.loads(line)
        except ValueError as exc:
            row[ROW_ERROR] = f"line {lineno} of {os.path.basename(self.spec.path)} is not valid JSON ({exc})"
            return row
        if not isinstance(obj, dict):
            row[ROW_ERROR] = (f"line {lineno} of {os.path.basename(self.spec.path)} is a JSON "
                              f"{type(obj).__name__}, not an object")
            return row
        for c in self.spec.columns:
            row[c] = obj.get(c)
        return row

    def identity(self):
        return {"format": "jsonl", "num_rows": self.num_rows, **_file_digest([self.spec.path])}


def _infer_schema(names: list[str], probe: list[dict]) -> pa.Schema:
    """JSONL column types from the probed lines; a column of no single type (or only nulls) is a string
    column (a writer stores its non-string values as JSON text)."""
    fields = []
    for name in names:
        try:
            kind = pa.array([obj.get(name) for obj in probe]).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
            kind = pa.null()
        fields.append(pa.field(name, pa.string() if pa.types.is_null(kind) else kind))
    return pa.schema(fields)


def _hf_name(spec: ReaderSpec) -> str:
    parts = [spec.path] + ([spec.config_name] if spec.config_name else []) + [spec.split or "train"]
    return "hf:" + ":".join(parts)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
