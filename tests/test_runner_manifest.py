"""Manifest bookkeeping, writer schema/atomicity, config layering: exact expectations on CPU."""

import dataclasses
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raas_batch.config import OUTPUT_FIELDS, ConfigError, JobConfig, load_yaml, resolve
from raas_batch.data.manifest import Manifest
from raas_batch.data.writer import (
    OUTPUT_SCHEMA,
    carried_columns,
    carried_value,
    file_sha256,
    job_schema,
    read_shard_meta,
    rows_to_table,
    verify_shard,
    write_shard,
)
from raas_batch.sampling_params import SamplingParams

FP = {"input": {"format": "jsonl", "num_rows": 10}, "settings": {"temperature": 1.0, "seed": 1}}


# --- manifest ---------------------------------------------------------------------------------------
def test_plan_covers_rows_exactly():
    m = Manifest.plan(10, 4, FP)
    assert [(s.index, s.start, s.end) for s in m.shards] == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    assert all(s.state == "pending" and s.attempts == 0 for s in m.shards)
    assert Manifest.plan(0, 4, FP).shards == []
    assert [(s.start, s.end) for s in Manifest.plan(8, 4, FP).shards] == [(0, 4), (4, 8)]


def test_state_transitions_and_attempts():
    m = Manifest.plan(10, 4, FP)
    m.start(0)
    m.finish(0, "shards/part-00000.parquet", 4, "abc", {"completion_tokens": 7})
    m.start(1)
    m.fail(1, "boom")
    m.start(1)  # retried
    assert [(s.state, s.attempts) for s in m.shards] == [("done", 1), ("running", 2), ("pending", 0)]
    assert [s.index for s in m.todo()] == [1, 2]
    assert m.counts() == {"pending": 1, "running": 1, "done": 1, "failed": 0}
    assert m.rows_done() == 4
    with pytest.raises(AssertionError):
        m.start(0)  # a done shard is never rerun


def test_save_is_atomic_and_round_trips(tmp_path):
    path = str(tmp_path / "manifest.json")
    m = Manifest.plan(10, 4, FP)
    m.start(0)
    m.finish(0, "shards/part-00000.parquet", 4, "abc", {"completion_tokens": 7, "finish_reasons": {"stop": 4}})
    m.save(path)
    assert os.listdir(tmp_path) == ["manifest.json"]  # no temp file left behind
    with open(path) as f:
        data = json.load(f)
    assert data["fingerprint_hash"] == m.fingerprint_hash
    m2 = Manifest.load(path)
    assert m2.shards == m.shards and m2.fingerprint == m.fingerprint
    assert m2.totals()["completion_tokens"] == 7
    assert m2.totals()["finish_reasons"] == {"stop": 4}


def test_diff_names_each_setting():
    m = Manifest.plan(10, 4, FP)
    assert m.diff(FP) == []
    other = {"input": {"format": "jsonl", "num_rows": 12}, "settings": {"temperature": 0.5, "seed": 1}}
    assert m.diff(other) == [("--temperature", 1.0, 0.5), ("input num_rows", 10, 12)]


# --- writer -------------------------------------------------------------------------------------------
def _row(i, s=0, **kw):
    row = {"id": f"r{i}", "row_idx": i, "sample_idx": s, "prompt": "p", "completion": "c", "finish_reason": "stop",
           "num_prompt_tokens": 1, "num_completion_tokens": 1, "num_reasoning_tokens": 0,
           "thinking_budget_hit": False, "kv_policy": "dense", "peak_kv_tokens": 2, "evicted_pages": 0,
           "kv_over_budget": False}
    row.update(kw)
    return row


def test_schema_is_fixed_and_has_required_columns():
    required = ["id", "sample_idx", "prompt", "completion", "reasoning", "answer", "finish_reason", "error",
                "num_prompt_tokens", "num_completion_tokens", "num_reasoning_tokens", "kv_policy", "kv_budget",
                "peak_kv_tokens", "evicted_pages", "kv_over_budget", "ttft_s", "e2e_s", "seed", "model"]
    assert set(required) <= set(OUTPUT_SCHEMA.names)
    assert rows_to_table([]).schema == OUTPUT_SCHEMA  # even an empty shard has the schema
    assert rows_to_table([_row(0, kv_budget=256, seed=3)]).schema == OUTPUT_SCHEMA


