"""kill -9 of a running job, then --resume: every row's samples exactly once, done files untouched.

The job runs in a subprocess (`python -m raas_batch`) on the fake engine (the real request core and
streaming runner over a toy model), slowed down per engine step so that the kill lands mid-run.
Shards stream through one batch and complete out of order; the kills land with later shards done
and earlier ones still running. The real engine's end-to-end run is covered by test_runner_real_engine.
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from fake_llm import sample_rows, write_input

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def _env(sleep_s: float) -> dict:
    env = dict(os.environ)
    env.update(RAAS_BATCH_ENGINE="fake_llm:FakeLLM", RAAS_FAKE_SLEEP_S=str(sleep_s),
               PYTHONPATH=os.pathsep.join([TESTS, ROOT, env.get("PYTHONPATH", "")]))
    env.pop("RAAS_FAKE_FAIL_ON", None)
    return env


def _start(args, sleep_s):
    return subprocess.Popen([sys.executable, "-m", "raas_batch", *map(str, args)], cwd=ROOT, env=_env(sleep_s),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _done_shards(out) -> dict:
    try:
        with open(os.path.join(out, "manifest.json")) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return {}
    return {s["index"]: s for s in m["shards"] if s["state"] == "done"}


def _fingerprint_files(out, shards) -> dict:
    """inode, mtime and sha256 of the files of the given done shards."""
    res = {}
    for i, s in shards.items():
        p = os.path.join(out, s["file"])
        st = os.stat(p)
        with open(p, "rb") as f:
            res[i] = (st.st_ino, st.st_mtime_ns, hashlib.sha256(f.read()).hexdigest(), s["sha256"])
    return res


def _load_json(out, name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def _wait_for(pred, proc, timeout=60.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def _kill_when(proc, pred, then_sleep: float = 0.0) -> None:
    """SIGKILL `proc` once pred() holds (then_sleep seconds later); the test fails if proc ends first."""
    try:
        assert _wait_for(pred, proc), proc.stderr.read().decode()
        time.sleep(then_sleep)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def _table(d):
    t = pq.read_table(os.path.join(d, "shards"), columns=["id", "sample_idx", "completion", "seed"])
    return sorted(map(tuple, (r.values() for r in t.to_pylist())))


def _run_to_end(args, out_flag_value=None):
    if out_flag_value is not None:
        args = [out_flag_value if a == "OUT" else a for a in args]
    res = subprocess.run([sys.executable, "-m", "raas_batch", *map(str, args)], cwd=ROOT, env=_env(0.0),
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr


def _check_exactly_once(out, rows, n):
    files = sorted(os.listdir(os.path.join(out, "shards")))
    assert all(f.startswith("part-") and ".tmp-" not in f for f in files), files
    got = [r for f in files for r in pq.read_table(os.path.join(out, "shards", f),
                                                   columns=["id", "row_idx", "sample_idx"]).to_pylist()]
    pairs = [(r["id"], r["sample_idx"]) for r in got]
    assert len(pairs) == len(set(pairs)) == len(rows) * n
    assert set(pairs) == {(r["id"], s) for r in rows for s in range(n)}
    summary = _load_json(out, "summary.json")
    assert summary["complete"] and summary["rows"] == len(rows) and summary["samples"] == len(rows) * n


def test_kill_9_after_first_shard_then_resume(tmp_path):
    rows = sample_rows(24)
    src = write_input(tmp_path / "in", "jsonl", rows)
    out = str(tmp_path / "out")
    args = ["--input", src, "--output", out, "--shard-size", 4, "--n", 2, "--seed", 7, "--max-new-tokens", 6]
    proc = _start(args, sleep_s=0.05)
    _kill_when(proc, lambda: len(_done_shards(out)) >= 1, then_sleep=0.08)  # land inside the next shard
    assert proc.returncode == -signal.SIGKILL
    done = _done_shards(out)
    assert 1 <= len(done) < 6, "the kill must land mid-job"
    before = _fingerprint_files(out, done)
    m = _load_json(out, "manifest.json")
    assert any(s["state"] == "running" for s in m["shards"])  # the shard being generated when killed

    res = subprocess.run([sys.executable, "-m", "raas_batch", *map(str, args), "--resume"], cwd=ROOT, check=False,
                         env=_env(0.0), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    after = _fingerprint_files(out, {i: s for i, s in _done_shards(out).items() if i in done})
    assert after == before  # same inode, mtime and hash: never rewritten
    _check_exactly_once(out, rows, n=2)
    m = _load_json(out, "manifest.json")
    assert all(s["state"] == "done" for s in m["shards"])
    assert all(s["attempts"] == 1 for s in m["shards"] if s["index"] in done)
    # A second identical job (no kill) gives the same samples: the kill changed nothing in the output.
    ref = str(tmp_path / "ref")
    _run_to_end([*args[:3], ref, *args[4:]])
    assert _table(out) == _table(ref)


def test_kill_9_with_later_shards_done_before_earlier_ones(tmp_path):
    """One-row shards all in one batch finish in the order of their rows' lengths, not their indices;
    kill when a later shard is done and an earlier one is not, then resume."""
    rows = sample_rows(8)
    src = write_input(tmp_path / "in", "jsonl", rows)
    out, ref = str(tmp_path / "out"), str(tmp_path / "ref")
    args = ["--input", src, "--output", "OUT", "--shard-size", 1, "--seed", 3, "--temperature", 0.9]
    _run_to_end(args, ref)
    finished = sorted(_load_json(ref, "manifest.json")["shards"], key=lambda s: s["finished_at"])
    assert [s["index"] for s in finished] != list(range(8)), "the shards finished in index order"

    def gap():  # a done shard above a shard that is not done
        done = _done_shards(out)
        return bool(done) and any(i not in done for i in range(max(done)))

    proc = _start([out if a == "OUT" else a for a in args], sleep_s=0.05)
    _kill_when(proc, gap)
    done = _done_shards(out)
    assert any(i not in done for i in range(max(done))) and len(done) < 8
    states = {s["state"] for s in _load_json(out, "manifest.json")["shards"] if s["index"] not in done}
    assert "running" in states  # several shards were in the batch together
    before = _fingerprint_files(out, done)
    _run_to_end([*args, "--resume"], out)
    assert _fingerprint_files(out, {i: s for i, s in _done_shards(out).items() if i in done}) == before
    _check_exactly_once(out, rows, n=1)
    assert _table(out) == _table(ref)


@pytest.mark.slow
def test_repeated_random_kills_converge_exactly_once(tmp_path):
    """Kill at random instants (during start-up, generation, a write or a manifest save) until done;
    rows of different lengths make shards finish out of order. The end result is an unkilled run's."""
    rng = random.Random(1234)
    rows = sample_rows(30)
    src = write_input(tmp_path / "in", "jsonl", rows)
    out = str(tmp_path / "out")
    args = ["--input", src, "--output", out, "--shard-size", 3, "--max-new-tokens", 12, "--seed", 5, "--resume"]
    seen: dict = {}  # shard index -> file fingerprint when first seen done
    for _ in range(8):
        proc = _start(args, sleep_s=0.03)
        time.sleep(rng.uniform(0.3, 1.5))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        done = _done_shards(out)
        now = _fingerprint_files(out, done)
        for i, fp in now.items():
            assert seen.setdefault(i, fp) == fp, f"shard {i}'s file was rewritten after it was done"
    res = subprocess.run([sys.executable, "-m", "raas_batch", *map(str, args)], cwd=ROOT, env=_env(0.0),
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    final = _fingerprint_files(out, _done_shards(out))
    assert {i: final[i] for i in seen} == seen
    _check_exactly_once(out, rows, n=1)
    ref = str(tmp_path / "ref")
    _run_to_end([ref if a == out else a for a in args])
    assert _table(out) == _table(ref)
