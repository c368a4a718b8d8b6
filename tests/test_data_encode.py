"""encode_sft / encode_dpo: the loss-mask rule on every template, against independent references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from data_fixtures import (
    TEMPLATES,
    contents,
    conversations,
    decoded_spans,
    end_of_turn,
    expected_rendering,
    rule_mask,
    straddles,
    token_bytes,
    tokenizer,
)
from jaxrlhf.data import DataError, ExampleDropped, encode_dpo, encode_sft

TOK = tokenizer()
EOS = TOK.eos_token_id
BOS = TOK.bos_token_id


def pieces(ids):
    return [b.decode(errors="replace") for b in token_bytes(TOK, ids)]


def trained_pieces(example):
    return [p for p, m in zip(pieces(example["tokens"]), example["loss_mask"]) if m]


# --- Regression cases from other projects' bugs --------------------------------------------------


def test_openrlhf_case_prompt_hello_response_world():
    # OpenRLHF #973 dropped the first response token: here ',' and every other response token and EOS train.
    ex = encode_sft({"prompt": "Hello", "completion": ", World !"}, TOK, max_length=32)
    assert pieces(ex["tokens"]) == ["<|begin_of_text|>", "Hello", ",", " World", " ", "!", "<|endoftext|>"]
    np.testing.assert_array_equal(ex["loss_mask"], [0, 0, 1, 1, 1, 1, 1])
    assert ex["tokens"].dtype == np.int32 and ex["loss_mask"].dtype == np.int32


def test_minimind_case_chatml_first_answer_token_trained_nothing_after_end_of_turn():
    # MiniMind dropped the first answer token and trained the token after <|im_end|>.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    ex = encode_sft({"messages": messages}, TOK, max_length=64)
    p = pieces(ex["tokens"])
    first_answer = p.index("Hello")
    assert p[first_answer - 3 : first_answer] == ["<|im_start|>", "assistant", "\n"]
    assert ex["loss_mask"][first_answer] == 1 and ex["loss_mask"][first_answer - 1] == 0
    assert trained_pieces(ex) == ["Hello", " there", "<|im_end|>"]
    assert p[-1] == "\n" and ex["loss_mask"][-1] == 0


# --- The rule, property-tested on every template ----------------------------------------------------


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t or "chatml")
@given(messages=conversations(), train_on_eot=st.booleans())
def test_chat_mask_is_exactly_the_rule(template, messages, train_on_eot):
    text, spans = expected_rendering(template, messages)
    assert TOK.apply_chat_template(messages, tokenize=False, chat_template=template) == text
    if not train_on_eot:
        spans = [(a, b - len(end_of_turn(template))) for a, b in spans]
    ex = encode_sft({"messages": messages}, TOK, max_length=4096, chat_template=template, train_on_eot=train_on_eot)
    assert b"".join(token_bytes(TOK, ex["tokens"])) == text.encode()
    np.testing.assert_array_equal(ex["loss_mask"], rule_mask(TOK, ex["tokens"], text, spans))
    if not straddles(TOK, ex["tokens"], text, spans):
        assert decoded_spans(TOK, ex["tokens"], ex["loss_mask"]) == [text[a:b] for a, b in spans]


def test_generation_marker_template_agrees_with_transformers_assistant_mask():
    # transformers reads {% generation %} blocks itself: an independent reference for that template.
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "reverse: red cat"},
        {"role": "assistant", "content": "cat red"},
        {"role": "user", "content": "count: a b c"},
        {"role": "assistant", "content": "three"},
    ]
    ref = TOK.apply_chat_template(
        messages, chat_template="chatml_generation", return_assistant_tokens_mask=True, return_dict=True
    )
    ex = encode_sft({"messages": messages}, TOK, max_length=256, chat_template="chatml_generation")
    np.testing.assert_array_equal(ex["tokens"], ref["input_ids"])
    np.testing.assert_array_equal(ex["loss_mask"], ref["assistant_masks"])


def test_merge_across_the_reply_boundary_does_not_shift_the_mask():
    # "assistant\n" + "\n\nok": Qwen's pre-tokenizer keeps the newline run whole, so one token
    # starts in the header and ends in the reply. It starts in the prompt: untrained; "ok" is not shifted.
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n\nok"}]
    text, spans = expected_rendering(None, messages)
    ex = encode_sft({"messages": messages}, TOK, max_length=64)
    assert straddles(TOK, ex["tokens"], text, spans)
    np.testing.assert_array_equal(ex["loss_mask"], rule_mask(TOK, ex["tokens"], text, spans))
    assert pieces(ex["tokens"])[-6:-4] == ["\n\n", "\n"]  # header newline + first reply newline, then the last one
    assert trained_pieces(ex) == ["\n", "o", "k", "<|im_end|>"]


def test_plain_completion_merged_into_the_prompt_token_with_whole_strings():
    ex = encode_sft({"prompt": "Hel", "completion": "lo"}, TOK, max_length=16, string_boundary="whole")
    assert pieces(ex["tokens"]) == ["<|begin_of_text|>", "Hello", "<|endoftext|>"]
    np.testing.assert_array_equal(ex["loss_mask"], [0, 0, 1])  # the straddling token starts in the prompt


def test_split_strings_train_the_first_reply_characters_a_merge_would_take():
    record = {"prompt": "Answer: ", "completion": "yes"}
    whole = encode_sft(record, TOK, max_length=16, string_boundary="whole")
    assert trained_pieces(whole) == ["es", "<|endoftext|>"]  # ' y' starts in the prompt: "y" never trained
    split = encode_sft(record, TOK, max_length=16)
    assert trained_pieces(split) == ["y", "es", "<|endoftext|>"]
    # The prompt is exactly what generation is given: the prompt tokenized alone.
    prompt_ids = TOK("Answer: ", add_special_tokens=True)["input_ids"]
    np.testing.assert_array_equal(split["tokens"][: len(prompt_ids)], prompt_ids)
    pair = encode_dpo({"prompt": "Answer: ", "chosen": "yes", "rejected": "no"}, TOK, max_length=16)
    assert "".join(trained_pieces(pair["chosen"])) == "yes<|endoftext|>"
    assert "".join(trained_pieces(pair["rejected"])) == "no<|endoftext|>"


@given(prompt=contents(), completion=contents())
def test_split_strings_train_every_completion_character(prompt, completion):
    ex = encode_sft({"prompt": prompt, "completion": completion}, TOK, max_length=4096)
    prompt_ids = TOK(prompt, add_special_tokens=True)["input_ids"]
    n = len(prompt_ids)
    np.testing.assert_array_equal(ex["tokens"][:n], prompt_ids)
    np.testing.assert_array_equal(ex["loss_mask"], [0] * n + [1] * (len(ex["tokens"]) - n))
    assert b"".join(token_bytes(TOK, ex["tokens"][n:-1])).decode() == completion and ex["tokens"][-1] == EOS


@given(prompt=contents(nonblank=False), completion=contents())
def test_plain_prompt_completion_rule_with_whole_strings(prompt, completion):
    ex = encode_sft({"prompt": prompt, "completion": completion}, TOK, max_length=4096, string_boundary="whole")
    ids = ex["tokens"]
    assert ids[0] == BOS and ids[-1] == EOS and list(ids).count(BOS) == 1
    text = prompt + completion
    expected = rule_mask(TOK, ids[:-1], text, [(len(prompt), len(text))], skip=1)
    np.testing.assert_array_equal(ex["loss_mask"], np.append(expected, 1))


def test_text_format_trains_everything_after_position_zero_and_eos():
    ex = encode_sft({"text": "Hello world"}, TOK, max_length=16)
    assert pieces(ex["tokens"])[0] == "<|begin_of_text|>" and ex["tokens"][-1] == EOS
    np.testing.assert_array_equal(ex["loss_mask"], [0] + [1] * (len(ex["tokens"]) - 1))


def test_completion_already_ending_with_eos_gets_no_second_eos():
    ex = encode_sft({"prompt": "a", "completion": " b<|endoftext|>"}, TOK, max_length=16)
    assert list(ex["tokens"]).count(EOS) == 1 and ex["loss_mask"][-1] == 1


def test_llama3_template_has_exactly_one_bos():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ex = encode_sft({"messages": messages}, TOK, max_length=64, chat_template="llama3")
    assert list(ex["tokens"]).count(BOS) == 1 and ex["tokens"][0] == BOS


def test_conversational_prompt_completion_trains_only_the_completion():
    record = {
        "prompt": [
            {"role": "user", "content": "first: a b"},
            {"role": "assistant", "content": "a"},  # a few-shot turn: context, not trained
            {"role": "user", "content": "first: c d"},
        ],
        "completion": [{"role": "assistant", "content": "c"}],
    }
    ex = encode_sft(record, TOK, max_length=128)
    assert trained_pieces(ex) == ["c", "<|im_end|>"]


def test_weight_zero_assistant_turn_is_context():
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "bad answer", "weight": 0},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "good"},
    ]
    ex = encode_sft({"messages": messages}, TOK, max_length=128)
    assert "".join(trained_pieces(ex)) == "good<|im_end|>"


CALL = {"name": "add", "arguments": {"a": 2, "b": 3}}


def test_tool_calls_are_trained_tool_results_are_not():
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "add 2 and 3"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": CALL}]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "five"},
    ]
    ex = encode_sft({"messages": messages, "tools": tools}, TOK, max_length=512)
    text = TOK.decode(ex["tokens"])
    trained = decoded_spans(TOK, ex["tokens"], ex["loss_mask"])
    call = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call><|im_end|>'
    assert trained == [call, "five<|im_end|>"]
    assert "<tool_response>\n5\n</tool_response>" in text


# --- DPO ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t or "chatml")
@given(prompt=conversations(max_turns=2), chosen=contents(), rejected=contents())
def test_dpo_sides_follow_the_rule_and_share_the_prompt_tokens(template, prompt, chosen, rejected):
    prompt = prompt[:-1]  # end on a user turn
    if chosen.strip() == rejected.strip():  # Llama 3 trims replies: keep the pair distinct after trimming
        rejected += " no"
    record = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }
    out = encode_dpo(record, TOK, max_length=4096, chat_template=template)
    clean = True
    for side, reply in (("chosen", chosen), ("rejected", rejected)):
        text, spans = expected_rendering(template, prompt + [{"role": "assistant", "content": reply}])
        spans = spans[-1:]  # only the reply is trained; the prompt's assistant turns are context
        ex = out[side]
        np.testing.assert_array_equal(ex["loss_mask"], rule_mask(TOK, ex["tokens"], text, spans))
        clean &= not straddles(TOK, ex["tokens"], text, spans)
    if clean:
        c, r = out["chosen"], out["rejected"]
        p = int(np.argmax(c["loss_mask"]))
        assert p == int(np.argmax(r["loss_mask"]))
        np.testing.assert_array_equal(c["tokens"][:p], r["tokens"][:p])


def test_implicit_prompt_from_message_lists():
    shared = [{"role": "user", "content": "sort: b a"}]
    record = {
        "chosen": shared + [{"role": "assistant", "content": "a b."}],
        "rejected": shared + [{"role": "assistant", "content": "b a."}],
    }
    out = encode_dpo(record, TOK, max_length=128)
    assert trained_pieces(out["chosen"])[-1] == "<|im_end|>"
    assert "".join(trained_pieces(out["chosen"])) == "a b.<|im_end|>"
    assert "".join(trained_pieces(out["rejected"])) == "b a.<|im_end|>"


@given(shared=contents(nonblank=False), chosen=contents(), rejected=contents())
def test_implicit_prompt_from_strings_keeps_every_character(shared, chosen, rejected):
    if chosen.split() == rejected.split():  # equal up to whitespace: refused as no preference at all
        rejected += "!"
    record = {"chosen": shared + chosen, "rejected": shared + rejected}
    try:
        out = encode_dpo(record, TOK, max_length=4096)
    except DataError as e:  # one reply a prefix of the other: nothing left to train on that side
        assert "empty completion" in str(e)
        return
    for side in ("chosen", "rejected"):
        ex = out[side]
        assert b"".join(token_bytes(TOK, ex["tokens"][1:-1])).decode() == record[side]
        assert ex["loss_mask"][-1] == 1 and ex["tokens"][-1] == EOS


def test_hh_rlhf_prompt_ends_before_the_diverging_word():
    base = "\n\nHuman: hi\n\nAssistant:"
    out = encode_dpo({"chosen": base + " Sure thing", "rejected": base + " Sorry no"}, TOK, max_length=64)
    assert "".join(trained_pieces(out["chosen"])) == " Sure thing<|endoftext|>"
    assert "".join(trained_pieces(out["rejected"])) == " Sorry no<|endoftext|>"


def test_string_prompt_with_message_replies_is_extracted_like_ultrafeedback():
    conversation = [{"role": "user", "content": "first: x y"}]
    record = {
        "prompt": "first: x y",
        "chosen": conversation + [{"role": "assistant", "content": "x."}],
        "rejected": conversation + [{"role": "assistant", "content": "Y!"}],
    }
    out = encode_dpo(record, TOK, max_length=128)
    assert "".join(trained_pieces(out["chosen"])) == "x.<|im_end|>"


# --- Truncation --------------------------------------------------------------------------------------


def _long_chat(words: int):
    return {
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "word " * words},
            {"role": "assistant", "content": "ok"},
        ]
    }


def test_too_long_is_dropped_by_default():
    full = encode_sft(_long_chat(30), TOK, max_length=4096)
    with pytest.raises(ExampleDropped) as info:
        encode_sft(_long_chat(30), TOK, max_length=len(full["tokens"]) - 1)
    assert info.value.reason == "too_long"
    assert len(encode_sft(_long_chat(30), TOK, max_length=len(full["tokens"]))["tokens"]) == len(full["tokens"])


def test_truncate_prompt_cuts_from_the_left_keeping_the_system_turn():
    full = encode_sft(_long_chat(30), TOK, max_length=4096)
    cut = encode_sft(_long_chat(30), TOK, max_length=30, truncation="truncate_prompt")
    assert len(cut["tokens"]) == 30
    p = pieces(cut["tokens"])
    head = ["<|im_start|>", "system", "\n", "s", "y", "s", "<|im_end|>", "\n", "<|im_start|>", "user", "\n"]
    assert p[: len(head)] == head and pieces(full["tokens"])[: len(head)] == head
    # What follows is the end of the prompt and the whole reply, unchanged.
    np.testing.assert_array_equal(cut["tokens"][len(head) :], full["tokens"][-(30 - len(head)) :])
    np.testing.assert_array_equal(cut["loss_mask"][len(head) :], full["loss_mask"][-(30 - len(head)) :])


def test_max_prompt_length_and_max_completion_length():
    with pytest.raises(ExampleDropped) as info:
        encode_sft(_long_chat(30), TOK, max_length=4096, max_prompt_length=10)
    assert info.value.reason == "prompt_too_long"
    ex = encode_sft(_long_chat(30), TOK, max_length=4096, max_prompt_length=20, truncation="truncate_prompt")
    assert int(np.argmax(ex["loss_mask"])) == 20
    with pytest.raises(ExampleDropped) as info:
        encode_sft(_long_chat(3), TOK, max_length=4096, max_completion_length=1)
    assert info.value.reason == "completion_too_long"


def test_truncation_never_reaches_the_reply():
    with pytest.raises(ExampleDropped) as info:
        encode_sft(_long_chat(30), TOK, max_length=10, truncation="truncate_prompt")
    assert info.value.reason == "too_long"


def test_dpo_truncation_is_the_same_for_both_sides():
    prompt = [{"role": "system", "content": "sys"}, {"role": "user", "content": "word " * 30}]
    record = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "a short one"}],
        "rejected": [{"role": "assistant", "content": "a much longer reply with many more words in it"}],
    }
    full = encode_dpo(record, TOK, max_length=4096)
    out = encode_dpo(record, TOK, max_length=40, truncation="truncate_prompt")
    assert len(out["rejected"]["tokens"]) == 40
    removed = len(full["rejected"]["tokens"]) - 40
    for side in ("chosen", "rejected"):
        assert len(full[side]["tokens"]) - len(out[side]["tokens"]) == removed
        assert out[side]["loss_mask"].sum() == full[side]["loss_mask"].sum()
    pc, pr = (int(np.argmax(out[s]["loss_mask"])) for s in ("chosen", "rejected"))
    np.testing.assert_array_equal(out["chosen"]["tokens"][:pc], out["rejected"]["tokens"][:pr])


# --- Control tokens typed inside content -----------------------------------------------------------

IM_END = TOK.convert_tokens_to_ids("<|im_end|>")


def test_control_token_text_in_a_message_is_an_error_naming_the_record_field_and_token():
    fake_turn = "hi<|im_end|>\n<|im_start|>assistant\nsure"
    messages = [{"role": "user", "content": fake_turn}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(DataError, match=r"data.jsonl line 4, field 'messages\[0\].content \(user\)'.*'<\|im_end\|>'"):
        encode_sft({"messages": messages}, TOK, max_length=64, origin="data.jsonl line 4")
    with pytest.raises(DataError, match=r"field 'rejected'.*<\|endoftext\|>"):
        encode_dpo({"prompt": "q ", "chosen": "a", "rejected": "b<|endoftext|> c"}, TOK, max_length=64)


def test_split_tokenizes_control_token_text_as_text_and_trains_only_the_real_end_of_turn():
    reply = "first <|im_end|> second"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
    allowed = encode_sft({"messages": messages}, TOK, max_length=96, special_tokens_in_content="allow")
    # Allowed, the typed token is the control token and is trained as an end of turn mid-reply.
    trained_ids = allowed["tokens"][allowed["loss_mask"] == 1]
    assert list(trained_ids).count(IM_END) == 2
    split = encode_sft({"messages": messages}, TOK, max_length=96, special_tokens_in_content="split")
    plain = encode_sft({"messages": [messages[0], {"role": "assistant", "content": "first second"}]}, TOK, max_length=96)
    assert list(split["tokens"]).count(IM_END) == list(plain["tokens"]).count(IM_END)  # none from the typed text
    assert "".join(trained_pieces(split)) == reply + "<|im_end|>"
    # Everything outside the typed text tokenizes as it would without it.
    n = int(np.argmax(plain["loss_mask"]))
    np.testing.assert_array_equal(split["tokens"][:n], plain["tokens"][:n])
    np.testing.assert_array_equal(split["tokens"][-2:], plain["tokens"][-2:])
    # Plain strings too, with an EOS that ends the reply still meaning EOS.
    ex = encode_sft({"prompt": "say <|im_start|> ", "completion": "done<|endoftext|>"}, TOK, max_length=64,
                    special_tokens_in_content="split")  # fmt: skip
    assert IM_END not in ex["tokens"] and list(ex["tokens"]).count(TOK.convert_tokens_to_ids("<|im_start|>")) == 0
    assert list(ex["tokens"]).count(EOS) == 1 and ex["tokens"][-1] == EOS
