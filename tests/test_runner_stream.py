"""Streaming jobs on the real engine (embedded SmolLM2, CPU): shard boundaries do not drain the batch,
and text prompts go through the chat template by default (through the CLI, in-process)."""

import os

import pyarrow.parquet as pq
import pytest
from fake_llm import sample_rows, write_input
from shared_engine import SharedLLM

from raas_batch.cli import main


@pytest.fixture()
def shared(smollm, monkeypatch):
    """Jobs of this module run on the session's SmolLM2 (8 sequences at a time, one torch thread)."""
    import torch

    monkeypatch.setenv("RAAS_BATCH_ENGINE", "shared_engine:SharedLLM")
    monkeypatch.setattr(SharedLLM, "instance", smollm)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield smollm
    torch.set_num_threads(threads)


def _rows(out):
    return pq.read_table(os.path.join(out, "shards")).to_pylist()


def test_later_shards_are_admitted_before_earlier_shards_finish(tmp_path, shared, capsys, monkeypatch):
    """One-row shards: every row's sequence joins the batch before the first shard's row is done (a
    runner that waited for each shard would admit shard i+1 only after shard i's row finished)."""
    core, engine = shared.llm_engine, shared.engine
    keys, seqs = [], []
    add_request, add = core._add, engine.add  # every request's way in (add_request and add_requests)

    def recording_add_request(key, *args, **kwargs):
        keys.append(key)
        return add_request(key, *args, **kwargs)

    def recording_add(seq):
        seqs.append((keys[-1], seq))
        return add(seq)

    monkeypatch.setattr(core, "_add", recording_add_request)
    monkeypatch.setattr(engine, "add", recording_add)
    src = write_input(tmp_path / "in", "jsonl", sample_rows(8))
    rc = main(["--input", src, "--output", str(tmp_path / "out"), "--shard-size", "1", "--max-new-tokens", "8",
               "--temperature", "0", "--ignore-eos", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    by_shard = {key[0]: seq for key, seq in seqs}
    assert sorted(by_shard) == list(range(8))
    first_done = by_shard[0].t_finish
    later_admitted = [i for i in range(1, 8) if by_shard[i].t_admitted < first_done]
    assert later_admitted == list(range(1, 8)), "later shards waited for shard 0 to finish"
    assert all(r["num_completion_tokens"] == 8 and 0 <= r["ttft_s"] <= r["e2e_s"] for r in _rows(tmp_path / "out"))


def test_text_prompts_go_through_the_chat_template_by_default(tmp_path, shared, capsys):
    tok = shared.tokenizer
    rows = [{"id": "a", "question": "What is 2 + 3?", "answer": "5"}]
    src = write_input(tmp_path / "in", "jsonl", rows)
    base = ["--input", src, "--prompt-column", "question", "--max-new-tokens", "2", "--temperature", "0", "--quiet"]

    def prompt_tokens(*extra):
        out = tmp_path / f"out{len(os.listdir(tmp_path))}"
        assert main([str(a) for a in [*base, "--output", out, *extra]]) == 0, capsys.readouterr().err
        (row,) = _rows(out)
        assert row["prompt"] == rows[0]["question"] and row["input_answer"] == "5" and row["question"] == rows[0]["question"]
        return row["num_prompt_tokens"]

    user = [{"role": "user", "content": rows[0]["question"]}]
    system = [{"role": "system", "content": "Answer with one number."}] + user

    def templated(messages):
        return len(tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False))

    assert prompt_tokens() == templated(user)
    assert prompt_tokens("--system-prompt", "Answer with one number.") == templated(system)
    assert prompt_tokens("--no-apply-chat-template") == len(tok.encode(rows[0]["question"]))
    assert templated(user) != templated(system) != len(tok.encode(rows[0]["question"]))
