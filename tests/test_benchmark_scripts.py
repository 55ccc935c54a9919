"""The GPU benchmark scripts stay runnable: each one's `--smoke` mode (tiny sizes on the CPU, the Triton
kernels in the interpreter) runs the script's whole path, writes its tables to $OUT, and fails on the
error a GPU session would otherwise meet first (device time is scarce; a broken script wastes it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_smoke(script: str, out, *args: str) -> str:
    env = dict(os.environ, OUT=str(out), TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--smoke", *args],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.parametrize("script,stem", [("bench_matmul.py", "bench_matmul_smoke"),
                                         ("bench_invariance.py", "bench_invariance_smoke"),
                                         ("bench_kernels.py", "bench_kernels_smoke"),
                                         ("bench_step_kernels.py", "bench_step_kernels_smoke"),
                                         ("bench_gpu_decode.py", None),
                                         ("bench_detok.py", "bench_detok_smoke"),
                                         ("bench_writer.py", "bench_writer_smoke"),
                                         ("bench_load.py", "bench_load_smoke")])
def test_benchmark_smoke_runs(tmp_path, script, stem):
    stdout = run_smoke(script, tmp_path)
    assert stdout.strip()
    if stem is not None:
        assert (tmp_path / f"{stem}.json").exists() and (tmp_path / f"{stem}.md").exists()
    if script == "bench_matmul.py":  # every configuration it tried kept rows independent of the batch
        rows = json.loads((tmp_path / "bench_matmul_smoke.json").read_text())
        assert rows and all(r["auto_invariant"] and r["auto_close"] for r in rows)
    if script == "bench_invariance.py":  # on the CPU (fp32) rows agree with and without the switch
        rows = json.loads((tmp_path / "bench_invariance_smoke.json").read_text())
        assert len(rows) == 4 and all(r["rows_identical"] == r["rows"] for r in rows)
    if script == "bench_load.py":  # both ways timed, on the same weights
        got = json.loads((tmp_path / "bench_load_smoke.json").read_text())
        assert got["same_weights"] and got["weight_bytes"] > 0 and len(got["rows"]) == 3
        assert all(r["s"] > 0 for r in got["rows"])
    if script == "bench_kernels.py":  # every Triton kernel agreed with its reference within tolerance
        checks = json.loads((tmp_path / "bench_kernels_smoke.json").read_text())["checks"]
        assert checks and all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
    if script == "bench_step_kernels.py":  # every variant ran and gave the default's result
        rows = json.loads((tmp_path / "bench_step_kernels_smoke.json").read_text())["rows"]
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        from bench_step_kernels import (
            ATTN_VARIANTS,
            BOUNDS_ONLY,
            LAYER_VARIANTS,
            REFRESH_VARIANTS,
            SAMPLER_VARIANTS,
            WINDOW_VARIANTS,
        )

        # (raas with the refresh both ways: the script asserts they leave the same stamps; dense has no bounds
        # pass, so no bounds-only variants; no PDL chain on a CPU; the refresh once a page's launch settings and
        # diagnostics, whose stamps the script checks)
        assert len(rows) == (2 * len(ATTN_VARIANTS) - len(BOUNDS_ONLY) + len(REFRESH_VARIANTS) + 2
                             + len(LAYER_VARIANTS) + len(WINDOW_VARIANTS) + len(SAMPLER_VARIANTS))
        assert {r["variant"] for r in rows if r["kernel"].startswith("layer")} >= {name for name, _ in WINDOW_VARIANTS}
        assert {r["variant"] for r in rows if r["policy"] == "raas L=1024"} >= BOUNDS_ONLY
        assert all(r["rel_err_vs_default"] <= 2e-2 for r in rows if r["kernel"] == "decode attention"), rows
        assert all(r["rel_err_vs_default"] == 0 for r in rows if r["kernel"] == "sampler"), rows
    if script == "bench_detok.py":  # texts were extended while running (the script checks every text)
        res = json.loads((tmp_path / "bench_detok_smoke.json").read_text())
        assert res["tokens_left_at_finish"] < res["tokens"] // 2, res
    if script == "bench_gpu_decode.py":  # batch 1, dense and the bounded RaaS steady state all decoded
        assert stdout.count("'tokens_per_s'") == 3 and "'evictions_per_seq_head'" in stdout


def test_matmul_forms_smoke_sums_each_models_step(tmp_path):
    """bench_matmul.py --forms: every shape's row, then one step's products per model, F.linear timed."""
    run_smoke("bench_matmul.py", tmp_path, "--forms")
    text = (tmp_path / "bench_matmul_forms_smoke.md").read_text()
    steps = [line for line in text.splitlines() if "one step's products" in line]
    assert len(steps) == 2 and all(line.startswith("| tiny: ") for line in steps), text  # rows 5 and 40
    assert all(float(line.split("|")[4].split()[0]) > 0 for line in steps), text


def test_invariance_benchmark_finds_where_rows_part():
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_invariance import first_differences

    assert first_differences([[1, 2, 3], [1, 2, 3], [1, 2], [4]], [[1, 2, 3], [1, 9, 3], [1, 2, 5], [5]]) == [None, 1, 2, 0]


def test_job_benchmark_smoke_records_the_job_edges(tmp_path, smollm_tokenizer):
    """bench_job.py on a tiny model directory with the embedded model's tokenizer: the table and the
    timings that attribute a job's time (profiled window, gaps between steps, the job's two edges)."""
    tok = tmp_path / "tok"
    smollm_tokenizer.save_pretrained(tok)
    run_smoke("bench_job.py", tmp_path, "--tokenizer", str(tok), "--work", str(tmp_path / "work"))
    result = json.loads((tmp_path / "bench_job.json").read_text())["results"]
    assert [r["policy"] for r in result] == ["dense", "raas"]
    # the batch column: max_num_seqs, and the most rows a step ran when fewer did (here: the job's 6 rows)
    table = (tmp_path / "bench_job.md").read_text()
    assert all(r["max_rows_per_decode_step"] == 6 for r in result)
    assert f"| {result[0]['max_num_seqs']} (6 ran) |" in table
    for r in result:
        assert r["completion_tokens"] > 0 and r["decode_steps"] > 0
        assert r["profile"] and r["profile"]["window_wall_s"] > 0
        assert 0 <= r["before_first_step_s"] < r["job_wall_s"] and 0 <= r["after_last_step_s"] < r["job_wall_s"]
        assert r["job_tokens_per_s_unprofiled"] > 0
        # a step's period is its call plus the host's gap before it
        gaps_ms = r["gaps_before_decode_steps_s"] / r["decode_steps"] * 1e3
        assert abs(r["ms_per_decode_step"] - r["ms_per_decode_step_wall"] - gaps_ms) < 1e-6
        # the steps by rows: the bands hold every decode step and token once, their shares of the time add up
        bands = r["by_rows"]
        assert sum(b["steps"] for b in bands) == r["decode_steps"]
        assert sum(b["tokens"] for b in bands) == pytest.approx(r["mean_rows_per_decode_step"] * r["decode_steps"])
        assert sum(b["share_of_decode_time"] for b in bands) == pytest.approx(1.0)
        # no decode graphs on the CPU: the captures' record is there, and empty
        assert r["graph_captures"] == {"count": 0, "s": 0.0, "max_s": 0.0, "warm_up_s": 0.0}
        # the tail's timeline: the last shard's write after the last step, in order, up to run_job's return
        tail = r["tail_timeline"]
        names = [name for name, _, _ in tail]
        assert names[-1] == "run_job returned" and tail[-1][1] == pytest.approx(r["after_last_step_s"], abs=1e-3)
        assert names.index("writer.rows_to_table") < names.index("writer.pq.write_table")
        assert [start for _, start, _ in tail] == sorted(start for _, start, _ in tail)
        assert all(0 <= start <= end <= tail[-1][2] for _, start, end in tail)
        # the collections' record: the job's are split before, during and after the steps
        gc_record = r["gc"]
        assert {"job", "before_first_step", "steps", "after_last_step"} <= set(gc_record)
        assert sum(v["count"] for v in gc_record["job"].values()) >= sum(
            v["count"] for part in ("before_first_step", "steps", "after_last_step") for v in gc_record[part].values())


def test_job_benchmark_groups_steps_by_rows():
    """by_rows: each step lands in the band of its row count (64, 128, 256, 384, 512, then the largest batch), with its
    period (call plus gap) and roofline; empty bands are left out."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_job import by_rows, rows_table

    steps = [{"rows": 512, "wall_s": 0.007, "gap_s": 0.001}, {"rows": 400, "wall_s": 0.006, "gap_s": 0.0},
             {"rows": 64, "wall_s": 0.002, "gap_s": 0.001}, {"rows": 1, "wall_s": 0.001, "gap_s": 0.0},
             {"rows": 700, "wall_s": 0.009, "gap_s": 0.0}]
    roof = [0.004, 0.003, 0.001, 0.0005, 0.005]
    bands = by_rows(steps, roof)
    assert [b["rows"] for b in bands] == ["1-64", "385-512", "513-700"]
    low, full, big = bands
    assert (low["steps"], low["tokens"], full["steps"], full["tokens"], big["tokens"]) == (2, 65, 2, 912, 700)
    assert low["ms_per_step"] == pytest.approx(2.0) and low["gap_ms_per_step"] == pytest.approx(0.5)
    assert full["step_over_roofline"] == pytest.approx(0.014 / 0.007)
    assert full["tokens_per_s"] == pytest.approx(912 / 0.014)
    assert sum(b["share_of_decode_time"] for b in bands) == pytest.approx(1.0)
    text = rows_table([{"policy": "raas", "budget": 64, "by_rows": bands}])
    assert "| raas L=64 | 385-512 | 2 | 912 |" in text


