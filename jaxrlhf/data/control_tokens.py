"""Special (control) tokens typed inside content: found, refused, or tokenized as the plain text they are.

A literal ``<|im_end|>`` in a message is tokenized as the control token itself: in
a user turn it opens a fake assistant turn, in a reply it is *trained* as a real
end of turn and the model learns to stop mid-reply. ``data.special_tokens_in_content``:

- ``error`` (default): a ``DataError`` naming the record, the field and the token;
- ``split``: the characters are kept and tokenized as ordinary text. Each
  occurrence is swapped for a private-use placeholder character before the
  template renders, then swapped back, and the text is tokenized piece by piece:
  template text as usual, each occurrence alone with special tokens split. Around
  special tokens a tokenizer splits anyway, so no other token changes;
- ``allow``: today's behaviour of every other project (the control token).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

from jaxrlhf.data.errors import DataError

__all__ = ["POLICIES", "Literals", "find_in_chat", "find_in_strings", "special_tokens"]

POLICIES = ("error", "split", "allow")
_PLACEHOLDER_BASE = 0xF0000  # Supplementary Private Use Area-A: no tokenizer gives it meaning


@functools.lru_cache(maxsize=8)
def special_tokens(tokenizer) -> tuple[str, ...]:
    """Every special token's text, longest first (so ``<|im_end|>`` wins over a prefix of it)."""
    names = set(tokenizer.all_special_tokens)
    names |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return tuple(sorted((n for n in names if n), key=len, reverse=True))


@functools.lru_cache(maxsize=8)
def _pattern(tokens: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(map(re.escape, tokens)))


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown special_tokens_in_content {policy!r}; expected one of {', '.join(POLICIES)}")


def _refuse(origin, field: str, token: str) -> DataError:
    return DataError(
        origin,
        f"contains the control token {token!r} as text: it would be tokenized as the token itself (a fake turn "
        "boundary, or a trained end of turn mid-reply). Remove it, or set data.special_tokens_in_content to split "
        "(tokenize it as plain text) or allow",
        field=field,
    )


@dataclasses.dataclass
class Literals:
    """Placeholders standing for special-token text inside content, and how to put the text back."""

    tokens: tuple[str, ...]

    def hide(self, text: str) -> str:
        pattern = _pattern(self.tokens)
        return pattern.sub(lambda m: chr(_PLACEHOLDER_BASE + self.tokens.index(m.group(0))), text)

    def reveal(self, text: str) -> tuple[str, list[tuple[int, int]], np.ndarray]:
        """``(text, literal ranges in it, map)``: ``map[i]`` is where character ``i`` of the placeholder text
        (or its end, ``i == len``) lands in the revealed text."""
        out, ranges, where, length = [], [], np.zeros(len(text) + 1, np.int64), 0
        for i, ch in enumerate(text):
            where[i] = length
            k = ord(ch) - _PLACEHOLDER_BASE
            piece = self.tokens[k] if 0 <= k < len(self.tokens) else ch
            if piece is not ch:
                ranges.append((length, length + len(piece)))
            out.append(piece)
            length += len(piece)
        where[len(text)] = length
        return "".join(out), ranges, where


def _first(text, tokens) -> str | None:
    match = _pattern(tokens).search(text) if tokens and isinstance(text, str) else None
    return match.group(0) if match else None


def find_in_strings(fields: dict[str, str], tokenizer, policy: str, origin) -> bool:
    """Apply ``policy`` to plain-string fields; True when some field holds special-token text to split."""
    tokens = special_tokens(tokenizer)
    for field, text in fields.items():
        token = _first(text, tokens)
        if token is not None:
            if policy == "error":
                raise _refuse(origin, field, token)
            return policy == "split"
    return False


def find_in_chat(messages, tokenizer, policy: str, origin) -> bool:
    """Apply ``policy`` to the content of every message; True when some holds special-token text to split."""
    tokens = special_tokens(tokenizer)
    found = False
    for i, message in enumerate(messages):
        token = _first(message.get("content"), tokens)
        if token is not None:
            if policy == "error":
                raise _refuse(origin, f"messages[{i}].content ({message.get('role')})", token)
            found = found or policy == "split"
    return found


def literal_ranges(text: str, tokenizer) -> list[tuple[int, int]]:
    """Character ranges of special-token text in ``text`` (for ``split``: tokenized as plain text)."""
    tokens = special_tokens(tokenizer)
    return [m.span() for m in _pattern(tokens).finditer(text)] if tokens else []
