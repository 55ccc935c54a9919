"""The engine and sampling flags of a job (`--max-num-seqs auto`, `--max-model-len`,
`--gpu-memory-utilization`, `--enforce-eager`, `--kv-policy-options`, `--stop-token-ids`): CLI and
YAML spellings, what reaches the engine, what config.yaml records and what the fingerprint holds."""

import json

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from fake_llm import FakeLLM, FakeTokenizer, sample_rows, write_input

from raas_batch.cli import main
from raas_batch.config import ConfigError, resolve
from raas_batch.engine.cuda_graph import BATCH_BUCKETS
from raas_batch.llm import (
    CPU_MAX_NUM_SEQS,
    DENSE_MAX_NUM_SEQS,
    LARGE_GPU_MAX_NUM_SEQS,
    auto_max_num_seqs,
    dense_max_num_seqs,
    kv_pool_tokens,
)
from raas_batch.policies import make_policy


@pytest.fixture(autouse=True)
def _fake_engine(monkeypatch):
    monkeypatch.setenv("RAAS_BATCH_ENGINE", "fake_llm:FakeLLM")
    monkeypatch.delenv("RAAS_FAKE_SLEEP_S", raising=False)
    monkeypatch.delenv("RAAS_FAKE_FAIL_ON", raising=False)


def run(capsys, *args):
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def test_engine_flags_reach_the_engine_and_config_yaml(tmp_path, capsys):
    src = write_input(tmp_path / "in", "jsonl", sample_rows(3))
    out = tmp_path / "out"
    think = FakeTokenizer().token("<think>")  # the fake model's first token of every completion
    rc, err = run(capsys, "--input", src, "--output", out, "--kv-policy", "raas", "--kv-budget", 64,
                  "--kv-policy-options", '{"pin_prompt": false}', "--max-num-seqs", 3, "--max-model-len", 96,
                  "--gpu-memory-utilization", 0.5, "--enforce-eager", "--stop-token-ids", f"5,{think}",
                  "--stop-token-ids", 7, "--no-share-prompts", "--batch-invariant", "--prefill-cost-steps", 2.5)
    assert rc == 0, err
    settings = FakeLLM.last_settings
    assert settings == {"max_num_seqs": 3, "policy_options": {"pin_prompt": False}, "max_model_len": 96,
                        "gpu_memory_utilization": 0.5, "enforce_eager": True, "share_prompts": False,
                        "batch_invariant": True, "prefill_cost_steps": 2.5}
    rows = pq.read_table(out / "shards").to_pylist()
    assert {(r["finish_reason"], r["num_completion_tokens"]) for r in rows} == {("stop", 1)}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["kv-policy-options"] == {"pin_prompt": False} and saved["stop-token-ids"] == [5, think, 7]
    assert (saved["max-num-seqs"], saved["max-model-len"], saved["gpu-memory-utilization"],
            saved["enforce-eager"], saved["share-prompts"], saved["batch-invariant"], saved["prefill-cost-steps"]) == \
        (3, 96, 0.5, True, False, True, 2.5)
    # config.yaml reruns the same job: --resume finds it done (same fingerprint).
    rc, err = run(capsys, "--config", out / "config.yaml", "--resume")
    assert rc == 0, err


def test_defaults_are_auto_and_yaml_spellings(tmp_path, capsys):
    src = write_input(tmp_path / "in", "jsonl", sample_rows(2))
    rc, err = run(capsys, "--input", src, "--output", tmp_path / "a")
    assert rc == 0, err
    assert FakeLLM.last_settings == {"max_num_seqs": "auto", "policy_options": None, "max_model_len": None,
                                     "gpu_memory_utilization": 0.9, "enforce_eager": False, "share_prompts": True,
                                     "batch_invariant": False, "prefill_cost_steps": None}
    y = tmp_path / "job.yaml"
    y.write_text(f"input: {src}\noutput: {tmp_path / 'b'}\nkv-policy: raas\nkv-budget: 64\n"
                 "kv-policy-options: {pin_prompt: false, recent_pages: 1}\nstop-token-ids: [3, 4]\n"
                 "max-num-seqs: auto\nenforce-eager: true\nprefill-cost-steps: '3'\n")
    cfg = resolve({"config": str(y)})
    assert cfg.prefill_cost_steps == 3.0
    assert cfg.kv_policy_options == {"pin_prompt": False, "recent_pages": 1}
    assert cfg.stop_token_ids == [3, 4] and cfg.max_num_seqs == "auto" and cfg.enforce_eager is True
    assert resolve({"config": str(y), "max_num_seqs": "12"}).max_num_seqs == 12


