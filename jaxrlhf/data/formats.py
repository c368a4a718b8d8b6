"""Records in the formats TRL reads -> typed examples, each field checked with a clear error.

SFT: ``{"messages"}`` (system/user/assistant/tool turns, every assistant turn
trained unless it carries ``"weight": 0`` as in OpenAI's fine-tuning format),
``{"prompt", "completion"}`` (strings: plain text, not templated; message lists:
templated, only the completion's assistant turns trained) and ``{"text"}``.

DPO: ``{"prompt", "chosen", "rejected"}`` with strings or message lists (the
replies hold only the reply turns), and ``{"chosen", "rejected"}`` with an
implicit shared prompt: for message lists the common leading turns, for strings
the longest common prefix (hh-rlhf), moved back to a word boundary so that a
reply's first token is never shared with the prompt. A string ``prompt`` next to
message-list replies that repeat it (UltraFeedback: they open with the user turn)
is treated as implicit, as TRL does; next to lists of reply turns alone it is the
user's message.

Column names, and the role/content keys of messages, come from ``Columns``.
"""

from __future__ import annotations

import dataclasses
import difflib
from jaxrlhf.data.config import Columns
from jaxrlhf.data.errors import DataError, Origin

__all__ = ["Chat", "Plain", "Text", "Pair", "parse_sft", "parse_preference", "record_origin"]

SFT_FORMATS = ("messages", "prompt_completion", "text")
# Roles chat templates render; another (a misspelled "asistant") would render as a turn of its own, and the
# reply it was meant to be would silently go untrained.
KNOWN_ROLES = ("system", "user", "assistant", "tool", "developer", "ipython", "function")
PREFERENCE_FORMATS = ("preference", "implicit_preference")


@dataclasses.dataclass(frozen=True)
class Chat:
    """A conversation for the chat template; ``trained`` are the indices of the assistant turns trained."""

    messages: tuple[dict, ...]
    trained: tuple[int, ...]
    tools: tuple | None = None


@dataclasses.dataclass(frozen=True)
class Plain:
    """Untemplated ``prompt + completion`` (+ EOS)."""

    prompt: str
    completion: str


@dataclasses.dataclass(frozen=True)
class Text:
    """Untemplated text, all of it trained (+ EOS)."""

    text: str


@dataclasses.dataclass(frozen=True)
class Pair:
    """A preference pair: one prompt, two replies (strings, or message tuples for the template)."""

    prompt: str | tuple[dict, ...]
    chosen: str | tuple[dict, ...]
    rejected: str | tuple[dict, ...]
    tools: tuple | None = None

    @property
    def identical(self) -> bool:
        return self.chosen == self.rejected

    @property
    def same_up_to_whitespace(self) -> bool:
        """The replies are equal once runs of whitespace are collapsed (a real preference has words in it)."""
        return _collapse(self.chosen) == _collapse(self.rejected)

    def side(self, which: str) -> Chat | Plain:
        reply = self.chosen if which == "chosen" else self.rejected
        if isinstance(reply, str):
            return Plain(self.prompt, reply)
        messages = tuple(self.prompt) + reply
        trained = tuple(len(self.prompt) + i for i, m in enumerate(reply) if m["role"] == "assistant")
        return Chat(messages, trained, self.tools)


def _collapse(reply):
    if isinstance(reply, str):
        return " ".join(reply.split())
    return tuple({**m, "content": _collapse(m.get("content") or "")} for m in reply)


def record_origin(record: dict, origin: Origin | None, columns: Columns) -> Origin | None:
    """``origin`` with the record's own id (``columns.id``) attached, for error messages."""
    record_id = record.get(columns.id)
    if origin is None or record_id is None:
        return origin
    return dataclasses.replace(origin, record_id=str(record_id))


def _field(record: dict, name: str, origin, *, kind: str):
    if name not in record or record[name] is None:
        present = ", ".join(repr(k) for k in record) or "none"
        raise DataError(origin, f"missing; this {kind} record needs it (fields present: {present})", field=name)
    return record[name]


