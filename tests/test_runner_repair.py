"""Damage after the fact, on the fake engine (in-process CLI): a resume verifies and repairs, a garbled
manifest is rebuilt, --verify names each kind of damage, failures print under --quiet, and a GPU
out-of-memory error fails fast with the knobs named (simulated: the fake engine raises torch's error)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from fake_llm import FakeLLM, sample_rows, write_input
from test_runner_job import read_out, run, snapshot

from raas_batch.cli import main
from raas_batch.data.manifest import Manifest

ROWS = sample_rows(8)


@pytest.fixture(autouse=True)
def _fake_engine(monkeypatch):
    monkeypatch.setenv("RAAS_BATCH_ENGINE", "fake_llm:FakeLLM")
    monkeypatch.delenv("RAAS_FAKE_SLEEP_S", raising=False)
    monkeypatch.delenv("RAAS_FAKE_FAIL_ON", raising=False)


def _job(tmp_path, capsys, *extra):
    """A finished 4-shard job (2 rows a shard, n=2, seeded) and its command line."""
    src = write_input(tmp_path / "in", "jsonl", ROWS)
    out = tmp_path / "out"
    base = ["--input", src, "--output", out, "--shard-size", 2, "--n", 2, "--seed", 3, "--temperature", 0.7, *extra]
    rc, err = run(capsys, *base)
    assert rc == 0, err
    return out, base


def _rows(out):
    """Every output sample, ordered, without timings: equal for two runs of the same seeded job."""
    got = read_out(out)[1]
    for r in got:
        r.pop("ttft_s"), r.pop("e2e_s")
    return sorted(got, key=lambda r: (r["row_idx"], r["sample_idx"]))


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def _flip_byte(path, offset=40):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_truncated_and_deleted_done_shards_are_regenerated_sound_ones_untouched(tmp_path, capsys):
    out, base = _job(tmp_path, capsys)
    reference = _rows(out)
    shards = out / "shards"
    before = snapshot(out)
    p1 = shards / "part-00001.parquet"
    p1.write_bytes(p1.read_bytes()[:100])  # a bad copy: the first 100 bytes
    os.unlink(shards / "part-00002.parquet")
    rc, err = run(capsys, *base, "--resume", "--quiet")  # repairs are printed even with --quiet
    assert rc == 0, err
    assert "shard 1: part-00001.parquet has 100 bytes, the manifest recorded" in err
    assert "shard 2: part-00002.parquet is missing; it will be regenerated" in err
    after = snapshot(out)
    for name in ("part-00000.parquet", "part-00003.parquet"):
        assert after[name] == before[name]  # same inode, mtime and size: never rewritten
    assert _rows(out) == reference  # the regenerated shards hold the same samples
    summary = _summary(out)
    assert summary["complete"] and summary["samples"] == 16 and summary["this_run"]["shards_repaired"] == 2
    assert [(r["index"], r["rows"], r["regenerated"]) for r in summary["repaired_shards"]] == [
        (1, [2, 4], True), (2, [4, 6], True)]
    assert "has 100 bytes" in summary["repaired_shards"][0]["problem"]
    m = Manifest.load(str(out / "manifest.json"))
    assert [(s.state, s.attempts) for s in m.shards] == [("done", 1), ("done", 2), ("done", 2), ("done", 1)]
    assert all(s.size == os.path.getsize(out / s.file) for s in m.shards)


def test_a_footer_that_lies_fails_the_cheap_check(tmp_path, capsys):
    """Same size, sound Parquet, but another shard's file copied over: the footer's metadata names it."""
    out, base = _job(tmp_path, capsys)
    reference = _rows(out)
    shards = out / "shards"
    m = Manifest.load(str(out / "manifest.json"))
    m.shards[1].size = None  # as in a manifest written before sizes were kept: the footer alone decides
    m.save(str(out / "manifest.json"))
    shutil.copy(shards / "part-00000.parquet", shards / "part-00001.parquet")
    rc, err = run(capsys, *base, "--resume")
    assert rc == 0, err
    assert "shard 1: part-00001.parquet is damaged: its metadata names another shard" in err
    assert _rows(out) == reference


def verify(capsys, out):
    """`python -m raas_batch --verify --output OUT` -> (exit status, report on stdout)."""
    rc = main(["--verify", "--output", str(out)])
    return rc, capsys.readouterr().out


def test_bytes_changed_in_place_are_found_by_verify_and_repaired_by_resume_verify(tmp_path, capsys):
    out, base = _job(tmp_path, capsys)
    reference = _rows(out)
    p2 = out / "shards" / "part-00002.parquet"
    _flip_byte(p2)  # inside the data: size and footer unchanged
    # The cheap check of a plain resume does not read the data (documented): the file is kept.
    rc, err = run(capsys, *base, "--resume")
    assert rc == 0 and "regenerated" not in err
    rc, report = verify(capsys, out)
    assert rc == 1 and "shard 2 (rows 4-5): shards/part-00002.parquet has another sha256" in report
    assert report.rstrip().endswith("--resume --verify")  # the repair that finds it is named
    rc, err = run(capsys, *base, "--resume", "--verify")
    assert rc == 0, err
    assert "shard 2: part-00002.parquet has another sha256 than the manifest recorded" in err
    assert _rows(out) == reference
    rc, report = verify(capsys, out)
    assert rc == 0 and "OK:" in report and "16 samples" in report


def test_garbled_manifest_is_rebuilt_keeping_every_sound_shard(tmp_path, capsys):
    out, base = _job(tmp_path, capsys)
    reference = _rows(out)
    mpath = out / "manifest.json"
    garbled = mpath.read_bytes()[:300]  # a partial write
    mpath.write_bytes(garbled)
    os.unlink(out / "manifest.prev.json")  # no previous copy either: rebuilt from the shard files
    p3 = out / "shards" / "part-00003.parquet"
    p3.write_bytes(p3.read_bytes()[:-20])  # and one shard lost its footer
    before = snapshot(out)
    rc, err = run(capsys, *base, "--resume")
    assert rc == 0, err
    assert "manifest.json cannot be trusted (JSONDecodeError" in err and "kept as manifest.damaged.json" in err
    assert "rebuilt from config.yaml and the shard files" in err
    assert err.count(": adopted part-") == 3 and "removed incomplete or foreign part-00003.parquet" in err
    after = snapshot(out)
    assert all(after[f"part-0000{i}.parquet"] == before[f"part-0000{i}.parquet"] for i in range(3))
    assert _rows(out) == reference
    assert (out / "manifest.damaged.json").read_bytes() == garbled  # kept for inspection
    m = Manifest.load(str(mpath))
    assert [s.state for s in m.shards] == ["done"] * 4 and m.shards[0].stats["adopted"] is True
    assert _summary(out)["complete"] and verify(capsys, out)[0] == 0


def test_garbled_manifest_falls_back_to_the_previous_copy(tmp_path, capsys):
    out, base = _job(tmp_path, capsys)
    prev = Manifest.load(str(out / "manifest.prev.json"))
    assert [s.state for s in prev.shards] == ["done"] * 4  # the save before the last one
    (out / "manifest.json").write_text('{"version": 2, "shards": [')
    before = snapshot(out)
    rc, err = run(capsys, *base, "--resume")
    assert rc == 0, err
    assert "continuing from manifest.prev.json" in err and ": adopted part-" not in err
    assert snapshot(out) == before
    assert Manifest.load(str(out / "manifest.json")).problems(2) == []


def test_inconsistent_manifest_is_not_trusted(tmp_path, capsys):
    """Valid JSON that does not describe the job: a shard missing from the plan, a done shard without sha256."""
    out, base = _job(tmp_path, capsys)
    for path in (out / "manifest.json", out / "manifest.prev.json"):
        data = json.loads(path.read_text())
        del data["shards"][2]
        data["shards"][0]["sha256"] = None
        path.write_text(json.dumps(data))
    m = Manifest.load(str(out / "manifest.json"))
    assert m.problems(2) == ["its 3 shards do not tile rows [0, 8) in shards of 2",
                             "shard 0 is done but its file, sha256 or row count is not recorded right"]
    before = snapshot(out)
    rc, err = run(capsys, *base, "--resume")
    assert rc == 0, err
    assert "do not tile rows" in err and err.count(": adopted part-") == 4
    assert snapshot(out) == before


def test_rebuild_reads_config_yaml_as_the_same_job(tmp_path, capsys):
    """Every kind of setting (lists, JSON objects, generation defaults) compares equal to config.yaml's."""
    out, base = _job(tmp_path, capsys, "--stop", "zzz", "--stop", "yyy", "--stop-token-ids", "5,6",
                     "--kv-policy-options", '{"pin_prompt": false}', "--chat-template-kwargs", '{"a": 1}',
                     "--top-k", 5, "--max-new-tokens", 9, "--thinking-budget", 4, "--limit", 7)
    before = snapshot(out)
    for args in (base, ["--config", out / "config.yaml"]):
        (out / "manifest.json").write_text("[]")
        os.unlink(out / "manifest.prev.json")
        rc, err = run(capsys, *args, "--resume")
        assert rc == 0 and "rebuilt" in err and err.count(": adopted part-") == 4, err
        assert snapshot(out) == before


