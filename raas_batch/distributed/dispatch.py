"""Which shard goes to which worker next, and what a failure costs: the Ray driver's bookkeeping,
kept free of Ray so that it is tested exactly on the CPU.

    fresh shards (in order) --take--> worker seat (at most `depth` shards in flight)
         ^                                  |
         |                        done / failed (worker died, engine error, write error)
    retries (isolated) <-- attempt < max ---+---> attempt == max: given up (failed in the manifest)

Invariants:
- Every shard handed to `ShardQueue` is, at the end, exactly once in `done` or in `given_up`;
  a shard is in flight on at most one worker at a time.
- A worker holds at most `depth` shards in flight (a cap: the driver asks for a shard only while the
  worker wants more rows, see raas_batch.distributed.driver).
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
class SeatState:
    """What the queue knows of one worker seat (the actor in it may be replaced)."""

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
        self.seats: dict[int, SeatState] = {}
        self.draining: set[int] = set()
        self.done: list[int] = []
        self.given_up: list[int] = []
        self.num_retries = 0  # failed tries that were retried

    # --- queries ---------------------------------------------------------------------------------
    def has_work(self) -> bool:
        """Shards are waiting or in flight."""
        return bool(self.fresh or self.retries or any(s.inflight for s in self.seats.values()))

    def num_waiting(self) -> int:
        return len(self.fresh) + len(self.retries)

    def inflight(self, seat: int) -> set[int]:
        return set(self._seat(seat).inflight)

    # --- transitions -----------------------------------------------------------------------------
    def take(self, seat: int) -> int | None:
        """The next shard for `seat`, or None when it should take nothing now."""
        s = self._seat(seat)
        if s.isolated or len(s.inflight) >= self.depth:
            return None
        if self.retries:
            if not s.inflight:
                index = self.retries.popleft()
                self.draining.discard(seat)
                s.isolated = True
                return self._give(s, index)
            if seat in self.draining or len(self.draining) < len(self.retries):
                self.draining.add(seat)  # let this worker run dry so that a retry gets it
                return None
        self.draining.discard(seat)  # no retry is waiting (any more)
        if not self.fresh:
            return None
        return self._give(s, self.fresh.popleft())

    def finish(self, seat: int, index: int) -> None:
        """Shard `index` is done (its file is in place)."""
        self._release(seat, index)
        self.done.append(index)

    def fail(self, seat: int, index: int, error: str) -> bool:
        """Shard `index` failed on `seat`. True: it will be retried; False: given up after
        `max_attempts` tries in this run."""
        self._release(seat, index)
        self.errors[index] = error
        if self.attempts[index] >= self.max_attempts:
            self.given_up.append(index)
            return False
        self.retries.append(index)
        self.num_retries += 1
        return True

    def remove_seat(self, seat: int) -> None:
        """Forget a seat whose worker is gone for good (`fail` the shards it held first). Shards not
        yet handed out stay waiting for the other seats."""
        if self._seat(seat).inflight:
            raise ValueError(f"worker seat {seat} still holds shards {sorted(self._seat(seat).inflight)}")
        self.seats.pop(seat, None)
        self.draining.discard(seat)

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
    def _seat(self, seat: int) -> SeatState:
        return self.seats.setdefault(seat, SeatState())

    def _give(self, s: SeatState, index: int) -> int:
        s.inflight.add(index)
        self.attempts[index] = self.attempts.get(index, 0) + 1
        return index

    def _release(self, seat: int, index: int) -> None:
        s = self._seat(seat)
        if index not in s.inflight:
            raise KeyError(f"shard {index} is not in flight on worker seat {seat}")
        s.inflight.discard(index)
        if not s.inflight:
            s.isolated = False
