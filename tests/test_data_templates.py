"""Chat templates that are not prefix-stable: a Qwen3-style thinking template and a Llama-3.1-style template
that puts the tools into the last user message, written here. Each trained assistant turn becomes an example
whose text is the template's own rendering of the conversation up to that turn, trained from its generation
prompt on."""

import json
import re

import numpy as np

from data_fixtures import TOKENIZER_DIR, token_bytes, tokenizer, write_jsonl
from jaxrlhf import cli
from jaxrlhf.data import encode_sft_examples

TOK = tokenizer()

# As Qwen3's template: reasoning is shown only for assistant turns after the last user message.
THINKING = (
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set reasoning = m.reasoning_content if m.reasoning_content is defined and m.reasoning_content else '' -%}"
    "{%- if loop.index0 > ns.last_query -%}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>assistant\\n' + m.content + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- else -%}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
)

# As Llama 3.1's "tools in the user message" mode: the schemas go into the last user turn.
TOOLS_IN_LAST_USER = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m.role + '\\n' }}"
    "{%- if tools and loop.index0 == ns.last_user -%}"
    "{{ 'Tools: ' }}{%- for t in tools %}{{ t.name }};{% endfor %}{{ '\\n' }}"
    "{%- endif -%}"
    "{{ m.content + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
)


def _text(ids) -> str:
    return b"".join(token_bytes(TOK, ids)).decode()


def _render(messages, template, tools=None, **kw) -> str:
    return TOK.apply_chat_template(list(messages), tools=tools, chat_template=template, tokenize=False, **kw)


def _check_against_the_template(record, template, tools=None):
    messages = record["messages"]
    examples, dropped = encode_sft_examples(record, TOK, max_length=512, chat_template=template)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(examples) == len(turns) and dropped == []
    for example, i in zip(examples, turns):
        whole = _render(messages[: i + 1], template, tools)
        prompt = _render(messages[:i], template, tools, add_generation_prompt=True)
        assert _text(example["tokens"]) == whole
        trained = np.flatnonzero(example["loss_mask"])
        first, last = trained[0], trained[-1] + 1
        assert _text(example["tokens"][:first]) == prompt  # untrained: exactly what generation is given
        assert len(trained) == last - first  # one contiguous span: the turn and its <|im_end|>, not the newline after
        assert _text(example["tokens"][first:last]) == whole[len(prompt) :].rstrip("\n")
    return examples


def test_thinking_template_trains_each_turn_with_its_own_reasoning():
    record = {"messages": [
        {"role": "user", "content": "two plus two?"},
        {"role": "assistant", "content": "four", "reasoning_content": "2+2=4"},
        {"role": "user", "content": "and three plus three?"},
        {"role": "assistant", "content": "six", "reasoning_content": "3+3=6"},
    ]}  # fmt: skip
    first, second = _check_against_the_template(record, THINKING)
    trained = lambda ex: _text(ex["tokens"][ex["loss_mask"] == 1])  # noqa: E731
    assert trained(first) == "<think>\n2+2=4\n</think>\n\nfour<|im_end|>"
    assert trained(second) == "<think>\n3+3=6\n</think>\n\nsix<|im_end|>"
    assert "2+2=4" not in _text(second["tokens"])  # as the template shows turn 1 once the user has moved on


def test_tools_template_sees_the_tools_where_it_puts_them_for_each_turn():
    tools = [{"name": "calculator", "description": "adds", "parameters": {}}]
    record = {"messages": [
        {"role": "user", "content": "add 2 and 2"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "add 3 and 3"},
        {"role": "assistant", "content": "6"},
    ], "tools": tools}  # fmt: skip
    first, second = _check_against_the_template(record, TOOLS_IN_LAST_USER, tools)
    assert "Tools: calculator;\nadd 2 and 2" in _text(first["tokens"])
    assert "Tools: calculator;\nadd 3 and 3" in _text(second["tokens"]) and "Tools: calculator;\nadd 2" not in _text(
        second["tokens"]
    )


