"""Streaming generation: requests keep arriving while the engine runs (`LLM.generate_stream`).

`LLM.generate` takes a closed list, so a caller that works in groups (a batch worker's shards) would
drain the batch at the end of every group and leave the device idle while the tail finishes. Here
the caller hands an iterator instead, and the engine pulls from it whenever its waiting queue is
short, so the next group's prompts are admitted as soon as slots and pages free up:

    for key, out in llm.generate_stream(requests):       # requests: (key, prompt, params) | None
        ...                                              # out: a RequestOutput, all samples done

Invariants:
- Every request pulled is yielded exactly once, with all its `n` samples finished (a prompt that
  cannot run is yielded at once with error outputs, as `generate` would give them).
- A request's output equals what `generate` gives for the same prompt and seeded params: sequences
  are built the same way and sampling is batch-invariant (`raas_batch.engine.sampler`).
- The iterator is pulled only between engine steps and only while fewer than `max_waiting`
  sequences wait for admission; a `None` item means "nothing new yet" (pulling resumes after the
  next step, or after a short sleep when the engine is idle).
- The engine never sees Ray, files or shards: keys are opaque to it.
- Closing the generator early leaves unfinished sequences in the engine: do not reuse that LLM.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

from raas_batch.engine.sampler import seed_key
from raas_batch.engine.sequence import Sequence
from raas_batch.outputs import CompletionOutput, RequestOutput
from raas_batch.reasoning import prompt_opens_think
from raas_batch.sampling_params import SamplingParams

Request = tuple[Hashable, Any, SamplingParams | None]  # (key, prompt, params)

IDLE_SLEEP_S = 0.005  # an idle engine whose source has nothing yet polls it this often


def start_request(llm, index: int, prompt: Any, params: SamplingParams) -> tuple[RequestOutput, int]:
    """Prepare `prompt` as `LLM.generate` does and add its samples to the engine.

    Returns the RequestOutput to fill (error outputs already set when the prompt cannot run) and
    the number of sequences added (0: nothing to wait for)."""
    text, ids, error = llm._prepare(prompt)
    seed = params.seed if params.seed is not None else random.getrandbits(63)
    outs = [CompletionOutput(index=j, seed=seed) for j in range(params.n)]
    result = RequestOutput(index=index, prompt=text, prompt_token_ids=ids, outputs=outs)
    if error:
        for out in outs:
            out.finish_reason, out.error = "error", error
        return result, 0
    opens_think = text is not None and prompt_opens_think(text)
    added = 0
    for j in range(params.n):
        seq = Sequence(request_idx=index, sample_idx=j, prompt_token_ids=ids, params=params,
                       seed_key=seed_key(seed, j), seed=seed,
                       max_new_tokens=min(params.max_new_tokens, llm.max_model_len - len(ids)),
                       starts_in_think=opens_think)
        try:
            llm.engine.add(seq)
        except ValueError as exc:  # the sequence can never fit the cache: this row's error
            outs[j].finish_reason, outs[j].error = "error", str(exc)
            continue
        added += 1
    return result, added


def generate_stream(llm, requests: Iterable[Request | None],
                    progress_callback: Callable[[int, int], None] | None = None,
                    max_waiting: int | None = None) -> Iterator[tuple[Hashable, RequestOutput]]:
    """Yield (key, RequestOutput) for each request of `requests` as it finishes (see module doc).

    progress_callback(num_new_tokens, num_finished_requests) is called after every engine step.
    max_waiting: pull more requests while fewer sequences than this wait for admission (default:
    the engine's max_num_seqs, enough to refill the whole batch at once).
    """
    engine = llm.engine
    source = iter(requests)
    max_waiting = max_waiting or engine.scheduler.max_num_seqs
    live: dict[int, list] = {}  # request index -> [key, RequestOutput, sequences not finished]
    counter = itertools.count()
    exhausted = False
    while True:
        got_none = False
        while not exhausted and len(engine.scheduler.waiting) < max_waiting:
            try:
                item = next(source)
            except StopIteration:
                exhausted = True
                break
            if item is None:
                got_none = True
                break
            key, prompt, params = item
            index = next(counter)
            result, added = start_request(llm, index, prompt, params or SamplingParams())
            if added:
                live[index] = [key, result, added]
            else:
                yield key, result
        if not engine.has_work():
            if exhausted:
                return
            if got_none:
                time.sleep(IDLE_SLEEP_S)
            continue
        finished, num_tokens = engine.step()
        done: list[tuple[Hashable, RequestOutput]] = []
        for seq in finished:
            entry = live[seq.request_idx]
            llm._fill_output(entry[1].outputs[seq.sample_idx], seq)
            entry[2] -= 1
            if entry[2] == 0:
                del live[seq.request_idx]
                done.append((entry[0], entry[1]))
        if progress_callback is not None:
            progress_callback(num_tokens, len(done))
        yield from done