def test_job_benchmark_without_a_profiled_window(tmp_path, smollm_tokenizer):
    """--profile-at -1: the measured jobs run without the profiler, so job tokens/s needs no correction (the
    "without the profiled window" column equals it) and the table's kernel columns are empty."""
    tok = tmp_path / "tok"
    smollm_tokenizer.save_pretrained(tok)
    run_smoke("bench_job.py", tmp_path, "--tokenizer", str(tok), "--work", str(tmp_path / "work"), "--profile-at", "-1")
    result = json.loads((tmp_path / "bench_job.json").read_text())["results"]
    assert len(result) == 2 and all(r["completion_tokens"] > 0 and r["profile"] is None for r in result)
    assert all(r["job_tokens_per_s_unprofiled"] == pytest.approx(r["job_tokens_per_s"], rel=1e-6) for r in result)
    rows = [line for line in (tmp_path / "bench_job.md").read_text().splitlines() if line.startswith("| dense")]
    assert rows and rows[0].rstrip(" |").endswith("| - | - | - | - | - | - | -")


def test_job_benchmark_settings_and_edge_profiles(tmp_path, smollm_tokenizer):
    """A POLICY+NAME=VALUE entry runs that policy's job labelled with its setting (the plain entry without one);
    --profile-first writes the first step's (a prefill's) profile tables and --cprofile the product's functions
    by cumulative time, run_job among them, with paths relative to the repository."""
    tok = tmp_path / "tok"
    smollm_tokenizer.save_pretrained(tok)
    run_smoke("bench_job.py", tmp_path, "--tokenizer", str(tok), "--work", str(tmp_path / "work"), "--profile-at", "-1",
              "--policies", "raas+RAAS_BATCH_REFRESH_WINDOW=0,dense", "--profile-first", "--cprofile")
    result = json.loads((tmp_path / "bench_job.json").read_text())["results"]
    assert [(r["policy"], r["setting"]) for r in result] == [("raas", "RAAS_BATCH_REFRESH_WINDOW=0"), ("dense", None)]
    table = (tmp_path / "bench_job.md").read_text()
    assert "| raas L=64 (RAAS_BATCH_REFRESH_WINDOW=0) |" in table and "| dense |" in table
    for policy in ("raas", "dense"):
        first = (tmp_path / f"profile_first_step_{policy}.txt").read_text()
        assert "'kind': 'prefill'" in first and "## by device time" in first and "## by host time" in first
        calls = (tmp_path / f"cprofile_{policy}.txt").read_text()
        assert "raas_batch/runner.py:" in calls and "run_job" in calls and ROOT not in calls


