"""Distributed runs on Ray (`python -m raas_batch --ray`, `ray job submit ... jobs/run.py`).

- `actor.GenerationWorker`: the job's Ray actor: one engine streaming every shard it holds (a plain class).
- `dispatch.ShardQueue`: which shard goes where, retries and giving up (plain bookkeeping).
- `pool.WorkerPool`: the actors, started, watched and replaced (Ray).
- `driver.run_job_ray`: the job loop (Ray); the output folder is a local run's.

The engine never imports anything from here, and importing this package does not import Ray.
"""
