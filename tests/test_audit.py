"""The fidelity audit (`--audit-rows`): which rows, answer extraction, a dense job audited against dense
(every token agrees, CPU fp32, real SmolLM2), a small-budget RaaS job (agreement below 1), the main output
unchanged by the audit, a kill during the audit then --resume, settings from YAML and bad settings, and
the Ray worker's side of it (in-process)."""

import json
import os
import signal

import pyarrow.parquet as pq
import pytest
from fake_llm import sample_rows, write_input
from test_runner_kill import _done_shards, _fingerprint_files, _kill_when, _load_json, _start

from raas_batch.audit import extract_answer, normalize, pick_rows, reference_answer
from raas_batch.config import resolve

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_pick_rows_spreads_evenly():
    assert pick_rows(10, 3) == [1, 5, 8]
    assert pick_rows(100, 4) == [12, 37, 62, 87]
    assert pick_rows(3, 10) == [0, 1, 2]  # more asked than there are rows: every row
    assert pick_rows(7, 7) == list(range(7))


def test_answers_are_extracted_and_compared():
    assert extract_answer("so x = 3, then \\boxed{\\frac{1}{2}} and later 7") == "\\frac{1}{2}"
    assert extract_answer("they have 1,234 apples. Then 12 left, total 1,250.") == "1,250"
    assert extract_answer("no number here") is None
    assert extract_answer("Answer: 12 ... Answer: 15 units", r"Answer: (\d+)") == "15"
    assert extract_answer("final: yes", r"final: \w+") == "final: yes"  # no group: the whole match
    assert normalize("1,250") == normalize("1250.0") == normalize(" $1250. ") == "1250"
    assert normalize("2.50") == normalize("2.5") and normalize("2.5") != normalize("25")
    assert reference_answer("She has 3 + 4 = 7 apples.\n#### 7") == "7"
    assert reference_answer("-12") == "-12"
    assert reference_answer("so the answer is \\boxed{42}.") == "42"


def _real_cfg(tmp_path, out, **kw):
    with open(os.path.join(ROOT, "examples", "gsm8k_mini.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:3]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": r["id"], "question": r["question"], "answer": r["answer"]}) + "\n"
                           for r in rows))
    values = {"input": str(src), "output": str(tmp_path / out), "prompt_column": "question", "shard_size": 2,
              "quiet": True, **kw}
    return resolve(values)


def test_dense_job_audited_against_dense_agrees_on_every_token(tmp_path, smollm):
    """CPU fp32, sampled (temperature 0.8, per-row seeds, 2 samples a row): the job runs without the audit,
    then a --resume asks for it. The dense re-decode is the job's own output token for token, the
    teacher-forced distributions are the same (KL 0), and the shard files are not touched."""
    from raas_batch.runner import run_job

    settings = {"max_new_tokens": 6, "temperature": 0.8, "top_p": 0.95, "seed": 3, "n": 2, "ignore_eos": True}
    out = tmp_path / "job"
    plain = run_job(_real_cfg(tmp_path, "job", **settings), engine=smollm)
    assert plain["complete"] and "audit" not in plain and not os.path.exists(out / "audit.parquet")
    done = _done_shards(out)
    before = _fingerprint_files(out, done)
    summary = run_job(_real_cfg(tmp_path, "job", audit_rows=2, reference_column="answer", resume=True, **settings),
                      engine=smollm)
    assert summary["complete"] and _fingerprint_files(out, _done_shards(out)) == before
    audit = summary["audit"]
    assert audit["rows"] == 2 and audit["samples"] == 4 and audit["errors"] == 0
    assert audit["top1_agreement"] == 1.0 and audit["dense_path_top1_agreement"] == 1.0
    assert audit["mean_kl"] < 1e-6 and audit["dense_path_mean_kl"] < 1e-6
    assert audit["identical"] == 1.0 and audit["answer_match"] in (1.0, None) and audit["length_ratio"] == 1.0
    assert audit["policy_reproduced"] == 1.0 and "policy_accuracy" in audit and "dense_accuracy" in audit
    table = pq.read_table(out / "audit.parquet").to_pylist()
    assert [(r["row_idx"], r["sample_idx"]) for r in table] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    for r in table:
        assert r["policy_completion"] == r["dense_completion"] and r["first_divergence"] is None
        assert r["policy_tokens"] == r["dense_tokens"] == 6 and r["top1_agreement"] == 1.0
    # the two samples of a row differ: they were sampled with their own draws, not greedily
    assert table[0]["policy_completion"] != table[1]["policy_completion"]
    m = _load_json(out, "manifest.json")
    assert m["audit"]["state"] == "done" and m["audit"]["rows"] == [0, 2]


