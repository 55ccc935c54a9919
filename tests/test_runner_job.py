"""End-to-end jobs through the CLI (in-process) on the fake engine: formats, schema, errors, resume."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from fake_llm import INPUT_FORMATS, FakeLLM, sample_rows, write_input

from raas_batch import job, runner
from raas_batch.cli import main
from raas_batch.data.manifest import Manifest
from raas_batch.data.writer import OUTPUT_SCHEMA


@pytest.fixture(autouse=True)
def _fake_engine(monkeypatch):
    monkeypatch.setenv("RAAS_BATCH_ENGINE", "fake_llm:FakeLLM")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("RAAS_FAKE_SLEEP_S", raising=False)
    monkeypatch.delenv("RAAS_FAKE_FAIL_ON", raising=False)


def run(capsys, *args):
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    return rc, err


def read_out(out):
    files = sorted(os.listdir(os.path.join(out, "shards")))
    tables = [pq.read_table(os.path.join(out, "shards", f)) for f in files]
    for t in tables:  # the fixed columns first, then the carried input columns; one schema per job
        assert pa.schema(list(t.schema)[:len(OUTPUT_SCHEMA)]) == OUTPUT_SCHEMA
        assert t.schema.remove_metadata() == tables[0].schema.remove_metadata()
    return files, [row for t in tables for row in t.to_pylist()]


def snapshot(out):
    """(inode, mtime_ns, size) of each shard file: proves files were not rewritten."""
    d = os.path.join(out, "shards")
    return {f: (os.stat(os.path.join(d, f)).st_ino, os.stat(os.path.join(d, f)).st_mtime_ns,
                os.stat(os.path.join(d, f)).st_size) for f in os.listdir(d)}


@pytest.mark.parametrize("fmt", INPUT_FORMATS)
def test_every_input_format_end_to_end(tmp_path, capsys, fmt):
    rows = sample_rows(7)
    src = write_input(tmp_path / "in", fmt, rows)
    out = tmp_path / "out"
    rc, err = run(capsys, "--input", src, "--output", out, "--shard-size", 3, "--max-new-tokens", 5, "--n", 2)
    assert rc == 0, err
    files, got = read_out(out)
    assert files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert sorted((r["id"], r["sample_idx"]) for r in got) == sorted(
        (r["id"], s) for r in rows for s in range(2))
    assert all(r["finish_reason"] == "length" and r["num_completion_tokens"] == 5 for r in got)
    # The input's `answer` column is carried, renamed clear of the output's own `answer`.
    assert {(r["id"], r["input_answer"]) for r in got} == {(r["id"], r["answer"]) for r in rows}
    assert "prompt" not in got[0] or got[0]["prompt"] == next(r["prompt"] for r in rows if r["id"] == got[0]["id"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["rows"] == 7 and summary["samples"] == 14 and summary["errors"] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(s["start"], s["end"], s["state"], s["attempts"]) for s in manifest["shards"]] == [
        (0, 3, "done", 1), (3, 6, "done", 1), (6, 7, "done", 1)]
    assert yaml.safe_load((out / "config.yaml").read_text())["shard-size"] == 3


def test_schema_same_for_every_policy_and_error_rows(tmp_path, capsys):
    rows = sample_rows(3) + [{"id": "bad", "prompt": ""}]
    src = write_input(tmp_path / "in", "jsonl", rows)
    schemas = []
    for policy, budget in (("dense", None), ("raas", 64), ("streaming", 32)):
        out = tmp_path / f"out-{policy}"
        args = ["--input", src, "--output", out, "--kv-policy", policy, "--max-new-tokens", 4]
        if budget:
            args += ["--kv-budget", budget]
        assert run(capsys, *args)[0] == 0
        _, got = read_out(out)
        schemas.append(pq.read_schema(out / "shards" / "part-00000.parquet").remove_metadata())
        assert {r["kv_policy"] for r in got} == {policy}
        assert {r["kv_budget"] for r in got} == {budget}
    assert all(s == schemas[0] for s in schemas)
    assert schemas[0] == pa.schema(list(OUTPUT_SCHEMA) + [pa.field("input_answer", pa.string())])


def test_row_level_errors_do_not_stop_the_job(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    lines = [
        {"id": "ok", "messages": [{"role": "user", "content": "fine question"}]},
        {"id": "null", "messages": None},
        {"id": "empty", "messages": []},
        {"id": "norole", "messages": [{"content": "x"}]},
        {"id": "badcontent", "messages": [{"role": "user", "content": 3}]},
        {"id": "notlist", "messages": "just text is fine"},
        {"id": "long", "messages": [{"role": "user", "content": "word " * 500}]},
    ]
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    out = tmp_path / "out"
    rc, err = run(capsys, "--input", src, "--output", out, "--shard-size", 3, "--max-new-tokens", 4)
    assert rc == 0, err  # the job completes; bad rows are error rows
    _, got = read_out(out)
    by_id = {r["id"]: r for r in got}
    assert len(got) == 8
    assert by_id["ok"]["finish_reason"] == "length" and by_id["notlist"]["finish_reason"] == "length"
    expected = {"null": "null", "empty": "empty list", "norole": "role", "badcontent": "content of type int",
                "long": "context", "7": "not valid JSON"}
    for rid, fragment in expected.items():
        row = by_id[rid]
        assert row["finish_reason"] == "error", rid
        assert fragment in row["error"] and row["error"].startswith("row "), row["error"]
        assert row["completion"] is None and row["num_completion_tokens"] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == 6 and summary["finish_reasons"] == {"length": 2, "error": 6}


def test_prompt_column_id_column_limit(tmp_path, capsys):
    rows = [{"text": f"prompt {i}", "key": i * 10} for i in range(9)]
    src = write_input(tmp_path / "in", "parquet", rows)
    out = tmp_path / "out"
    rc, err = run(capsys, "--input", src, "--output", out, "--prompt-column", "text", "--id-column", "key",
                  "--limit", 5, "--max-new-tokens", 3)
    assert rc == 0, err
    _, got = read_out(out)
    assert [r["id"] for r in got] == ["0", "10", "20", "30", "40"]
    assert [r["prompt"] for r in got] == [f"prompt {i}" for i in range(5)]
    # No id column: ids are the row numbers.
    out2 = tmp_path / "out2"
    assert run(capsys, "--input", src, "--output", out2, "--prompt-column", "text", "--max-new-tokens", 3)[0] == 0
    assert [r["id"] for r in read_out(out2)[1]] == [str(i) for i in range(9)]


def test_seeds_do_not_depend_on_shard_size(tmp_path, capsys):
    src = write_input(tmp_path / "in", "jsonl", sample_rows(7))
    results = []
    for size in (2, 5):
        out = tmp_path / f"out{size}"
        assert run(capsys, "--input", src, "--output", out, "--shard-size", size, "--seed", 11, "--n", 2,
                   "--temperature", 0.8)[0] == 0
        results.append({(r["id"], r["sample_idx"]): (r["completion"], r["seed"]) for r in read_out(out)[1]})
    assert results[0] == results[1]
    assert len({seed for _, seed in results[0].values()}) == 7  # one seed per row, shared by its samples


@pytest.mark.parametrize("case", ["missing", "format", "column", "parquet", "nonempty", "both", "engine"])
def test_job_level_errors_exit_2_and_write_nothing(tmp_path, capsys, case):
    out = tmp_path / "out"
    src = write_input(tmp_path / "in", "jsonl", sample_rows(3))
    args = ["--input", src, "--output", out]
    expect = {"missing": "does not exist", "format": "unknown format", "column": "has no column 'question'",
              "parquet": "not a readable Parquet file", "nonempty": "is not empty",
              "both": "contradict", "engine": "Could not start the engine"}[case]
    if case == "missing":
        args[1] = str(tmp_path / "nope.parquet")
    elif case == "format":
        (tmp_path / "x.csv").write_text("a\n")
        args[1] = str(tmp_path / "x.csv")
    elif case == "column":
        args += ["--prompt-column", "question"]
    elif case == "parquet":
        (tmp_path / "bad.parquet").write_bytes(b"garbage")
        args[1] = str(tmp_path / "bad.parquet")
    elif case == "nonempty":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    elif case == "both":
        args += ["--resume", "--overwrite"]
    elif case == "engine":
        args += ["--kv-policy", "no-such-policy"]
    rc, err = run(capsys, *args)
    assert rc == 2
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    if case == "nonempty":
        assert os.listdir(out) == ["keep.txt"] and "--resume" in err and "--overwrite" in err
    else:
        assert not out.exists()


def test_foreign_folder_is_not_resumed_or_overwritten(tmp_path, capsys):
    src = write_input(tmp_path / "in", "jsonl", sample_rows(3))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    for flag in ("--resume", "--overwrite"):
        rc, err = run(capsys, "--input", src, "--output", out, flag)
        assert rc == 2 and "holds no manifest.json" in err
    assert os.listdir(out) == ["keep.txt"]


def test_fingerprint_mismatch_is_refused_then_overwrite(tmp_path, capsys):
    src = write_input(tmp_path / "in", "jsonl", sample_rows(5))
    out = tmp_path / "out"
    base = ["--input", src, "--output", out, "--shard-size", 2, "--max-new-tokens", 5]
    assert run(capsys, *base, "--temperature", 0.7)[0] == 0
    before = snapshot(out)
    rc, err = run(capsys, *base, "--temperature", 0.2, "--seed", 3, "--resume")
    assert rc == 2
    assert "--temperature was 0.7, now 0.2" in err and "--seed was None, now 3" in err and "--overwrite" in err
    assert snapshot(out) == before
    # The input changed: named too.
    write_input(tmp_path / "in", "jsonl", sample_rows(6))
    rc, err = run(capsys, *base, "--temperature", 0.7, "--resume")
    assert rc == 2 and "input num_rows was 5, now 6" in err
    # --overwrite starts over.
    rc, err = run(capsys, *base, "--temperature", 0.2, "--overwrite")
    assert rc == 0, err
    files, got = read_out(out)
    assert len(got) == 6 and len(files) == 3
    assert json.loads((out / "manifest.json").read_text())["fingerprint"]["settings"]["temperature"] == 0.2


def test_resume_skips_done_shards_and_config_yaml_reruns(tmp_path, capsys):
    src = write_input(tmp_path / "in", "jsonl", sample_rows(6))
    out = tmp_path / "out"
    assert run(capsys, "--input", src, "--output", out, "--shard-size", 2, "--seed", 1)[0] == 0
    before = snapshot(out)
    # Rerun from the saved config alone, from another folder: nothing to do, nothing rewritten.
    os.chdir(tmp_path / "in")
    rc, err = run(capsys, "--config", out / "config.yaml", "--resume")
    assert rc == 0, err
    assert snapshot(out) == before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["this_run"]["shards_done"] == 0 and summary["rows"] == 6 and summary["num_runs"] == 2
    # Resume on a folder that does not exist yet simply starts the job.
    rc, _ = run(capsys, "--input", src, "--output", tmp_path / "fresh", "--resume")
    assert rc == 0 and (tmp_path / "fresh" / "summary.json").exists()


def test_engine_crash_fails_the_shards_in_flight_and_resume_retries(tmp_path, capsys, monkeypatch):
    rows = sample_rows(6)
    src = write_input(tmp_path / "in", "jsonl", rows)
    out = tmp_path / "out"
    monkeypatch.setenv("RAAS_FAKE_FAIL_ON", rows[3]["prompt"])
    # A batch of 2 and rows of 3 tokens: shard 0 runs while shard 1 waits; row 3's admission crashes the
    # engine with only shard 1 in flight (shard 0 done). The job goes on with shard 2 on the emptied engine.
    rc, err = run(capsys, "--input", src, "--output", out, "--shard-size", 2, "--max-num-seqs", 2,
                  "--max-new-tokens", 3)
    assert rc == 1 and "shard 1 failed" in err and "--resume" in err and "in flight" in err
    m = Manifest.load(str(out / "manifest.json"))
    assert [(s.state, s.attempts) for s in m.shards] == [("done", 1), ("failed", 1), ("done", 1)]
    assert "fake engine crashed" in m.shards[1].error
    assert not json.loads((out / "summary.json").read_text())["complete"]
    before = snapshot(out)
    monkeypatch.delenv("RAAS_FAKE_FAIL_ON")
    rc, err = run(capsys, "--input", src, "--output", out, "--shard-size", 2, "--max-new-tokens", 3, "--resume")
    assert rc == 0, err
    after = snapshot(out)
    assert {k: after[k] for k in before} == before  # done shards untouched
    m = Manifest.load(str(out / "manifest.json"))
    assert [(s.state, s.attempts) for s in m.shards] == [("done", 1), ("done", 2), ("done", 1)]
    assert len(read_out(out)[1]) == 6


def test_shard_file_left_by_a_kill_is_adopted_or_regenerated(tmp_path, capsys):
    src = write_input(tmp_path / "in", "jsonl", sample_rows(6))
    out = tmp_path / "out"
    base = ["--input", src, "--output", out, "--shard-size", 2, "--seed", 4]
    assert run(capsys, *base)[0] == 0
    mpath = str(out / "manifest.json")
    # Pretend the run died after renaming shard 1's file and shard 2's file was half written.
    m = Manifest.load(mpath)
    m.shards[1].state, m.shards[2].state = "running", "running"
    m.save(mpath)
    good = snapshot(out)["part-00001.parquet"]
    p2 = out / "shards" / "part-00002.parquet"
    p2.write_bytes(p2.read_bytes()[:50])
    (out / "shards" / ".part-00003.parquet.tmp-999").write_bytes(b"partial")
    rc, err = run(capsys, *base, "--resume")
    assert rc == 0, err
    assert "shard 1: adopted" in err and "shard 2: removed incomplete" in err
    assert snapshot(out)["part-00001.parquet"] == good  # adopted, not rewritten
    assert sorted(os.listdir(out / "shards")) == [f"part-0000{i}.parquet" for i in range(3)]
    m = Manifest.load(mpath)
    assert [(s.state, s.attempts) for s in m.shards] == [("done", 1), ("done", 1), ("done", 2)]
    assert m.shards[1].stats.get("adopted") is True
    got = read_out(out)[1]
    assert sorted(r["row_idx"] for r in got) == list(range(6))


def test_progress_lines_and_quiet(tmp_path, capsys):
    src = write_input(tmp_path / "in", "jsonl", sample_rows(4))
    rc, err = run(capsys, "--input", src, "--output", tmp_path / "a", "--shard-size", 2)
    assert rc == 0
    assert "done (1/2 shards)" in err and "done (2/2 shards)" in err
    assert "4/4 rows (100.0%)" in err and "tok/s" in err
    rc, err = run(capsys, "--input", src, "--output", tmp_path / "b", "--quiet")
    assert rc == 0 and err == ""


def test_one_stream_per_row_params_and_progress_reach_the_engine(tmp_path):
    calls, requests, steps = [], [], []

    class Recording(FakeLLM):
        def generate_stream(self, source, progress_callback=None, max_waiting=None):
            calls.append(progress_callback is not None)

            def recorded():
                for item in source:
                    requests.append(item)
                    yield item

            def on_step(num_tokens, num_rows):
                steps.append((num_tokens, num_rows))
                progress_callback(num_tokens, num_rows)

            return super().generate_stream(recorded(), on_step, max_waiting)

    from raas_batch.config import resolve
    from raas_batch.shards import derive_row_seed

    rows = sample_rows(5)
    src = write_input(tmp_path / "in", "jsonl", rows)
    cfg = resolve({"input": src, "output": str(tmp_path / "o"), "shard_size": 3, "seed": 2, "quiet": True,
                   "max_new_tokens": 4})
    summary = runner.run_job(cfg, engine=Recording())
    assert summary["complete"] and calls == [True]  # one stream over both shards
    real = [r for r in requests if r is not None]
    assert [key for key, _, _ in real] == [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4)]
    assert [p.seed for _, _, p in real] == [derive_row_seed(2, r["id"]) for r in rows]
    assert all(p.max_new_tokens == 4 and p.temperature == 1.0 for _, _, p in real)
    assert sum(r for _, r in steps) == 5 and sum(t for t, _ in steps) == summary["completion_tokens"] == 20


def test_done_shard_whose_file_vanished_is_regenerated(tmp_path, capsys):
    src = write_input(tmp_path / "in", "jsonl", sample_rows(6))
    out = tmp_path / "out"
    base = ["--input", src, "--output", out, "--shard-size", 2, "--seed", 9]
    assert run(capsys, *base)[0] == 0
    before = snapshot(out)
    os.unlink(out / "shards" / "part-00001.parquet")
    rc, err = run(capsys, *base, "--resume")
    assert rc == 0, err
    assert "shard 1: part-00001.parquet is missing" in err
    after = snapshot(out)
    assert after["part-00000.parquet"] == before["part-00000.parquet"]
    assert after["part-00002.parquet"] == before["part-00002.parquet"]
    assert sorted(r["row_idx"] for r in read_out(out)[1]) == list(range(6))


def test_overwrite_forgets_the_old_job_before_deleting_files(tmp_path, capsys, monkeypatch):
    """A kill inside --overwrite's clean-up must not leave old shards recorded done without files."""
    src = write_input(tmp_path / "in", "jsonl", sample_rows(4))
    out = tmp_path / "out"
    base = ["--input", src, "--output", out, "--shard-size", 2]
    assert run(capsys, *base, "--temperature", 0.5)[0] == 0

    def die(_out_dir):
        raise KeyboardInterrupt  # stands in for a kill at the worst moment

    monkeypatch.setattr(job, "_clear_outputs", die)
    assert run(capsys, *base, "--temperature", 0.9, "--overwrite")[0] == 130
    m = Manifest.load(str(out / "manifest.json"))
    assert m.fingerprint["settings"]["temperature"] == 0.9 and all(s.state == "pending" for s in m.shards)
    monkeypatch.undo()
    monkeypatch.setenv("RAAS_BATCH_ENGINE", "fake_llm:FakeLLM")
    rc, err = run(capsys, *base, "--temperature", 0.9, "--resume")
    assert rc == 0, err
    assert "removed incomplete or foreign" in err  # the old job's files fail verification
    got = read_out(out)[1]
    assert len(got) == 4


