"""The pieces of a distributed run that need no cluster: shard dispatch bookkeeping (exact), the
engine's streaming API, and GenerationWorker in-process (real engine and fake engine)."""

import dataclasses
import os
import random
import threading

import pyarrow.parquet as pq
import pytest
from fake_llm import sample_rows, write_input

from raas_batch import SamplingParams
from raas_batch.config import resolve
from raas_batch.distributed.actor import GenerationWorker
from raas_batch.distributed.dispatch import ShardQueue
from raas_batch.job import begin_run, prepare_job

TIMING = ("ttft_s", "e2e_s")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as in a CPU actor


# --- ShardQueue ---------------------------------------------------------------------------------------
def test_queue_keeps_two_shards_per_worker_in_order():
    q = ShardQueue(range(5), max_attempts=3, depth=2)
    assert [q.take(0), q.take(0), q.take(0)] == [0, 1, None]
    assert [q.take(1), q.take(1)] == [2, 3]
    q.finish(0, 0)
    assert q.take(0) == 4 and q.take(0) is None and q.take(1) is None
    for seat, index in ((0, 1), (0, 4), (1, 2), (1, 3)):
        q.finish(seat, index)
    assert not q.has_work() and sorted(q.done) == [0, 1, 2, 3, 4] and q.given_up == []


def test_failed_shard_is_retried_isolated_and_another_worker_drains_for_it():
    q = ShardQueue(range(6), max_attempts=2, depth=2)
    assert [q.take(0), q.take(0), q.take(1), q.take(1)] == [0, 1, 2, 3]
    # Worker 0 dies holding shards 0 and 1: both failed once, both retried.
    assert q.fail(0, 0, "died") and q.fail(0, 1, "died")
    assert q.num_retries == 2
    # The idle (replaced) worker 0 takes a retry, alone; worker 1, busy, drains for the other.
    assert q.take(0) == 0 and q.take(0) is None
    assert q.take(1) is None  # draining: no fresh shard although it has room
    q.finish(1, 2)
    assert q.take(1) is None
    q.finish(1, 3)
    assert q.take(1) == 1 and q.take(1) is None  # isolated too
    q.finish(0, 0)
    assert q.take(0) == 4 and q.take(0) == 5  # no retry waiting: back to two at a time
    # Shard 1 fails again on its own: given up after max_attempts tries.
    assert not q.fail(1, 1, "boom")
    assert q.given_up == [1] and q.errors[1] == "boom" and q.attempts[1] == 2
    q.finish(0, 4)
    q.finish(0, 5)
    assert not q.has_work() and sorted(q.done) == [0, 2, 3, 4, 5]


def test_closed_seats_and_giving_up_the_rest():
    q = ShardQueue(range(3), max_attempts=3)
    assert q.take(0) == 0
    q.fail(0, 0, "died")
    with pytest.raises(KeyError):
        q.finish(0, 0)  # not in flight any more
    q.remove_seat(0)
    assert sorted(q.give_up_waiting("no worker left")) == [0, 1, 2]
    assert not q.has_work() and q.errors[2] == "no worker left"


@pytest.mark.parametrize("seed", range(5))
def test_random_failures_end_with_every_shard_exactly_once(seed):
    rng = random.Random(seed)
    num_shards, seats = 40, (0, 1, 2)
    q = ShardQueue(range(num_shards), max_attempts=3, depth=2)
    for _ in range(10_000):
        if not q.has_work():
            break
        for s in seats:
            while q.take(s) is not None:
                pass
        held = [(s, i) for s in seats for i in q.inflight(s)]
        owners = [i for _, i in held]
        assert len(owners) == len(set(owners)), "a shard is in flight twice"
        assert all(len(q.inflight(s)) <= 2 for s in seats)
        assert all(len(q.inflight(s)) == 1 for s in seats if q.seats[s].isolated)
        if not held:
            continue
        s, i = rng.choice(held)
        event = rng.random()
        if event < 0.1:  # the worker dies: everything it holds fails
            for j in sorted(q.inflight(s)):
                q.fail(s, j, "died")
        elif event < 0.2:
            q.fail(s, i, "error")
        else:
            q.finish(s, i)
    assert not q.has_work()
    assert sorted(q.done + q.given_up) == list(range(num_shards))
    assert all(q.attempts[i] == 3 for i in q.given_up)


def test_a_worker_is_sent_rows_until_it_holds_twice_its_batch():
    from raas_batch.distributed.pool import Seat

    seat = Seat(0, info={"wanted_rows": 16})  # max_num_seqs 8
    assert seat.rows_wanted() == 16
    seat.sent_rows += [4, 4, 4]  # sent; the actor has not reported them yet: counted as unfinished
    assert seat.rows_wanted() == 4
    seat.sent_rows.append(4)
    assert seat.rows_wanted() == 0
    seat.received, seat.unfinished_rows = 4, 5  # its report: all four received, 5 of their rows left
    assert seat.rows_wanted() == 11
    seat.sent_rows.append(1)
    assert seat.rows_wanted() == 10