def test_small_budget_raas_audit_shows_disagreement(tmp_path, tiny_model_dir):
    """RaaS with 2-page budget on 64 greedy tokens of short prompts evicts decode pages (tiny random
    Llama, so that it runs in seconds): its distributions move away from dense's, and the audit says so;
    the audit's RaaS decode is still the job's own output."""
    from raas_batch import LLM
    from raas_batch.runner import run_job

    path = tiny_model_dir("llama")
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"count {i} {i + 1}"}) + "\n" for i in range(4)))
    cfg = resolve({"input": str(src), "output": str(tmp_path / "raas"), "model": path, "audit_rows": 2,
                   "max_new_tokens": 64, "temperature": 0, "ignore_eos": True, "kv_policy": "raas", "kv_budget": 32,
                   "apply_chat_template": False, "dtype": "fp32", "device": "cpu", "quiet": True})
    llm = LLM(model=path, kv_policy="raas", kv_budget=32, max_num_seqs=4, device="cpu", dtype="fp32")
    audit = run_job(cfg, engine=llm)["audit"]
    assert audit["samples"] == 2 and audit["kv_policy"] == "raas" and audit["kv_budget"] == 32
    assert audit["top1_agreement"] < 1.0 and audit["mean_kl"] > 0.0 and audit["dense_path_mean_kl"] > 0.0
    table = pq.read_table(tmp_path / "raas" / "audit.parquet").to_pylist()
    assert all(r["mean_kl"] > 0 for r in table)
    assert all(r["policy_reproduced"] for r in table)


@pytest.fixture
def cli(monkeypatch, capsys):
    """`python -m raas_batch` in-process on the fake engine -> (exit status, stderr)."""
    from raas_batch.cli import main

    monkeypatch.setenv("RAAS_BATCH_ENGINE", "fake_llm:FakeLLM")
    monkeypatch.delenv("RAAS_FAKE_SLEEP_S", raising=False)
    monkeypatch.delenv("RAAS_FAKE_FAIL_ON", raising=False)

    def run(args):
        capsys.readouterr()
        rc = main([str(a) for a in args])
        return rc, capsys.readouterr().err

    return run


def test_kill_during_the_audit_then_resume_loses_nothing(tmp_path, cli):
    rows = sample_rows(12)
    src = write_input(tmp_path / "in", "jsonl", rows)
    out = str(tmp_path / "out")
    args = ["--input", src, "--output", out, "--shard-size", 3, "--seed", 7, "--max-new-tokens", 6,
            "--audit-rows", 4]

    def audit_state():
        try:
            return (_load_json(out, "manifest.json").get("audit") or {}).get("state")
        except (OSError, ValueError):
            return None

    proc = _start(args, sleep_s=0.05)
    _kill_when(proc, lambda: audit_state() == "running")
    assert proc.returncode == -signal.SIGKILL
    assert audit_state() == "running" and not os.path.exists(os.path.join(out, "audit.parquet"))
    done = _done_shards(out)
    assert sorted(done) == [0, 1, 2, 3]  # the audit starts only once every shard is done
    before = _fingerprint_files(out, done)

    rc, err = cli([*args, "--resume"])
    assert rc == 0, err
    assert _fingerprint_files(out, _done_shards(out)) == before  # no shard rewritten
    m = _load_json(out, "manifest.json")
    assert m["audit"]["state"] == "done" and m["audit"]["attempts"] == 2
    table = pq.read_table(os.path.join(out, "audit.parquet")).to_pylist()
    assert [r["row_idx"] for r in table] == pick_rows(12, 4) == [1, 4, 7, 10]
    assert [r["id"] for r in table] == [rows[i]["id"] for i in (1, 4, 7, 10)]
    assert all(r["policy_reproduced"] and r["identical"] for r in table)
    summary = _load_json(out, "summary.json")
    assert summary["complete"] and summary["audit"]["rows"] == 4 and summary["audit"]["top1_agreement"] == 1.0

    # Done: a further --resume neither redoes the audit nor touches its file.
    st = os.stat(os.path.join(out, "audit.parquet"))
    rc, err = cli([*args, "--resume"])
    assert rc == 0, err
    assert os.stat(os.path.join(out, "audit.parquet")).st_mtime_ns == st.st_mtime_ns
    assert _load_json(out, "summary.json")["audit"] == summary["audit"]
    # Other audit settings on --resume: the shards stay done, the audit is redone with them.
    rc, err = cli([*args[:-1], 2, "--resume"])
    assert rc == 0, err
    assert [r["row_idx"] for r in pq.read_table(os.path.join(out, "audit.parquet")).to_pylist()] == [3, 9]
    assert _fingerprint_files(out, _done_shards(out)) == before


