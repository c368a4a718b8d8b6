"""Records -> encoded examples: ``{"tokens", "loss_mask"}``, 1-D int32, unpadded.

The loss-mask rule, for every format: the text is tokenized ONCE, whole, and

    a token is trained iff its first character lies inside an assistant span,

where an assistant span is the reply as the chat template renders it (some
templates trim it) plus its end-of-turn marker (``train_on_eot=False``: without
the marker); for ``{"text"}`` all of the text and the EOS. Tokens with no
characters (a BOS the tokenizer's post-processor adds) are never in a span. A
token that straddles a span's start (a BPE merge across the prompt/reply
boundary) starts in the prompt, so it is not trained; the tokens after it are
unaffected: the mask never shifts. Finally ``loss_mask[0] = 0``: the first token
has no context to be predicted from.

Untemplated prompt/completion strings (SFT, and DPO string pairs) follow
``string_boundary``. ``split`` (the default): the prompt is tokenized alone, as
generation will see it, the completion alone after it, and every completion
token plus the EOS is trained, so a prompt ending inside a merge ("Answer: " +
"yes" is ``' y'`` whole) cannot take the reply's first characters with it.
``whole``: the concatenated text is tokenized once and the rule above applies
(the merged token is not trained; ``boundary_merged`` tells when that happens).

Rendered templates are tokenized with ``add_special_tokens=False`` (the template
writes its own BOS); plain strings with the tokenizer's special tokens (as TRL).

Length limits apply before packing, identically to both sides of a DPO pair:
an example longer than ``max_length`` (or whose prompt/completion exceeds
``max_prompt_length``/``max_completion_length``) is dropped, or with
``truncation="truncate_prompt"`` loses prompt tokens from the left, right after
the system turn (which is kept, with the first message's header). A completion
is never cut. Drops raise ``ExampleDropped(reason)``; bad records ``DataError``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from jaxrlhf.data import chat as chat_lib
from jaxrlhf.data import control_tokens
from jaxrlhf.data import validate
from jaxrlhf.data.config import Columns
from jaxrlhf.data.errors import DataError, ExampleDropped
from jaxrlhf.data.formats import Chat, Plain, Text, parse_preference, parse_sft, record_origin

__all__ = ["boundary_merged", "encode_dpo", "encode_sft", "encode_sft_examples"]


@dataclasses.dataclass
class _Sequence:
    tokens: np.ndarray  # int32 [n]
    mask: np.ndarray  # int32 [n]
    ends: np.ndarray  # end character of each token (appended EOS: len(text))
    protected_chars: Callable[[], int]  # characters prompt truncation keeps (computed only when truncating)

    @property
    def prompt_tokens(self) -> int:
        """Tokens before the first trained one."""
        return int(np.argmax(self.mask)) if self.mask.any() else len(self.mask)


@functools.lru_cache(maxsize=8)
def _special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's post-processor puts before and after a text (a BOS, sometimes an EOS)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(framed) - len(bare) + 1):
        if framed[i : i + len(bare)] == bare:
            return framed[:i], framed[i + len(bare) :]
    return [], []


def _ids_and_offsets(tokenizer, text: str, *, add_special_tokens: bool, literal=()) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and character offsets of ``text``; the ``literal`` ranges are tokenized as plain text
    (special tokens split), each alone, the rest as usual."""
    if not literal:
        encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        offsets = np.asarray(encoding["offset_mapping"], np.int64).reshape(-1, 2)
        return np.asarray(encoding["input_ids"], np.int32), offsets
    pieces, position = [], 0
    for start, end in literal:
        pieces += [(position, start, False), (start, end, True)]
        position = end
    pieces.append((position, len(text), False))
    ids, offsets = [], []
    for start, end, is_literal in pieces:
        if start == end:
            continue
        encoding = tokenizer(
            text[start:end], add_special_tokens=False, split_special_tokens=is_literal, return_offsets_mapping=True
        )
        ids += encoding["input_ids"]
        offsets += [(a + start, b + start) for a, b in encoding["offset_mapping"]]
    if add_special_tokens:
        before, after = _special_frame(tokenizer)
        ids = [*before, *ids, *after]
        offsets = [(0, 0)] * len(before) + offsets + [(0, 0)] * len(after)
    return np.asarray(ids, np.int32), np.asarray(offsets, np.int64).reshape(-1, 2)


def _tokenize(tokenizer, text: str, spans, *, add_special_tokens: bool, literal=()):
    tokens, offsets = _ids_and_offsets(tokenizer, text, add_special_tokens=add_special_tokens, literal=literal)
    starts, ends = offsets[:, 0], offsets[:, 1]
    trained = np.zeros(len(tokens), bool)
    for a, b in spans:
        trained |= (starts >= a) & (starts < b)
    trained &= ends > starts  # tokens with no characters (post-processor BOS) are never trained
    return tokens, trained.astype(np.int32), ends


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; plain prompt/completion and text examples end with EOS")
    return int(tokenizer.eos_token_id)


