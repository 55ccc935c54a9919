"""`GenerationWorker`: one engine, loaded once, fed shards back to back (the Ray actor of a job).

This is a plain class: it imports no Ray and runs in-process too (tests do). The driver makes it an
actor with `ray.remote(num_gpus=1, max_concurrency=...)(GenerationWorker)`, so the actor's class name,
which `ray list actors` shows, is `GenerationWorker`.

    driver ---- run_shard(spec) x depth ---->  caller threads: read rows, validate (ShardWorker.plan)
                                                    | queue of plans
                                               engine thread: llm.generate_stream(requests of every
                                                    | queued shard, pulled as the batch frees up)
                                               writer thread: a shard's last row done -> write its
    driver <--- {"ok": True, result} ---------      file atomically (ShardWorker.assemble)

Invariants:
- `run_shard` blocks until its shard's file is written, then returns {"ok": True, "result": ShardResult};
  it never raises for a failure: it returns {"ok": False, "error": str, "broken": bool}.
  broken=False: only this shard failed (reading or writing it), the engine is fine.
  broken=True: the engine raised (CUDA error, out of memory, a bug): every shard in flight failed,
  and so will every later call: the driver replaces the worker.
- Several shards are in flight at once and their prompts share the engine's batch; each row's output
  does not depend on that (per-row seeds, batch-invariant sampling), so a shard's file is the same
  as a local run's.
- With an engine that has no `generate_stream` (a test double), shards run one `generate` call each,
  in order; the next shard is still read while the current one generates.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from raas_batch.config import JobConfig
from raas_batch.worker import ShardPlan, ShardResult, ShardSpec, ShardWorker, make_engine


class EngineBroken(RuntimeError):
    """The engine raised: its state is unknown, the worker must be replaced."""


@dataclass
class _Active:
    """A shard handed to this worker and not yet written."""

    plan: ShardPlan
    future: Future
    outputs: dict[int, Any] = field(default_factory=dict)  # row_idx -> RequestOutput

    @property
    def complete(self) -> bool:
        return len(self.outputs) == len(self.plan.runnable)


class GenerationWorker:
    """Owns one engine; runs the shards it is given, several at a time, on that engine."""

    def __init__(self, cfg: JobConfig, worker_index: int = 0, num_threads: int | None = None, llm=None):
        """cfg: the job's config (the engine is built from it); num_threads: torch CPU threads (a CPU
        actor gets the cores Ray reserved for it); llm: an engine already loaded (in-process use)."""
        t0 = time.monotonic()
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.worker_index = worker_index
        self.start_error: str | None = None
        try:
            self.llm = llm if llm is not None else make_engine(cfg)
        except Exception as exc:  # noqa: BLE001 - reported by ready(): a clean refusal, not a crashed actor
            self.llm, self.start_error = None, f"{_describe(exc)}"
        self.load_s = time.monotonic() - t0
        self._shards = ShardWorker(self.llm) if self.llm is not None else None
        self._plan_lock = threading.Lock()  # readers are not shared across threads
        self._lock = threading.Lock()  # guards _active, _broken and the counters
        self._active: dict[int, _Active] = {}
        self._incoming: queue.Queue[_Active] = queue.Queue()
        self._broken: str | None = None
        self._stopping = threading.Event()
        self.num_tokens = 0
        self.num_steps = 0
        self.busy_s = 0.0  # wall time with at least one shard in hand
        self._busy_since: float | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self._engine_thread = threading.Thread(target=self._engine_loop, name="engine", daemon=True)
        if self.llm is None:
            self._broken = f"the engine could not start: {self.start_error}"
        else:
            self._engine_thread.start()

    # --- driver-facing API (each call may come from its own thread) ------------------------------
    def ready(self) -> dict[str, Any]:
        """Who and where this worker is (the driver records it in the manifest's run record);
        "error" is set when the engine could not start (the worker is then of no use)."""
        device = getattr(self.llm, "device", None)
        info = {"worker": self.worker_index, "error": self.start_error, "pid": os.getpid(),
                "host": socket.gethostname(),
                "device": str(device) if device is not None else None,
                "model": getattr(self.llm, "model_name", None), "load_s": round(self.load_s, 3)}
        if device is not None and getattr(device, "type", None) == "cuda":
            import torch

            info["gpu"] = torch.cuda.get_device_name(device)
        return info

    def run_shard(self, spec: ShardSpec) -> dict[str, Any]:
        """Generate and write one shard; returns when its file is in place (see the module doc)."""
        if self._broken:
            return {"ok": False, "broken": True, "error": self._broken}
        try:
            with self._plan_lock:
                plan = self._shards.plan(spec)
        except Exception as exc:  # noqa: BLE001 - reading this shard failed, not the engine
            return {"ok": False, "broken": False, "error": f"reading shard {spec.index}: {_describe(exc)}"}
        entry = _Active(plan, Future())
        with self._lock:
            if self._broken:
                return {"ok": False, "broken": True, "error": self._broken}
            if not self._active:
                self._busy_since = time.monotonic()
            self._active[spec.index] = entry
        if entry.complete:  # every row was rejected before the engine: nothing to generate
            self._writer.submit(self._write, entry)
        else:
            self._incoming.put(entry)
        try:
            result: ShardResult = entry.future.result()
        except EngineBroken as exc:
            return {"ok": False, "broken": True, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - writing this shard failed
            return {"ok": False, "broken": False, "error": f"writing shard {spec.index}: {_describe(exc)}"}
        return {"ok": True, "result": result}

    def progress(self) -> dict[str, Any]:
        """Cumulative counters, polled by the driver for the job's progress bar."""
        with self._lock:
            rows = {i: len(a.outputs) for i, a in self._active.items()}
            busy = self.busy_s + (time.monotonic() - self._busy_since if self._busy_since is not None else 0.0)
            return {"tokens": self.num_tokens, "steps": self.num_steps, "busy_s": round(busy, 3),
                    "rows": rows, "broken": self._broken}

    def stop(self) -> None:
        """Let the engine thread finish what it holds and end (the driver usually just kills the actor)."""
        self._stopping.set()
        if self._engine_thread.is_alive():
            self._engine_thread.join(timeout=5)
        self._writer.shutdown(wait=True)

    # --- engine thread ------------------------------------------------------------------------------
    def _engine_loop(self) -> None:
        try:
            if hasattr(self.llm, "generate_stream"):
                for key, out in self.llm.generate_stream(self._requests(), progress_callback=self._on_step):
                    self._deliver(key, out)
            else:
                self._generate_loop()
        except BaseException as exc:  # noqa: BLE001 - whatever the engine raised breaks this worker
            self._break(f"the engine failed on worker {self.worker_index} (pid {os.getpid()}): {_describe(exc)}")

    def _requests(self):
        """Requests of every queued shard, in order; None when nothing is queued right now."""
        while not self._stopping.is_set():
            try:
                entry = self._incoming.get_nowait()
            except queue.Empty:
                yield None
                continue
            for row_idx, prompt, params in entry.plan.requests():
                yield (entry.plan.spec.index, row_idx), prompt, params

    def _generate_loop(self) -> None:
        """One `generate` call per shard, for engines without generate_stream."""
        while not self._stopping.is_set():
            try:
                entry = self._incoming.get(timeout=0.05)
            except queue.Empty:
                continue
            requests = entry.plan.requests()
            prompts = [prompt for _, prompt, _ in requests]
            params = entry.plan.params()
            outputs = self.llm.generate(prompts, params, use_tqdm=False, progress_callback=self._on_step)
            if len(outputs) != len(prompts):
                raise RuntimeError(f"engine returned {len(outputs)} outputs for {len(prompts)} prompts")
            for (row_idx, _, _), out in zip(requests, outputs):
                self._deliver((entry.plan.spec.index, row_idx), out)

    def _on_step(self, num_tokens: int, num_finished: int) -> None:
        with self._lock:
            self.num_tokens += int(num_tokens)
            self.num_steps += 1

    def _deliver(self, key, out) -> None:
        index, row_idx = key
        with self._lock:
            entry = self._active[index]
            entry.outputs[row_idx] = out
            complete = entry.complete
        if complete:
            self._writer.submit(self._write, entry)

    # --- writer thread ------------------------------------------------------------------------------
    def _write(self, entry: _Active) -> None:
        try:
            result = self._shards.assemble(entry.plan, entry.outputs)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting run_shard
            self._retire([entry])
            entry.future.set_exception(exc)
            return
        self._retire([entry])
        entry.future.set_result(result)

    def _retire(self, entries: list[_Active]) -> None:
        with self._lock:
            for a in entries:
                self._active.pop(a.plan.spec.index, None)
            if not self._active and self._busy_since is not None:
                self.busy_s += time.monotonic() - self._busy_since
                self._busy_since = None

    def _break(self, message: str) -> None:
        with self._lock:
            self._broken = message
            failed = [a for a in self._active.values() if not a.complete]
        self._retire(failed)
        for a in failed:
            if not a.future.done():
                a.future.set_exception(EngineBroken(message))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
