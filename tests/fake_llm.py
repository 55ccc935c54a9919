"""A fake `LLM` with the real one's constructor and `generate` contract, for fast runner tests.

Select it in a subprocess with RAAS_BATCH_ENGINE=fake_llm:FakeLLM (and tests/ on PYTHONPATH).
Behaviour, all deterministic:
- "tokens" are whitespace-separated words; the context is `max_model_len` (128) words; a longer prompt,
  an empty one or malformed messages give finish_reason="error" with a reason, as the real engine does.
- the completion is `<think>w1 ... wk</think> answer-<hash>` where the words depend on the prompt,
  the sample index and the seed only (not on the batch), cut to max_new_tokens words ("length"),
  otherwise "stop".
- RAAS_FAKE_SLEEP_S (float) sleeps that long per prompt, calling progress_callback in between, so a
  test can kill a job mid-shard. RAAS_FAKE_FAIL_ON (text) raises RuntimeError for a batch holding a
  prompt containing that text (an engine crash).
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from typing import ClassVar

from raas_batch.outputs import CompletionOutput, RequestOutput
from raas_batch.sampling_params import SamplingParams


class FakeLLM:
    max_model_len = 128

    last_settings: ClassVar[dict] = {}  # the constructor's arguments of the last instance (tests read them)

    def __init__(self, model=None, kv_policy="dense", kv_budget=None, page_size=16, max_num_seqs="auto",
                 dtype=None, device=None, chat_template_kwargs=None, **settings):
        if kv_policy not in ("dense", "raas", "quest", "h2o", "streaming"):
            raise ValueError(f"unknown kv_policy {kv_policy!r}")
        FakeLLM.last_settings = {"max_num_seqs": max_num_seqs, **settings}
        self.model_name = model or "fake/tiny"
        self.kv_policy, self.kv_budget, self.page_size = kv_policy, kv_budget, page_size
        self.calls: list[int] = []  # batch sizes seen by generate

    def _prepare(self, prompt):
        if isinstance(prompt, dict):
            ids = list(prompt.get("prompt_token_ids", []))
            return " ".join(f"t{i}" for i in ids), ids, None if ids else "the prompt has no tokens"
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, list):
            if not prompt or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt):
                return None, [], "malformed chat messages"
            text = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
        else:
            return None, [], f"bad prompt type {type(prompt).__name__}"
        words = text.split()
        ids = [int(hashlib.md5(w.encode()).hexdigest()[:6], 16) for w in words]
        if not ids:
            return text, ids, "the prompt is empty"
        if len(ids) >= self.max_model_len:
            return text, ids, (f"the prompt has {len(ids)} tokens but the model's context is "
                               f"{self.max_model_len}; shorten it")
        return text, ids, None

    def generate(self, prompts, params=None, use_tqdm=False, progress_callback=None):
        prompts = list(prompts)
        params = params or SamplingParams()
        per = params if isinstance(params, list) else [params] * len(prompts)
        assert len(per) == len(prompts)
        FakeLLM.last_params = per
        fail_on = os.environ.get("RAAS_FAKE_FAIL_ON")
        if fail_on and any(fail_on in str(p) for p in prompts):
            raise RuntimeError("fake engine crashed")
        sleep_s = float(os.environ.get("RAAS_FAKE_SLEEP_S", "0"))
        self.calls.append(len(prompts))
        results = []
        for i, (prompt, p) in enumerate(zip(prompts, per)):
            text, ids, error = self._prepare(prompt)
            seed = p.seed if p.seed is not None else random.getrandbits(63)
            outs = []
            for j in range(p.n):
                out = CompletionOutput(index=j, seed=seed)
                if error:
                    out.finish_reason, out.error = "error", error
                else:
                    self._fill(out, text, j, seed, p)
                outs.append(out)
            results.append(RequestOutput(index=i, prompt=text, prompt_token_ids=ids, outputs=outs))
            if sleep_s:
                time.sleep(sleep_s)
            if progress_callback is not None:
                progress_callback(sum(o.num_tokens for o in outs), 1)
        return results

    def _fill(self, out, text, j, seed, p):
        h = hashlib.sha256(f"{text}|{j}|{seed if p.temperature > 0 else 0}".encode()).hexdigest()
        num_think = 3 + int(h[:2], 16) % 6
        words = [f"w{h[k:k + 3]}" for k in range(0, 3 * num_think, 3)]
        answer = f"answer-{h[-4:]}"
        tokens = ["<think>", *words, "</think>", answer]
        cut = tokens[:p.max_new_tokens]
        out.token_ids = list(range(len(cut)))
        out.text = " ".join(cut)
        out.finish_reason = "length" if len(tokens) > p.max_new_tokens else "stop"
        inner = cut[1:-2] if out.finish_reason == "stop" else cut[1:]
        out.reasoning = " ".join(w for w in inner if w != "</think>")
        out.answer = answer if out.finish_reason == "stop" else ""
        out.num_reasoning_tokens = min(len(cut), num_think + 2)
        out.peak_kv_tokens = min(len(text.split()) + len(cut), self.kv_budget or 10**9)
        out.evicted_pages = 0
        out.ttft_s, out.e2e_s = 0.001, 0.002


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