def _literal_ranges(tokenizer, text: str, *, ends_reply: bool) -> list[tuple[int, int]]:
    """Special-token text to tokenize as text; an EOS that ends a reply stays the EOS it was meant to be."""
    ranges = control_tokens.literal_ranges(text, tokenizer)
    if ends_reply and ranges and ranges[-1][1] == len(text) and text[ranges[-1][0] :] == tokenizer.eos_token:
        ranges = ranges[:-1]
    return ranges


def _split_plain(tokenizer, prompt: str, completion: str, *, literal: bool):
    """Prompt tokens (with the tokenizer's special tokens around them), then the completion's own tokens."""
    prompt_literal = _literal_ranges(tokenizer, prompt, ends_reply=False) if literal else ()
    ids, offsets = _ids_and_offsets(tokenizer, prompt, add_special_tokens=True, literal=prompt_literal)
    # Special tokens the post-processor appends after the text (an EOS) belong after the completion.
    real = np.flatnonzero(offsets[:, 1] > offsets[:, 0])
    body_end = int(real[-1]) + 1 if len(real) else int(np.sum(np.cumprod(offsets[:, 1] == 0)))
    reply_literal = _literal_ranges(tokenizer, completion, ends_reply=True) if literal else ()
    reply_ids, reply_offsets = _ids_and_offsets(tokenizer, completion, add_special_tokens=False, literal=reply_literal)
    reply_ends = reply_offsets[:, 1] + len(prompt)
    text_end = len(prompt) + len(completion)
    tokens = np.concatenate([ids[:body_end], reply_ids, ids[body_end:]])
    after = len(ids) - body_end
    mask = np.concatenate([np.zeros(body_end, np.int32), np.ones(len(reply_ids), np.int32), np.zeros(after, np.int32)])
    ends = np.concatenate([offsets[:body_end, 1], reply_ends, np.full(after, text_end)])
    return tokens, mask, ends


def _plain(tokenizer, prompt: str, completion: str, *, string_boundary: str, literal: bool) -> _Sequence:
    text = prompt + completion
    if string_boundary == "split" and prompt:  # without a prompt there is no boundary to split at
        tokens, mask, ends = _split_plain(tokenizer, prompt, completion, literal=literal)
    else:
        ranges = _literal_ranges(tokenizer, text, ends_reply=True) if literal else ()
        tokens, mask, ends = _tokenize(
            tokenizer, text, [(len(prompt), len(text))], add_special_tokens=True, literal=ranges
        )
    eos = _eos_id(tokenizer)
    if len(tokens) and tokens[-1] == eos:  # the text (or the post-processor) already ends with EOS
        mask[-1] = 1
    else:
        tokens = np.append(tokens, np.int32(eos))
        mask = np.append(mask, np.int32(1))
        ends = np.append(ends, len(text))
    return _Sequence(tokens, mask, ends, lambda: 0)


def _hide_specials(chat: Chat, literals: control_tokens.Literals) -> Chat:
    messages = tuple(
        {**m, "content": literals.hide(m["content"])} if isinstance(m.get("content"), str) else m for m in chat.messages
    )
    return dataclasses.replace(chat, messages=messages)


def _chat_sequence(tokenizer, chat: Chat, rendered, literals, *, template, label, origin) -> _Sequence:
    text, spans, ranges, where = rendered.text, rendered.spans, (), None
    if literals is not None:
        text, ranges, where = literals.reveal(rendered.text)
        spans = [(int(where[a]), int(where[b])) for a, b in spans]
    tokens, mask, ends = _tokenize(tokenizer, text, spans, add_special_tokens=False, literal=ranges)
    prefix = functools.partial(
        chat_lib.protected_prefix, tokenizer, chat, rendered.text, template=template, label=label, origin=origin
    )
    protected = prefix if where is None else (lambda: int(where[prefix()]))
    return _Sequence(tokens, mask, ends, protected)


def _chat(
    tokenizer, chat: Chat, *, template, label, train_on_eot, origin, specials: str, per_turn: bool
) -> list[_Sequence]:
    """One sequence, or with ``per_turn`` (SFT) one per trained turn when the template is not prefix-stable."""
    literals = None
    if control_tokens.find_in_chat(chat.messages, tokenizer, specials, origin):
        literals = control_tokens.Literals(control_tokens.special_tokens(tokenizer))
        chat = _hide_specials(chat, literals)
    kw = dict(template=template, label=label, train_on_eot=train_on_eot, origin=origin)
    if per_turn:
        renderings = chat_lib.render_turns(tokenizer, chat, **kw)
    else:
        renderings = [(chat, chat_lib.render_chat(tokenizer, chat, **kw))]
    return [
        _chat_sequence(tokenizer, c, r, literals, template=template, label=label, origin=origin) for c, r in renderings
    ]


