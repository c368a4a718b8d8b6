"""Bad input: each case raises a clear error naming file, line/row and field, or is counted as a drop."""

from __future__ import annotations

import pickle
import re
import warnings

import numpy as np
import pytest

from data_fixtures import tokenizer, write_jsonl
from jaxrlhf.data import DataConfig, DataError, DatasetConfig, ExampleDropped, Origin, encode_dpo, encode_sft
from jaxrlhf.data.encode import encode_sft_examples
from jaxrlhf.data.pipeline import make_iterator
from jaxrlhf.data.validate import check_batch

TOK = tokenizer()
ORIGIN = Origin("data/train.jsonl", "line", 41)
USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}

SFT_CASES = [
    ({"foo": 1}, None, "no SFT fields"),
    ({"messages": "hi"}, "messages", "expected a non-empty list of messages"),
    ({"messages": []}, "messages", "expected a non-empty list of messages"),
    ({"messages": [USER, "x"]}, "messages[1]", "expected a message object"),
    ({"messages": [{"content": "hi"}, ASSISTANT]}, "messages[0].role", "missing or not a string"),
    ({"messages": [{"role": "user", "content": 3}, ASSISTANT]}, "messages[0].content", "expected a string, got int"),
    ({"messages": [USER]}, "messages", "no assistant turn"),
    ({"messages": [USER, {"role": "assistant", "content": " \n"}]}, "messages[1].content", "empty completion"),
    ({"messages": [USER, dict(ASSISTANT, weight=0.5)]}, "messages[1].weight", "expected 0 or 1"),
    ({"messages": [USER, ASSISTANT], "tools": "add"}, "tools", "expected a list of tool schemas"),
    ({"prompt": "a", "completion": ""}, "completion", "empty completion"),
    ({"prompt": 1, "completion": "b"}, "prompt", "expected a string or a list of messages, got int"),
    ({"prompt": "a", "completion": ["b"]}, "completion", "both be strings or both be message lists"),
    ({"prompt": [USER], "completion": [USER]}, "completion", "no assistant turn"),
    ({"text": ""}, "text", "empty completion"),
]


@pytest.mark.parametrize("record, field, message", SFT_CASES)
def test_bad_sft_records_name_file_line_and_field(record, field, message):
    with pytest.raises(DataError) as info:
        encode_sft(record, TOK, max_length=64, origin=ORIGIN)
    text = str(info.value)
    assert text.startswith("data/train.jsonl line 41")
    assert message in text
    if field is not None:
        assert f"field {field!r}" in text and info.value.field == field


DPO_CASES = [
    ({"prompt": "q", "chosen": "a"}, "rejected", "missing"),
    ({"prompt": "q", "chosen": "a", "rejected": ["b"]}, "rejected", "both be strings or both be message lists"),
    ({"prompt": "q", "chosen": "a", "rejected": " "}, "rejected", "empty completion"),
    (
        {"chosen": [USER, ASSISTANT], "rejected": [{"role": "user", "content": "B"}, ASSISTANT]},
        "chosen",
        "chosen and rejected have different prompts",
    ),
    ({"prompt": [USER], "chosen": [USER, ASSISTANT], "rejected": [ASSISTANT]}, "chosen", "hold only the reply"),
    ({"prompt": [USER], "chosen": [{"role": "tool", "content": "1"}], "rejected": [ASSISTANT]}, "chosen", "no assist"),
    ({"chosen": "same prefix", "rejected": "same prefix and more"}, "chosen", "empty completion"),
]


@pytest.mark.parametrize("record, field, message", DPO_CASES)
def test_bad_dpo_records_name_file_line_and_field(record, field, message):
    with pytest.raises(DataError) as info:
        encode_dpo(record, TOK, max_length=64, origin=ORIGIN)
    assert str(info.value).startswith("data/train.jsonl line 41")
    assert message in str(info.value) and info.value.field == field


def test_identical_pairs_error_by_default_with_the_record_id():
    record = {"id": "pair-7", "prompt": "q", "chosen": "same", "rejected": "same"}
    with pytest.raises(DataError, match=re.escape("data/train.jsonl line 41 (id 'pair-7')")) as info:
        encode_dpo(record, TOK, max_length=64, origin=ORIGIN)
    assert "0.6931" in str(info.value) and "on_identical_pairs=drop" in str(info.value)
    with pytest.raises(ExampleDropped) as dropped:
        encode_dpo(record, TOK, max_length=64, on_identical_pairs="drop")
    assert dropped.value.reason == "identical_pair"
    out = encode_dpo(record, TOK, max_length=64, on_identical_pairs="allow")
    np.testing.assert_array_equal(out["chosen"]["tokens"], out["rejected"]["tokens"])