def test_audit_settings_from_yaml_and_bad_settings(tmp_path, cli):
    src = write_input(tmp_path / "in", "jsonl", sample_rows(6))
    conf = tmp_path / "job.yaml"
    conf.write_text(f"input: {src}\noutput: {tmp_path / 'out'}\nmax-new-tokens: 12\naudit-rows: 3\n"
                    "answer-pattern: 'answer-(\\w+)'\nreference-column: answer\n")
    rc, err = cli(["--config", conf])
    assert rc == 0, err
    audit = _load_json(tmp_path / "out", "summary.json")["audit"]
    assert audit["rows"] == 3 and audit["reference_column"] == "answer"
    assert audit["answer_match"] == 1.0 and audit["policy_accuracy"] == audit["dense_accuracy"] == 0.0
    table = pq.read_table(tmp_path / "out" / "audit.parquet").to_pylist()
    assert all(len(r["policy_answer"]) == 4 and r["reference"] == str(2 * r["row_idx"]) for r in table)
    assert "audit-rows: 3" in (tmp_path / "out" / "config.yaml").read_text()

    base = ["--input", src, "--max-new-tokens", 4]
    for k, (extra, words) in enumerate(((["--audit-rows", 2, "--answer-pattern", "(unclosed"], "--answer-pattern"),
                         (["--audit-rows", 2, "--reference-column", "gold"], "no column 'gold'"),
                         (["--reference-column", "answer"], "--audit-rows N"),
                         (["--audit-rows", -1], "--audit-rows must be a non-negative integer"))):
        rc, err = cli([*base, "--output", tmp_path / f"bad{k}", *extra])
        assert rc == 2 and words in err, (extra, err)


def test_ray_worker_runs_the_audit_decodes(tmp_path, monkeypatch):
    """GenerationWorker.audit (what the Ray driver calls once every shard is done), in-process."""
    from raas_batch.audit import row_specs
    from raas_batch.distributed.actor import GenerationWorker
    from raas_batch.job import begin_run, prepare_job

    monkeypatch.setenv("RAAS_BATCH_ENGINE", "fake_llm:FakeLLM")
    src = write_input(tmp_path / "in", "jsonl", sample_rows(8))
    cfg = resolve({"input": src, "output": str(tmp_path / "out"), "shard_size": 4, "max_new_tokens": 6, "seed": 2,
                   "audit_rows": 3, "quiet": True})
    job = prepare_job(cfg)
    begin_run(job, lambda m: None)
    worker = GenerationWorker(cfg)
    reply = worker.audit(row_specs(job))
    assert reply["ok"], reply
    got = [(row.row_idx, dec.policy.outputs[0].text == dec.dense.outputs[0].text) for row, dec in reply["result"]]
    assert got == [(1, True), (4, True), (6, True)]
    # An engine without audit_decode: the worker answers with the reason, it does not crash.
    monkeypatch.setenv("RAAS_BATCH_ENGINE", "test_audit:NoAuditLLM")
    reply = GenerationWorker(cfg).audit(row_specs(job))
    assert not reply["ok"] and "cannot run the audit" in reply["error"]


class NoAuditLLM:
    """An engine with the job-facing surface but no audit_decode (built by GenerationWorker above)."""

    def __init__(self, **kwargs):
        from fake_llm import FakeLLM

        self._inner = FakeLLM(**kwargs)
        self.tokenizer, self.model_name = self._inner.tokenizer, self._inner.model_name

    def generate_stream(self, *args, **kwargs):
        return self._inner.generate_stream(*args, **kwargs)


@pytest.mark.parametrize("value", ["3", 3.0])
def test_audit_rows_given_as_text_or_float(value, tmp_path):
    cfg = resolve({"input": "x.jsonl", "output": str(tmp_path), "audit_rows": value})
    assert cfg.audit_rows == 3