def test_job_benchmark_records_the_kernel_builds(monkeypatch):
    """watch_compiles keeps what Triton's JIT hooks report of a variant built (its kernel, seconds and
    arguments, pointer alignments included), and compile_times returns those inside a job's window: the
    record that found run 68's rebuilds."""
    runtime = getattr(getattr(pytest.importorskip("triton"), "knobs", None), "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_post_compile_hook"):
        pytest.skip("this Triton has no JIT hooks (the record is empty there)")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import time

    import bench_job

    monkeypatch.setattr(runtime, "jit_cache_hook", None)
    monkeypatch.setattr(runtime, "jit_post_compile_hook", None)
    monkeypatch.setattr(bench_job, "COMPILES", [])
    monkeypatch.setattr(bench_job, "_COMPILE_HOOKS", [])
    bench_job.watch_compiles()

    class Fn:
        name = "_decode_stage1"

    compiled = {"signature": {"fill_ptr": "*i32"}, "constants": {(61,): True}, "configs": [{(4,): [["tt.divisibility", 16]]}]}
    t0 = time.perf_counter()
    runtime.jit_cache_hook(key=("a",), repr="", fn=Fn(), compile=compiled, is_manual_warmup=False, already_compiled=False)
    runtime.jit_post_compile_hook(key=("a",), repr="", fn=Fn(), compile=compiled, is_manual_warmup=False,
                                  already_compiled=False)
    # a post hook without its pre hook (nothing started under that key) records nothing
    runtime.jit_post_compile_hook(key=("b",), repr="", fn=Fn(), compile=compiled, is_manual_warmup=False,
                                  already_compiled=False)
    t1 = time.perf_counter()
    got = bench_job.compile_times(t0, t1)
    assert got["count"] == 1 and got["variants"][0]["kernel"] == "_decode_stage1"
    args = json.loads(got["variants"][0]["args"])
    assert "*i32" in args["signature"] and "tt.divisibility" in args["configs"] and "61" in args["constants"]
    assert bench_job.compile_times(t1, t1 + 60)["count"] == 0  # another job's window
    bench_job.watch_compiles()  # once per process: the hooks stay the first pair
    assert runtime.jit_post_compile_hook is bench_job._COMPILE_HOOKS[1]


