"""The kill soak: 20 kill -9s in a row, each at a chosen instant of the job's file I/O (a shard temp file
written but not renamed, a shard renamed but not recorded, a manifest temp written, the previous copy
linked, the summary half done), each followed by `--resume`, which may itself be killed. The folder
must converge to the output of an unkilled run, every sample exactly once, no done file ever rewritten.

Kills land by `tests/kill_at.py` (SIGKILL of the job's own process at the nth matching os call), so
each kill is at a moment that matters rather than wherever a timer happens to fall; the fake engine
keeps each run about a second. The real engine's kill and resume are in test_runner_real_engine.
"""

import os
import random
import signal
import subprocess
import sys

import pyarrow.parquet as pq
from fake_llm import sample_rows, write_input
from test_runner_kill import _check_exactly_once, _done_shards, _fingerprint_files, _table

from raas_batch.integrity import verify_folder

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

KILL_POINTS = (
    "fsync:.part-:before",  # a shard's temp file written whole, not yet renamed
    "replace:part-:before",  # a shard's temp file fsynced, the rename not done
    "replace:part-:after",  # a shard file in place, not yet recorded done
    "fsync:manifest.json.tmp:before",  # a manifest save half way (its temp file)
    "replace:manifest.prev.json:before",  # the previous copy linked, not yet renamed
    "replace:manifest.json:before",  # a manifest save: temp and previous copy in place, not renamed
    "replace:manifest.json:after",  # a manifest save done, nothing after it
    "replace:summary.json:before",  # the summary's temp file written, not renamed
)


def _run(args, kill_at=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAAS_")}
    env.update(RAAS_BATCH_ENGINE="fake_llm:FakeLLM", PYTHONPATH=os.pathsep.join([TESTS, ROOT, env.get("PYTHONPATH", "")]))
    if kill_at:
        env["RAAS_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, os.path.join(TESTS, "kill_at.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_twenty_kills_in_a_row_converge_to_the_unkilled_output(tmp_path):
    rng = random.Random(20)
    rows = sample_rows(60)  # 60 one-row shards: the mid-run kills never run out of work
    src = write_input(tmp_path / "in", "jsonl", rows)
    out, ref = str(tmp_path / "out"), str(tmp_path / "ref")
    args = ["--input", src, "--output", out, "--shard-size", 1, "--n", 2, "--max-new-tokens", 10, "--seed", 11,
            "--temperature", 0.8, "--max-num-seqs", 4, "--resume"]
    seen: dict = {}  # shard index -> (inode, mtime, sha256, recorded sha256) when first seen done
    # Every moment, in a shuffled order, several times; the summary (written once a run has done all it
    # could, so a kill there lets the job finish) comes last.
    mid_run = [p for p in KILL_POINTS if "summary" not in p]
    schedule = rng.sample(mid_run, 7) + rng.sample(mid_run, 7) + rng.sample(mid_run, 5) + [KILL_POINTS[-1]]
    kills, runs, where = 0, 0, []
    while schedule:
        runs += 1
        assert runs <= 30, f"only {kills} kills landed in {runs - 1} runs"
        point = schedule[0]
        res = _run(args, f"{point}:{rng.randint(1, 2)}")
        if res.returncode == 0:
            continue  # this run ended before that moment came: the next run tries it again
        assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
        kills += 1
        where.append(schedule.pop(0))
        done = _done_shards(out)
        for i, fp in _fingerprint_files(out, done).items():
            assert seen.setdefault(i, fp) == fp, f"shard {i}'s file was rewritten after it was done ({point})"
        # Whatever instant the kill hit, no done shard is damaged: only missing work or unrecorded files.
        if not os.path.exists(os.path.join(out, "manifest.json")):
            continue  # killed before the first manifest save: nothing recorded yet
        report = verify_folder(out)
        assert not any("damaged" in p or "sha256" in p or "bytes" in p for p in report.problems), report.text()
    assert kills == 20 and set(where) == set(KILL_POINTS)

    res = _run(args)
    assert res.returncode == 0, res.stderr[-3000:]
    final = _fingerprint_files(out, _done_shards(out))
    assert {i: final[i] for i in seen} == seen  # shards done before a kill kept their files
    _check_exactly_once(out, rows, n=2)
    report = verify_folder(out)
    assert report.ok and report.num_samples == 120, report.text()
    assert sorted(os.listdir(out)) == ["config.yaml", "manifest.json", "manifest.prev.json", "shards", "summary.json"]
    res = _run([ref if a == out else a for a in args])
    assert res.returncode == 0, res.stderr[-3000:]
    assert _table(out) == _table(ref)
    full = pq.read_table(os.path.join(out, "shards")).drop_columns(["ttft_s", "e2e_s"])
    assert full.sort_by([("row_idx", "ascending"), ("sample_idx", "ascending")]).to_pylist() == \
        pq.read_table(os.path.join(ref, "shards")).drop_columns(["ttft_s", "e2e_s"]).sort_by(
            [("row_idx", "ascending"), ("sample_idx", "ascending")]).to_pylist()


def test_a_kill_during_a_repair_never_lets_the_damaged_file_back(tmp_path):
    """A bit flipped inside a done shard, found by `--resume --verify`, which is killed as it saves the
    manifest that reopens the shard: the damaged file is already gone, so the next (cheap) resume sees a
    done shard without its file and regenerates it, rather than adopting the damaged file as it would
    adopt a sound one left by a kill."""
    rows = sample_rows(6)
    src = write_input(tmp_path / "in", "jsonl", rows)
    out, ref = str(tmp_path / "out"), str(tmp_path / "ref")
    args = ["--input", src, "--output", out, "--shard-size", 2, "--seed", 2, "--temperature", 0.5]
    assert _run(args).returncode == 0
    path = os.path.join(out, "shards", "part-00001.parquet")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[40] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))
    res = _run([*args, "--resume", "--verify"], "replace:manifest.json:before:1")
    assert res.returncode == -signal.SIGKILL
    assert not os.path.exists(path) and _done_shards(out).keys() == {0, 1, 2}  # deleted, not yet reopened
    res = _run([*args, "--resume"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "shard 1: part-00001.parquet is missing; it will be regenerated" in res.stderr
    assert _run([ref if a == out else a for a in args]).returncode == 0
    assert _table(out) == _table(ref) and verify_folder(out).ok
