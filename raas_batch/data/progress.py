"""Job progress: one bar for the whole job (rows done of total, output tokens/s, ETA).

On a terminal it is a tqdm bar; when stderr is not a terminal (a log file, a CI job, a Ray job) it
prints a plain line at most every `log_interval_s` seconds and one per finished shard; `quiet`
silences progress but not failures (`log(..., always=True)`). Rows already done by an earlier run count as done from the start, but rates
and the ETA only use what this run did.

Invariant: the rows shown never exceed the total and never go backwards.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class JobProgress:
    def __init__(self, total_rows: int, initial_rows: int = 0, quiet: bool = False,
                 stream: TextIO | None = None, log_interval_s: float = 15.0, desc: str = "raas_batch"):
        self.total_rows = total_rows
        self.rows = initial_rows
        self.initial_rows = initial_rows
        self.tokens = 0
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.log_interval_s = log_interval_s
        self.desc = desc
        self.t0 = time.monotonic()
        self._last_log = self.t0
        self._bar = None
        if not quiet and _isatty(self.stream):
            self._bar = tqdm(total=total_rows, initial=initial_rows, unit="row", desc=desc,
                             file=self.stream, dynamic_ncols=True, smoothing=0.1)

    @property
    def is_bar(self) -> bool:
        """True when a live bar is shown (a terminal), False for plain log lines or quiet."""
        return self._bar is not None

    # --- counters -------------------------------------------------------------------------------
    def update(self, num_new_tokens: int = 0, num_finished_rows: int = 0) -> None:
        """Engine callback: tokens generated and rows finished since the last call."""
        self.tokens += max(0, int(num_new_tokens))
        step = max(0, min(int(num_finished_rows), self.total_rows - self.rows))
        self.rows += step
        if self._bar is not None:
            if step:
                self._bar.update(step)
            self._bar.set_postfix_str(f"{self.tokens_per_s:.1f} tok/s", refresh=False)
        elif not self.quiet and time.monotonic() - self._last_log >= self.log_interval_s:
            self._log_line()

    def advance_to(self, rows: int) -> None:
        """Set rows done to at least `rows` (reconciles a shard's end with what callbacks reported)."""
        if rows > self.rows:
            self.update(0, rows - self.rows)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.t0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.elapsed_s, 1e-9)

    def eta_s(self) -> float | None:
        done_now = self.rows - self.initial_rows
        if done_now <= 0:
            return None
        return (self.total_rows - self.rows) * self.elapsed_s / done_now

    # --- messages -------------------------------------------------------------------------------
    def log(self, message: str, always: bool = False) -> None:
        """A line of its own (above the bar on a terminal); silenced by quiet unless `always` (failures
        and repairs: quiet silences progress, not what went wrong)."""
        if self.quiet and not always:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(f"[{self.desc}] {message}", file=self.stream, flush=True)

    def _log_line(self) -> None:
        self._last_log = time.monotonic()
        pct = 100.0 * self.rows / self.total_rows if self.total_rows else 100.0
        print(f"[{self.desc}] {self.rows}/{self.total_rows} rows ({pct:.1f}%), "
              f"{self.tokens_per_s:.1f} tok/s, elapsed {_fmt_eta(self.elapsed_s)}, "
              f"ETA {_fmt_eta(self.eta_s())}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.tokens_per_s:.1f} tok/s", refresh=True)
            self._bar.close()
            self._bar = None
        elif not self.quiet:
            self._log_line()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
