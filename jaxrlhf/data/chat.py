"""Chat templates -> rendered text plus the character spans of the trained assistant turns.

Spans come from rendering conversation prefixes with the tokenizer's own
template, so they are right for templates with ``{% generation %}`` markers and
for the (more common) ones without. For each trained assistant turn ``i``:

- ``render(messages[:i], add_generation_prompt=True)`` ends where the model
  starts generating: the span starts there (after the role header, which the
  template must render as the generation prompt);
- ``render(messages[:i + 1])`` ends after the turn's end-of-turn marker and its
  trailing whitespace: the span ends after the marker (the whitespace that
  separates turns, e.g. the ``\\n`` after ``<|im_end|>``, is not trained);
- rendering an assistant turn whose content is a sentinel tells the template's
  header and end-of-turn marker apart from the reply.

When every prefix is a prefix of the whole rendered conversation (the template
is *prefix-stable*), one rendering holds every trained turn. A template that
rewrites earlier turns depending on what follows (Qwen3's drops the reasoning of
assistant turns before the last user message; Llama 3.1's moves ``tools`` into
the last user message) is rendered once per trained assistant turn instead
(``render_turns``): turn ``i``'s example is ``messages[:i + 1]`` as the template
renders it when turn ``i`` is the one being generated, which is exactly the
context the model sees at inference, and only turn ``i`` is trained in it. A
conversation with k trained turns then encodes to k examples.

Spans are character offsets into the full text; ``encode`` maps them to tokens
through the offset mapping of one tokenization of that text.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import warnings

from jaxrlhf.data.errors import DataError
from jaxrlhf.data.formats import Chat

__all__ = [
    "NotPrefixStable",
    "RenderedChat",
    "protected_prefix",
    "render",
    "render_chat",
    "render_turns",
    "template_text",
]

_SENTINEL = "JAXRLHF_SENTINEL_REPLY_5F2C"


@dataclasses.dataclass(frozen=True)
class RenderedChat:
    """The rendered conversation and the half-open character spans that are trained."""

    text: str
    spans: tuple[tuple[int, int], ...]


@functools.lru_cache(maxsize=16)
def _read_template_file(path: str) -> str:
    return pathlib.Path(path).read_text(encoding="utf-8")


def template_text(tokenizer, spec: str | None) -> str:
    """The Jinja source for ``spec``: None = the tokenizer's default, one of its named templates, a file, or source."""
    named = tokenizer.chat_template if isinstance(tokenizer.chat_template, dict) else {}
    if spec is None:
        try:
            return tokenizer.get_chat_template()
        except ValueError as e:
            raise ValueError(
                f"the tokenizer has no usable default chat template ({e}); set data.chat_template to a template"
                f" name{' (' + ', '.join(sorted(named)) + ')' if named else ''} or a .jinja file"
            ) from None
    if spec in named:
        return named[spec]
    if "{{" in spec or "{%" in spec:
        return spec
    if pathlib.Path(spec).is_file():
        return _read_template_file(spec)
    known = ", ".join(sorted(named)) if named else "none"
    raise ValueError(f"chat template {spec!r} is neither a template name of this tokenizer ({known}) nor a file")