def _sequences(
    example, tokenizer, *, chat_template, train_on_eot, origin, string_boundary, specials, reply_field="completion",
    per_turn=False,
) -> list[_Sequence]:  # fmt: skip
    if isinstance(example, (Plain, Text)):
        prompt, completion = (example.prompt, example.completion) if isinstance(example, Plain) else ("", example.text)
        # A reply that ends with the EOS token's text (as many datasets store it) means that EOS.
        eos = tokenizer.eos_token or ""
        reply = completion[: -len(eos)] if eos and completion.endswith(eos) else completion
        fields = {"prompt": prompt, reply_field: reply} if isinstance(example, Plain) else {"text": reply}
        literal = control_tokens.find_in_strings(fields, tokenizer, specials, origin)
        boundary = string_boundary if isinstance(example, Plain) else "whole"
        return [_plain(tokenizer, prompt, completion, string_boundary=boundary, literal=literal)]
    template = chat_lib.template_text(tokenizer, chat_template)
    if chat_template is None:
        label = "(the tokenizer's default)"
    else:
        label = repr(chat_template) if len(chat_template) < 200 else "(inline template)"
    return _chat(
        tokenizer, example, template=template, label=label, train_on_eot=train_on_eot, origin=origin,
        specials=specials, per_turn=per_turn,
    )  # fmt: skip


def _fit(sequences: list[_Sequence], *, max_length, max_prompt_length, max_completion_length, truncation):
    """Apply the length limits to sequences sharing one prompt (1 for SFT, 2 for DPO); same cut for all."""
    for s in sequences:
        s.mask[0] = 0
        if not s.mask.any():
            raise ExampleDropped("no_trained_tokens", "no token starts inside a reply")
    prompt = min(s.prompt_tokens for s in sequences)
    if max_completion_length is not None:
        longest = max(len(s.tokens) - s.prompt_tokens for s in sequences)
        if longest > max_completion_length:
            raise ExampleDropped("completion_too_long", f"{longest} > max_completion_length={max_completion_length}")
    cut, reason = 0, "too_long"
    if max_prompt_length is not None and prompt > max_prompt_length:
        cut, reason = prompt - max_prompt_length, "prompt_too_long"
        if truncation == "drop":
            raise ExampleDropped(reason, f"{prompt} > max_prompt_length={max_prompt_length}")
    longest = max(len(s.tokens) for s in sequences)
    if longest - max_length > cut:
        cut, reason = longest - max_length, "too_long"
        if truncation == "drop":
            raise ExampleDropped(reason, f"{longest} > max_length={max_length}")
    if cut == 0:
        return sequences
    # Only tokens all sequences share may go, and the first trained token must keep a token before it.
    shared = len(sequences[0].tokens)
    for s in sequences[1:]:
        n = min(shared, len(s.tokens))
        shared = int(np.argmin(np.append(s.tokens[:n] == sequences[0].tokens[:n], False)))
    keep_chars = sequences[0].protected_chars()
    keep = max(int(np.sum(s.ends <= keep_chars)) for s in sequences)
    if keep + cut > min(shared, prompt - 1):
        raise ExampleDropped(reason, f"cutting {cut} prompt tokens would reach the system turn or the reply")
    return [
        _Sequence(
            np.concatenate([s.tokens[:keep], s.tokens[keep + cut :]]),
            np.concatenate([s.mask[:keep], s.mask[keep + cut :]]),
            np.concatenate([s.ends[:keep], s.ends[keep + cut :]]),
            s.protected_chars,
        )
        for s in sequences
    ]


def _output(s: _Sequence, max_length: int, origin) -> dict[str, np.ndarray]:
    example = {"tokens": s.tokens.astype(np.int32), "loss_mask": s.mask.astype(np.int32)}
    validate.check_example(example, max_length=max_length, origin=origin)
    return example