def test_pairs_that_differ_only_in_whitespace_are_identical_too():
    record = {"prompt": [USER], "chosen": [{"role": "assistant", "content": "yes"}],
              "rejected": [{"role": "assistant", "content": "yes \n"}]}  # fmt: skip
    # Whatever the template does with the whitespace (llama3 trims it, ChatML keeps it), there is no preference.
    for template in ("llama3", None):
        with pytest.raises(DataError, match="chosen and rejected differ only in whitespace"):
            encode_dpo(record, TOK, max_length=64, chat_template=template, origin=ORIGIN)
        with pytest.raises(ExampleDropped):
            encode_dpo(record, TOK, max_length=64, chat_template=template, on_identical_pairs="drop")
    out = encode_dpo(record, TOK, max_length=64, on_identical_pairs="allow")
    assert not np.array_equal(out["chosen"]["tokens"], out["rejected"]["tokens"])  # ChatML keeps the whitespace


def test_identical_message_pairs_keep_their_reply_when_allowed():
    record = {"chosen": [USER, ASSISTANT], "rejected": [USER, ASSISTANT]}
    out = encode_dpo(record, TOK, max_length=64, on_identical_pairs="allow")
    assert out["chosen"]["loss_mask"].sum() == out["rejected"]["loss_mask"].sum() > 0


def test_unknown_policies_are_rejected():
    with pytest.raises(ValueError, match="unknown truncation policy"):
        encode_sft({"text": "a"}, TOK, max_length=8, truncation="cut")
    with pytest.raises(ValueError, match="unknown on_identical_pairs"):
        encode_dpo({"prompt": "q", "chosen": "a", "rejected": "b"}, TOK, max_length=8, on_identical_pairs="maybe")


def test_unknown_chat_template_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="chatml_generation, default, llama3"):
        encode_sft({"messages": [USER, ASSISTANT]}, TOK, max_length=64, chat_template="zephyr")


def test_a_conversation_a_template_renders_once_per_turn_is_not_one_example():
    # Earlier assistant turns lose their reasoning, as some reasoning-model templates do: two renderings.
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
        "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
        "{% else %}{{ m.content }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    messages = [USER, {"role": "assistant", "content": "<think>hmm</think>yes"}, USER, ASSISTANT]
    with pytest.raises(DataError, match="encodes to 2 examples .* use encode_sft_examples") as info:
        encode_sft({"messages": messages}, TOK, max_length=256, chat_template=template, origin=ORIGIN)
    assert "data/train.jsonl line 41" in str(info.value)
    examples, dropped = encode_sft_examples({"messages": messages}, TOK, max_length=256, chat_template=template)
    assert len(examples) == 2 and dropped == []


