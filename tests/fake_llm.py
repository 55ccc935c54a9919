"""A fake `LLM` for fast runner tests: the real request core (`raas_batch.llm_engine.LLMEngine`) and
stream over a toy engine and a word-level tokenizer, so a job through it runs the real prompt
validator, stream loop and output builder; only the model is fake. It never imports torch.

Select it in a subprocess with RAAS_BATCH_ENGINE=fake_llm:FakeLLM (and tests/ on PYTHONPATH).
Behaviour, all deterministic:
- tokens are whitespace-separated words (ids from a hash of the word); the context is 128 tokens;
  the chat template writes one `<|role|> content` line per message, then `<|assistant|>`.
- the toy model's completion of a sequence is `<think> w.. w.. </think> answer-xxxx <eos>` with 3-8
  reasoning words; it depends on the prompt and, when temperature > 0, on the sample's seed key only
  (not on the batch). Stop strings, stop token ids, max tokens, EOS and the thinking budget are the
  real `Sequence`'s.
- a step admits waiting sequences in arrival order up to max_num_seqs ("auto": 8) and gives every
  running sequence one token, so rows finish out of order and shards complete out of order.
- RAAS_FAKE_SLEEP_S (float) sleeps that long per step, so a test can kill a job mid-run.
  RAAS_FAKE_FAIL_ON (text) makes a step raise RuntimeError when it admits a sequence whose prompt
  contains that text (an engine crash).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from typing import ClassVar

from raas_batch.generation_config import read_generation_defaults
from raas_batch.llm_engine import LLMEngine
from raas_batch.sampling_params import SamplingParams
from raas_batch.streaming import collect, generate_stream

EOS = 0


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def fake_seed_key(seed: int, sample_idx: int) -> int:
    return int(_hash(f"{seed}:{sample_idx}")[:8], 16)


class FakeTokenizer:
    chat_template = "<|role|> content lines"
    eos_token_id = EOS

    def __init__(self):
        self._words = {EOS: "<eos>"}

    def token(self, word: str) -> int:
        tid = int(_hash(word)[:6], 16) + 1
        self._words[tid] = word
        return tid

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self.token(w) for w in text.split()]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(self._words.get(i, f"t{i}") for i in ids if not (skip_special_tokens and i == EOS))

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kwargs) -> str:
        text = "\n".join(f"<|{m['role']}|> {m['content']}" for m in messages)
        return text + ("\n<|assistant|>" if add_generation_prompt else "")


class _Scheduler:
    def __init__(self, max_num_seqs: int):
        self.max_num_seqs = max_num_seqs
        self.waiting: deque = deque()
        self.running: list = []
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))

    def release(self, seq) -> None:
        self._free_slots.append(seq.slot)
        seq.slot = -1


class FakeEngine:
    """`Engine`'s interface (add / has_work / step / scheduler) with a toy model."""

    def __init__(self, tokenizer: FakeTokenizer, max_num_seqs: int, kv_budget: int | None):
        self.tokenizer, self.kv_budget = tokenizer, kv_budget
        self.scheduler = _Scheduler(max_num_seqs)
        self.num_steps = 0

    def add(self, seq) -> None:
        seq.start_tracking(self.tokenizer)
        self.scheduler.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def abort(self) -> None:
        s = self.scheduler
        for seq in list(s.running):
            s.release(seq)
        s.running.clear()
        s.waiting.clear()

    def _admit(self) -> None:
        s, fail_on = self.scheduler, os.environ.get("RAAS_FAKE_FAIL_ON")
        while s.waiting and s._free_slots:
            seq = s.waiting.popleft()
            seq.slot, seq.t_admitted = s._free_slots.pop(), time.perf_counter()
            seq.kv_over_budget = self.kv_budget is not None and len(seq.prompt_token_ids) > self.kv_budget
            s.running.append(seq)
            if fail_on and fail_on in self.tokenizer.decode(seq.prompt_token_ids):
                raise RuntimeError("fake engine crashed")

    def _token(self, seq) -> int:
        sampled = seq.params.temperature > 0
        h = _hash(f"{seq.prompt_token_ids}|{seq.seed_key if sampled else 0}")
        words = [f"w{h[k:k + 3]}" for k in range(0, 3 * (3 + int(h[:2], 16) % 6), 3)]
        plan = ["<think>", *words, "</think>", f"answer-{h[-4:]}"]
        k = len(seq.output_token_ids)
        if k < len(plan):
            return self.tokenizer.token(plan[k])
        return EOS if k == len(plan) else self.tokenizer.token(f"more-{k}")

    def step(self):
        self._admit()
        sleep_s = float(os.environ.get("RAAS_FAKE_SLEEP_S", "0"))
        if sleep_s:
            time.sleep(sleep_s)
        s = self.scheduler
        stepped = list(s.running)
        for seq in stepped:
            seq.append(self._token(seq), {EOS}, self.tokenizer)
        finished = [seq for seq in stepped if seq.finished]
        s.running = [seq for seq in stepped if not seq.finished]
        for seq in finished:
            seq.peak_kv_tokens = min(seq.num_tokens, self.kv_budget or 10**9)
            s.release(seq)
        self.num_steps += 1
        return finished, len(stepped)