def render(tokenizer, messages, *, template: str, tools=None, add_generation_prompt: bool = False, origin=None) -> str:
    """The template applied to ``messages`` as text; a template failure is a ``DataError`` naming the record."""
    try:
        return tokenizer.apply_chat_template(
            list(messages),
            tools=list(tools) if tools is not None else None,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
    except Exception as e:  # jinja's TemplateError, raise_exception(), type errors in the template...
        raise DataError(origin, f"the chat template failed on this conversation: {type(e).__name__}: {e}") from e


def _divergence(prefix: str, full: str) -> str:
    i = next((k for k, (a, b) in enumerate(zip(prefix, full)) if a != b), min(len(prefix), len(full)))
    return f"at character {i}: the prefix renders {prefix[i : i + 40]!r}, the whole conversation {full[i : i + 40]!r}"


class NotPrefixStable(DataError):
    """The template renders an earlier turn differently depending on what follows it."""


def _not_prefix_stable(origin, label: str, i: int, what: str, prefix: str, full: str) -> DataError:
    return NotPrefixStable(
        origin,
        f"chat template {label} is not prefix-stable: {what} is not a prefix of the whole rendered conversation"
        f" ({_divergence(prefix, full)}). The template renders earlier turns differently depending on what follows"
        f" (e.g. it drops reasoning from earlier assistant turns or moves the system prompt), so the text of turn {i}"
        " cannot be located in one rendering. SFT conversations are then rendered once per assistant turn; for a"
        " DPO reply of several assistant turns use a prefix-stable template (data.chat_template=<file.jinja>).",
    )


def render_chat(
    tokenizer, chat: Chat, *, template: str, label: str = "default", train_on_eot: bool = True, origin=None
) -> RenderedChat:
    """Render ``chat`` and locate each trained assistant turn: reply as rendered + end-of-turn marker.

    With ``train_on_eot=False`` the spans stop before the marker.
    """
    messages = chat.messages
    kw = dict(template=template, tools=chat.tools, origin=origin)
    full = render(tokenizer, messages, **kw)
    spans = []
    for i in chat.trained:
        through = render(tokenizer, messages[:i + 1], **kw)
        if not full.startswith(through):
            raise _not_prefix_stable(origin, label, i, f"the conversation up to message {i}", through, full)
        probe = render(tokenizer, messages[:i] + ({"role": "assistant", "content": _SENTINEL},), **kw)
        if probe.count(_SENTINEL) != 1:
            raise DataError(origin, f"chat template {label} does not render an assistant message's content verbatim")
        header, tail = probe.split(_SENTINEL)
        if i == 0:
            start = len(header)
        else:
            generation = render(tokenizer, messages[:i], add_generation_prompt=True, **kw)
            if not header.startswith(generation):
                raise _not_prefix_stable(
                    origin, label, i, f"the generation prompt before message {i}", generation, header
                )
            # Text between the generation prompt and the reply is generated too (e.g. an empty
            # <think></think>), unless the template simply ignores add_generation_prompt: then it is
            # the role header. (Templates whose user turn ends with the header, like Mistral's
            # "[/INST]", need no generation prompt.)
            if header != generation and generation == render(tokenizer, messages[:i], **kw):
                raise DataError(
                    origin,
                    f"chat template {label} ignores add_generation_prompt, so the assistant header"
                    f" {header[len(generation):]!r} cannot be told apart from the reply; use a template that"
                    " renders the generation prompt",
                )
            start = len(generation)
        if not through.startswith(header[:start]):
            raise _not_prefix_stable(
                origin, label, i, f"the opening of assistant message {i} as a bare reply", header[:start], through
            )
        turn = through.rstrip()
        end = max(start, len(turn))
        eot = tail.rstrip()
        if not eot:
            warnings.warn(
                f"chat template {label} puts no end-of-turn marker after assistant replies: the model will not"
                " learn to stop",
                stacklevel=2,
            )
        elif not train_on_eot:
            if not turn.endswith(eot):
                raise DataError(origin, f"turn {i} does not end with the template's end-of-turn marker {eot!r}")
            end = max(start, end - len(eot))
        spans.append((start, end))
    return RenderedChat(full, tuple(spans))


def render_turns(
    tokenizer, chat: Chat, *, template: str, label: str = "default", train_on_eot: bool = True, origin=None
) -> list[tuple[Chat, RenderedChat]]:
    """``[(conversation, rendering)]``: the whole conversation once when the template is prefix-stable for it,
    else one rendering per trained assistant turn (the conversation up to that turn, only that turn trained)."""
    kw = dict(template=template, label=label, train_on_eot=train_on_eot, origin=origin)
    try:
        return [(chat, render_chat(tokenizer, chat, **kw))]
    except NotPrefixStable:
        pass  # messages after the last trained turn never shape a target: leaving them out is exact
    turns = []
    for i in chat.trained:
        upto = dataclasses.replace(chat, messages=chat.messages[: i + 1], trained=(i,))
        turns.append((upto, render_chat(tokenizer, upto, **kw)))
    return turns


def protected_prefix(tokenizer, chat: Chat, full: str, *, template: str, label: str = "default", origin=None) -> int:
    """Characters that prompt truncation keeps: system turn(s) and the header of the first other message."""
    k = 0
    while k < len(chat.messages) and chat.messages[k]["role"] == "system":
        k += 1
    probe_messages = chat.messages[:k] + ({**chat.messages[k], "content": _SENTINEL},)
    probe = render(tokenizer, probe_messages, template=template, tools=chat.tools, origin=origin)
    head = probe.split(_SENTINEL)[0]
    if not full.startswith(head):
        raise _not_prefix_stable(origin, label, k, "the system turn", head, full)
    return len(head)