def test_every_input_column_is_carried_clear_of_output_names(tmp_path):
    columns = ["id", "prompt", "answer", "input_answer", "level", "model"]
    assert carried_columns(columns, "prompt", "id") == (
        ("answer", "input_input_answer"), ("input_answer", "input_answer"), ("level", "level"),
        ("model", "input_model"))
    # A prompt or id column with another name is carried too (the output's prompt/id hold strings).
    assert carried_columns(["question", "key"], "question", "key") == (("question", "question"), ("key", "key"))
    schema = job_schema(pa.schema([("level", pa.int64()), ("answer", pa.list_(pa.int32()))]),
                        (("level", "level"), ("answer", "input_answer")))
    assert schema.names == OUTPUT_SCHEMA.names + ["level", "input_answer"]
    assert schema.field("input_answer").type == pa.list_(pa.int32())
    # A JSONL column of mixed types is a string column: non-strings stored as JSON text.
    assert carried_value({"a": [1]}, pa.string()) == '{"a": [1]}' and carried_value("x", pa.string()) == "x"
    assert carried_value([1, 2], pa.list_(pa.int64())) == [1, 2]
    path = str(tmp_path / "part-00000.parquet")
    meta = {"index": 0, "start": 0, "end": 1, "n": 1, "fingerprint": "f"}
    write_shard(path, [_row(0, level=3)], meta, schema)
    assert verify_shard(path, meta, schema) and not verify_shard(path, meta)  # another job's schema
    with pytest.raises(ValueError, match="column 'level' holds a value that is not int64"):
        write_shard(path, [_row(0, level="three")], meta, schema)


def test_write_shard_atomic_and_verifiable(tmp_path):
    path = str(tmp_path / "part-00000.parquet")
    meta = {"index": 0, "start": 0, "end": 2, "n": 2, "fingerprint": "f"}
    rows = [_row(i, s) for i in range(2) for s in range(2)]
    digest = write_shard(path, rows, meta)
    assert os.listdir(tmp_path) == ["part-00000.parquet"]
    assert digest == file_sha256(path)  # hashed as it was written: the file's own digest
    assert pq.read_schema(path).remove_metadata() == OUTPUT_SCHEMA
    assert read_shard_meta(path) == meta
    assert verify_shard(path, meta)
    assert not verify_shard(path, {**meta, "fingerprint": "other"})
    write_shard(path, rows[:3], meta)  # a row missing
    assert not verify_shard(path, meta)
    with open(path, "r+b") as f:  # truncated file
        f.truncate(100)
    assert not verify_shard(path, meta)


def test_write_shard_keeps_long_text_out_of_dictionaries(tmp_path):
    """A shard is zstd-compressed; the long text columns (prompt, completion, reasoning, answer) are written
    without dictionary encoding, the short ones and the carried input columns with it (bench_writer.py: the
    dictionary of distinct long texts only cost time)."""
    schema = job_schema(pa.schema([("level", pa.string())]), (("level", "level"),))
    path = str(tmp_path / "part-00000.parquet")
    meta = {"index": 0, "start": 0, "end": 3, "n": 1, "fingerprint": "f"}
    rows = [_row(i, 0, level="easy") for i in range(3)]
    for r in rows:
        r["completion"] = r["reasoning"] = "a long trace " * 200 + str(r["row_idx"])
    write_shard(path, rows, meta, schema)
    group = pq.ParquetFile(path).metadata.row_group(0)
    columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    assert {c.compression for c in columns.values()} == {"ZSTD"}
    dictionary = {name for name, c in columns.items() if c.has_dictionary_page}
    assert not dictionary & {"prompt", "completion", "reasoning", "answer"}
    assert {"id", "finish_reason", "kv_policy", "model", "level"} <= dictionary
    assert verify_shard(path, meta, schema)
    assert pq.read_table(path).column("completion").to_pylist() == [r["completion"] for r in rows]


def test_write_shard_failure_leaves_nothing(tmp_path):
    path = str(tmp_path / "part-00000.parquet")
    with pytest.raises((ValueError, TypeError)):
        write_shard(path, [{"id": None, "row_idx": 0}], {"index": 0})  # non-nullable id
    assert os.listdir(tmp_path) == []


# --- config -------------------------------------------------------------------------------------------
def test_sampling_defaults_are_sampling_params_defaults():
    cfg, sp = JobConfig(), SamplingParams()
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "n", "ignore_eos"):
        assert getattr(cfg, name) == getattr(sp, name)
    # Unset fields resolve as SamplingParams.with_defaults does: the model's values, then the fallbacks.
    resolved = JobConfig(top_k=5).with_sampling_defaults({"temperature": 0.6, "top_p": 0.95, "top_k": 20})
    assert (resolved.max_new_tokens, resolved.temperature, resolved.top_p, resolved.top_k) == (256, 0.6, 0.95, 5)


