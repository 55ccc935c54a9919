"""Reasoning-model text handling: `<think>...</think>` splitting, reasoning token counts, and the
incremental detokenizer the thinking budget and stop strings need while decoding."""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# What the engine writes itself when the thinking budget runs out.
BUDGET_CLOSE = "\n" + THINK_CLOSE + "\n\n"


def prompt_opens_think(prompt_text: str) -> bool:
    """True when the prompt (e.g. a chat template) leaves a think block open for the model."""
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)


def split_reasoning(text: str, starts_in_think: bool) -> tuple[str, str]:
    """-> (reasoning, answer). Without a think block the whole text is the answer; an unclosed block
    is all reasoning."""
    if not starts_in_think:
        start = text.find(THINK_OPEN)
        if start < 0:
            return "", text.strip()
        text = text[start + len(THINK_OPEN):]
    end = text.find(THINK_CLOSE)
    if end < 0:
        return text.strip(), ""
    return text[:end].strip(), text[end + len(THINK_CLOSE):].strip()


def count_reasoning_tokens(tokenizer, token_ids: list[int], starts_in_think: bool) -> int:
    """Tokens generated inside the think block: from its opening (or the start, when the prompt opened
    it) up to the token that completes `</think>` (binary search over decoded prefixes)."""

    def text_of(n: int) -> str:
        return tokenizer.decode(token_ids[:n], skip_special_tokens=True)

    def first_prefix_containing(tag: str) -> int | None:
        if tag not in text_of(len(token_ids)):
            return None
        lo, hi = 1, len(token_ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if tag in text_of(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    if not token_ids:
        return 0
    start = 0
    if not starts_in_think:
        opened = first_prefix_containing(THINK_OPEN)
        if opened is None:
            return 0
        start = opened
    closed = first_prefix_containing(THINK_CLOSE)
    end = len(token_ids) if closed is None else closed
    return max(0, end - start)


class IncrementalText:
    """Detokenizes a growing list of token ids a token at a time, holding back incomplete UTF-8."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Append a token; return the text it completed (maybe empty)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            new = after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += new
            return new
        return ""
