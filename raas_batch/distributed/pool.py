"""The driver's actors: one `GenerationWorker` per slot, started, watched and replaced.

A slot is a place for one worker (one GPU). Its actor may die (process killed, CUDA error, out of
memory, node lost); the slot then gets a fresh actor, so the job keeps its width. A slot whose
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
from raas_batch.distributed.worker import GenerationWorker

MAX_START_FAILURES = 2
ENV_PREFIXES = ("RAAS_",)  # forwarded to the actors (engine substitution, cache folder, test hooks)


@dataclass
class Slot:
    index: int
    actor: Any = None
    ready_ref: Any = None  # set while the actor starts (its engine loads)
    state: str = "starting"  # starting | ready | closed
    info: dict[str, Any] = field(default_factory=dict)  # what the actor's ready() said
    generation: int = 0  # actors started in this slot
    start_failures: int = 0  # consecutive
    last_error: str | None = None
    progress_ref: Any = None
    tokens_seen: int = 0  # the current actor's cumulative tokens at the last poll
    busy_done_s: float = 0.0  # busy seconds of earlier actors in this slot
    busy_now_s: float = 0.0  # the current actor's, at the last poll
    # per-slot figures for the summary
    shards_done: int = 0
    rows: int = 0
    completion_tokens: int = 0
    failures: int = 0

    def figures(self) -> dict[str, Any]:
        busy = self.busy_done_s + self.busy_now_s
        return {"worker": self.index, "state": self.state, "pid": self.info.get("pid"),
                "host": self.info.get("host"), "device": self.info.get("device"), "gpu": self.info.get("gpu"),
                "load_s": self.info.get("load_s"), "actors_started": self.generation,
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
        self.slots = [Slot(i) for i in range(num_workers)]
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
        for slot in self.slots:
            self._start(slot)

    def _start(self, slot: Slot) -> None:
        slot.generation += 1
        slot.state = "starting"
        slot.actor = self._cls.remote(self.actor_cfg, slot.index, self._num_threads)
        slot.ready_ref = slot.actor.ready.remote()
        slot.progress_ref = None
        slot.busy_done_s += slot.busy_now_s
        slot.busy_now_s, slot.tokens_seen = 0.0, 0

    def on_ready(self, slot: Slot) -> dict[str, Any] | None:
        """The slot's ready() answered: its info, or None when the actor failed to start (the slot
        is restarted or, after MAX_START_FAILURES in a row, closed)."""
        ref, slot.ready_ref = slot.ready_ref, None
        try:
            info = ray.get(ref)
            error = info.get("error")
        except ray.exceptions.RayError as exc:  # the actor process died while starting
            info, error = {}, short_error(exc)
        if error:
            slot.start_failures += 1
            slot.last_error = error
            self._kill(slot)
            if slot.start_failures >= MAX_START_FAILURES:
                slot.state = "closed"
            else:
                self._start(slot)
            return None
        slot.info = info
        slot.state, slot.start_failures = "ready", 0
        return slot.info

    def replace(self, slot: Slot, error: str) -> None:
        """The slot's actor died or its engine broke: kill it (if alive) and start a fresh one."""
        slot.failures += 1
        slot.last_error = error
        self._kill(slot)
        self._start(slot)

    def close(self, slot: Slot) -> None:
        self._kill(slot)
        slot.state = "closed"

    def kill_all(self) -> None:
        for slot in self.slots:
            self._kill(slot)

    def _kill(self, slot: Slot) -> None:
        if slot.actor is not None:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(slot.actor, no_restart=True)
            slot.actor = None

    # --- queries -----------------------------------------------------------------------------------
    def ready_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.state == "ready"]

    def starting(self) -> dict[Any, Slot]:
        """ready() refs of the starting slots -> slot."""
        return {s.ready_ref: s for s in self.slots if s.state == "starting" and s.ready_ref is not None}

    def any_open(self) -> bool:
        return any(s.state != "closed" for s in self.slots)

    def last_error(self) -> str:
        errors = [s.last_error for s in self.slots if s.last_error]
        return errors[-1] if errors else "unknown error"

    # --- progress ----------------------------------------------------------------------------------
    def poll(self, timeout_s: float) -> tuple[int, dict[int, dict[int, int]]]:
        """Ask every ready actor for its counters (at most one question in flight per actor).
        Returns (new tokens since the last poll, {slot: {shard index: rows finished}})."""
        for slot in self.ready_slots():
            if slot.progress_ref is None:
                slot.progress_ref = slot.actor.progress.remote()
        pending = {s.progress_ref: s for s in self.ready_slots() if s.progress_ref is not None}
        if not pending:
            return 0, {}
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
        new_tokens, rows = 0, {}
        for ref in done:
            slot = pending[ref]
            slot.progress_ref = None
            try:
                p = ray.get(ref)
            except ray.exceptions.RayError:
                continue  # a dead actor: its run_shard calls report it
            new_tokens += max(0, p["tokens"] - slot.tokens_seen)
            slot.tokens_seen = p["tokens"]
            slot.busy_now_s = p["busy_s"]
            rows[slot.index] = p["rows"]
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