def test_rebuild_never_deletes_another_jobs_files(tmp_path, capsys):
    out, base = _job(tmp_path, capsys)
    (out / "manifest.json").write_text("{")
    os.unlink(out / "manifest.prev.json")
    before = snapshot(out)
    rc, err = run(capsys, *[a if a != 0.7 else 0.9 for a in base], "--resume")  # other settings
    assert rc == 2 and "config.yaml records another job (--temperature was 0.7, now 0.9)" in err
    os.unlink(out / "config.yaml")  # without config.yaml the shard files' fingerprints still refuse
    rc, err = run(capsys, *[a if a != 0.7 else 0.9 for a in base], "--resume")
    assert rc == 2 and "4 shard file(s) there (part-00000.parquet" in err and "belong to another job" in err
    assert snapshot(out) == before and (out / "manifest.json").read_text() == "{"
    rc, err = run(capsys, *base, "--resume")  # the right settings: every file adopted
    assert rc == 0 and err.count(": adopted part-") == 4 and snapshot(out) == before


@pytest.mark.parametrize("damage", ["none", "truncated", "deleted", "bit-flip", "swapped", "stray", "garbled-manifest",
                                    "not-done", "temp-file"])
def test_verify_names_each_kind_of_damage(tmp_path, capsys, damage):
    out, _ = _job(tmp_path, capsys)
    shards = out / "shards"
    expect = {
        "none": "OK:",
        "truncated": "shard 1 (rows 2-3): shards/part-00001.parquet has 100 bytes, the manifest recorded",
        "deleted": "shard 2 (rows 4-5): shards/part-00002.parquet is missing",
        "bit-flip": "shard 0 (rows 0-1): shards/part-00000.parquet has another sha256",
        "swapped": "shard 3 (rows 6-7): shards/part-00003.parquet",
        "stray": "shards/part-00009.parquet is not recorded done",
        "garbled-manifest": "manifest.json cannot be trusted (JSONDecodeError",
        "not-done": "shard 1 (rows 2-3): failed, its 4 samples are missing, last error: boom",
        "temp-file": "note: shards/.part-00001.parquet.tmp-77 is a temporary file of a killed write",
    }[damage]
    if damage == "truncated":
        (shards / "part-00001.parquet").write_bytes((shards / "part-00001.parquet").read_bytes()[:100])
    elif damage == "deleted":
        os.unlink(shards / "part-00002.parquet")
    elif damage == "bit-flip":
        _flip_byte(shards / "part-00000.parquet")
    elif damage == "swapped":
        shutil.copy(shards / "part-00002.parquet", shards / "part-00003.parquet")
    elif damage == "stray":
        shutil.copy(shards / "part-00002.parquet", shards / "part-00009.parquet")
    elif damage == "garbled-manifest":
        (out / "manifest.json").write_text((out / "manifest.json").read_text()[:200])
    elif damage == "not-done":
        m = Manifest.load(str(out / "manifest.json"))
        m.reopen(1, "x")
        m.start(1)
        m.fail(1, "boom")
        m.save(str(out / "manifest.json"))
        os.unlink(shards / "part-00001.parquet")
    elif damage == "temp-file":
        (shards / ".part-00001.parquet.tmp-77").write_bytes(b"half")
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc, report = verify(capsys, out)
    assert expect in report, report
    assert rc == (0 if damage in ("none", "temp-file") else 1), report
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files  # --verify writes nothing
    if rc:  # the command it names repairs the folder
        assert "NOT OK" in report
        fix = report.strip().splitlines()[-1].split(": python -m raas_batch ")[1].split()
        assert fix[:3] == ["--config", str(out / "config.yaml"), "--resume"]
        rc, err = run(capsys, *fix)
        assert rc == 0, err
        rc, report = verify(capsys, out)
        assert rc == 0, report


