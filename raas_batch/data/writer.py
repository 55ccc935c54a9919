"""Output shard files: one schema per job, written whole or not at all.

Invariants:
- Every shard file of a job has exactly that job's schema: `OUTPUT_SCHEMA` (same names, types,
  order, whatever the policy; the README's "Output schema" table documents it column by column),
  then the input columns the job carries (`carried_columns`, `job_schema`).
- `write_shard` writes `<dir>/.<name>.tmp-<pid>`, flushes and fsyncs it, renames it over `<name>`
  and fsyncs the folder: a reader (or a crash at any instant) sees either no file or the whole file.
- Each file carries key-value metadata (`raas_batch.shard`: shard index, row range, fingerprint,
  number of rows) so a file left on disk by a killed run can be verified before it is adopted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

OUTPUT_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("row_idx", pa.int64(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("prompt", pa.string()),
    pa.field("completion", pa.string()),
    pa.field("reasoning", pa.string()),
    pa.field("answer", pa.string()),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("num_prompt_tokens", pa.int64(), nullable=False),
    pa.field("num_completion_tokens", pa.int64(), nullable=False),
    pa.field("num_reasoning_tokens", pa.int64(), nullable=False),
    pa.field("thinking_budget_hit", pa.bool_(), nullable=False),
    pa.field("kv_policy", pa.string(), nullable=False),
    pa.field("kv_budget", pa.int64()),
    pa.field("peak_kv_tokens", pa.int64(), nullable=False),
    pa.field("evicted_pages", pa.int64(), nullable=False),
    pa.field("kv_over_budget", pa.bool_(), nullable=False),
    pa.field("ttft_s", pa.float64()),
    pa.field("e2e_s", pa.float64()),
    pa.field("seed", pa.int64()),
    pa.field("model", pa.string()),
])

# The columns of long text (a prompt, the model's output: tens of KB a row for a long reasoning trace) are
# written without dictionary encoding: a dictionary of distinct long strings only grows until Parquet's writer
# gives up on it at its page limit and falls back to plain encoding. zstd at level 1. On the job benchmark's
# 512-row shard of 6,144-token outputs (benchmarks/bench_writer.py) the write took 0.157 s instead of 0.168 on
# the H200 machine's CPU (run 95, docs/gpu-notes.md), the file the same size; prose compresses a little less.
# Carried input columns keep the writer's defaults.
PLAIN_TEXT_COLUMNS = ("prompt", "completion", "reasoning", "answer")
PARQUET_OPTIONS = {"compression": "zstd", "compression_level": 1}


def parquet_write_options(schema: pa.Schema) -> dict[str, Any]:
    """pyarrow.parquet.write_table's options for a shard of `schema` (PLAIN_TEXT_COLUMNS without dictionary)."""
    return {**PARQUET_OPTIONS, "use_dictionary": [n for n in schema.names if n not in PLAIN_TEXT_COLUMNS]}


SHARD_META_KEY = b"raas_batch.shard"
FINISH_REASONS = ("stop", "length", "error")


def shard_file_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def carried_columns(input_columns, prompt_column: str, id_column: str | None) -> tuple[tuple[str, str], ...]:
    """(input column, output column) of every input column a job carries into its output rows.

    Every input column is carried, except the prompt column named `prompt` and the id column named
    `id` (the output's `prompt` and `id` already hold them); a name taken by an output column (or by
    an earlier renamed one) gets `input_` in front until it is free, e.g. `answer` -> `input_answer`.
    """
    taken = set(OUTPUT_SCHEMA.names) | set(input_columns)
    out = []
    for name in input_columns:
        if (name == prompt_column == "prompt") or (name == id_column == "id"):
            continue
        new = name
        if name in OUTPUT_SCHEMA.names:
            new = f"input_{name}"
            while new in taken:
                new = f"input_{new}"
            taken.add(new)
        out.append((name, new))
    return tuple(out)


def job_schema(input_schema: pa.Schema, carried: tuple[tuple[str, str], ...]) -> pa.Schema:
    """OUTPUT_SCHEMA followed by the carried input columns (their input types, nullable)."""
    fields = [pa.field(out, input_schema.field(name).type) for name, out in carried]
    return pa.schema(list(OUTPUT_SCHEMA) + fields)


