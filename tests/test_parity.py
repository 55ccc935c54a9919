"""Greedy tokens identical to transformers' generate() (fp32, CPU), for every supported family."""

from __future__ import annotations

import pytest
import torch

from raas_batch import LLM, SamplingParams


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy tokens with EOS off (as ignore_eos): the EOS id is one outside the vocabulary
    (eos_token_id=None would fall back to the model's EOS; min_new_tokens would mask EOS out of the
    logits and change the greedy choice)."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=model.config.vocab_size, pad_token_id=0)
    assert out.shape[1] == len(prompt_ids) + max_new_tokens
    return out[0, len(prompt_ids):].tolist()


def ragged_prompts(num: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [1, 5, 16, 17, 33, 3, 40, 9][:num]
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_tiny_families_match_transformers(family, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(family)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # max_num_seqs=3 < 8 prompts: later prompts are admitted while earlier ones are still decoding.
    llm = LLM(model=path, max_num_seqs=3, device="cpu", dtype="fp32")
    prompts = ragged_prompts(8, hf.config.vocab_size)
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12), f"{family}: prompt of {len(prompt)} tokens"
        assert out.outputs[0].finish_reason == "length"
    # one prompt alone gives the same tokens as inside the batch
    alone = llm.generate({"prompt_token_ids": prompts[4]}, params)[0]
    assert alone.outputs[0].token_ids == outs[4].outputs[0].token_ids


def test_smollm2_matches_transformers(smollm, smollm_hf):
    tok = smollm.tokenizer
    texts = ["The capital of France is", "def fibonacci(n):",
             "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:"]
    chats = [[{"role": "user", "content": "What is 12 + 30? Answer briefly."}]]
    prompts = [tok.encode(t) for t in texts]
    prompts += [tok.encode(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False) for c in chats]
    # 64 tokens: past the point where the chat answer ends (EOS is then a greedy pick, ignored here)
    params = SamplingParams(max_new_tokens=64, temperature=0, ignore_eos=True)
    outs = smollm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(smollm_hf, prompt, 64)


def test_chat_prompt_equals_its_token_ids(smollm):
    chat = [{"role": "user", "content": "Name a prime number."}]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    by_chat, = smollm.generate([chat], params)
    by_ids, = smollm.generate([{"prompt_token_ids": by_chat.prompt_token_ids}], params)
    assert "<|im_start|>assistant" in by_chat.prompt
    assert by_chat.outputs[0].token_ids == by_ids.outputs[0].token_ids


def test_unsupported_architecture_is_named(tmp_path, smollm_tokenizer):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    smollm_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not supported.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        LLM(model=str(tmp_path), device="cpu")


def test_loading_skips_the_initialisers_and_loads_every_weight(tmp_path, smollm_tokenizer, monkeypatch):
    """load_model builds the model on the meta device without running nn.Linear's / nn.Embedding's
    initialisers (their first use costs ~1 s in a fresh process), and every weight is the checkpoint's."""
    from torch import nn
    from transformers import AutoModelForCausalLM, LlamaConfig

    from raas_batch.models.loader import load_model

    cfg = LlamaConfig(vocab_size=smollm_tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    hf = AutoModelForCausalLM.from_config(cfg)
    hf.save_pretrained(tmp_path)
    smollm_tokenizer.save_pretrained(tmp_path)
    calls = []
    for name in ("kaiming_uniform_", "uniform_", "normal_"):
        original = getattr(nn.init, name)
        monkeypatch.setattr(nn.init, name, lambda t, *a, _f=original, **k: (calls.append(t.shape), _f(t, *a, **k))[1])
    net = load_model(str(tmp_path), torch.float32, torch.device("cpu")).model
    assert calls == []
    ours = dict(net.named_parameters())
    theirs = hf.state_dict()
    assert torch.equal(ours["embed_tokens.weight"], theirs["model.embed_tokens.weight"])
    assert torch.equal(ours["lm_head.weight"], theirs["lm_head.weight"])
    q, k, v = (theirs[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(ours["layers.1.self_attn.qkv_proj.weight"], torch.cat([q, k, v]))
    assert torch.equal(ours["layers.1.mlp.down_proj.weight"], theirs["model.layers.1.mlp.down_proj.weight"])


@pytest.mark.parametrize("threads,stage_bytes", [(3, 64), (1, 6), (8, 1 << 20)])
def test_staged_weight_copy_equals_one_copy_at_a_time(threads, stage_bytes):
    """copy_weights' staged path (on CUDA: pinned buffers, a thread and stream each; here forced on the CPU):
    every target gets its source, converted to the target's dtype, whatever the buffer's size against the
    tensors' (chunks of one element to many tensors in one buffer) and the threads against the pairs; slices
    of one fused parameter, as the loader's q/k/v parts, each get theirs."""
    from raas_batch.models.loader import copy_weights

    g = torch.Generator().manual_seed(3)
    fused = torch.zeros(7, 5, dtype=torch.bfloat16)
    targets = [fused[0:3], fused[3:7], torch.zeros(33, dtype=torch.bfloat16), torch.zeros(2, 4, 3),
               torch.zeros(1, dtype=torch.bfloat16)]
    sources = [torch.randn(3, 5, generator=g), torch.randn(4, 5, generator=g).to(torch.bfloat16),
               torch.randn(33, generator=g), torch.randn(2, 4, 3, generator=g).to(torch.bfloat16),
               torch.randn(1, generator=g)]
    want = [t.clone().copy_(s) for t, s in zip(targets, sources)]
    copy_weights(list(zip(targets, sources)), threads=threads, stage_bytes=stage_bytes, staged=True)
    for got, w in zip(targets, want):
        assert torch.equal(got, w)
    assert torch.equal(fused, torch.cat(want[:2]))
