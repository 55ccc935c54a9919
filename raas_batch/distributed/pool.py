"""The driver's actors: one `GenerationWorker` per seat, started, watched and replaced.

A seat is a place for one worker (one GPU). Its actor may die (process killed, CUDA error, out of
memory, node lost); the seat then gets a fresh actor, so the job keeps its width. A seat whose
actor fails to *start* `MAX_START_FAILURES` times in a row is closed (the engine cannot load there).

This is the only module besides driver.py that imports Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

import ray

from raas_batch.config import JobConfig
from raas_batch.distributed.actor import GenerationWorker

MAX_START_FAILURES = 2
ENV_PREFIXES = ("RAAS_",)  # forwarded to the actors (engine substitution, cache folder, test hooks)


@dataclass
class Seat:
    index: int
    actor: Any = None
    ready_ref: Any = None  # set while the actor starts (its engine loads)
    state: str = "starting"  # starting | ready | closed
    info: dict[str, Any] = field(default_factory=dict)  # what the actor's ready() said
    generation: int = 0  # actors started in this seat
    start_failures: int = 0  # consecutive
    last_error: str | None = None
    progress_ref: Any = None
    tokens_seen: int = 0  # the current actor's cumulative tokens at the last poll
    busy_done_s: float = 0.0  # busy seconds of earlier actors in this seat
    busy_now_s: float = 0.0  # the current actor's, at the last poll
    # how many rows to send: the actor's unfinished rows at the last poll, plus rows sent since
    unfinished_rows: int = 0
    sent_rows: list[int] = field(default_factory=list)  # rows of each shard sent to the current actor
    received: int = 0  # shards the current actor had received at the last poll
    # per-seat figures for the summary
    shards_done: int = 0
    rows: int = 0
    completion_tokens: int = 0
    failures: int = 0

    def rows_wanted(self) -> int:
        """Rows the actor asks for beyond what it holds (its `wanted_rows` minus unfinished rows,
        counting shards sent after its last report as wholly unfinished)."""
        in_transit = sum(self.sent_rows[self.received:])
        return self.info.get("wanted_rows", 0) - self.unfinished_rows - in_transit

    def figures(self) -> dict[str, Any]:
        busy = self.busy_done_s + self.busy_now_s
        return {"worker": self.index, "state": self.state, "pid": self.info.get("pid"),
                "host": self.info.get("host"), "device": self.info.get("device"), "gpu": self.info.get("gpu"),
                "load_s": self.info.get("load_s"), "max_num_seqs": self.info.get("max_num_seqs"),
                "actors_started": self.generation,
                "restarts": max(0, self.generation - 1), "shards_done": self.shards_done, "rows": self.rows,
                "completion_tokens": self.completion_tokens, "failures": self.failures,
                "busy_s": round(busy, 3),
                "tokens_per_s": round(self.completion_tokens / busy, 3) if busy > 0 else 0.0,
                "last_error": self.last_error}


class WorkerPool:
    def __init__(self, cfg: JobConfig, num_workers: int, use_gpu: bool, depth: int):
        self.use_gpu, self.depth = use_gpu, depth
        device = cfg.device
        if use_gpu and device and device.startswith("cuda"):
            device = "cuda"  # Ray gives each actor one GPU through CUDA_VISIBLE_DEVICES
        self.actor_cfg = dataclasses.replace(cfg, device=device)
        self.seats = [Seat(i) for i in range(num_workers)]
        env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
        options: dict[str, Any] = {"num_cpus": 1, "max_concurrency": depth + 4, "max_restarts": 0}
        if use_gpu:
            options["num_gpus"] = 1
        if env:
            options["runtime_env"] = {"env_vars": env}
        self._cls = ray.remote(GenerationWorker).options(**options)
        self._num_threads = None if use_gpu else 1  # CPU actors: one core each, as reserved

    # --- lifecycle ---------------------------------------------------------------------------------
    def start_all(self) -> None:
        for seat in self.seats:
            self._start(seat)

    def _start(self, seat: Seat) -> None:
        seat.generation += 1
        seat.state = "starting"
        seat.actor = self._cls.remote(self.actor_cfg, seat.index, self._num_threads)
        seat.ready_ref = seat.actor.ready.remote()
        seat.progress_ref = None
        seat.busy_done_s += seat.busy_now_s
        seat.busy_now_s, seat.tokens_seen = 0.0, 0
        seat.unfinished_rows, seat.sent_rows, seat.received = 0, [], 0

    def on_ready(self, seat: Seat) -> dict[str, Any] | None:
        """The seat's ready() answered: its info, or None when the actor failed to start (the seat
        is restarted or, after MAX_START_FAILURES in a row, closed)."""
        ref, seat.ready_ref = seat.ready_ref, None
        try:
            info = ray.get(ref)
            error = info.get("error")
        except ray.exceptions.RayError as exc:  # the actor process died while starting
            info, error = {}, short_error(exc)
        if error:
            seat.start_failures += 1
            seat.last_error = error
            self._kill(seat)
            if seat.start_failures >= MAX_START_FAILURES:
                seat.state = "closed"
            else:
                self._start(seat)
            return None
        seat.info = info
        seat.state, seat.start_failures = "ready", 0
        return seat.info

    def replace(self, seat: Seat, error: str) -> None:
        """The seat's actor died or its engine broke: kill it (if alive) and start a fresh one."""
        seat.failures += 1
        seat.last_error = error
        self._kill(seat)
        self._start(seat)

    def close(self, seat: Seat) -> None:
        self._kill(seat)
        seat.state = "closed"

    def kill_all(self) -> None:
        for seat in self.seats:
            self._kill(seat)

    def _kill(self, seat: Seat) -> None:
        if seat.actor is not None:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(seat.actor, no_restart=True)
            seat.actor = None

    # --- queries -----------------------------------------------------------------------------------
    def ready_seats(self) -> list[Seat]:
        return [s for s in self.seats if s.state == "ready"]

    def starting(self) -> dict[Any, Seat]:
        """ready() refs of the starting seats -> seat."""
        return {s.ready_ref: s for s in self.seats if s.state == "starting" and s.ready_ref is not None}

    def any_open(self) -> bool:
        return any(s.state != "closed" for s in self.seats)

    def last_error(self) -> str:
        errors = [s.last_error for s in self.seats if s.last_error]
        return errors[-1] if errors else "unknown error"

    # --- progress ----------------------------------------------------------------------------------
    def poll(self, timeout_s: float) -> tuple[int, dict[int, dict[int, int]]]:
        """Ask every ready actor for its counters (at most one question in flight per actor).
        Returns (new tokens since the last poll, {seat: {shard index: rows finished}})."""
        for seat in self.ready_seats():
            if seat.progress_ref is None:
                seat.progress_ref = seat.actor.progress.remote()
        pending = {s.progress_ref: s for s in self.ready_seats() if s.progress_ref is not None}
        if not pending:
            return 0, {}
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
        new_tokens, rows = 0, {}
        for ref in done:
            seat = pending[ref]
            seat.progress_ref = None
            try:
                p = ray.get(ref)
            except ray.exceptions.RayError:
                continue  # a dead actor: its run_shard calls report it
            new_tokens += max(0, p["tokens"] - seat.tokens_seen)
            seat.tokens_seen = p["tokens"]
            seat.busy_now_s = p["busy_s"]
            seat.unfinished_rows, seat.received = p["unfinished_rows"], p["received"]
            rows[seat.index] = p["rows"]
        return new_tokens, rows


def short_error(exc: BaseException) -> str:
    """One line for a Ray error (Ray's messages carry whole tracebacks and advice)."""
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    kind = re.search(r"Worker exit type: (\w+)", text)
    detail = re.search(r"Worker exit detail: (.+?\.)(?:\s|$)", text)
    if kind or detail:  # the worker process died: say how
        how = ", ".join(x for x in (kind and kind.group(1), detail and detail.group(1)) if x)
        return f"its process died ({how})"
    return lines[-1][:500]