@pytest.mark.parametrize("values, fragment", [
    ({"max_num_seqs": "many"}, "--max-num-seqs must be an integer"),
    ({"max_num_seqs": 0}, "--max-num-seqs must be a positive integer or auto"),
    ({"gpu_memory_utilization": 1.5}, "--gpu-memory-utilization must be in (0, 1]"),
    ({"max_model_len": 0}, "--max-model-len must be a positive integer"),
    ({"stop_token_ids": "12,x"}, "--stop-token-ids must be token ids"),
    ({"stop_token_ids": [-1]}, "--stop-token-ids must be token ids"),
    ({"kv_policy_options": "[1]"}, "--kv-policy-options must be a JSON object"),
    ({"kv_policy_options": "{bad"}, "--kv-policy-options is not valid JSON"),
    ({"enforce_eager": "yes"}, "enforce-eager must be true or false"),
    ({"prefill_cost_steps": -1}, "--prefill-cost-steps must be a number >= 0"),
    ({"prefill_cost_steps": "soon"}, "--prefill-cost-steps must be a number"),
])
def test_bad_engine_flags_are_one_sentence(values, fragment):
    with pytest.raises(ConfigError) as info:
        resolve({"input": "x.jsonl", "output": "o", **values})
    assert fragment in str(info.value)


def test_fingerprint_holds_output_settings_only(tmp_path, capsys):
    src = write_input(tmp_path / "in", "jsonl", sample_rows(4))
    out = tmp_path / "out"
    base = ["--input", src, "--output", out, "--shard-size", 2, "--stop-token-ids", 9]
    assert run(capsys, *base)[0] == 0
    # Speed settings may change between runs ...
    rc, err = run(capsys, *base, "--max-num-seqs", 2, "--gpu-memory-utilization", 0.7, "--enforce-eager",
                  "--prefill-cost-steps", 8, "--resume")
    assert rc == 0, err
    # ... output settings may not.
    for extra, named in ((["--stop-token-ids", 8], "--stop-token-ids was [9], now [9, 8]"),
                         (["--max-model-len", 64], "--max-model-len was None, now 64")):
        rc, err = run(capsys, *base, *extra, "--resume")
        assert rc == 2 and named in err, err
    settings = json.loads((out / "manifest.json").read_text())["fingerprint"]["settings"]
    assert {"stop_token_ids", "kv_policy_options", "max_model_len", "apply_chat_template", "system_prompt"} <= set(settings)
    assert not {"max_num_seqs", "gpu_memory_utilization", "enforce_eager"} & set(settings)


def test_unknown_policy_option_is_refused_before_loading_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAAS_BATCH_ENGINE")  # the real registry is consulted; no model is loaded
    src = write_input(tmp_path / "in", "jsonl", sample_rows(2))
    out = tmp_path / "out"
    rc, err = run(capsys, "--input", src, "--output", out, "--kv-policy", "raas", "--kv-budget", 64,
                  "--kv-policy-options", '{"pin_promt": false}')
    assert rc == 2 and "--kv-policy-options" in err and "no option pin_promt" in err, err
    assert not out.exists()


def fake_gpu(monkeypatch, name: str = "NVIDIA H200", gib: float = 140) -> None:
    """torch.cuda.get_device_properties answers for a GPU of that name and memory (this machine has none)."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(name=name, total_memory=int(gib * 2**30)))


def test_dense_auto_batch_is_vllms_default_for_the_gpu(monkeypatch):
    """dense / quest "auto": vLLM's default batch for the GPU: 1,024 on 70 GiB or more (A100s excepted), else 256."""
    cuda = torch.device("cuda")
    for name, gib, want in (("NVIDIA H200", 140, LARGE_GPU_MAX_NUM_SEQS), ("NVIDIA H100 80GB HBM3", 79.6, 1024),
                            ("NVIDIA A100-SXM4-80GB", 80, DENSE_MAX_NUM_SEQS), ("NVIDIA L40S", 44.5, 256),
                            ("AMD Instinct MI300X", 192, 1024), ("NVIDIA GPU", 69.9, 256)):
        fake_gpu(monkeypatch, name, gib)
        assert dense_max_num_seqs(cuda) == want, name
        assert auto_max_num_seqs(cuda, make_policy("dense"), None, 16, 10**9) == want
        assert auto_max_num_seqs(cuda, make_policy("quest", 2048, 16), 2048, 16, 10**9) == want


