"""Think-block splitting, reasoning token counts and the thinking budget."""

from __future__ import annotations

from raas_batch import SamplingParams
from raas_batch.reasoning import BUDGET_CLOSE, count_reasoning_tokens, prompt_opens_think, split_reasoning


def test_split_reasoning():
    assert split_reasoning("<think>a b</think> 42", False) == ("a b", "42")
    assert split_reasoning("a b</think>\n\n42", True) == ("a b", "42")
    assert split_reasoning("just 42", False) == ("", "just 42")
    assert split_reasoning("<think>still going", False) == ("still going", "")
    assert split_reasoning("still going", True) == ("still going", "")


def test_prompt_opens_think():
    assert prompt_opens_think("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_think("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_think("plain")


def test_count_reasoning_tokens(smollm_tokenizer):
    tok = smollm_tokenizer
    ids = tok.encode("so 3 + 4 is 7</think>The answer is 7.", add_special_tokens=False)
    head = tok.encode("so 3 + 4 is 7</think>", add_special_tokens=False)
    assert count_reasoning_tokens(tok, ids, True) == len(head)
    assert count_reasoning_tokens(tok, ids, False) == 0
    assert count_reasoning_tokens(tok, tok.encode("no tags", add_special_tokens=False), True) == 2


def test_thinking_budget_closes_the_block(smollm):
    tok = smollm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 6 times 7?"}], tokenize=False,
                                     add_generation_prompt=True) + "<think>\n"
    budget = 6
    out = smollm.generate(prompt, SamplingParams(max_new_tokens=40, temperature=0, thinking_budget=budget,
                                                 ignore_eos=True))[0].outputs[0]
    close = tok.encode(BUDGET_CLOSE, add_special_tokens=False)
    assert out.thinking_budget_hit
    assert out.num_reasoning_tokens == budget
    assert out.token_ids[budget:budget + len(close)] == close
    assert out.reasoning == tok.decode(out.token_ids[:budget], skip_special_tokens=True).strip()
    assert "</think>" in out.text and out.answer == out.text.split("</think>", 1)[1].strip()
    # without a budget the model keeps "thinking" past that point
    free = smollm.generate(prompt, SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True))[0].outputs[0]
    assert not free.thinking_budget_hit and free.token_ids[:budget] == out.token_ids[:budget]
