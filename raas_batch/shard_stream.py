"""Many shards through one engine stream: rows of later shards are admitted while earlier rows decode,
and each shard is handed back as soon as its last row finishes (shards complete in any order).

    stream = ShardStream(llm, on_done)           # on_done(plan, outputs): write the file, record it
    plan = stream.plan(spec)                     # read the shard's rows (any thread, one at a time)
    stream.run(plans, progress_callback)         # plans: iterator of ShardPlan | None ("none yet")

The local runner pulls plans on demand, a Ray actor queues the plans its driver sends; both write
files on a writer thread, so the engine never waits for a file. Both run the request core's one loop
(`LLM.generate_stream`), so a shard boundary never drains the batch.

Invariants:
- `on_done` is called exactly once for every plan pulled, with the RequestOutput of each runnable
  row (row_idx -> output); a plan without runnable rows is done as soon as it is pulled.
- Plans are pulled only when the engine's waiting queue is short (generate_stream's rule): the next
  shard is read when the batch can take its rows, not earlier.
- If the engine raises, `run` raises it; the shards not done are then in `active` (the caller fails
  them) and the engine is empty (generate_stream aborts the core), so `run` may be called again
  with the rest of the same `plans` iterator.
- progress_callback(num_new_tokens, num_finished_rows) counts every row once, rows rejected before
  the engine (unreadable JSONL lines) included.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from raas_batch.data.reader import ReaderSpec, open_reader
from raas_batch.prompts import has_chat_template
from raas_batch.shards import ShardPlan, ShardResult, ShardSpec, plan_shard, write_shard_file


@dataclass
class ActiveShard:
    """A shard pulled into the stream and not yet handed to on_done."""

    plan: ShardPlan
    outputs: dict[int, Any] = field(default_factory=dict)  # row_idx -> RequestOutput

    @property
    def complete(self) -> bool:
        return len(self.outputs) == len(self.plan.runnable)


class ShardStream:
    def __init__(self, llm, on_done: Callable[[ShardPlan, dict[int, Any]], None]):
        self.llm, self.on_done = llm, on_done
        self.model_name = getattr(llm, "model_name", None)
        self.uses_chat_template = has_chat_template(getattr(llm, "tokenizer", None))
        self.active: dict[int, ActiveShard] = {}  # shard index -> rows so far (engine thread only)
        self._readers: dict[ReaderSpec, Any] = {}
        self._read_lock = threading.Lock()  # readers are not shared across threads
        self._rejected_rows = 0  # rows rejected before the engine, not yet reported to progress

    # --- shards in and out ---------------------------------------------------------------------------
    def plan(self, spec: ShardSpec) -> ShardPlan:
        """Read spec's rows and prepare them for the engine (raises what reading raises)."""
        with self._read_lock:
            if spec.reader not in self._readers:
                self._readers[spec.reader] = open_reader(spec.reader)
            return plan_shard(self._readers[spec.reader], spec, spec.apply_chat_template and self.uses_chat_template)

    def write(self, plan: ShardPlan, outputs: dict[int, Any]) -> ShardResult:
        """Write the shard's file atomically (see raas_batch.shards.write_shard_file)."""
        return write_shard_file(plan, outputs, self.model_name)

    def unfinished_rows(self) -> int:
        """Rows pulled into the stream whose output has not come back (read from any thread)."""
        return sum(len(a.plan.runnable) - len(a.outputs) for a in list(self.active.values()))

    # --- the loop --------------------------------------------------------------------------------------
    def run(self, plans: Iterable[ShardPlan | None],
            progress_callback: Callable[[int, int], None] | None = None) -> None:
        """Stream every plan of `plans` through the engine until it is exhausted and all are done."""

        def on_step(num_tokens: int, num_finished: int) -> None:
            rejected, self._rejected_rows = self._rejected_rows, 0
            if progress_callback is not None:
                progress_callback(num_tokens, num_finished + rejected)

        for (index, row_idx), out in self.llm.generate_stream(self._requests(plans), progress_callback=on_step):
            entry = self.active[index]
            entry.outputs[row_idx] = out
            if entry.complete:
                self._hand_back(index)
        if self._rejected_rows:  # rows of plans pulled after the last step
            on_step(0, 0)

    def _requests(self, plans: Iterable[ShardPlan | None]) -> Iterator[tuple | None]:
        for plan in plans:
            if plan is None:
                yield None
                continue
            index = plan.spec.index
            self.active[index] = ActiveShard(plan)
            self._rejected_rows += len(plan.jobs) - len(plan.runnable)
            if not plan.runnable:
                self._hand_back(index)
                continue
            for row_idx, prompt, params in plan.requests():
                yield (index, row_idx), prompt, params

    def _hand_back(self, index: int) -> None:
        entry = self.active.pop(index)
        self.on_done(entry.plan, entry.outputs)