def test_gpu_only_overlap_probe_imports_and_refuses_a_cpu():
    """bench_overlap.py needs CUDA streams and green contexts, so CI cannot run it: it must at least
    import (it reuses bench_step_kernels' caches and bench_matmul's timer) and, without a GPU, say so."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_overlap.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, check=False)
    assert proc.returncode != 0 and "needs a CUDA device" in proc.stderr + proc.stdout, proc.stderr[-2000:]


def test_trace_gaps_finds_the_idle_time():
    """trace_gaps.summarize: idle = time when no kernel runs (overlapping kernels on two streams count
    once), the largest gap named by its neighbours, with the runtime calls made during it."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from trace_gaps import summarize

    kernels = [("a", 0, 10), ("b", 12, 20), ("c", 15, 30), ("d", 130, 10)]  # (name, ts, dur) in us
    trace = {"traceEvents": [{"cat": "kernel", "name": n, "ts": t, "dur": d} for n, t, d in kernels]
             + [{"cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 50, "dur": 60},
                {"cat": "cpu_op", "name": "aten::mm", "ts": 50, "dur": 5}]}
    text = summarize(trace, top=2, num_steps=2)
    # span 0..140 us; busy 10 + (12..45) 33 + 10 = 53; gaps 2 (10..12) and 85 (45..130)
    assert "over 0.140 ms: busy 0.053 ms, idle 0.087 ms (0.043 ms a step over 2 steps) in 2 gaps" in text
    first = text.splitlines()[4]
    assert first.split()[0] == "85.0" and "c -> d" in first and "cudaStreamSynchronize" in first
    assert "aten::mm" not in text


def test_prefill_probe_smoke(tmp_path, smollm_tokenizer):
    """profile_prefill.py times a prefill step per group size and writes its profile."""
    tok = tmp_path / "tok"
    smollm_tokenizer.save_pretrained(tok)
    run_smoke("profile_prefill.py", tmp_path, "--tokenizer", str(tok), "--work", str(tmp_path / "work"), "--repeats", "2")
    rows = json.loads((tmp_path / "profile_prefill_smoke.json").read_text())["rows"]
    assert [r["rows"] for r in rows] == [1, 4]
    assert all(r["prefill_ms_median"] > 0 and r["steps_per_call"] == 1 and r["runs"] == 2 for r in rows)
    assert "Self CPU time total" in (tmp_path / "profile_prefill.txt").read_text()
