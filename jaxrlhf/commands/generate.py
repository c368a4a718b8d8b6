"""`jaxrlhf generate`: chat completions from a run's checkpoint or a Hugging Face folder (KV cache).

Prompts come from the command line or a JSONL file and are rendered with the
tokenizer's chat template (generation prompt added); the model is a run's
checkpoint (restored as `jaxrlhf export` does) or a folder; stop tokens are
generation_config.json's, config.json's, the tokenizer's EOS and the template's
end-of-turn token. Decoding itself is ``jaxrlhf.models.generate``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
from typing import Any

import jax.numpy as jnp

from jaxrlhf.commands.policy_checkpoint import restore_policy
from jaxrlhf.config import ConfigError
from jaxrlhf.data.chat import render, template_text
from jaxrlhf.data.errors import DataError, Origin
from jaxrlhf.data.tokenizer import load_tokenizer, pad_id
from jaxrlhf.models import Decoder, ModelConfig, end_of_turn_token_id, load_hf
from jaxrlhf.models.generate import Sampling, generate


@dataclasses.dataclass
class GenerateConfig:
    run_dir: str = ""
    """A run directory written by `jaxrlhf sft` / `jaxrlhf dpo`: generate with one of its checkpoints."""
    step: int = 0
    """Checkpoint step of run_dir; 0 = the newest."""
    model: str = ""
    """Instead of run_dir: a local Hugging Face model folder."""
    tokenizer: str = ""
    """Tokenizer folder; empty = the run's data.tokenizer, or the model folder."""
    chat_template: str | None = None
    """None = the run's data.chat_template (else the tokenizer's default); or a template name or .jinja file."""
    # Any, checked in run_generate: draccus reads every option as YAML, so a prompt like "count: a b"
    # arrives as a dict, which a str field would silently turn into "{'count': 'a b'}".
    prompt: Any = None
    """One user message, or a YAML list of them. Options are YAML: quote text with ': ' in it, as in
    --prompt '"count: rain ant cow"' (or use prompts_file)."""
    prompts_file: str = ""
    """JSONL of {"messages": [...]} (trailing assistant turns are dropped) or {"prompt": text or messages}."""
    max_new_tokens: int = 128
    """Most tokens generated per prompt, its stop token included."""
    temperature: float = 0.0
    """0 = greedy."""
    top_k: int = 0
    """0 = off."""
    top_p: float = 1.0
    """1 = off."""
    seed: int = 0
    """Seed of the sampling (greedy decoding uses none)."""
    batch_size: int = 16
    """Prompts generated together (left-padded into one batch)."""
    dtype: str = ""
    """Compute dtype; empty = the run's model.dtype, or the dtype of the folder's weights."""
    out: str = ""
    """Also write one JSON line per prompt here: messages, completion, finish_reason, num_tokens."""


def _user_messages(value: Any) -> list[list[dict]]:
    values = value if isinstance(value, list) else [value]
    for text in values:
        if not isinstance(text, str):
            raise ConfigError(
                f"--prompt was read as YAML into {text!r}, not text: quote it inside the shell quotes,"
                " e.g. --prompt '\"count: rain ant cow\"', or put the prompts in a prompts_file"
            )
    return [[{"role": "user", "content": text}] for text in values]


def read_prompts(path: str | pathlib.Path) -> list[list[dict]]:
    """The conversations to continue, from a JSONL file of ``{"messages"}`` or ``{"prompt"}`` records."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    conversations = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        origin = Origin(str(path), "line", number)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(origin, f"not valid JSON: {e}") from None
        if isinstance(record, dict) and isinstance(record.get("messages"), list):
            messages = list(record["messages"])
            # A conversation with its replies (SFT data): continue it where the last reply starts.
            while messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
                messages.pop()
        elif isinstance(record, dict) and isinstance(record.get("prompt"), str):
            messages = [{"role": "user", "content": record["prompt"]}]
        elif isinstance(record, dict) and isinstance(record.get("prompt"), list):
            messages = list(record["prompt"])
        else:
            raise DataError(origin, 'expected {"messages": [...]} or {"prompt": text or [messages]}')
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise DataError(origin, "no prompt messages ({'role', 'content'} dicts) before the assistant's reply")
        conversations.append(messages)
    return conversations


def _restore_run(config: GenerateConfig) -> tuple[Decoder, ModelConfig, dict]:
    """The policy of a run checkpoint (restored as `jaxrlhf export` does) and the run's data/model settings."""
    model, model_config, train, _ = restore_policy(config.run_dir, config.step, dtype=config.dtype or None)
    settings = {
        "tokenizer": train.data.tokenizer,
        "chat_template": train.data.chat_template,
        "model_folder": train.model.path,
    }
    return model, model_config, settings


