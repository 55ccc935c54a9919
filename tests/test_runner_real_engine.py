"""The batch CLI end to end on the real engine (embedded SmolLM2-135M on CPU, a few tokens per row).

One subprocess run (the model load dominates: ~20-40 s on CPU), then a --resume that finds
everything done and must not load the model or rewrite anything; then the same job killed (SIGKILL
right after its second shard file is renamed into place, before the manifest records it) and resumed,
which must give the unkilled run's samples (the real engine's part of the kill soak,
test_runner_soak.py).
"""

import json
import os
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raas_batch.data.writer import OUTPUT_SCHEMA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=600, kill_at=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAAS_")}
    cmd = [sys.executable, "-m", "raas_batch"]
    if kill_at:  # tests/kill_at.py: the same CLI, SIGKILLed at that moment
        env["RAAS_KILL_AT"] = kill_at
        cmd = [sys.executable, os.path.join(ROOT, "tests", "kill_at.py")]
    return subprocess.run([*cmd, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_real_engine_end_to_end(tmp_path):
    with open(os.path.join(ROOT, "examples", "gsm8k_mini.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:3]
    rows.append({"id": "empty", "messages": [{"role": "user", "content": "  "}]})
    rows.append({"id": "too-long", "messages": [{"role": "user", "content": "seven " * 9000}]})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["--input", src, "--output", out, "--shard-size", 2, "--max-new-tokens", 8, "--temperature", 0,
            "--seed", 5, "--kv-policy", "dense", "--max-num-seqs", 4]
    res = _cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]

    files = sorted(os.listdir(out / "shards"))
    assert files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    for f in files:  # the fixed columns, then the input's (`answer` renamed clear of the output's own)
        schema = pq.read_schema(out / "shards" / f).remove_metadata()
        assert pa.schema(list(schema)[:len(OUTPUT_SCHEMA)]) == OUTPUT_SCHEMA
        assert schema.names[len(OUTPUT_SCHEMA):] == ["question", "input_answer", "source", "messages"]
    got = {r["id"]: r for f in files for r in pq.read_table(out / "shards" / f).to_pylist()}
    assert set(got) == {r["id"] for r in rows}
    for r in rows[:3]:
        o = got[r["id"]]
        assert o["finish_reason"] in ("stop", "length") and o["error"] is None
        assert 1 <= o["num_completion_tokens"] <= 8 and o["num_prompt_tokens"] > 10
        assert o["completion"] and o["model"] and "SmolLM2" in o["model"]
        assert o["kv_policy"] == "dense" and o["peak_kv_tokens"] >= o["num_prompt_tokens"]
        assert o["e2e_s"] > 0 and o["seed"] is not None
        assert r["question"][:40] in o["prompt"]  # messages are stored as JSON
        assert o["input_answer"] == r["answer"] and o["question"] == r["question"] and not o["kv_over_budget"]
    assert got["empty"]["finish_reason"] == "error" and "empty content" in got["empty"]["error"]
    long_row = got["too-long"]
    assert long_row["finish_reason"] == "error" and "context" in long_row["error"]
    assert long_row["num_prompt_tokens"] > 8192
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["rows"] == 5 and summary["errors"] == 2
    assert summary["completion_tokens"] == sum(o["num_completion_tokens"] for o in got.values())
    assert summary["tokens_per_s"] > 0

    # Resume of a finished job: no model load, no file rewritten.
    stats = {f: os.stat(out / "shards" / f).st_mtime_ns for f in files}
    res = _cli(*args, "--resume", timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {f: os.stat(out / "shards" / f).st_mtime_ns for f in files} == stats
    summary = json.loads((out / "summary.json").read_text())
    assert summary["this_run"]["shards_done"] == 0 and summary["engine_load_s"] < 5

    # Killed between a shard's rename and its manifest record, then resumed: the unkilled run's samples.
    killed = tmp_path / "killed"
    kill_args = [killed if a == out else a for a in args]
    res = _cli(*kill_args, kill_at="replace:part-:after:2")
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    recorded = json.loads((killed / "manifest.json").read_text())
    assert sum(s["state"] == "done" for s in recorded["shards"]) < 3 and len(os.listdir(killed / "shards")) >= 2
    res = _cli(*kill_args, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert ": adopted part-" in res.stderr  # the file renamed before the kill is kept, not regenerated

    def samples(folder):
        table = pq.read_table(folder / "shards").drop_columns(["ttft_s", "e2e_s"])
        return sorted(table.to_pylist(), key=lambda r: (r["row_idx"], r["sample_idx"]))

    assert samples(killed) == samples(out)
    assert _cli("--verify", "--output", killed, timeout=120).returncode == 0