def test_turn_that_opens_unlike_the_generation_prompt_fails():
    # Tool-call turns get their own header, which the generation prompt never produces.
    template = (
        "{% for m in messages %}{% if m.tool_calls %}{{ '<|im_start|>call\\n' }}{% else %}"
        "{{ '<|im_start|>' + m.role + '\\n' }}{% endif %}{{ m.content + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    call = {"role": "assistant", "content": "x", "tool_calls": [{"name": "f", "arguments": {}}]}
    with pytest.raises(DataError, match="the opening of assistant message 1 as a bare reply"):
        encode_sft({"messages": [USER, call]}, TOK, max_length=64, chat_template=template)


def test_template_ignoring_the_generation_prompt_fails():
    template = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
    with pytest.raises(DataError, match="ignores add_generation_prompt"):
        encode_sft({"messages": [USER, ASSISTANT]}, TOK, max_length=64, chat_template=template)


def test_template_whose_user_turn_ends_with_the_assistant_header():
    # Mistral / Llama-2 style: "[INST] q [/INST]" opens the reply; add_generation_prompt adds nothing.
    template = (
        "{% for m in messages %}{% if m.role == 'user' %}{{ '[INST] ' + m.content + ' [/INST]' }}"
        "{% else %}{{ m.content + '</s>' }}{% endif %}{% endfor %}"
    )
    messages = [USER, ASSISTANT, {"role": "user", "content": "again"}, {"role": "assistant", "content": "bye"}]
    ex = encode_sft({"messages": messages}, TOK, max_length=128, chat_template=template)
    assert TOK.decode(ex["tokens"]) == "[INST] hi [/INST]hello</s>[INST] again [/INST]bye</s>"
    runs = [TOK.decode(ex["tokens"][i]) for i in np.flatnonzero(ex["loss_mask"])]
    assert "".join(runs) == "hello</s>bye</s>"


def test_template_without_end_of_turn_marker_warns():
    template = (
        "{% for m in messages %}{{ m.role + ':\\n' + m.content + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = encode_sft({"messages": [USER, ASSISTANT]}, TOK, max_length=64, chat_template=template)
    assert any("no end-of-turn marker" in str(w.message) for w in caught)
    assert TOK.decode(ex["tokens"][ex["loss_mask"] == 1]) == "hello"


def test_template_errors_become_data_errors():
    template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match="roles must alternate") as info:
        encode_sft({"messages": [USER, ASSISTANT]}, TOK, max_length=64, chat_template=template, origin=ORIGIN)
    assert str(info.value).startswith("data/train.jsonl line 41")


def test_length_drops_are_counted_by_reason(tmp_path):
    records = [{"prompt": "q", "completion": "short"}, {"prompt": "q", "completion": "word " * 40}]
    records += [{"prompt": "p " * 40, "completion": "a"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    config = DataConfig(
        tokenizer=str(TOK.name_or_path), train=[DatasetConfig(paths=[str(path)])], max_length=32,
        max_prompt_length=20, batch_size=1, shuffle=False, cache_dir=str(tmp_path),
    )  # fmt: skip
    it = make_iterator(config, task="sft")
    assert len(list(it)) == 1
    assert it.stats == {"kept": 1, "dropped": {"prompt_too_long": 1, "too_long": 1}}


def test_bad_record_in_a_pipeline_names_the_file_and_line(tmp_path):
    records = [{"prompt": "q", "completion": "a"}] * 2 + [{"prompt": "q", "completion": 5}]
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    config = DataConfig(
        tokenizer=str(TOK.name_or_path), train=[DatasetConfig(paths=[str(path)])], max_length=32,
        batch_size=1, shuffle=False, cache_dir=str(tmp_path),
    )  # fmt: skip
    with pytest.raises(DataError, match=re.escape(f"{path} line 3, field 'completion': expected a string")):
        list(make_iterator(config, task="sft"))


def _batch(mask_row, seg_row, pos_row):
    rows = {"tokens": [5] * len(mask_row), "loss_mask": mask_row, "segment_ids": seg_row, "positions": pos_row}
    return {key: np.array([row], np.int32) for key, row in rows.items()}


def test_batch_invariants_are_checked():
    good = _batch([0, 1, 0, 1, 0], [1, 1, 2, 2, 0], [0, 1, 0, 1, 0])
    check_batch(good, task="sft", batch_size=1, max_length=5)
    for bad in (
        _batch([1, 1, 0, 1, 0], [1, 1, 2, 2, 0], [0, 1, 0, 1, 0]),  # position 0 trained
        _batch([0, 1, 1, 1, 0], [1, 1, 2, 2, 0], [0, 1, 0, 1, 0]),  # segment start trained
        _batch([0, 1, 0, 1, 1], [1, 1, 2, 2, 0], [0, 1, 0, 1, 0]),  # padding trained
    ):
        with pytest.raises(ValueError, match="loss_mask must be 0/1 and 0 at position 0"):
            check_batch(bad, task="sft", batch_size=1, max_length=5)
    with pytest.raises(ValueError, match="positions must restart"):
        check_batch(_batch([0, 1, 0, 1, 0], [1, 1, 2, 2, 0], [0, 1, 2, 3, 0]), task="sft", batch_size=1, max_length=5)
    with pytest.raises(ValueError, match="batch keys"):
        check_batch({**good, "extra": good["tokens"]}, task="sft", batch_size=1, max_length=5)


def test_errors_survive_the_trip_back_from_a_worker_process():
    # Grain's worker processes pickle exceptions; a DataError must arrive as itself, message intact.
    error = pickle.loads(pickle.dumps(DataError(ORIGIN, "expected a string", field="completion")))
    assert type(error) is DataError and error.field == "completion" and error.origin == ORIGIN
    assert str(error) == "data/train.jsonl line 41, field 'completion': expected a string"
    dropped = pickle.loads(pickle.dumps(ExampleDropped("too_long", "90 > max_length=64")))
    assert (dropped.reason, dropped.detail) == ("too_long", "90 > max_length=64")