def carried_value(value: Any, kind: pa.DataType) -> Any:
    """An input value for its output column: a non-string value of a string column (a JSONL column
    of mixed types) is stored as JSON text; anything else as it is."""
    if value is not None and pa.types.is_string(kind) and not isinstance(value, str):
        return json.dumps(value, ensure_ascii=False, default=str)
    return value


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema = OUTPUT_SCHEMA) -> pa.Table:
    """Build a table with exactly `schema` from row dicts (missing keys are null). A value that does not
    fit its column's type (a JSONL column whose later lines change type) raises ValueError naming it."""
    columns = {}
    for f in schema:
        values = [row.get(f.name) for row in rows]
        try:
            columns[f.name] = pa.array(values, type=f.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            if f.name in OUTPUT_SCHEMA.names:
                raise
            raise ValueError(f"column {f.name!r} holds a value that is not {f.type} ({exc}); the type was taken "
                             "from the input's first rows: give the column one type in every row") from None
    return pa.Table.from_pydict(columns, schema=schema)


def write_shard(path: str, rows: list[dict[str, Any]], meta: dict[str, Any], schema: pa.Schema = OUTPUT_SCHEMA) -> str:
    """Atomically write `rows` (with `schema`) to the Parquet file `path`; return the file's sha256.

    `meta` (JSON-able) is stored in the file's schema metadata under SHARD_META_KEY.
    """
    table = rows_to_table(rows, schema)
    table = table.replace_schema_metadata({SHARD_META_KEY: json.dumps(meta, sort_keys=True).encode()})
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            out = _HashingWriter(f)  # the file's sha256 as it is written: the file is not read back
            pq.write_table(table, out, **parquet_write_options(schema))
            f.flush()
            os.fsync(f.fileno())
        digest = out.hexdigest()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)
    return digest


def read_shard_meta(path: str, expected_schema: pa.Schema = OUTPUT_SCHEMA) -> dict[str, Any] | None:
    """The metadata stored by write_shard, or None if the file is not a readable shard file of
    `expected_schema`."""
    meta, _, problem = read_footer(path, expected_schema)
    return None if problem else meta


def read_footer(path: str, expected_schema: pa.Schema | None) -> tuple[dict[str, Any] | None, int, str | None]:
    """(metadata stored by write_shard, row count, problem or None) from the file's Parquet footer only
    (a few KiB read, whatever the file's size). expected_schema None: any schema that starts with
    OUTPUT_SCHEMA (a reader that does not know the job's carried columns)."""
    try:
        footer = pq.ParquetFile(path)
        schema, num_rows = footer.schema_arrow, footer.metadata.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        return None, 0, f"not a readable Parquet file ({str(exc).splitlines()[0][:120]})"
    raw = (schema.metadata or {}).get(SHARD_META_KEY)
    plain = schema.remove_metadata()
    if expected_schema is not None and plain != expected_schema.remove_metadata():
        return None, num_rows, "its columns are not this job's"
    if expected_schema is None and list(plain)[:len(OUTPUT_SCHEMA)] != list(OUTPUT_SCHEMA):
        return None, num_rows, "its columns are not a raas_batch shard's"
    try:
        meta = json.loads(raw) if raw is not None else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        return None, num_rows, "it carries no raas_batch shard metadata"
    return meta, num_rows, None


def shard_problem(path: str, expected: dict[str, Any], schema: pa.Schema | None = OUTPUT_SCHEMA,
                  full: bool = True) -> str | None:
    """None iff `path` is a sound shard file with `schema` (None: see read_footer) whose metadata
    matches `expected` and whose footer counts end - start rows times n; full: also read its
    (row_idx, sample_idx) columns and require exactly the pairs the metadata promises, each once.
    Otherwise one phrase saying what is wrong."""
    meta, num_rows, problem = read_footer(path, schema)
    if problem:
        return problem
    wrong = sorted(k for k, v in expected.items() if meta.get(k) != v)
    if wrong:
        return "its metadata names another " + ("job" if wrong == ["fingerprint"] else "shard") + \
            f" ({', '.join(f'{k} {meta.get(k)!r}, expected {expected[k]!r}' for k in wrong)})"
    try:
        expected_rows = (int(meta["end"]) - int(meta["start"])) * int(meta["n"])
    except (KeyError, TypeError, ValueError):
        return "its metadata lacks the row range or n"
    if num_rows != expected_rows:
        return f"it holds {num_rows} rows, expected {expected_rows}"
    if not full:
        return None
    try:
        table = pq.read_table(path, columns=["row_idx", "sample_idx"])
    except (pa.ArrowInvalid, OSError) as exc:
        return f"its rows cannot be read ({str(exc).splitlines()[0][:120]})"
    pairs = set(zip(table["row_idx"].to_pylist(), table["sample_idx"].to_pylist()))
    want = {(r, s) for r in range(meta["start"], meta["end"]) for s in range(meta["n"])}
    if table.num_rows != len(want) or pairs != want:
        return "its rows are not each (row, sample) of its range exactly once"
    return None


def verify_shard(path: str, expected: dict[str, Any], schema: pa.Schema = OUTPUT_SCHEMA) -> bool:
    """True iff `path` is a complete shard file with `schema`, whose metadata matches `expected` and
    whose rows are exactly the (row_idx, sample_idx) pairs the metadata promises, each once."""
    return shard_problem(path, expected, schema) is None


class _HashingWriter(io.RawIOBase):
    """A write-only file over `f` that hashes (sha256) every byte written through it, in order. The Parquet writer
    only appends, so the digest is the file's (tests/test_runner_manifest.py compares it with `file_sha256`)."""

    def __init__(self, f):
        super().__init__()
        self._f, self._sha, self._pos = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        self._sha.update(data)
        self._f.write(data)
        self._pos += size
        return size

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._f.flush()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(folder: str) -> None:
    """Make a rename in `folder` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