def test_unknown_policy_is_refused_before_loading_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAAS_BATCH_ENGINE")  # the real engine's registry is consulted, no model is loaded
    src = write_input(tmp_path / "in", "jsonl", sample_rows(2))
    out = tmp_path / "out"
    rc, err = run(capsys, "--input", src, "--output", out, "--kv-policy", "no-such-policy", "--kv-budget", 256)
    assert rc == 2 and "no-such-policy" in err and "unknown" in err
    rc, err = run(capsys, "--input", src, "--output", out, "--kv-budget", 4)
    assert rc == 2 and "kv_budget 4" in err
    assert not out.exists()


def test_shard_files_are_written_while_the_engine_decodes(tmp_path, capsys, monkeypatch):
    """A finished shard's file is written on the writer thread: the first write waits until the engine
    has taken two more steps (it would wait forever if writing blocked decoding), and the run still
    ends with every shard written and recorded."""
    import threading

    from fake_llm import FakeEngine

    from raas_batch.shard_stream import ShardStream

    src = write_input(tmp_path / "in", "jsonl", sample_rows(12))
    out = tmp_path / "out"
    steps, moved_on, threads = [0], threading.Event(), []
    real_step, real_write = FakeEngine.step, ShardStream.write
    first_write_at: list[int] = []

    def counted_step(self):
        steps[0] += 1
        if first_write_at and steps[0] >= first_write_at[0] + 2:
            moved_on.set()
        return real_step(self)

    def slow_write(self, plan, outputs):
        threads.append(threading.current_thread().name)
        if not first_write_at:
            first_write_at.append(steps[0])
            assert moved_on.wait(timeout=20), "the engine stopped while a shard file was being written"
        return real_write(self, plan, outputs)

    monkeypatch.setattr(FakeEngine, "step", counted_step)
    monkeypatch.setattr(ShardStream, "write", slow_write)
    rc, err = run(capsys, "--input", src, "--output", out, "--shard-size", 2, "--max-num-seqs", 4)
    assert rc == 0, err
    assert len(threads) == 6 and all(t.startswith("shard-writer") for t in threads)
    m = Manifest.load(str(out / "manifest.json"))
    assert [s.state for s in m.shards] == ["done"] * 6
    assert sorted(r["row_idx"] for r in read_out(out)[1]) == list(range(12))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 12 and summary["complete"]
