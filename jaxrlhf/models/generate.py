"""Text generation with a KV cache, and ``jaxrlhf generate``.

    from jaxrlhf.models.generate import Sampling, generate
    out = generate(model, [prompt_ids, ...], max_new_tokens=64, stop_ids=(eos, im_end),
                   sampling=Sampling(temperature=0.7, top_p=0.9), seed=0)
    out.completion(0)   # row 0's new tokens, without the stop token

Prompts of different lengths are left-padded into one batch: padding sits in
segment 0, which real tokens never attend to, and each row's positions count
from its own first token, so a row generates what it would generate alone. The
whole generation is one jitted function: ``Decoder.extend`` runs the prompts
into a ``KVCache`` of ``prompt + max_new_tokens`` slots (prefill), then a
``lax.while_loop`` runs one token per step until every row has emitted a stop
token or ``max_new_tokens`` are out. Sampling follows transformers: temperature,
then top-k, then top-p (nucleus); temperature 0 is greedy.

``run_generate`` is the command: prompts from the command line or a JSONL file,
rendered with the tokenizer's chat template (generation prompt added), a model
from a run's checkpoint or a Hugging Face folder, stop tokens from
generation_config.json, config.json, the tokenizer's EOS and the template's
end-of-turn token.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.config import ConfigError
from jaxrlhf.data.chat import render, template_text
from jaxrlhf.data.errors import DataError, Origin
from jaxrlhf.data.tokenizer import load_tokenizer, pad_id
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.decoder import Decoder, KVCache
from jaxrlhf.models.hf_io import end_of_turn_token_id, load_hf

__all__ = [
    "GenerateConfig",
    "Generation",
    "Sampling",
    "generate",
    "left_pad",
    "read_prompts",
    "run_generate",
    "sample_next",
    "stop_token_ids",
]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen (transformers' order: temperature, top-k, top-p)."""

    temperature: float = 0.0
    """0 = greedy (argmax); otherwise logits are divided by it before sampling."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 = all."""
    top_p: float = 1.0
    """Sample among the most likely tokens whose probabilities add up to top_p; 1 = all."""

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got {self}")


def sample_next(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """The next token ``[B]`` int32 from logits ``[B, V]``."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k > 0:
        kth_largest = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if sampling.top_p < 1:
        descending = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        # Keep a token while the mass of the more likely ones is below top_p: the smallest set reaching it.
        kept = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p
        threshold = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class Generation(NamedTuple):
    """What ``generate`` returns (numpy)."""

    tokens: np.ndarray  # [B, max_new_tokens] int32; pad_id after a row's stop token
    lengths: np.ndarray  # [B] tokens generated, the stop token included
    stopped: np.ndarray  # [B] bool: the row ended with a stop token (else max_new_tokens ran out)

    def completion(self, row: int) -> list[int]:
        """Row ``row``'s generated tokens without its stop token."""
        return self.tokens[row, : self.lengths[row] - int(self.stopped[row])].tolist()


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """``tokens``, ``segment_ids`` (0 on padding, 1 on the prompt) and ``positions`` ``[B, length]`` int32."""
    batch = len(prompts)
    tokens = np.full((batch, length), pad_id, np.int32)
    segment_ids = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    for row, prompt in enumerate(prompts):
        start = length - len(prompt)
        tokens[row, start:] = prompt
        segment_ids[row, start:] = 1
        positions[row, start:] = np.arange(len(prompt))
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling"))
def _generate(graphdef, params, prompt, stop_ids, pad_id, key, *, max_new_tokens: int, sampling: Sampling):
    model = nnx.merge(graphdef, params)
    lm_head = model.lm_head_matrix()
    batch, prompt_length = prompt["tokens"].shape
    cache = KVCache.empty(model.config, batch, prompt_length + max_new_tokens)
    hidden, cache = model.extend(
        prompt["tokens"], cache, positions=prompt["positions"], segment_ids=prompt["segment_ids"]
    )

    def choose(hidden_last, step, done):
        logits = (hidden_last @ lm_head).astype(jnp.float32)
        token = sample_next(logits, jax.random.fold_in(key, step), sampling)
        return jnp.where(done, pad_id, token)

    def is_stop(token):
        return jnp.any(token[:, None] == stop_ids[None, :], axis=-1)

    token = choose(hidden[:, -1], 0, jnp.zeros((batch,), bool))
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)

    def step(carry):
        i, token, done, out, cache, position = carry
        hidden, cache = model.extend(token[:, None], cache, positions=position[:, None])
        token = choose(hidden[:, 0], i, done)
        return i + 1, token, done | is_stop(token), out.at[:, i].set(token), cache, position + 1

    def running(carry):
        i, _, done, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    start = (jnp.int32(1), token, is_stop(token), out, cache, prompt["positions"][:, -1] + 1)
    return jax.lax.while_loop(running, step, start)[3]


def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    seed: int = 0,
    prompt_bucket: int = 64,
) -> Generation:
    """Continue each prompt (token ids) by up to ``max_new_tokens`` tokens, stopping a row at any of ``stop_ids``.

    The batch's prompt length is rounded up to a multiple of ``prompt_bucket``, so
    that batches of similar prompts share one compilation. The same ``seed``
    gives the same tokens for the same batch.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    length = -(-max(len(p) for p in prompts) // prompt_bucket) * prompt_bucket
    # Padded with -1 (never a token) to a multiple of 8, so the number of stop ids rarely changes the program.
    stop_array = np.full(-(-max(len(stop_ids), 1) // 8) * 8, -1, np.int32)
    stop_array[: len(stop_ids)] = stop_ids
    graphdef, params = nnx.split(model)
    tokens = np.asarray(
        _generate(
            graphdef,
            params,
            left_pad(prompts, length, pad_id),
            stop_array,
            jnp.int32(pad_id),
            jax.random.key(seed),
            max_new_tokens=max_new_tokens,
            sampling=sampling,
        )
    )
    is_stop = np.isin(tokens, list(stop_ids))
    stopped = is_stop.any(axis=1)
    lengths = np.where(stopped, is_stop.argmax(axis=1) + 1, max_new_tokens)
    return Generation(tokens, lengths, stopped)


# ---- `jaxrlhf generate` ----


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
    # Imported here: the trainer builds on this package, not the other way round.
    from jaxrlhf.train.trainer import restore_policy

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
