"""One request lifecycle, in the shape of nano-vllm's / vLLM's `LLMEngine`:

    core = LLMEngine(engine, tokenizer, max_model_len)
    core.add_request(key, prompt, params)        # checked, tokenized, n sequences added to the engine
    core.add_requests([(key, prompt, params), ...])  # the same, the prompts tokenized in one call
    while core.has_unfinished_requests():
        finished, num_tokens = core.step()       # [(key, RequestOutput)]: requests whose samples all ended

Every caller goes through it: `LLM.generate` (collects a stream), `LLM.generate_stream`, the shard
stream of batch jobs and Ray actors (`raas_batch.shard_stream`), and teacher-forced scoring
(`raas_batch.engine.scoring`). The prompt validator is `raas_batch.prompts.check_prompt`, the output
builder `fill_completion` below: each exists once.

Invariants:
- Every request added comes out of `step` exactly once, with all its `n` samples finished. A prompt
  that cannot run (`check_prompt`, tokenizer failure, longer than the context, larger than the KV
  cache) comes out of the next `step` with error outputs (finish_reason "error", `error` says why).
- A request's output depends only on its prompt and params: sequences are built the same way
  whenever they are added, and seeded sampling is batch-invariant (`raas_batch.engine.sampler`).
- Sampling fields a request leaves unset take the model's generation_config values
  (`generation_defaults`), then `FALLBACK_DEFAULTS`.
- `ttft_s` and `e2e_s` are measured from the sequence's admission into the running batch.
- When no request is left unfinished the engine is idle too (a decode step still in flight for
  sequences that had stopped, engine/engine.py's overlap, is drained).
- A completion's text is exactly `tokenizer.decode(token_ids, skip_special_tokens=True)`. Long ones are
  decoded while they run, a few sequences a step (`advance_texts`), so that a step that finishes many
  rows (every row of a fixed-length job at once) only decodes their last tokens.
- `abort_all` releases every sequence (their pages and slots) and forgets every request: the engine
  is idle and reusable afterwards. The engine never sees keys: they are opaque here too.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from raas_batch.engine.sequence import PromptGroup, Sequence
from raas_batch.outputs import CompletionOutput, RequestOutput
from raas_batch.prompts import check_prompt, encode_many, render
from raas_batch.reasoning import count_reasoning_tokens, prompt_opens_think, split_reasoning
from raas_batch.sampling_params import SamplingParams


@dataclass
class _Request:
    key: Hashable
    output: RequestOutput
    num_unfinished: int = 0  # sequences still in the engine
    group_key: Hashable = None  # its samples' entry in LLMEngine._groups (None: no group)


class LLMEngine:
    """The request layer over an `Engine` (add / has_work / step / scheduler).

    seed_key(seed, sample_idx) -> the sampler's stream key; default `raas_batch.engine.sampler.seed_key`
    (a test double passes its own to stay free of torch).
    """

    def __init__(self, engine, tokenizer, max_model_len: int | None = None, chat_template_kwargs: dict | None = None,
                 generation_defaults: dict | None = None, seed_key: Callable[[int, int], int] | None = None):
        if seed_key is None:
            from raas_batch.engine.sampler import seed_key
        if max_model_len is None:
            max_model_len = engine.runner.model.spec.max_positions
        self.engine, self.tokenizer, self.max_model_len = engine, tokenizer, max_model_len
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.generation_defaults = dict(generation_defaults or {})
        self.seed_key = seed_key
        self._ids = itertools.count()
        self._running: dict[int, _Request] = {}  # request id -> request with sequences in the engine
        self._done: list[_Request] = []  # finished before reaching the engine (errors), out at next step
        # (prompt ids, kv_override) -> the PromptGroup that requests with that prompt may still join
        self._groups: dict[Hashable, PromptGroup] = {}
        self._texts = text_backend(tokenizer)  # None: texts are decoded when a sequence finishes only
        self._text_cursor = 0  # where the next step's advance_texts starts in the running list
        self._text_worker: ThreadPoolExecutor | None = None  # runs advance_texts off the step loop
        self._text_job: Future | None = None  # the advance_texts in flight, if any
        self._text_job_seqs: set[int] = set()  # id() of its sequences

    # ---- requests in ----
    def prepare(self, prompt: Any) -> tuple[str | None, list[int], str | None]:
        """-> (prompt text as the model sees it, token ids, error or None). Never raises."""
        return self.prepare_many([prompt])[0]

    def prepare_many(self, prompts: list) -> list[tuple[str | None, list[int], str | None]]:
        """`prepare` of each prompt, the texts to encode going through the tokenizer in one batch call (a fast
        tokenizer encodes it in parallel); the same results as one by one. Never raises."""
        out: list = [None] * len(prompts)
        texts: dict[bool, list[tuple[int, str]]] = {True: [], False: []}  # add_special_tokens -> (index, text)
        for i, prompt in enumerate(prompts):
            normal, error = check_prompt(prompt)
            if error:
                out[i] = (None, [], error)
                continue
            try:
                text, ids, special = render(self.tokenizer, normal, self.chat_template_kwargs)
            except Exception as exc:  # noqa: BLE001 - a template failure is this prompt's problem only
                out[i] = (None, [], _untokenizable(exc))
                continue
            if ids is None:
                texts[special].append((i, text))
            else:
                out[i] = self._checked(text, ids)
        for special, items in texts.items():
            try:
                encoded = encode_many(self.tokenizer, [text for _, text in items], special)
            except Exception:  # noqa: BLE001 - one text broke the batch: each on its own, to name it
                encoded = None
            for k, (i, text) in enumerate(items):
                if encoded is not None:
                    out[i] = self._checked(text, encoded[k])
                    continue
                try:
                    out[i] = self._checked(text, list(self.tokenizer.encode(text, add_special_tokens=special)))
                except Exception as exc:  # noqa: BLE001
                    out[i] = (None, [], _untokenizable(exc))
        return out

    def _checked(self, text: str | None, ids: list[int]) -> tuple[str | None, list[int], str | None]:
        if not ids:
            return text, ids, "the prompt has no tokens"
        if len(ids) >= self.max_model_len:
            return text, ids, (f"the prompt has {len(ids)} tokens but the model's context is {self.max_model_len}; "
                               "shorten it")
        return text, ids, None

    def samples_of(self, params: SamplingParams | None) -> int:
        """The sequences a request with `params` adds (its n, after the defaults)."""
        return (params or SamplingParams()).with_defaults(self.generation_defaults).n

    def add_requests(self, requests: list[tuple[Hashable, Any, SamplingParams | None]]) -> None:
        """`add_request` of each (key, prompt, params), their prompts prepared together (`prepare_many`)."""
        for (key, _, params), prepared in zip(requests, self.prepare_many([p for _, p, _ in requests])):
            self._add(key, prepared, params)

    def add_request(self, key: Hashable, prompt: Any, params: SamplingParams | None = None, *,
                    forced: list[int] | None = None, kv_override: object = None) -> None:
        """Queue one request. forced: tokens fed instead of sampled ones (teacher forcing);
        kv_override: a per-sequence KV budget (see raas_batch.policies.base)."""
        self._add(key, self.prepare(prompt), params, forced, kv_override)

    def _add(self, key: Hashable, prepared: tuple, params: SamplingParams | None, forced: list[int] | None = None,
             kv_override: object = None) -> None:
        params = (params or SamplingParams()).with_defaults(self.generation_defaults)
        text, ids, error = prepared
        request_id = next(self._ids)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        outs = [CompletionOutput(index=j, seed=seed) for j in range(params.n)]
        request = _Request(key, RequestOutput(index=request_id, prompt=text, prompt_token_ids=ids, outputs=outs))
        if error:
            for out in outs:
                out.finish_reason, out.error = "error", error
        else:
            opens_think = text is not None and prompt_opens_think(text)
            group = self._group_for(request, ids, params, forced, kv_override)
            for j, out in enumerate(outs):
                seq = Sequence(request_idx=request_id, sample_idx=j, prompt_token_ids=ids, params=params,
                               seed_key=self.seed_key(seed, j), seed=seed,
                               max_new_tokens=min(params.max_new_tokens, self.max_model_len - len(ids)),
                               starts_in_think=opens_think, forced=list(forced or []), kv_override=kv_override,
                               group=group)
                try:
                    self.engine.add(seq)
                except ValueError as exc:  # the sequence can never fit the cache: this request's error
                    out.finish_reason, out.error = "error", str(exc)
                    continue
                request.num_unfinished += 1
        if request.num_unfinished:
            self._running[request_id] = request
        else:
            self._forget_group(request)
            self._done.append(request)

    def _group_for(self, request: _Request, ids: list[int], params: SamplingParams, forced, kv_override):
        """The PromptGroup of a request's samples (engine/sequence.py): they prefill the prompt once and
        share its pages. A request with n > 1 whose prompt (and KV setting) equals that of a group still
        joinable joins it: its prefill has not run yet, or its logits are kept (a group whose pages are
        read in place keeps them while any sample runs; a copying group while some of its samples wait).
        None: n = 1, forced tokens, or sharing off."""
        if params.n < 2 or forced or not getattr(self.engine, "share_prompts", False):
            return None
        key = (tuple(ids), kv_override)
        try:
            group = self._groups.get(key)
        except TypeError:  # an unhashable kv_override: no joining
            return PromptGroup(len(ids))
        if group is None or group.refs == 0 or (group.pages is not None and group.logits is None):
            group = self._groups[key] = PromptGroup(len(ids))
        request.group_key = key
        return group

    def _forget_group(self, request: _Request) -> None:
        """A finished request's group entry goes once no sample reads the group any more."""
        key = request.group_key
        if key is not None:
            group = self._groups.get(key)
            if group is not None and group.refs == 0:
                del self._groups[key]

    # ---- the loop ----
    def has_unfinished_requests(self) -> bool:
        return bool(self._running or self._done)

    def num_waiting(self) -> int:
        """Sequences added and not yet admitted into the running batch."""
        return len(self.engine.scheduler.waiting)

    def step(self) -> tuple[list[tuple[Hashable, RequestOutput]], int]:
        """One engine step (when it has work) -> (requests finished by it, tokens generated in it)."""
        done, self._done = self._done, []
        num_tokens = 0
        if self.engine.has_work():
            finished, num_tokens = self.engine.step()
            if self._text_job is not None and any(id(s) in self._text_job_seqs for s in finished):
                self._text_job.result()  # their prefixes are being extended: let that finish first
            texts = decode_texts(self.tokenizer, [s for s in finished if s.detok is None])
            for seq in finished:
                request = self._running[seq.request_idx]
                fill_completion(request.output.outputs[seq.sample_idx], seq, self.tokenizer, texts.get(id(seq)))
                request.num_unfinished -= 1
                if request.num_unfinished == 0:
                    del self._running[seq.request_idx]
                    self._forget_group(request)
                    done.append(request)
            while not self._running and self.engine.has_work():
                self.engine.step()  # an overlapped decode step of sequences that had already stopped
            if self._texts is not None:
                self._advance_some_texts()
        return [(r.key, r.output) for r in done], num_tokens

    def _advance_some_texts(self) -> None:
        """advance_texts on the next 1/TEXT_PERIOD_STEPS of the running sequences (round robin), so that
        each one's text is extended about every TEXT_PERIOD_STEPS steps. It runs on a worker thread:
        `decode_batch` releases the GIL, so the step loop, whose host work at large batches is close to
        the device's step time, is not slowed (run 57: on the loop it cost the H200 job 1 ms a step).
        One job at a time: a step whose previous job is still running starts none."""
        if self._text_job is not None:
            if not self._text_job.done():
                return
            self._text_job.result()  # (raises what the job raised)
            self._text_job, self._text_job_seqs = None, set()
        running = getattr(getattr(self.engine, "scheduler", None), "running", None)
        if not running:
            return
        count = -(-len(running) // TEXT_PERIOD_STEPS)
        start = self._text_cursor % len(running)
        picked = running[start:start + count]
        if len(picked) < count:
            picked += running[:count - len(picked)]
        self._text_cursor = start + count
        picked = [s for s in picked if s.detok is None and not s.finished and _text_due(s)]
        if not picked:
            return
        if self._text_worker is None:
            self._text_worker = ThreadPoolExecutor(1, thread_name_prefix="raas-texts")
        self._text_job_seqs = {id(s) for s in picked}
        self._text_job = self._text_worker.submit(advance_texts, self._texts, picked)

    def key_of(self, seq: Sequence) -> Hashable:
        """The key of the request a running sequence belongs to (for step observers, e.g. scoring)."""
        return self._running[seq.request_idx].key

    def abort_all(self) -> None:
        """Drop every request and release every sequence (after an engine error, or a stream closed early)."""
        if self._text_job is not None:
            self._text_job.exception()  # wait for it; what it raised no longer matters
            self._text_job, self._text_job_seqs = None, set()
        self.engine.abort()
        self._running.clear()
        self._done.clear()
        self._groups.clear()


# Texts decoded while sequences run (advance_texts): each running sequence gets a turn about every
# TEXT_PERIOD_STEPS steps, and its text is extended when at least TEXT_MIN_TOKENS tokens wait; a seam is
# checked on SEAM_TOKENS tokens either side.
TEXT_PERIOD_STEPS = 128
TEXT_MIN_TOKENS = 32
SEAM_TOKENS = 8


def text_backend(tokenizer):
    """The tokenizer's Rust backend when its batch decode equals `tokenizer.decode(ids,
    skip_special_tokens=True)` (a fast tokenizer that does not clean up spaces after decoding), else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "decode_batch") or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    return backend


def _text_due(seq: Sequence) -> bool:
    """Whether at least TEXT_MIN_TOKENS tokens wait between the decoded prefix and the seam's window."""
    return len(seq.output_token_ids) - SEAM_TOKENS - seq.text_upto >= TEXT_MIN_TOKENS


def advance_texts(backend, seqs: list[Sequence]) -> None:
    """Extend the decoded prefix (text_done, text_upto) of each running sequence, up to SEAM_TOKENS before
    its last token, where that is safe; one `decode_batch` for all of them.

    A prefix may end at token c only where decoding is additive: decode(ids) == decode(ids[:c]) +
    decode(ids[c:]) for any continuation. Decoders act on neighbouring tokens only (UTF-8 characters
    split over byte tokens, a leading space a SentencePiece decoder strips, WordPiece's joins), so the
    check decodes SEAM_TOKENS tokens each side of c: the two halves must give the window's text. Where
    they do not, the prefix stays and a later turn tries a later seam; the rest of the text is always
    decoded when the sequence finishes (decode_texts)."""
    w = SEAM_TOKENS
    jobs, pieces = [], []
    for s in seqs:
        if not _text_due(s):
            continue
        ids = s.output_token_ids
        cut = len(ids) - w
        jobs.append((s, cut))
        pieces += [ids[s.text_upto:cut], ids[cut - w:cut], ids[cut:cut + w], ids[cut - w:cut + w]]
    if not jobs:
        return
    texts = backend.decode_batch(pieces, skip_special_tokens=True)
    for k, (s, cut) in enumerate(jobs):
        chunk, before, after, window = texts[4 * k:4 * k + 4]
        if before + after == window:
            s.text_done += chunk
            s.text_upto = cut


def _untokenizable(exc: Exception) -> str:
    return f"the prompt could not be tokenized ({type(exc).__name__}: {exc})"


def decode_texts(tokenizer, seqs: list[Sequence]) -> dict[int, str]:
    """The texts of sequences that finished in one step: id(seq) -> text, equal to
    `tokenizer.decode(ids, skip_special_tokens=True)`.

    The tokens past each sequence's decoded prefix (advance_texts: all of them for a short generation)
    are decoded in one parallel `decode_batch` in Rust. {} when the tokenizer has no such backend
    (text_backend): fill_completion then calls tokenizer.decode per sequence."""
    backend = text_backend(tokenizer)
    if backend is None or not seqs:
        return {}
    texts = backend.decode_batch([s.output_token_ids[s.text_upto:] for s in seqs], skip_special_tokens=True)
    return {id(s): s.text_done + t for s, t in zip(seqs, texts)}


def fill_completion(out: CompletionOutput, seq: Sequence, tokenizer, text: str | None = None) -> None:
    """The output builder: a finished sequence -> its CompletionOutput (text, reasoning split, counts,
    KV figures, timings from admission). text: the completion's text when already decoded (decode_texts).
    The output takes the finished sequence's token list itself (no copy: nothing appends to it any more)."""
    out.token_ids = seq.output_token_ids
    if text is None:
        if seq.detok is not None:
            text = seq.detok.text if seq.stop_text_end is None else seq.detok.text[:seq.stop_text_end]
        elif tokenizer is None:  # random weights from a config (benchmarks): tokens only
            text = ""
        else:
            text = seq.text_done + tokenizer.decode(out.token_ids[seq.text_upto:], skip_special_tokens=True)
    out.text = text
    out.reasoning, out.answer = split_reasoning(text, seq.starts_in_think)
    if seq.params.thinking_budget is not None:
        out.num_reasoning_tokens = seq.num_reasoning_tokens
    elif seq.starts_in_think or "<think>" in text:
        out.num_reasoning_tokens = count_reasoning_tokens(tokenizer, out.token_ids, seq.starts_in_think)
    out.thinking_budget_hit = seq.thinking_budget_hit
    out.finish_reason = seq.finish_reason or "length"
    out.peak_kv_tokens, out.evicted_pages = seq.peak_kv_tokens, seq.evicted_pages
    out.shared_kv_tokens = seq.shared_kv_tokens
    out.kv_over_budget = seq.kv_over_budget
    now = time.perf_counter()
    start = seq.t_admitted if seq.t_admitted is not None else seq.t_arrival
    out.ttft_s = (seq.t_first_token or now) - start
    out.e2e_s = (seq.t_finish or now) - start