class FakeLLM:
    """`LLM`'s job-facing surface (constructor keywords, generate, generate_stream, tokenizer)."""

    last_settings: ClassVar[dict] = {}  # the constructor's arguments of the last instance (tests read them)

    def __init__(self, model=None, kv_policy="dense", kv_budget=None, page_size=16, max_num_seqs="auto",
                 dtype=None, device=None, chat_template_kwargs=None, **settings):
        if kv_policy not in ("dense", "raas", "quest", "h2o", "streaming"):
            raise ValueError(f"unknown kv_policy {kv_policy!r}")
        FakeLLM.last_settings = {"max_num_seqs": max_num_seqs, **settings}
        self.model_name = model or "fake/tiny"
        self._model = model
        self.kv_policy, self.kv_budget, self.page_size = kv_policy, kv_budget, page_size
        self.max_num_seqs = 8 if max_num_seqs in (None, "auto") else int(max_num_seqs)
        self.tokenizer = FakeTokenizer()
        self.engine = FakeEngine(self.tokenizer, self.max_num_seqs, kv_budget)
        self.llm_engine = LLMEngine(self.engine, self.tokenizer, settings.get("max_model_len") or 128,
                                    chat_template_kwargs, read_generation_defaults(model), seed_key=fake_seed_key)

    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams().with_defaults(self.llm_engine.generation_defaults)

    def generate(self, prompts, params=None, use_tqdm=False, progress_callback=None):
        prompts = list(prompts)
        per = params if isinstance(params, list) else [params] * len(prompts)
        return collect(self.llm_engine, prompts, per, use_tqdm, progress_callback)

    def generate_stream(self, requests, progress_callback=None, max_waiting=None):
        return generate_stream(self.llm_engine, requests, progress_callback, max_waiting)

    def audit_decode(self, items):
        """The audit's engine work, faked: the policy's decode is this engine's, dense's a budget-free
        twin's (the toy model's text does not depend on the budget, so they agree); a position agrees
        when both outputs hold the same token there, and KL is 1 where they differ."""
        from raas_batch.audit_engine import AuditDecode, PathScore

        dense = FakeLLM(self._model, "dense", None, self.page_size, self.max_num_seqs)
        prompts, params = [i.prompt for i in items], [i.params for i in items]
        results = []
        for item, pol, den in zip(items, self.generate(prompts, params), dense.generate(prompts, params)):
            res = AuditDecode(item.key, pol, den)
            for a, b in zip(pol.outputs, den.outputs):
                for path, ids in ((res.policy_path, a.token_ids), (res.dense_path, b.token_ids)):
                    agree = sum(x == y for x, y in zip(a.token_ids, b.token_ids))
                    path.append(PathScore(len(ids), agree, float(len(ids) - agree)))
            results.append(res)
        return results


# ------------------------------------------------------------------------------------------------
# Test helpers shared by tests/test_runner_*.py (kept here: tests/ has no conftest of ours).
# ------------------------------------------------------------------------------------------------
INPUT_FORMATS = ("parquet", "parquet_dir", "arrow", "feather", "arrow_stream", "datasets", "jsonl", "hf")


def sample_rows(num: int, prefix: str = "q") -> list[dict]:
    """Rows with string ids and short, distinct prompts."""
    return [{"id": f"{prefix}{i:03d}", "prompt": f"question number {i} : what is {i} plus {i} ?",
             "answer": str(2 * i)} for i in range(num)]


def write_input(folder, fmt: str, rows: list[dict]) -> str:
    """Write `rows` in format `fmt` under `folder`; return the --input string."""
    import json as _json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyarrow import feather

    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    if fmt == "parquet":
        path = os.path.join(folder, "data.parquet")
        pq.write_table(table, path, row_group_size=3)  # several row groups
        return path
    if fmt == "parquet_dir":
        path = os.path.join(folder, "pq")
        os.makedirs(path, exist_ok=True)
        half = table.num_rows // 2
        pq.write_table(table.slice(0, half), os.path.join(path, "a.parquet"), row_group_size=2)
        pq.write_table(table.slice(half), os.path.join(path, "b.parquet"), row_group_size=4)
        return path
    if fmt == "arrow":
        path = os.path.join(folder, "data.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            for batch in table.to_batches(max_chunksize=3):
                w.write_batch(batch)
        return path
    if fmt == "feather":
        path = os.path.join(folder, "data.feather")
        feather.write_feather(table, path, chunksize=4)
        return path
    if fmt == "arrow_stream":
        path = os.path.join(folder, "stream.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table, max_chunksize=3)
        return path
    if fmt == "datasets":
        import datasets

        path = os.path.join(folder, "ds")
        datasets.Dataset.from_list(rows).save_to_disk(path)
        return path
    if fmt == "jsonl":
        path = os.path.join(folder, "data.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(_json.dumps(r) + "\n" for r in rows)
        return path
    if fmt == "hf":
        # datasets.load_dataset on a local folder of data files: the hf: path without a hub.
        path = os.path.join(folder, "hfdata")
        os.makedirs(path, exist_ok=True)
        pq.write_table(table, os.path.join(path, "train.parquet"))
        return f"hf:{path}:train"
    raise ValueError(fmt)
