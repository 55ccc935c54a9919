"""Distributed runs end to end on a real local Ray cluster (CPU actors, loopback only).

The module starts one head with `ray start --head` (127.0.0.1, free non-default ports, its own
--temp-dir, 2 CPUs, no GPU) in a new session, and at the end stops exactly what it started: every
process of that session and their descendants, by process id (never `ray stop`).

- the real embedded model on 2 workers gives the same rows as a local run with the same seed, and a
  local --resume of the Ray output finds it complete;
- `ray job submit ... python jobs/run.py --config configs/embedded_cpu.yaml` end to end;
- kill -9 of a worker process mid-shard: the job completes, every row exactly once, retry counted;
- a shard that keeps failing is given up (exit 1, named), the rest finishes, --resume finishes it.
The fake engine (tests/fake_llm.py) stands in where the model adds nothing but time.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import pyarrow.parquet as pq
import pytest
from fake_llm import sample_rows, write_input

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
TIMING = ("ttft_s", "e2e_s")


# --- the cluster ---------------------------------------------------------------------------------------
@dataclass
class Head:
    address: str  # GCS, for ray.init / --ray-address
    dashboard: str  # job server, for `ray job submit --address`
    env: dict  # environment for drivers that join it


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every process we can see."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(name)] = (int(fields[1]), int(fields[3]))  # ppid, session
    return out


def _ours(session: int, known: set[int]) -> set[int]:
    """Processes of our session, those recorded at start, and all their descendants (a Ray job's
    driver runs in a session of its own, as a child of a worker of ours)."""
    procs = _processes()
    ours = {pid for pid, (_, sid) in procs.items() if sid == session} | (known & set(procs))
    grew = True
    while grew:
        kids = {pid for pid, (ppid, _) in procs.items() if ppid in ours} - ours
        ours |= kids
        grew = bool(kids)
    ours.discard(os.getpid())
    return ours


def _stop(pids: set[int]) -> None:
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") and not _zombie(p) for p in pids):
            time.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture(scope="module")
def ray_head():
    temp = tempfile.mkdtemp(prefix="rbt-", dir="/tmp")  # short: Ray's socket paths live under it
    gcs, dashboard, client, agent = _free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAAS_", "RAY_"))}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # Ray's switch to keep every address on 127.0.0.1
               # Token authentication with a token of this module's own (not ~/.ray/auth_token).
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PATH=os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join([TESTS, ROOT, env.get("PYTHONPATH", "")]))
    cmd = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port",
           str(client), "--dashboard-agent-listen-port", str(agent), "--num-cpus", "2", "--num-gpus", "0",
           "--temp-dir", temp, "--include-dashboard", "true", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    session = proc.pid  # the new session's id is its leader's pid
    started: set[int] = set()
    try:
        output, _ = proc.communicate(timeout=180)
        started = _ours(session, set())
        assert proc.returncode == 0, output[-3000:]
        yield Head(address=f"127.0.0.1:{gcs}", dashboard=f"http://127.0.0.1:{dashboard}", env=env)
    finally:
        if proc.poll() is None:
            proc.kill()
        _stop(_ours(session, started))
        shutil.rmtree(temp, ignore_errors=True)


# --- helpers -----------------------------------------------------------------------------------------
def _env(head: Head, **extra) -> dict:
    return {**head.env, **{k: str(v) for k, v in extra.items()}}


def _cli(head: Head, *args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "raas_batch", *map(str, args)], cwd=ROOT, env=env or head.env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _load(out, name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def _table(out) -> list[dict]:
    rows = pq.read_table(os.path.join(out, "shards")).to_pylist()
    return sorted(({k: v for k, v in r.items() if k not in TIMING} for r in rows),
                  key=lambda r: (r["row_idx"], r["sample_idx"]))


def _check_exactly_once(out, rows, n=1):
    files = sorted(os.listdir(os.path.join(out, "shards")))
    assert all(f.startswith("part-") for f in files), files  # no temporary files left
    got = [(r["id"], r["sample_idx"]) for r in _table(out)]
    assert len(got) == len(set(got)) == len(rows) * n
    assert set(got) == {(r["id"], s) for r in rows for s in range(n)}


# --- tests ---------------------------------------------------------------------------------------------
def test_ray_run_matches_local_run_with_the_real_model(ray_head, tmp_path, smollm):
    import torch

    from raas_batch.config import resolve
    from raas_batch.runner import run_job

    src = os.path.join(ROOT, "examples", "gsm8k_mini.jsonl")
    settings = ["--input", src, "--shard-size", 2, "--seed", 3, "--temperature", 0.8, "--max-new-tokens", 10,
                "--max-num-seqs", 8, "--device", "cpu", "--quiet"]
    ray_out, local_out = tmp_path / "ray", tmp_path / "local"
    res = _cli(ray_head, *settings, "--output", ray_out, "--ray-address", ray_head.address, "--num-workers", 2)
    assert res.returncode == 0, res.stderr[-4000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors; 2 threads on 2 shared cores crawl
    try:
        cfg = resolve({"input": src, "output": str(local_out), "shard_size": 2, "seed": 3, "temperature": 0.8,
                       "max_new_tokens": 10, "max_num_seqs": 8, "device": "cpu", "quiet": True})
        local = run_job(cfg, engine=smollm)
    finally:
        torch.set_num_threads(threads)
    assert local["complete"]
    ray_rows, local_rows = _table(ray_out), _table(local_out)
    assert len(ray_rows) == 8 and all(r["completion"] for r in ray_rows)
    assert ray_rows == local_rows

    summary = _load(ray_out, "summary.json")
    assert summary["complete"] and summary["distributed"]["backend"] == "ray"
    assert summary["distributed"]["gpu"] is False and summary["this_run"]["retries"] == 0
    workers = summary["workers"]
    assert [w["worker"] for w in workers] == [0, 1] and all(w["state"] == "ready" for w in workers)
    assert sum(w["shards_done"] for w in workers) == 4
    assert sum(w["completion_tokens"] for w in workers) == summary["completion_tokens"]
    run = _load(ray_out, "manifest.json")["runs"][-1]
    assert len({w["pid"] for w in run["workers"]}) == 2 and os.getpid() not in {w["pid"] for w in run["workers"]}
    # Same layout as a local run: a local --resume finds the Ray job complete (and loads no model).
    res = _cli(ray_head, *settings, "--output", ray_out, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _table(ray_out) == local_rows
    # A Ray resume of a finished job has nothing to distribute: it needs no cluster at all.
    res = _cli(ray_head, *settings, "--output", ray_out, "--resume", "--ray-address", "127.0.0.1:9")
    assert res.returncode == 0, res.stderr[-3000:]


def test_ray_job_submit_end_to_end(ray_head, tmp_path):
    rows = sample_rows(12)
    src = write_input(tmp_path / "in", "parquet", rows)
    out = tmp_path / "out"
    runtime_env = {"env_vars": {"RAAS_BATCH_ENGINE": "fake_llm:FakeLLM"}}
    cmd = [RAY, "job", "submit", "--address", ray_head.dashboard, "--working-dir", ROOT,
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "jobs/run.py", "--config", "configs/embedded_cpu.yaml", "--input", str(src),
           "--output", str(out), "--shard-size", "3", "--num-workers", "2", "--audit-rows", "2"]
    res = subprocess.run(cmd, cwd=tmp_path, env=ray_head.env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "succeeded" in res.stdout.lower()
    _check_exactly_once(out, rows)
    summary = _load(out, "summary.json")
    assert summary["complete"] and summary["model"] == "fake/tiny"
    # the audit ran on a worker of the cluster after the shards: its table and summary block
    audit = pq.read_table(out / "audit.parquet").to_pylist()
    assert sorted({r["row_idx"] for r in audit}) == [3, 9] and summary["audit"]["rows"] == 2
    assert _load(out, "manifest.json")["audit"]["state"] == "done"
    assert summary["distributed"]["num_workers"] == 2 and len(summary["workers"]) == 2
    # Operators find the actors by class name.
    listed = subprocess.run([RAY, "list", "actors", "--address", ray_head.dashboard, "--filter",
                             "class_name=GenerationWorker", "--format", "json", "--limit", "100"],
                            env=ray_head.env, capture_output=True, text=True, timeout=120, check=False)
    assert listed.returncode == 0, listed.stderr[-2000:]
    pids = {w["pid"] for w in _load(out, "manifest.json")["runs"][-1]["workers"]}
    assert pids <= {a["pid"] for a in json.loads(listed.stdout)}


def test_killed_worker_is_replaced_and_its_shards_retried(ray_head, tmp_path):
    rows = sample_rows(24)
    src = write_input(tmp_path / "in", "jsonl", rows)
    out = tmp_path / "out"
    env = _env(ray_head, RAAS_BATCH_ENGINE="fake_llm:FakeLLM", RAAS_FAKE_SLEEP_S=0.15)
    proc = subprocess.Popen([sys.executable, "-m", "raas_batch", "--input", src, "--output", out, "--shard-size", "3",
                             "--seed", "5", "--max-new-tokens", "6", "--ray-address", ray_head.address,
                             "--num-workers", "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        victim = None
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            try:
                m = _load(out, "manifest.json")
            except (OSError, ValueError):
                continue
            done = sum(s["state"] == "done" for s in m["shards"])
            workers = m["runs"][-1].get("workers", [])
            if done >= 1 and len(workers) == 2:
                victim = workers[0]["pid"]
        assert victim is not None, "the job never got going"
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-4000:]
    _check_exactly_once(out, rows)
    summary = _load(out, "summary.json")
    assert summary["complete"] and summary["this_run"]["retries"] >= 1
    assert summary["this_run"]["worker_restarts"] >= 1
    killed = [w for w in summary["workers"] if w["restarts"] >= 1]
    assert killed and killed[0]["failures"] >= 1 and killed[0]["pid"] != victim
    assert "died" in killed[0]["last_error"]
    assert any(s["attempts"] == 2 for s in _load(out, "manifest.json")["shards"])
    assert "shard retries" in stderr


def test_shard_that_keeps_failing_is_given_up_then_resume_finishes(ray_head, tmp_path):
    rows = sample_rows(12)
    src = write_input(tmp_path / "in", "jsonl", rows)
    out = tmp_path / "out"
    args = ["--input", src, "--output", out, "--shard-size", 3, "--max-new-tokens", 6, "--seed", 1]
    env = _env(ray_head, RAAS_BATCH_ENGINE="fake_llm:FakeLLM", RAAS_FAKE_FAIL_ON=rows[4]["prompt"])
    res = _cli(ray_head, *args, "--ray-address", ray_head.address, "--num-workers", 2, "--max-attempts", 2, env=env)
    assert res.returncode == 1, res.stderr[-4000:]
    assert "failed: shard 1 (rows 3-5)" in res.stderr and "fake engine crashed" in res.stderr
    m = _load(out, "manifest.json")
    assert [s["state"] for s in m["shards"]] == ["done", "failed", "done", "done"]
    assert m["shards"][1]["attempts"] == 2
    summary = _load(out, "summary.json")
    assert summary["failed_shards"][0]["index"] == 1 and not summary["complete"]
    # Resume locally (the same layout): only the failed shard runs.
    res = _cli(ray_head, *args, "--resume", env=_env(ray_head, RAAS_BATCH_ENGINE="fake_llm:FakeLLM"))
    assert res.returncode == 0, res.stderr[-3000:]
    _check_exactly_once(out, rows)
    assert _load(out, "manifest.json")["shards"][1]["attempts"] == 3

    # Damage after the fact, repaired by a Ray resume (the checks are the local run's, in prepare_job):
    # a truncated shard and a garbled manifest, with --quiet (repairs are printed anyway).
    before = {f: os.stat(out / "shards" / f).st_mtime_ns for f in ("part-00000.parquet", "part-00003.parquet")}
    p2 = out / "shards" / "part-00002.parquet"
    p2.write_bytes(p2.read_bytes()[:100])
    (out / "manifest.json").write_text('{"version": 2, "shar')
    res = _cli(ray_head, *args, "--resume", "--quiet", "--ray-address", ray_head.address, "--num-workers", 1,
               env=_env(ray_head, RAAS_BATCH_ENGINE="fake_llm:FakeLLM"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "continuing from manifest.prev.json" in res.stderr and "shard 2: part-00002.parquet has 100 bytes" in res.stderr
    summary = _load(out, "summary.json")
    assert summary["complete"] and [r["index"] for r in summary["repaired_shards"]] == [2]
    assert "workers" in summary  # it ran on Ray
    assert {f: os.stat(out / "shards" / f).st_mtime_ns for f in before} == before
    _check_exactly_once(out, rows)