# --- LLM.generate_stream --------------------------------------------------------------------------------
def test_generate_stream_matches_generate(smollm):
    prompts = [[{"role": "user", "content": f"What is {i} times {i + 1}?"}] for i in range(5)] + [""]
    params = [SamplingParams(max_new_tokens=6, temperature=0.8, seed=40 + i, n=1 + (i == 2)) for i in range(6)]
    ref = smollm.generate(prompts, params)

    def source():  # two groups with a pause between them, as a worker's shards arrive
        for i in range(3):
            yield f"k{i}", prompts[i], params[i]
        yield None
        for i in range(3, 6):
            yield f"k{i}", prompts[i], params[i]

    steps = []
    got = dict(smollm.generate_stream(source(), progress_callback=lambda t, f: steps.append((t, f)),
                                      max_waiting=2))
    assert sorted(got) == [f"k{i}" for i in range(6)]
    for i in range(6):
        for a, b in zip(ref[i].outputs, got[f"k{i}"].outputs, strict=True):
            assert (a.token_ids, a.text, a.finish_reason, a.seed) == (b.token_ids, b.text, b.finish_reason, b.seed)
    assert got["k5"].outputs[0].finish_reason == "error"
    assert sum(f for _, f in steps) == 6  # every request is counted once, the error prompt too
    assert sum(t for t, _ in steps) == sum(len(o.token_ids) for i in range(5) for o in got[f"k{i}"].outputs)


# --- GenerationWorker in-process -------------------------------------------------------------------------
def _job(tmp_path, num_rows, **settings):
    src = write_input(tmp_path / "in", "jsonl", sample_rows(num_rows))
    cfg = resolve({"input": src, "output": str(tmp_path / "out"), "quiet": True, **settings})
    job = prepare_job(cfg)
    begin_run(job, lambda message: None)
    return cfg, job


def _run_concurrently(worker, specs):
    results = {}

    def go(spec):
        results[spec.index] = worker.run_shard(spec)

    threads = [threading.Thread(target=go, args=(s,)) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def _rows(path):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in pq.read_table(path).to_pylist()]


def test_worker_overlaps_shards_in_one_batch_and_writes_local_files(tmp_path, smollm, monkeypatch):
    cfg, job = _job(tmp_path, 6, shard_size=2, seed=11, temperature=0.7, max_new_tokens=6)
    sizes = []
    step = smollm.engine.step

    def counting_step():
        sizes.append(len(smollm.engine.scheduler.running) + len(smollm.engine.scheduler.waiting))
        return step()

    monkeypatch.setattr(smollm.engine, "step", counting_step)
    worker = GenerationWorker(cfg, llm=smollm)
    results = _run_concurrently(worker, [job.shard_spec(i) for i in range(3)])
    worker.stop()
    monkeypatch.undo()
    assert all(r["ok"] for r in results.values()), results
    assert max(sizes) > 2, "shards of 2 rows never shared a batch"
    assert worker.progress()["tokens"] == sum(r["result"].stats["completion_tokens"] for r in results.values())
    # The same job through the local runner gives the same rows.
    from raas_batch.runner import run_job

    local_cfg = dataclasses.replace(cfg, output=str(tmp_path / "local"))
    assert run_job(local_cfg, engine=smollm)["complete"]
    for i in range(3):
        name = os.path.basename(job.shard_spec(i).path)
        assert _rows(tmp_path / "local" / "shards" / name) == _rows(job.shard_spec(i).path)


def test_worker_reports_broken_engine_and_shard_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("RAAS_BATCH_ENGINE", "fake_llm:FakeLLM")
    cfg, job = _job(tmp_path, 8, shard_size=2, seed=1, max_new_tokens=5)
    worker = GenerationWorker(cfg)
    assert worker.ready()["error"] is None and worker.ready()["pid"] == os.getpid()
    ok = _run_concurrently(worker, [job.shard_spec(0), job.shard_spec(1)])
    assert ok[0]["ok"] and ok[1]["ok"]
    report = worker.progress()
    assert (report["received"], report["unfinished_rows"], report["rows"]) == (2, 0, {})
    # A shard whose file cannot be written fails alone; the engine is fine.
    os.makedirs(os.path.join(job.shard_spec(2).path, "in-the-way"))
    res = worker.run_shard(job.shard_spec(2))
    assert not res["ok"] and not res["broken"] and "writing shard 2" in res["error"]
    # The engine raising breaks the worker: this shard and every later one report broken.
    monkeypatch.setenv("RAAS_FAKE_FAIL_ON", "question number 6 ")
    res = worker.run_shard(job.shard_spec(3))
    assert not res["ok"] and res["broken"] and "fake engine crashed" in res["error"]
    assert worker.run_shard(job.shard_spec(1))["broken"]


def test_worker_that_cannot_load_its_engine_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("RAAS_BATCH_ENGINE", "fake_llm:FakeLLM")
    cfg, job = _job(tmp_path, 2, kv_policy="nope")
    worker = GenerationWorker(cfg)
    assert "unknown kv_policy" in worker.ready()["error"]
    assert worker.run_shard(job.shard_spec(0))["broken"]
