"""`GenerationWorker`: the Ray actor of a job: one engine, loaded once, streaming every shard it holds.

This is a plain class: it imports no Ray and runs in-process too (tests do). The driver makes it an
actor with `ray.remote(num_gpus=1, max_concurrency=...)(GenerationWorker)`, so the actor's class name,
which `ray list actors` shows, is `GenerationWorker`.

    driver ---- run_shard(spec) ----------->  caller thread: read the rows (ShardStream.plan), queue
                                                    | the plan, wait for the shard's file
                                               engine thread: ShardStream.run over the queued plans:
                                                    | one engine batch over every shard held
                                               writer thread: a shard's last row done -> its file,
    driver <--- {"ok": True, result} --------       written atomically
    driver ---- progress() ---------------->  tokens, rows done per shard, unfinished rows: the driver
                                               sends more shards while unfinished rows < wanted_rows

Invariants:
- `run_shard` blocks until its shard's file is written, then returns {"ok": True, "result": ShardResult};
  it never raises for a failure: it returns {"ok": False, "error": str, "broken": bool}.
  broken=False: only this shard failed (reading or writing it), the engine is fine.
  broken=True: the engine raised (CUDA error, out of memory, a bug): every shard it held failed,
  and so will every later call: the driver replaces the worker.
- Every shard held shares the engine's batch (`raas_batch.shard_stream`); each row's output does not
  depend on that (per-row seeds, batch-invariant sampling), so a shard's file is a local run's.
- `wanted_rows` (2 x max_num_seqs) is what the driver keeps in hand here: a full batch running and
  a full batch waiting, so shard boundaries and slow tails never leave the batch short.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from raas_batch.config import JobConfig
from raas_batch.engine_factory import make_engine, out_of_memory_advice
from raas_batch.shard_stream import ShardStream
from raas_batch.shards import ShardPlan, ShardResult, ShardSpec

DEFAULT_MAX_NUM_SEQS = 64  # for an engine that does not say its batch size


class EngineBroken(RuntimeError):
    """The engine raised: its state is unknown, the worker must be replaced."""


class GenerationWorker:
    """Owns one engine; runs the shards it is given, all at once, on that engine."""

    def __init__(self, cfg: JobConfig, worker_index: int = 0, num_threads: int | None = None, llm=None):
        """cfg: the job's config (the engine is built from it); num_threads: torch CPU threads (a CPU
        actor gets the cores Ray reserved for it); llm: an engine already loaded (in-process use)."""
        t0 = time.monotonic()
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.worker_index = worker_index
        self.cfg = cfg
        self.start_error: str | None = None
        try:
            self.llm = llm if llm is not None else make_engine(cfg)
        except Exception as exc:  # noqa: BLE001 - reported by ready(): a clean refusal, not a crashed actor
            self.llm, self.start_error = None, _describe(exc)
        self.load_s = time.monotonic() - t0
        self._stream = ShardStream(self.llm, self._on_done) if self.llm is not None else None
        self._lock = threading.Lock()  # guards the fields below
        self._held: dict[int, Future] = {}  # shard index -> its result, for the waiting run_shard
        self._writing: set[int] = set()  # handed to the writer: the engine is done with them
        self._incoming: queue.Queue[ShardPlan] = queue.Queue()
        self._received, self._arriving_rows, self._queued_rows = 0, 0, 0
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
        max_num_seqs = getattr(self.llm, "max_num_seqs", None) or DEFAULT_MAX_NUM_SEQS
        info = {"worker": self.worker_index, "error": self.start_error, "pid": os.getpid(),
                "host": socket.gethostname(), "device": str(device) if device is not None else None,
                "model": getattr(self.llm, "model_name", None), "load_s": round(self.load_s, 3),
                "max_num_seqs": max_num_seqs, "wanted_rows": 2 * max_num_seqs}
        if device is not None and getattr(device, "type", None) == "cuda":
            import torch

            info["gpu"] = torch.cuda.get_device_name(device)
        return info

    def run_shard(self, spec: ShardSpec) -> dict[str, Any]:
        """Generate and write one shard; returns when its file is in place (see the module doc)."""
        with self._lock:
            if self._broken:
                return {"ok": False, "broken": True, "error": self._broken}
            self._received += 1
            self._arriving_rows += spec.num_rows
            if not self._held:
                self._busy_since = time.monotonic()
            future = self._held[spec.index] = Future()
        try:
            plan = self._stream.plan(spec)
        except Exception as exc:  # noqa: BLE001 - reading this shard failed, not the engine
            self._retire(spec.index, spec.num_rows)
            return {"ok": False, "broken": False, "error": f"reading shard {spec.index}: {_describe(exc)}"}
        with self._lock:
            self._arriving_rows -= spec.num_rows
            self._queued_rows += len(plan.runnable)
        self._incoming.put(plan)
        try:
            result: ShardResult = future.result()
        except EngineBroken as exc:
            return {"ok": False, "broken": True, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - writing this shard failed
            return {"ok": False, "broken": False, "error": f"writing shard {spec.index}: {_describe(exc)}"}
        return {"ok": True, "result": result}

    def progress(self) -> dict[str, Any]:
        """Cumulative counters, polled by the driver (progress bar, and how many rows to send)."""
        active = list(self._stream.active.items()) if self._stream is not None else []
        with self._lock:
            busy = self.busy_s + (time.monotonic() - self._busy_since if self._busy_since is not None else 0.0)
            unfinished = self._arriving_rows + self._queued_rows + sum(
                len(a.plan.runnable) - len(a.outputs) for _, a in active)
            return {"tokens": self.num_tokens, "steps": self.num_steps, "busy_s": round(busy, 3),
                    "rows": {i: len(a.outputs) for i, a in active}, "received": self._received,
                    "unfinished_rows": unfinished, "broken": self._broken}

    def audit(self, specs: list[ShardSpec]) -> dict[str, Any]:
        """The audit's decodes on this worker's engine (`raas_batch.audit.decode_rows`), once every shard
        of the job is done: the engine thread is stopped first (the audit is this worker's last work, and
        on CUDA it gives the job's page pool back). Never raises: {"ok": True, "result": [...]} or
        {"ok": False, "error": str}."""
        from raas_batch.audit import decode_rows

        self._stopping.set()
        if self._engine_thread.is_alive():
            self._engine_thread.join()
        try:
            return {"ok": True, "result": decode_rows(self._stream, specs)}
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which records the audit failed
            return {"ok": False, "error": _describe(exc)}

    def stop(self) -> None:
        """Let the engine thread finish what it holds and end (the driver usually just kills the actor)."""
        self._stopping.set()
        if self._engine_thread.is_alive():
            self._engine_thread.join(timeout=5)
        self._writer.shutdown(wait=True)

    # --- engine thread ------------------------------------------------------------------------------
    def _engine_loop(self) -> None:
        try:
            self._stream.run(self._plans(), self._on_step)
        except BaseException as exc:  # noqa: BLE001 - whatever the engine raised breaks this worker
            advice = out_of_memory_advice(exc, self.cfg, getattr(self.llm, "max_num_seqs", None))
            self._break(f"the engine failed on worker {self.worker_index} (pid {os.getpid()}): "
                        f"{advice or _describe(exc)}")

    def _plans(self):
        """Queued plans as the stream has room for them; None when nothing is queued right now."""
        while not self._stopping.is_set():
            try:
                plan = self._incoming.get_nowait()
            except queue.Empty:
                yield None
                continue
            with self._lock:
                self._queued_rows -= len(plan.runnable)
            yield plan

    def _on_step(self, num_tokens: int, num_rows: int) -> None:
        with self._lock:
            self.num_tokens += int(num_tokens)
            self.num_steps += 1

    def _on_done(self, plan: ShardPlan, outputs: dict[int, Any]) -> None:
        with self._lock:
            self._writing.add(plan.spec.index)
        self._writer.submit(self._write, plan, outputs)

    # --- writer thread ------------------------------------------------------------------------------
    def _write(self, plan: ShardPlan, outputs: dict[int, Any]) -> None:
        index = plan.spec.index
        try:
            result = self._stream.write(plan, outputs)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting run_shard
            self._retire(index)[0].set_exception(exc)
            return
        self._retire(index)[0].set_result(result)

    def _retire(self, index: int, arriving_rows: int = 0) -> list[Future]:
        with self._lock:
            future = self._held.pop(index, None)
            self._writing.discard(index)
            self._arriving_rows -= arriving_rows
            if not self._held and self._busy_since is not None:
                self.busy_s += time.monotonic() - self._busy_since
                self._busy_since = None
        return [future] if future is not None else []

    def _break(self, message: str) -> None:
        with self._lock:
            self._broken = message
            failed = [i for i in self._held if i not in self._writing]
        for index in failed:
            for future in self._retire(index):
                future.set_exception(EngineBroken(message))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
