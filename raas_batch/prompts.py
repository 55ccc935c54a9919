"""Prompts: the one validator, the chat-template conversion of text prompts, and tokenization.

A prompt is one of
- a string: used as it is (or, for batch jobs, sent as one user message: `text_as_chat`);
- chat messages: a list of {"role": str, "content": str}, run through the model's chat template;
- token ids: a list of ints, or {"prompt_token_ids": [...]}.

Invariants:
- `check_prompt` is the only place that decides whether a prompt can run; its reasons are bare
  ("the prompt is empty"): the caller adds where the prompt came from (a job names the row and the fix).
- `check_prompt` never raises, whatever the value (None, numbers, nested junk): bad input is a reason.
- `text_as_chat` changes only a non-blank string (or adds a system message to well-formed messages
  that have none); everything else is returned unchanged, so `check_prompt` still gives its reason.
"""

from __future__ import annotations

from typing import Any

# What check_prompt returns for a runnable prompt: str | list[dict] (messages) | list[int] (token ids).
Prompt = Any


def check_prompt(value: Any) -> tuple[Prompt | None, str | None]:
    """-> (the prompt in normal form, None) or (None, why it cannot run)."""
    if value is None:
        return None, "the prompt is null"
    if isinstance(value, str):
        return (value, None) if value.strip() else (None, "the prompt is empty")
    if isinstance(value, dict):
        if "prompt_token_ids" not in value:
            return None, ("the prompt is a single object without 'prompt_token_ids'; expected a string, a "
                          "list of {role, content} messages or {'prompt_token_ids': [...]}")
        ids = value["prompt_token_ids"]
        if not isinstance(ids, (list, tuple)) or not all(_is_token(t) for t in ids):
            return None, "'prompt_token_ids' must be a list of non-negative integers"
        return (list(map(int, ids)), None) if ids else (None, "the prompt has no tokens")
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            return None, "the prompt is an empty list of messages"
        if all(_is_token(t) for t in value):
            return [int(t) for t in value], None
        return _check_messages(value)
    return None, f"the prompt is a {type(value).__name__}; expected a string or a list of {{role, content}} messages"


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def _check_messages(value) -> tuple[list[dict] | None, str | None]:
    messages = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            what = f"a {type(m).__name__}" if not isinstance(m, dict) else f"an object with keys {sorted(m)}"
            return None, f"message {k} is {what}; expected an object with 'role' and 'content'"
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or not role.strip():
            return None, f"message {k} has role {role!r}; expected a string such as 'user' or 'system'"
        if not isinstance(content, str):
            return None, f"message {k} has content of type {type(content).__name__}, expected a string"
        messages.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in messages):
        return None, "every message has empty content"
    return messages, None


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def text_as_chat(value: Any, system_prompt: str | None = None) -> Any:
    """A non-blank string -> [system?, user] messages; well-formed messages without a system message
    get `system_prompt` first; anything else is returned unchanged (see the module invariants)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if isinstance(value, str):
        return system + [{"role": "user", "content": value}] if value.strip() else value
    well_formed = isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value)
    if system and well_formed and not any(m.get("role") == "system" for m in value):
        return system + list(value)
    return value


def render(tokenizer, prompt: Prompt, chat_template_kwargs: dict | None = None) -> tuple[str | None, list[int] | None, bool]:
    """A prompt in normal form -> (its text as the model sees it, its token ids when the prompt is token ids, else
    None (the text is to be encoded), whether encoding the text adds the tokenizer's special tokens). Raises what
    the chat template raises (the caller makes it the prompt's error)."""
    if isinstance(prompt, str):
        return prompt, None, True
    if prompt and isinstance(prompt[0], dict):
        text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True,
                                             **(chat_template_kwargs or {}))
        return text, None, False
    return (tokenizer.decode(prompt) if tokenizer is not None else None), list(prompt), False


def encode_many(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """`tokenizer.encode(text, add_special_tokens=...)` of each text, in one call: a fast tokenizer encodes the
    batch in parallel, in Rust."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]
