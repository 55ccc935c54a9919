"""Which shard goes to which worker next, and what a failure costs: the Ray driver's bookkeeping,
kept free of Ray so that it is tested exactly on the CPU.

    fresh shards (in order) --take--> worker slot (at most `depth` shards in flight)
         ^                                  |
         |                        done / failed (worker died, engine error, write error)
    retries (isolated) <-- attempt < max ---+---> attempt == max: given up (failed in the manifest)

Invariants:
- Every shard handed to `ShardQueue` is, at the end, exactly once in `done` or in `given_up`;
  a shard is in flight on at most one worker at a time.
- A worker holds at most `depth` shards in flight. `depth` = 2 keeps the engine's batch full across
  shard boundaries: the next shard's prompts are already waiting when the current one drains.
- A shard that failed once is retried *isolated*: on a worker with nothing else in flight, which
  takes nothing else until it is done. A failure that kills a worker fails every shard it held
  (their attempts all count), so isolation is what attributes a repeated failure to the one shard
  that causes it, and keeps a crashing shard from using up its neighbours' attempts.
- While retries wait, as many workers as there are waiting retries stop taking fresh shards
  ("draining"), so a retry gets an idle worker soon instead of at the end of the job.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class SlotState:
    """What the queue knows of one worker slot (the actor in it may be replaced)."""

    inflight: set[int] = field(default_factory=set)
    isolated: bool = False  # holds a retried shard: takes nothing else until it is done


class ShardQueue:
    def __init__(self, indices, max_attempts: int, depth: int = 2):
        if max_attempts < 1 or depth < 1:
            raise ValueError("max_attempts and depth must be >= 1")
        self.fresh: deque[int] = deque(indices)
        self.retries: deque[int] = deque()
        self.max_attempts, self.depth = max_attempts, depth
        self.attempts: dict[int, int] = {}  # tries in this run (the manifest counts all runs)
        self.errors: dict[int, str] = {}  # last error of each shard that failed at least once
        self.slots: dict[int, SlotState] = {}
        self.draining: set[int] = set()
        self.done: list[int] = []
        self.given_up: list[int] = []
        self.num_retries = 0  # failed tries that were retried

    # --- queries ---------------------------------------------------------------------------------
    def has_work(self) -> bool:
        """Shards are waiting or in flight."""
        return bool(self.fresh or self.retries or any(s.inflight for s in self.slots.values()))

    def num_waiting(self) -> int:
        return len(self.fresh) + len(self.retries)

    def inflight(self, slot: int) -> set[int]:
        return set(self._slot(slot).inflight)

    # --- transitions -----------------------------------------------------------------------------
    def take(self, slot: int) -> int | None:
        """The next shard for `slot`, or None when it should take nothing now."""
        s = self._slot(slot)
        if s.isolated or len(s.inflight) >= self.depth:
            return None
        if self.retries:
            if not s.inflight:
                index = self.retries.popleft()
                self.draining.discard(slot)
                s.isolated = True
                return self._give(s, index)
            if slot in self.draining or len(self.draining) < len(self.retries):
                self.draining.add(slot)  # let this worker run dry so that a retry gets it
                return None
        self.draining.discard(slot)  # no retry is waiting (any more)
        if not self.fresh:
            return None
        return self._give(s, self.fresh.popleft())

    def finish(self, slot: int, index: int) -> None:
        """Shard `index` is done (its file is in place)."""
        self._release(slot, index)
        self.done.append(index)

    def fail(self, slot: int, index: int, error: str) -> bool:
        """Shard `index` failed on `slot`. True: it will be retried; False: given up after
        `max_attempts` tries in this run."""
        self._release(slot, index)
        self.errors[index] = error
        if self.attempts[index] >= self.max_attempts:
            self.given_up.append(index)
            return False
        self.retries.append(index)
        self.num_retries += 1
        return True

    def remove_slot(self, slot: int) -> None:
        """Forget a slot whose worker is gone for good (`fail` the shards it held first). Shards not
        yet handed out stay waiting for the other slots."""
        if self._slot(slot).inflight:
            raise ValueError(f"worker slot {slot} still holds shards {sorted(self._slot(slot).inflight)}")
        self.slots.pop(slot, None)
        self.draining.discard(slot)

    def give_up_waiting(self, error: str) -> list[int]:
        """No worker is left: every waiting shard is given up with `error`; returns them."""
        left = list(self.retries) + list(self.fresh)
        self.retries.clear()
        self.fresh.clear()
        for index in left:
            self.errors[index] = error
            self.given_up.append(index)
        return left

    # --- internals -------------------------------------------------------------------------------
    def _slot(self, slot: int) -> SlotState:
        return self.slots.setdefault(slot, SlotState())

    def _give(self, s: SlotState, index: int) -> int:
        s.inflight.add(index)
        self.attempts[index] = self.attempts.get(index, 0) + 1
        return index

    def _release(self, slot: int, index: int) -> None:
        s = self._slot(slot)
        if index not in s.inflight:
            raise KeyError(f"shard {index} is not in flight on worker slot {slot}")
        s.inflight.discard(index)
        if not s.inflight:
            s.isolated = False