def test_auto_max_num_seqs_from_the_page_pool(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA L4", 22)  # a GPU under 70 GiB: dense gets 256
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    raas = make_policy("raas", 2048, 16)  # 128 pages per sequence
    assert auto_max_num_seqs(cpu, raas, 2048, 16, 10**9) == CPU_MAX_NUM_SEQS
    assert auto_max_num_seqs(cuda, raas, 2048, 16, 100 * 128 * 16) == 100
    assert auto_max_num_seqs(cuda, raas, 2048, 16, 10**9) == BATCH_BUCKETS[-1] == 1024  # the largest graph bucket
    assert auto_max_num_seqs(cuda, raas, 2048, 16, 16) == 1
    for name, budget in (("dense", None), ("quest", 2048)):
        assert auto_max_num_seqs(cuda, make_policy(name, budget, 16), budget, 16, 10**9) == DENSE_MAX_NUM_SEQS
    with_dense_layers = make_policy("raas", 2048, 16, dense_layers=2)
    assert auto_max_num_seqs(cuda, with_dense_layers, 2048, 16, 10**9) == DENSE_MAX_NUM_SEQS


def test_the_default_pool_leaves_room_for_the_refresh_rings():
    """The page pool's default size (kv_pool_tokens) takes the rings of RaaS's refresh once a page out of the free
    memory first: for max_num_seqs slots and the padding slot, or with "auto" for every slot that auto_max_num_seqs
    then picks from that pool; the pool is the largest that leaves them room. Without rings: (free - reserve)
    in whole pages."""
    cuda, P = torch.device("cuda"), 16
    raas = make_policy("raas", 1024, P)  # 64 pages a sequence
    per_page, ring = 28 * 2 * 2 * P * 128 * 2, 28 * P * 12 * 128 * 2  # the 1.5B shape's page and ring, bf16
    assert kv_pool_tokens(10**9 + 7, 10**8, per_page, P) == (10**9 + 7 - 10**8) // per_page * P
    assert kv_pool_tokens(0, 10**8, per_page, P) == P  # at least one page (the engine then reports what does not fit)
    for avail in (3 * 10**9, 17 * 10**9, 40 * 10**9, 120 * 10**9):
        for seqs in (None, 1, 512):
            tokens = kv_pool_tokens(avail + 10**9, 10**9, per_page, P, ring, seqs, 1024 // P)
            slots = seqs if seqs is not None else auto_max_num_seqs(cuda, raas, 1024, P, tokens)
            used = tokens // P * per_page + (slots + 1) * ring
            assert used <= avail < used + per_page + (ring if seqs is None else 0), (avail, seqs, slots)
            if seqs is None:
                assert slots <= BATCH_BUCKETS[-1]
    # rings for 1,025 slots at most: with memory for more, the pool takes the rest
    big = kv_pool_tokens(10**12, 0, per_page, P, ring, None, 1024 // P)
    assert big // P * per_page + (BATCH_BUCKETS[-1] + 1) * ring <= 10**12 < big // P * per_page + 1025 * ring + per_page


def test_the_llm_sizes_its_pool_on_cuda_with_the_rings(tiny_model_dir, monkeypatch):
    """LLM._default_kv_tokens on CUDA (the device and its free memory stood in for): the rings of the refresh
    once a page come off the pool for a raas engine on Triton (with dense layers, for the 256 sequences "auto"
    then gives), none for dense, the torch backend or without a policy (the audit's engine calls it so)."""
    from raas_batch import LLM
    from raas_batch.engine.model_runner import window_ring_bytes
    from raas_batch.engine.page_pool import PagePool

    llm = LLM(model=tiny_model_dir("llama"), device="cpu")
    free, total = 30 * 2**30, 40 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    fake_gpu(monkeypatch, "NVIDIA L40S", 40)  # under 70 GiB: "auto" gives dense-layered raas 256 sequences
    llm.device, llm.kv_budget = torch.device("cuda"), 64
    spec, P = llm.model.spec, 16
    per_page = PagePool.bytes_per_page(spec.num_layers, spec.num_kv_heads, P, spec.head_dim, llm.dtype)
    reserve = 0.1 * total + 4 * 2**30
    plain = llm._default_kv_tokens(P, 0.9)
    assert plain == kv_pool_tokens(free, reserve, per_page, P) == llm._default_kv_tokens(P, 0.9, make_policy("dense"),
                                                                                          "triton", None)
    ring = window_ring_bytes(spec, P, llm.dtype)
    for seqs in (8, None):
        got = llm._default_kv_tokens(P, 0.9, make_policy("raas", 64, P), "triton", seqs)
        assert got == kv_pool_tokens(free, reserve, per_page, P, ring, seqs, 64 // P) < plain
    assert llm._default_kv_tokens(P, 0.9, make_policy("raas", 64, P), "torch", 8) == plain
    # with dense layers "auto" gives 256 sequences whatever the pool: rings for those
    with_dense = llm._default_kv_tokens(P, 0.9, make_policy("raas", 64, P, dense_layers=1), "triton", None)
    assert with_dense == kv_pool_tokens(free, reserve, per_page, P, ring, DENSE_MAX_NUM_SEQS) < plain


def test_refresh_placement_names_where_the_refresh_runs(monkeypatch):
    """The side stream and the ring of the refresh once a page: CUDA, Triton and RaaS's refresh by the bounds;
    the ring for the top_half rule only; either setting turns its part off. The engine's runner and the pool's
    default size (above) read this one rule."""
    from raas_batch.engine.model_runner import refresh_placement

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    raas = make_policy("raas", 1024, 16)
    assert refresh_placement(raas, cuda, "triton") == (True, True)
    assert refresh_placement(raas, cpu, "cpu") == refresh_placement(raas, cuda, "torch") == (False, False)
    assert refresh_placement(make_policy("raas", 1024, 16, refresh_rule="alpha"), cuda, "triton") == (True, False)
    for name in ("raas-mass", "h2o", "streaming", "quest", "dense"):
        policy = make_policy(name, None if name == "dense" else 1024, 16)
        assert refresh_placement(policy, cuda, "triton") == (False, False), name
    monkeypatch.setenv("RAAS_BATCH_REFRESH_WINDOW", "0")
    assert refresh_placement(raas, cuda, "triton") == (True, False)
    monkeypatch.setenv("RAAS_BATCH_REFRESH_STREAM", "0")
    assert refresh_placement(raas, cuda, "triton") == (False, False)


def test_max_model_len_caps_the_context(tiny_model_dir):
    from raas_batch import LLM, SamplingParams

    path = tiny_model_dir("llama")
    with pytest.raises(ValueError, match="outside the model's context of 512"):
        LLM(model=path, device="cpu", max_model_len=513)
    llm = LLM(model=path, device="cpu", max_model_len=40)
    assert llm.max_num_seqs == CPU_MAX_NUM_SEQS and llm.engine.scheduler.max_num_seqs == CPU_MAX_NUM_SEQS
    params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    long, short = llm.generate([{"prompt_token_ids": list(range(10, 50))},
                                {"prompt_token_ids": list(range(10, 40))}], params)
    assert long.outputs[0].finish_reason == "error" and "context is 40" in long.outputs[0].error
    assert short.outputs[0].finish_reason == "length" and short.outputs[0].num_tokens == 10


def test_unset_sampling_flags_take_the_models_generation_config(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95, "do_sample": True}))
    src = write_input(tmp_path / "in", "jsonl", sample_rows(3))
    out = tmp_path / "out"
    base = ["--input", src, "--output", out, "--model", model, "--seed", 1]
    rc, err = run(capsys, *base, "--top-k", 20)
    assert rc == 0, err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["temperature"], saved["top-p"], saved["top-k"], saved["max-new-tokens"]) == (0.6, 0.95, 20, 256)
    settings = json.loads((out / "manifest.json").read_text())["fingerprint"]["settings"]
    assert (settings["temperature"], settings["top_p"]) == (0.6, 0.95)
    # The values used are what is fingerprinted: the same values given as flags resume, others do not.
    rc, err = run(capsys, *base, "--top-k", 20, "--temperature", 0.6, "--top-p", 0.95, "--resume")
    assert rc == 0, err
    rc, err = run(capsys, *base, "--top-k", 20, "--temperature", 1.0, "--resume")
    assert rc == 2 and "--temperature was 0.6, now 1.0" in err
    rc, err = run(capsys, "--config", out / "config.yaml", "--resume")
    assert rc == 0, err


def test_system_prompt_needs_the_chat_template():
    with pytest.raises(ConfigError, match="--system-prompt goes through the chat template"):
        resolve({"input": "x.jsonl", "output": "o", "system_prompt": "Be brief.", "apply_chat_template": False})


def test_generation_defaults_read_only_what_the_file_says(tmp_path):
    from raas_batch.generation_config import read_generation_defaults

    assert read_generation_defaults(None) == {} and read_generation_defaults(str(tmp_path / "m.gguf")) == {}
    assert read_generation_defaults(str(tmp_path)) == {}  # a model folder without the file
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.7, "top_k": 20, "do_sample": True, "eos_token_id": [1, 2], "top_p": None}))
    assert read_generation_defaults(str(tmp_path)) == {"temperature": 0.7, "top_k": 20}
    (tmp_path / "generation_config.json").write_text("{broken")
    assert read_generation_defaults(str(tmp_path)) == {}