def test_layering_defaults_yaml_flags(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text("input: in.jsonl\noutput: out\nmax-new-tokens: 32\ntemperature: 0.6\nkv_policy: raas\n"
                 "chat-template-kwargs: {enable_thinking: true}\n")
    cfg = resolve({"config": str(y), "temperature": 0.0, "output": str(tmp_path / "o2")})
    assert cfg.max_new_tokens == 32  # from YAML
    assert cfg.temperature == 0.0  # the flag wins
    assert cfg.kv_policy == "raas"  # underscore spelling accepted
    assert cfg.top_p is None  # not given: the model's generation_config decides when the job starts
    assert cfg.chat_template_kwargs == {"enable_thinking": True}
    assert os.path.isabs(cfg.input) and cfg.output == str(tmp_path / "o2")


def test_yaml_round_trip(tmp_path):
    cfg = resolve({"input": "x.jsonl", "output": "o", "seed": 5, "stop": ["###"],
                   "chat_template_kwargs": '{"enable_thinking": false}'})
    y = tmp_path / "config.yaml"
    y.write_text(cfg.to_yaml())
    again = resolve({"config": str(y)})
    assert dataclasses.asdict(again) == {**dataclasses.asdict(cfg), "config": str(y)}


def test_config_errors(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("max_new_token: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'max_new_token'"):
        load_yaml(str(y))
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(str(tmp_path / "nope.yaml"))
    base = {"input": "x.jsonl", "output": "o"}
    with pytest.raises(ConfigError, match="contradict"):
        resolve({**base, "resume": True, "overwrite": True})
    with pytest.raises(ConfigError, match="--shard-size must be a positive integer"):
        resolve({**base, "shard_size": 0})
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve({**base, "chat_template_kwargs": "{bad"})
    with pytest.raises(ConfigError, match="--input"):
        resolve({"output": "o"})


def test_output_fields_are_fields():
    assert set(OUTPUT_FIELDS) <= set(JobConfig.field_names())
    assert "device" not in OUTPUT_FIELDS and "output" not in OUTPUT_FIELDS


def test_save_keeps_the_previous_copy_whole(tmp_path):
    path = str(tmp_path / "manifest.json")
    m = Manifest.plan(10, 4, FP)
    m.save(path)
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"]  # nothing to keep on the first save
    first = (tmp_path / "manifest.json").read_bytes()
    m.start(0)
    m.finish(0, "shards/part-00000.parquet", 4, "a" * 64, {}, size=123)
    m.save(path)
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "manifest.prev.json"]
    assert (tmp_path / "manifest.prev.json").read_bytes() == first
    # Damage to manifest.json in place (not through save) never reaches the previous copy.
    (tmp_path / "manifest.json").write_bytes(b"{garbled")
    assert (tmp_path / "manifest.prev.json").read_bytes() == first
    assert Manifest.load(path.replace("manifest.json", "manifest.prev.json")).shards[0].state == "pending"


def test_reopen_and_problems():
    m = Manifest.plan(10, 4, FP)
    m.start(1)
    m.finish(1, "shards/part-00001.parquet", 8, "b" * 64, {"completion_tokens": 3}, size=99)
    assert m.problems(2) == []
    assert m.problems(1) == ["shard 1 is done but its file, sha256 or row count is not recorded right"]
    rec = m.reopen(1, "part-00001.parquet is missing; regenerated")
    assert (rec.state, rec.file, rec.sha256, rec.size, rec.num_output_rows, rec.stats) == (
        "pending", None, None, None, None, {})
    assert rec.attempts == 1 and [s.index for s in m.todo()] == [0, 1, 2]
    with pytest.raises(AssertionError):
        m.reopen(1, "again")  # only a done shard is reopened
    m.shards[2].state = "finished"
    m.shards[0].end = 5
    assert m.problems() == ["its 3 shards do not tile rows [0, 10) in shards of 4",
                            "shard 2 has the unknown state 'finished'"]
    m.shards[0].end, m.shards[2].state = 4, "pending"
    m.fingerprint = {**FP, "settings": {"temperature": 0.5}}
    m.stored_hash = "0" * 16
    assert m.problems() == ["its fingerprint_hash does not match its fingerprint"]