def test_the_pipeline_and_inspect_data_count_one_example_per_turn(tmp_path, capsys):
    template = tmp_path / "thinking.jinja"
    template.write_text(THINKING)
    record = {"messages": [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "reasoning_content": "r2"},
    ]}  # fmt: skip
    path = write_jsonl(tmp_path / "d.jsonl", [record] * 3)
    args = ["--file", str(path), "--tokenizer", TOKENIZER_DIR, "--data.cache_dir", str(tmp_path),
            "--data.chat_template", str(template), "--num_examples", "2", "--json", "true"]  # fmt: skip
    assert cli.main(["inspect-data", *args]) == 0
    captured = capsys.readouterr()
    assert re.search(r"│ kept\s*│\s*6 │", captured.err)
    origins = [json.loads(line)["origin"] for line in captured.out.splitlines()]
    assert origins == [f"{path} line 1, assistant turn 1 of 2", f"{path} line 1, assistant turn 2 of 2"]


def test_the_training_pipeline_hands_on_every_turn_and_resumes_between_them(tmp_path):
    from jaxrlhf.data import DataConfig, DatasetConfig, make_iterator

    template = tmp_path / "thinking.jinja"
    template.write_text(THINKING)
    records = [{"messages": [
        {"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": "a", "reasoning_content": "r"},
        {"role": "user", "content": "again"}, {"role": "assistant", "content": "b", "reasoning_content": "s"},
    ]} for k in range(4)]  # fmt: skip
    path = write_jsonl(tmp_path / "d.jsonl", records)
    config = DataConfig(tokenizer=TOKENIZER_DIR, train=[DatasetConfig(paths=[str(path)])], chat_template=str(template),
                        max_length=64, batch_size=1, shuffle=False, num_epochs=1, cache_dir=str(tmp_path))  # fmt: skip
    rows = [b["tokens"][0] for b in make_iterator(config, task="sft")]
    assert len(rows) == 8  # two examples per record
    it = make_iterator(config, task="sft")
    next(it)  # the first turn of record 0 handed on, its second still pending
    state = it.get_state()
    resumed = make_iterator(config, task="sft")
    resumed.set_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(np.stack([b["tokens"][0] for b in resumed]), np.stack(rows[1:]))
    assert resumed.stats["kept"] == 8


# As Gemma 3's template: no system role (a system message is folded into the first user turn), the assistant
# is "model", contents trimmed, every turn closed by <end_of_turn> and a newline.
GEMMA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def test_gemma_template_trains_exactly_each_reply_and_its_end_of_turn(tmp_path):
    from jaxrlhf.models import config_from_hf, end_of_turn_token_id, init_model, save_hf

    import transformers

    # A tokenizer of its own: load_tokenizer's is shared by every test of this process.
    tok = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.add_special_tokens({"bos_token": "<bos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = GEMMA
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": " hi there \n"},
        {"role": "user", "content": "bye?"},
        {"role": "assistant", "content": "bye"},
    ]}  # fmt: skip
    (example,), dropped = encode_sft_examples(record, tok, max_length=512, chat_template=GEMMA)
    text = b"".join(token_bytes(tok, example["tokens"])).decode()
    assert dropped == [] and text == (
        "<bos><start_of_turn>user\nBe brief.\n\nhello<end_of_turn>\n<start_of_turn>model\nhi there<end_of_turn>\n"
        "<start_of_turn>user\nbye?<end_of_turn>\n<start_of_turn>model\nbye<end_of_turn>\n"
    )
    mask = np.asarray(example["loss_mask"])
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    spans = [b"".join(token_bytes(tok, example["tokens"][a:b])).decode() for a, b in zip(edges[::2], edges[1::2])]
    assert spans == ["hi there<end_of_turn>", "bye<end_of_turn>"]  # not the newline, not the model header
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn_token_id(tok) == end_of_turn
    # An exported Gemma stops generating at the end of its turn.
    tiny = dict(model_type="gemma3_text", vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8)  # fmt: skip
    config = config_from_hf(tiny, dtype="float32")
    save_hf(init_model(config), config, tmp_path, tokenizer=tok)
    assert end_of_turn in json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"]