def encode_sft_examples(
    record: dict,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    truncation: str = "drop",
    train_on_eot: bool = True,
    chat_template: str | None = None,
    string_boundary: str = "split",
    special_tokens_in_content: str = "error",
    columns: Columns | None = None,
    fmt: str = "auto",
    origin=None,
) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """One SFT record -> ``(examples, drop reasons)``: one example, or one per trained assistant turn of a
    conversation whose template is not prefix-stable (see ``chat``), each fitted to the length limits alone.

    Raises ``DataError`` for a bad record and ``ExampleDropped`` when every example is dropped.
    """
    validate.check_truncation(truncation)
    validate.check_string_boundary(string_boundary)
    control_tokens.check_policy(special_tokens_in_content)
    columns = columns or Columns()
    origin = record_origin(record, origin, columns)
    example = parse_sft(record, columns=columns, fmt=fmt, origin=origin)
    sequences = _sequences(
        example, tokenizer, chat_template=chat_template, train_on_eot=train_on_eot, origin=origin,
        string_boundary=string_boundary, specials=special_tokens_in_content, per_turn=True,
    )  # fmt: skip
    examples, dropped = [], []
    for sequence in sequences:
        try:
            (fitted,) = _fit(
                [sequence],
                max_length=max_length,
                max_prompt_length=max_prompt_length,
                max_completion_length=max_completion_length,
                truncation=truncation,
            )
        except ExampleDropped as e:
            if len(sequences) == 1:
                raise
            dropped.append(e.reason)
            continue
        examples.append(_output(fitted, max_length, origin))
    if not examples:
        raise ExampleDropped(dropped[0], f"all {len(sequences)} turns of the conversation were dropped")
    return examples, dropped


def encode_sft(record: dict, tokenizer, *, max_length: int, **options) -> dict[str, np.ndarray]:
    """One SFT record -> ``{"tokens", "loss_mask"}`` (1-D int32, unpadded, ``len <= max_length``); ``options``
    are those of ``encode_sft_examples``.

    Raises ``DataError`` for a bad record and ``ExampleDropped`` for one the length
    policy leaves out. The mask rule is in this module's docstring. A conversation
    whose template is not prefix-stable and that trains several assistant turns
    encodes to one example per turn: ``encode_sft_examples`` returns them.
    """
    examples, dropped = encode_sft_examples(record, tokenizer, max_length=max_length, **options)
    if len(examples) + len(dropped) > 1:
        raise DataError(
            record_origin(record, options.get("origin"), options.get("columns") or Columns()),
            f"encodes to {len(examples) + len(dropped)} examples (one per assistant turn: the chat template is not "
            "prefix-stable): use encode_sft_examples",
        )
    return examples[0]


def encode_dpo(
    record: dict,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    truncation: str = "drop",
    train_on_eot: bool = True,
    on_identical_pairs: str = "error",
    chat_template: str | None = None,
    string_boundary: str = "split",
    special_tokens_in_content: str = "error",
    columns: Columns | None = None,
    fmt: str = "auto",
    origin=None,
) -> dict[str, dict[str, np.ndarray]]:
    """One preference record -> ``{"chosen": {"tokens", "loss_mask"}, "rejected": {...}}``.

    Both sides share the prompt text and get the same truncation; identical pairs
    follow ``on_identical_pairs`` ("error", "drop" or "allow").
    """
    validate.check_truncation(truncation)
    columns = columns or Columns()
    origin = record_origin(record, origin, columns)
    pair = parse_preference(record, columns=columns, fmt=fmt, origin=origin)
    validate.check_pair(pair.identical, on_identical_pairs, origin)
    validate.check_pair(
        pair.same_up_to_whitespace and not pair.identical, on_identical_pairs, origin, what="differ only in whitespace"
    )
    validate.check_string_boundary(string_boundary)
    control_tokens.check_policy(special_tokens_in_content)
    kw = dict(
        chat_template=chat_template, train_on_eot=train_on_eot, origin=origin, string_boundary=string_boundary,
        specials=special_tokens_in_content,
    )  # fmt: skip
    sides = [_sequences(pair.side(which), tokenizer, reply_field=which, **kw)[0] for which in ("chosen", "rejected")]
    # Replies that differ only in what the template trims (whitespace) still make the same tokens.
    same_tokens = np.array_equal(sides[0].tokens, sides[1].tokens) and np.array_equal(sides[0].mask, sides[1].mask)
    validate.check_pair(
        same_tokens and not pair.identical, on_identical_pairs, origin, what="encode to the same tokens"
    )
    chosen, rejected = _fit(
        sides,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        truncation=truncation,
    )
    return {"chosen": _output(chosen, max_length, origin), "rejected": _output(rejected, max_length, origin)}



def boundary_merged(record: dict, tokenizer, *, task: str, columns: Columns | None = None, fmt: str = "auto") -> bool:
    """Whether a plain-string record's prompt ends inside a token of the whole text: the case where
    ``string_boundary: whole`` leaves the reply's first characters untrained (``split`` trains them)."""
    columns = columns or Columns()
    origin = record_origin(record, None, columns)
    if task == "sft":
        sides = [parse_sft(record, columns=columns, fmt=fmt, origin=origin)]
    else:
        pair = parse_preference(record, columns=columns, fmt=fmt, origin=origin)
        sides = [pair.side(which) for which in ("chosen", "rejected")]
    for side in sides:
        if isinstance(side, Plain) and side.prompt:
            offsets = tokenizer(side.prompt + side.completion, return_offsets_mapping=True)["offset_mapping"]
            if any(start < len(side.prompt) < end for start, end in offsets):
                return True
    return False