def test_verify_loads_no_engine(tmp_path, capsys):
    """--verify needs neither the input nor torch: it runs where only the output folder is."""
    out, _ = _job(tmp_path, capsys)
    shutil.rmtree(tmp_path / "in")  # the input is gone
    code = ("import sys; from raas_batch.cli import main; rc = main(['--verify', '--output', sys.argv[1]]); "
            "print(rc, 'torch' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code, str(out)], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": root}, timeout=120, check=False)
    assert res.stdout.strip().splitlines()[-1] == "0 False", res.stdout + res.stderr


def test_verify_refuses_a_folder_without_a_job(tmp_path, capsys):
    rc = main(["--verify", "--output", str(tmp_path)])
    assert rc == 2 and "holds no raas_batch job" in capsys.readouterr().err
    rc = main(["--verify"])
    assert rc == 2 and "pass --output DIR" in capsys.readouterr().err


# --- failures under --quiet; the GPU running out of memory --------------------------------------------------
def test_a_failure_prints_under_quiet(tmp_path, capsys, monkeypatch):
    src = write_input(tmp_path / "in", "jsonl", ROWS)
    monkeypatch.setenv("RAAS_FAKE_FAIL_ON", ROWS[5]["prompt"])
    rc, err = run(capsys, "--input", src, "--output", tmp_path / "out", "--shard-size", 2, "--quiet")
    assert rc == 1
    assert "fake engine crashed" in err and "shard(s) not done: rerun with --resume" in err
    assert "tok/s" in err.splitlines()[-1] and "rows (" not in err  # the final line, no progress lines