def _load_folder(config: GenerateConfig) -> tuple[Decoder, ModelConfig, dict]:
    folder = pathlib.Path(config.model)
    dtype = config.dtype
    if not dtype and (folder / "config.json").exists():
        hf = json.loads((folder / "config.json").read_text())
        dtype = hf.get("dtype") or hf.get("torch_dtype")
    dtype = dtype or "float32"
    model, model_config = load_hf(folder, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
    return model, model_config, {"tokenizer": str(folder), "chat_template": None, "model_folder": str(folder)}


def stop_token_ids(tokenizer, template: str, model_config: ModelConfig, model_folder: str = "") -> list[int]:
    """Every id that ends a reply: generation_config.json's and config.json's EOS, the tokenizer's EOS, and the
    special token ``template`` puts after an assistant turn."""
    ids = list(model_config.eos_token_id)
    generation_config = pathlib.Path(model_folder) / "generation_config.json" if model_folder else None
    if generation_config is not None and generation_config.exists():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos]
    # end_of_turn_token_id renders the tokenizer's own template; ask a copy that holds the one in use.
    probe = copy.copy(tokenizer)
    probe.chat_template = template
    ids += [tokenizer.eos_token_id, end_of_turn_token_id(probe)]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def run_generate(config: GenerateConfig) -> list[dict]:
    """`jaxrlhf generate`: print (and with ``out`` write) a completion for every prompt."""
    if bool(config.run_dir) == bool(config.model):
        raise ConfigError("set exactly one of --run_dir (a training run) and --model (a Hugging Face folder)")
    conversations = [] if config.prompt is None else _user_messages(config.prompt)
    if config.prompts_file:
        conversations += read_prompts(config.prompts_file)
    if not conversations:
        raise ConfigError("nothing to generate from: pass --prompt or --prompts_file")
    sampling = Sampling(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)
    model, model_config, settings = _restore_run(config) if config.run_dir else _load_folder(config)
    tokenizer = load_tokenizer(config.tokenizer or settings["tokenizer"])
    template = template_text(tokenizer, config.chat_template or settings["chat_template"])
    stop_ids = stop_token_ids(tokenizer, template, model_config, settings["model_folder"])
    prompts = [
        tokenizer.encode(render(tokenizer, m, template=template, add_generation_prompt=True), add_special_tokens=False)
        for m in conversations
    ]
    results = []
    for first in range(0, len(prompts), config.batch_size):
        batch = prompts[first : first + config.batch_size]
        out = generate(
            model,
            batch,
            max_new_tokens=config.max_new_tokens,
            sampling=sampling,
            stop_ids=stop_ids,
            pad_id=pad_id(tokenizer),
            seed=config.seed + first,  # each batch its own random stream
        )
        for row in range(len(batch)):
            result = {
                "messages": conversations[first + row],
                "completion": tokenizer.decode(out.completion(row)),
                "finish_reason": "stop" if out.stopped[row] else "length",
                "num_tokens": int(out.lengths[row]),
            }
            results.append(result)
            print(f"### {len(results)}: {result['messages'][-1]['content']}")
            print(result["completion"])
            print(f"({result['finish_reason']}, {result['num_tokens']} tokens)\n", flush=True)
    if config.out:
        out_path = pathlib.Path(config.out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results), encoding="utf-8")
    return results