def _string(value, name: str, origin, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(origin, f"expected a string, got {type(value).__name__}", field=name)
    if not allow_empty and not value.strip():
        raise DataError(origin, "empty completion: there is nothing to train on", field=name)
    return value


def _messages(
    value, name: str, origin, columns: Columns, *, replies: bool = True
) -> tuple[tuple[dict, ...], tuple[bool, ...]]:
    """Normalized messages (keys ``role``/``content`` + the template's extras) and whether each is trained.

    ``replies=False`` for prompts: their assistant turns (few-shot examples) are context, never trained.
    """
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(origin, f"expected a non-empty list of messages, got {type(value).__name__}", field=name)
    messages, trainable = [], []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise DataError(origin, f"expected a message object, got {type(message).__name__}", field=where)
        role = message.get(columns.role)
        if not isinstance(role, str) or not role:
            raise DataError(origin, "missing or not a string", field=f"{where}.{columns.role}")
        if role not in KNOWN_ROLES:
            close = difflib.get_close_matches(role, KNOWN_ROLES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(
                origin, f"unknown role {role!r}{hint}; chat templates know {', '.join(KNOWN_ROLES)}",
                field=f"{where}.{columns.role}",
            )  # fmt: skip
        content = message.get(columns.content)
        tool_calls = message.get("tool_calls")
        if content is None and role == "assistant" and tool_calls:
            content = ""
        if not isinstance(content, str):
            raise DataError(
                origin, f"expected a string, got {type(content).__name__}", field=f"{where}.{columns.content}"
            )
        # Arrow tables fill keys that only some messages have with None.
        weight = 1 if message.get("weight") is None else message["weight"]
        if weight not in (0, 1):
            raise DataError(origin, f"expected 0 or 1, got {weight!r}", field=f"{where}.weight")
        extras = {k: v for k, v in message.items() if k not in (columns.role, columns.content, "weight")}
        messages.append({"role": role, "content": content, **extras})
        trainable.append(replies and role == "assistant" and weight == 1)
        if trainable[-1] and not content.strip() and not tool_calls:
            raise DataError(
                origin, "empty completion: an assistant turn with no text", field=f"{where}.{columns.content}"
            )
    return tuple(messages), tuple(trainable)


def _tools(record: dict, columns: Columns, origin) -> tuple | None:
    tools = record.get(columns.tools)
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools):
        raise DataError(origin, "expected a list of tool schemas (objects)", field=columns.tools)
    return tuple(tools)


def _sft_format(record: dict, columns: Columns, fmt: str, origin) -> str:
    if fmt != "auto":
        if fmt not in SFT_FORMATS:
            raise DataError(origin, f"format {fmt!r} is a preference format; SFT reads {', '.join(SFT_FORMATS)}")
        return fmt
    if columns.messages in record:
        return "messages"
    if columns.prompt in record and columns.completion in record:
        return "prompt_completion"
    if columns.text in record:
        return "text"
    present = ", ".join(repr(k) for k in record) or "none"
    raise DataError(
        origin,
        f"no SFT fields: expected {columns.messages!r}, {columns.prompt!r} + {columns.completion!r}, or"
        f" {columns.text!r} (fields present: {present}); set the dataset's `columns` if they are named differently",
    )


def parse_sft(record: dict, *, columns: Columns | None = None, fmt: str = "auto", origin=None) -> Chat | Plain | Text:
    """One SFT record -> ``Chat``, ``Plain`` or ``Text``; a ``DataError`` names the bad field."""
    columns = columns or Columns()
    origin = record_origin(record, origin, columns)
    fmt = _sft_format(record, columns, fmt, origin)
    if fmt == "text":
        return Text(_string(_field(record, columns.text, origin, kind="text"), columns.text, origin))
    if fmt == "messages":
        messages, trainable = _messages(
            _field(record, columns.messages, origin, kind="messages"), columns.messages, origin, columns
        )
        trained = tuple(i for i, t in enumerate(trainable) if t)
        if not trained:
            raise DataError(origin, "no assistant turn to train on", field=columns.messages)
        return Chat(messages, trained, _tools(record, columns, origin))
    prompt = _field(record, columns.prompt, origin, kind="prompt/completion")
    completion = _field(record, columns.completion, origin, kind="prompt/completion")
    for name, value in ((columns.prompt, prompt), (columns.completion, completion)):
        if not isinstance(value, (str, list, tuple)):
            raise DataError(origin, f"expected a string or a list of messages, got {type(value).__name__}", field=name)
    if isinstance(prompt, str) and isinstance(completion, str):
        return Plain(
            _string(prompt, columns.prompt, origin, allow_empty=True), _string(completion, columns.completion, origin)
        )
    if isinstance(prompt, (list, tuple)) and isinstance(completion, (list, tuple)):
        prompt_messages, _ = _messages(prompt, columns.prompt, origin, columns, replies=False)
        completion_messages, trainable = _messages(completion, columns.completion, origin, columns)
        trained = tuple(len(prompt_messages) + i for i, t in enumerate(trainable) if t)
        if not trained:
            raise DataError(origin, "no assistant turn to train on", field=columns.completion)
        return Chat(prompt_messages + completion_messages, trained, _tools(record, columns, origin))
    raise DataError(
        origin,
        f"prompt and completion must both be strings or both be message lists, got"
        f" {type(prompt).__name__} and {type(completion).__name__}",
        field=columns.completion,
    )


def _common_prefix_split(chosen: str, rejected: str) -> tuple[str, str, str]:
    """hh-rlhf style: the longest common prefix is the prompt, cut back to a word boundary."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1

    def word_char(text: str, i: int) -> bool:
        return i < len(text) and text[i].isalnum()

    # Diverging inside a word ("Sure" / "Sorry"): start the replies at that word.
    if word_char(chosen, n - 1) and (word_char(chosen, n) or word_char(rejected, n)):
        while n > 0 and chosen[n - 1].isalnum():
            n -= 1
    # The space before a word belongs to the word's token (" Sure"): give it to the replies.
    if n > 0 and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _check_reply_turns(messages: tuple[dict, ...], name: str, origin, offset: int, implicit: bool) -> None:
    for i, message in enumerate(messages):
        if message["role"] not in ("assistant", "tool"):
            if implicit:
                raise DataError(
                    origin,
                    f"chosen and rejected have different prompts: after their {offset} common leading messages,"
                    f" {name}[{offset + i}] is a {message['role']!r} turn; a pair must share everything but the reply",
                    field=name,
                )
            raise DataError(
                origin,
                f"{name}[{i}] is a {message['role']!r} turn; with an explicit prompt, chosen and rejected hold only"
                " the reply (assistant/tool turns); drop the prompt column to have the shared prompt extracted",
                field=name,
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(origin, "no assistant turn to train on", field=name)


def _preference_format(record: dict, columns: Columns, fmt: str, origin) -> str:
    if fmt not in ("auto",) + PREFERENCE_FORMATS:
        raise DataError(origin, f"format {fmt!r} is an SFT format; DPO reads {', '.join(PREFERENCE_FORMATS)}")
    if fmt == "auto":
        fmt = "preference" if columns.prompt in record else "implicit_preference"
    # A string prompt next to message-list replies that repeat it (UltraFeedback: the lists open with the
    # user turn): implicit. Lists of reply turns alone keep the prompt, as one user message.
    chosen = record.get(columns.chosen)
    if (
        fmt == "preference"
        and isinstance(record.get(columns.prompt), str)
        and isinstance(chosen, (list, tuple))
        and chosen
        and isinstance(chosen[0], dict)
        and chosen[0].get(columns.role) != "assistant"
    ):
        fmt = "implicit_preference"
    return fmt


def parse_preference(record: dict, *, columns: Columns | None = None, fmt: str = "auto", origin=None) -> Pair:
    """One DPO record -> ``Pair`` (implicit prompts extracted); a ``DataError`` names the bad field."""
    columns = columns or Columns()
    origin = record_origin(record, origin, columns)
    fmt = _preference_format(record, columns, fmt, origin)
    chosen = _field(record, columns.chosen, origin, kind="preference")
    rejected = _field(record, columns.rejected, origin, kind="preference")
    tools = _tools(record, columns, origin)
    if isinstance(chosen, str) != isinstance(rejected, str) or not isinstance(chosen, (str, list, tuple)):
        raise DataError(
            origin,
            f"chosen and rejected must both be strings or both be message lists, got {type(chosen).__name__}"
            f" and {type(rejected).__name__}",
            field=columns.rejected,
        )
    if fmt == "implicit_preference":
        if isinstance(chosen, str):
            prompt, chosen_reply, rejected_reply = _common_prefix_split(chosen, rejected)
            if chosen_reply != rejected_reply:  # identical pairs are judged by the caller's policy
                _string(chosen_reply, columns.chosen, origin)
                _string(rejected_reply, columns.rejected, origin)
            return Pair(prompt, chosen_reply, rejected_reply, tools)
        chosen_messages, _ = _messages(chosen, columns.chosen, origin, columns)
        rejected_messages, _ = _messages(rejected, columns.rejected, origin, columns)
        n = 0
        while n < min(len(chosen_messages), len(rejected_messages)) and chosen_messages[n] == rejected_messages[n]:
            n += 1
        if chosen_messages == rejected_messages:
            # Identical conversations: the trailing assistant turns are the (identical) replies.
            while n > 0 and chosen_messages[n - 1]["role"] == "assistant":
                n -= 1
        pair = Pair(chosen_messages[:n], chosen_messages[n:], rejected_messages[n:], tools)
        if not pair.identical:
            for name, reply in ((columns.chosen, pair.chosen), (columns.rejected, pair.rejected)):
                _check_reply_turns(reply, name, origin, n, implicit=True)
        return pair
    prompt = _field(record, columns.prompt, origin, kind="preference")
    if isinstance(prompt, str) and not isinstance(chosen, str):
        # Reply turns after a string prompt: the prompt is the user's message (never dropped).
        _string(prompt, columns.prompt, origin)
        prompt = [{columns.role: "user", columns.content: prompt}]
    if isinstance(prompt, str):
        _string(prompt, columns.prompt, origin, allow_empty=True)
        if chosen != rejected:
            _string(chosen, columns.chosen, origin)
            _string(rejected, columns.rejected, origin)
        return Pair(prompt, chosen, rejected, tools)
    prompt_messages, _ = _messages(prompt, columns.prompt, origin, columns, replies=False)
    if isinstance(chosen, str):
        # A message-list prompt with string replies: each reply is one assistant turn.
        chosen, rejected = [{columns.role: "assistant", columns.content: r} for r in (chosen, rejected)]
        chosen, rejected = [chosen], [rejected]
    chosen_messages, _ = _messages(chosen, columns.chosen, origin, columns)
    rejected_messages, _ = _messages(rejected, columns.rejected, origin, columns)
    for name, reply in ((columns.chosen, chosen_messages), (columns.rejected, rejected_messages)):
        _check_reply_turns(reply, name, origin, 0, implicit=False)
    return Pair(prompt_messages, chosen_messages, rejected_messages, tools)