class OomLLM(FakeLLM):
    """The fake engine, whose 3rd step raises torch's out-of-memory error (as a CUDA allocation would)."""

    steps = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        step = self.engine.step

        def failing_step():
            OomLLM.steps += 1
            if OomLLM.steps == 3:
                import torch

                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return step()

        self.engine.step = failing_step


def test_out_of_memory_fails_fast_naming_the_knobs(tmp_path, capsys, monkeypatch):
    import torch

    assert torch.cuda.OutOfMemoryError is torch.OutOfMemoryError  # one class: both spellings are caught
    monkeypatch.setenv("RAAS_BATCH_ENGINE", "test_runner_repair:OomLLM")
    OomLLM.steps = 0
    src = write_input(tmp_path / "in", "jsonl", ROWS)
    out = tmp_path / "out"
    base = ["--input", src, "--output", out, "--shard-size", 2, "--max-num-seqs", 2, "--seed", 1]
    rc, err = run(capsys, *base, "--quiet")
    assert rc == 1
    assert "the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB): lower --max-num-seqs " \
           "(now 2) or --gpu-memory-utilization (now 0.9" in err
    assert OomLLM.steps == 3  # the run stopped at the error: no step after it
    m = Manifest.load(str(out / "manifest.json"))
    states = [(s.state, s.attempts) for s in m.shards]
    assert states[0] == ("failed", 1) and all(s == ("pending", 0) for s in states[2:]), states
    assert "--max-num-seqs" in m.shards[0].error and "--gpu-memory-utilization" in m.shards[0].error
    monkeypatch.setenv("RAAS_BATCH_ENGINE", "fake_llm:FakeLLM")
    rc, err = run(capsys, *base, "--resume")
    assert rc == 0, err
    assert len(read_out(out)[1]) == 8


def test_out_of_memory_is_recognised_by_class_and_by_cuda_text():
    import torch

    from raas_batch.config import JobConfig
    from raas_batch.engine_factory import out_of_memory_advice

    cfg = JobConfig(max_num_seqs=64, gpu_memory_utilization=0.8)
    advice = out_of_memory_advice(torch.cuda.OutOfMemoryError("Tried to allocate 1 GiB\nmore"), cfg)
    assert advice.startswith("the GPU ran out of memory (Tried to allocate 1 GiB): lower --max-num-seqs (now 64) or "
                             "--gpu-memory-utilization (now 0.8")
    assert "(now 12)" in out_of_memory_advice(RuntimeError("CUDA error: out of memory"), cfg, max_num_seqs=12)
    assert out_of_memory_advice(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"), cfg)
    assert out_of_memory_advice(RuntimeError("fake engine crashed"), cfg) is None
    assert out_of_memory_advice(MemoryError("host memory"), cfg) is None  # not the GPU: no GPU knobs


class OomAtLoadLLM(FakeLLM):
    def __init__(self, *args, **kwargs):
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 70.00 GiB")


def test_out_of_memory_at_load_names_the_knobs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAAS_BATCH_ENGINE", "test_runner_repair:OomAtLoadLLM")
    src = write_input(tmp_path / "in", "jsonl", ROWS)
    rc, err = run(capsys, "--input", src, "--output", tmp_path / "out", "--gpu-memory-utilization", 0.5)
    assert rc == 2 and "Could not start the engine: the GPU ran out of memory" in err
    assert "--max-num-seqs (now auto)" in err and "--gpu-memory-utilization (now 0.5" in err
