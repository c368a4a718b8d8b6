"""Regenerate the tiny test assets under jaxrlhf/assets/ (deterministic: same files on every run).

    python scripts/make_assets.py            # writes jaxrlhf/assets/
    python scripts/make_assets.py --check    # exits 1 if the shipped files differ

What it writes:

- ``sft.jsonl``: 320 chat conversations ({"messages"}, 1-3 user/assistant turns,
  sometimes a system turn) on five word tasks with one right answer each
  (reverse, sort, count, first, upper). A tiny model can learn them, so an SFT
  demo shows the loss falling well below its starting value.
- ``dpo.jsonl``: 320 preference pairs ({"prompt", "chosen", "rejected"} as
  message lists) on the same tasks. The rule a tiny model can learn: the chosen
  reply is the correct answer in lower case ending with a period; the rejected
  reply breaks it, either the words in the order they were given (wrong for
  reverse/sort) or the right answer SHOUTED in upper case with "!". DPO reward
  accuracy therefore rises well above chance within a few hundred steps.
- ``kto.jsonl``: the same 320 prompts as unpaired KTO records ({"prompt",
  "completion", "label"}, TRL's unpaired preference format): each keeps one
  reply of its pair, the chosen one (label true) with probability 0.6, so the
  labels are unbalanced about 60:40, as KTO data often is.
- ``tokenizer/``: a byte-level BPE tokenizer (vocabulary 1024) trained with
  ``tokenizers`` on the text of the two files above, saved as a normal Hugging
  Face tokenizer folder. Its post-processor adds ``<|begin_of_text|>`` like
  Llama 3's; eos = pad = ``<|endoftext|>`` like Qwen's base models, so tests see
  the case where padding and EOS share an id. Chat templates:
  ``chat_template.jinja`` (default, ChatML/Qwen-style with tools, no generation
  markers), ``additional_chat_templates/chatml_generation.jinja`` (ChatML with
  ``{% generation %}`` markers) and ``additional_chat_templates/llama3.jinja``
  (Llama-3 style: BOS, header tokens, replies trimmed, ``<|eot_id|>``).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import pathlib
import random
import shutil
import sys
import tempfile

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "jaxrlhf" / "assets"

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
VOCAB_SIZE = 1024
# Qwen2's pre-tokenizer split: unlike GPT-2's it keeps a run of newlines (and the
# spaces before it) in one piece, so "\n" + "\n..." at a prompt/reply boundary
# becomes one token, the case the mask rule must get right.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML as Qwen2.5 lays it out (default system prompt, tools in the system turn,
# tool calls inside the assistant turn, tool results as user turns), written for
# this project. No generation markers: spans come from prefix rendering.
CHATML_TEMPLATE = """\
{%- if messages[0].role == 'system' %}
    {%- set system = messages[0].content %}
{%- else %}
    {%- set system = 'You are a helpful assistant.' %}
{%- endif %}
{{- '<|im_start|>system\\n' + system }}
{%- if tools %}
    {{- '\\n\\n# Tools\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\\n</tools>\\nCall a tool with <tool_call>{"name": ..., "arguments": ...}</tool_call>.' }}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'assistant' and message.tool_calls %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if message.content %}
            {{- message.content + '\\n' }}
        {%- endif %}
        {%- for call in message.tool_calls %}
            {%- set call = call.function if call.function is defined else call %}
            {{- '<tool_call>{"name": "' + call.name + '", "arguments": ' + (call.arguments | tojson) + '}</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# The same ChatML layout with the assistant reply and its <|im_end|> inside
# {% generation %}, as templates written for `return_assistant_tokens_mask` do.
CHATML_GENERATION_TEMPLATE = """\
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
            {{- message.content + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- elif not (message.role == 'system' and loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Llama 3 layout: BOS text, role headers, every content trimmed, <|eot_id|> with
# no newline after it; tool results use the `ipython` role.
LLAMA3_TEMPLATE = """\
{{- bos_token }}
{%- for message in messages %}
    {%- set role = 'ipython' if message.role == 'tool' else message.role %}
    {{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

WORDS = (
    "red blue green black white gold pink gray "
    "cat dog fox owl bee cow hen ant elk yak "
    "sun moon star rain snow wind fire tree rock lake "
    "apple pear plum lime fig kiwi bread milk tea rice"
).split()
NUMBERS = "zero one two three four five six seven eight nine".split()
SYSTEM_PROMPTS = [
    "You are a careful assistant. Answer with the result only.",
    "You solve small word puzzles.",
    "Reply briefly.",
]
TASKS = ("reverse", "sort", "count", "first", "upper")

# Plain prose for the tokenizer's training text: paragraph breaks, indentation
# and trailing spaces give it merges of whitespace runs ("\n\n", "  "), which
# the mask tests need to see a token straddling a prompt/reply boundary.
PROSE = """\
Hello, World! Hello there. How are you today?

The model reads a prompt and writes a reply.  Each reply ends with an end-of-turn
token, and the loss is computed on the reply only.

    Indented lines keep their spaces.
    Lists, too:
        - one item
        - another item

Thank you for reading.  Goodbye!
"""


def _answer(task: str, words: list[str]) -> str:
    if task == "reverse":
        return " ".join(reversed(words))
    if task == "sort":
        return " ".join(sorted(words))
    if task == "count":
        return NUMBERS[len(words)]
    if task == "first":
        return words[0]
    return " ".join(words).upper()


def _question(rng: random.Random) -> tuple[str, str]:
    task = rng.choice(TASKS)
    words = rng.sample(WORDS, rng.randint(2, 5))
    return f"{task}: {' '.join(words)}", _answer(task, words)


def make_sft(rng: random.Random, n: int) -> list[dict]:
    records = []
    for i in range(n):
        messages = []
        if rng.random() < 0.4:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(rng.randint(1, 3)):
            question, answer = _question(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        records.append({"id": f"sft-{i:04d}", "messages": messages})
    return records


def make_dpo(rng: random.Random, n: int) -> list[dict]:
    records = []
    for i in range(n):
        task = rng.choice(("reverse", "sort", "first", "count"))
        words = rng.sample(WORDS, rng.randint(3, 5))
        while task == "sort" and words == sorted(words):
            rng.shuffle(words)
        answer = _answer(task, words)
        chosen = answer + "."
        if task in ("reverse", "sort") and rng.random() < 0.5:
            rejected = " ".join(words) + "."
        else:
            rejected = answer.upper() + "!"
        prompt = [{"role": "user", "content": f"{task}: {' '.join(words)}"}]
        records.append(
            {
                "id": f"dpo-{i:04d}",
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return records


def make_kto(rng: random.Random, dpo: list[dict]) -> list[dict]:
    records = []
    for pair in dpo:
        desirable = rng.random() < 0.6
        records.append(
            {
                "id": pair["id"].replace("dpo-", "kto-"),
                "prompt": pair["prompt"],
                "completion": pair["chosen"] if desirable else pair["rejected"],
                "label": desirable,
            }
        )
    return records


def _texts(sft: list[dict], dpo: list[dict]):
    for record in sft:
        for message in record["messages"]:
            yield message["content"]
    for record in dpo:
        for key in ("prompt", "chosen", "rejected"):
            for message in record[key]:
                yield message["content"]
    # The template text too, so role names and tool markup are single tokens.
    yield from (CHATML_TEMPLATE, LLAMA3_TEMPLATE)
    yield from [PROSE] * 20


def make_tokenizer(texts, out_dir: pathlib.Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    bos = SPECIAL_TOKENS.index("<|begin_of_text|>")
    # Untrimmed offsets: a token's offsets cover every character it encodes, which
    # is what the loss-mask rule (first character inside a span) is stated on.
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
    )
    hf.chat_template = {
        "default": CHATML_TEMPLATE,
        "chatml_generation": CHATML_GENERATION_TEMPLATE,
        "llama3": LLAMA3_TEMPLATE,
    }
    hf.save_pretrained(str(out_dir))


def _write_jsonl(path: pathlib.Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def build(out: pathlib.Path) -> None:
    rng = random.Random(20240611)
    sft = make_sft(rng, 320)
    dpo = make_dpo(rng, 320)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "sft.jsonl", sft)
    _write_jsonl(out / "dpo.jsonl", dpo)
    _write_jsonl(out / "kto.jsonl", make_kto(random.Random(18), dpo))
    make_tokenizer(_texts(sft, dpo), out / "tokenizer")


def _same_tree(a: pathlib.Path, b: pathlib.Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped assets instead of writing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = pathlib.Path(tmp) / "assets"
        build(fresh)
        if args.check:
            same = _same_tree(fresh, ASSETS)
            print("assets are up to date" if same else "assets differ from scripts/make_assets.py output")
            return 0 if same else 1
        for name in ("sft.jsonl", "dpo.jsonl", "kto.jsonl", "tokenizer"):
            target = ASSETS / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        shutil.copytree(fresh, ASSETS, dirs_exist_ok=True)
    print(f"wrote {ASSETS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
