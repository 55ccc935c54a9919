"""Generation loops over the request core (`raas_batch.llm_engine.LLMEngine`).

`generate_stream` is the one loop: the caller hands an iterator of requests and the core pulls from
it whenever its waiting queue is short, so a caller that works in groups (a job's shards) never
drains the batch between groups:

    for key, out in generate_stream(core, requests):     # requests: (key, prompt, params) | None
        ...                                              # out: a RequestOutput, all samples done

`collect` (what `LLM.generate` runs) is that loop over a closed list, returned in input order.

Invariants:
- Every request pulled is yielded exactly once, with all its `n` samples finished (a prompt that
  cannot run is yielded after the next step with error outputs).
- The iterator is pulled only between engine steps and only while fewer than `max_waiting`
  sequences wait for admission; a `None` item means "nothing new yet" (pulling resumes after the
  next step, or after a short sleep when the engine is idle).
- progress_callback(num_new_tokens, num_finished_requests) is called after every step.
- When the loop ends early (an engine error, the generator closed), the core is aborted: no sequence
  is left in the engine, so the same LLM can run the next stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

from raas_batch.outputs import RequestOutput
from raas_batch.sampling_params import SamplingParams

log = logging.getLogger(__name__)

Request = tuple[Hashable, Any, SamplingParams | None]  # (key, prompt, params)
ProgressCallback = Callable[[int, int], None]

IDLE_SLEEP_S = 0.005  # an idle engine whose source has nothing yet polls it this often


def generate_stream(core, requests: Iterable[Request | None], progress_callback: ProgressCallback | None = None,
                    max_waiting: int | None = None) -> Iterator[tuple[Hashable, RequestOutput]]:
    """Yield (key, RequestOutput) for each request of `requests` as it finishes (see module doc).

    max_waiting: pull more requests while fewer sequences than this wait for admission (default: the
    engine's max_num_seqs, enough to refill the whole batch at once).
    """
    source = iter(requests)
    max_waiting = max_waiting or core.engine.scheduler.max_num_seqs
    exhausted = False
    _more_coming(core, True)
    try:
        while True:
            got_none = False
            batch, pending = [], 0  # pulled, and the sequences they add: prepared together (tokenized in one call)
            while not exhausted and core.num_waiting() + pending < max_waiting:
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    _more_coming(core, False)  # the scheduler may start the last rows without waiting to group them
                    break
                if item is None:
                    got_none = True
                    break
                batch.append(item)
                pending += core.samples_of(item[2])
            if batch:
                core.add_requests(batch)
            if not core.has_unfinished_requests():
                if exhausted:
                    return
                if got_none:
                    time.sleep(IDLE_SLEEP_S)
                continue
            finished, num_tokens = core.step()
            if progress_callback is not None:
                progress_callback(num_tokens, len(finished))
            yield from finished
    finally:
        _more_coming(core, True)
        if core.has_unfinished_requests():
            core.abort_all()


def _more_coming(core, value: bool) -> None:
    """Tell the engine's scheduler whether requests may still arrive (its refill rule, engine/scheduler.py)."""
    scheduler = getattr(core.engine, "scheduler", None)
    if scheduler is not None:
        scheduler.more_coming = value


def collect(core, prompts: list, params: list[SamplingParams | None], use_tqdm: bool = False,
            progress_callback: ProgressCallback | None = None) -> list[RequestOutput]:
    """Run every prompt to completion -> one RequestOutput per prompt, in input order."""
    bar = None
    if use_tqdm:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="prompts", unit="prompt")

    def on_step(num_tokens: int, num_finished: int) -> None:
        if bar is not None and num_finished:
            bar.update(num_finished)
        if progress_callback is not None:
            progress_callback(num_tokens, num_finished)

    requests = ((i, prompt, p) for i, (prompt, p) in enumerate(zip(prompts, params)))
    try:
        results = dict(generate_stream(core, requests, on_step, max_waiting=max(1, len(prompts))))
    finally:
        if bar is not None:
            bar.close()
    outputs = [results[i] for i in range(len(prompts))]
    for i, out in enumerate(outputs):
        out.index = i
    over = sum(o.kv_over_budget for r in outputs for o in r.outputs)
    if over:
        log.warning("%d sequence(s) had prompts longer than the KV budget allows; they kept their prompt "
                    "pages plus a small decode allowance (CompletionOutput.kv_over_budget).", over)
    return outputs
