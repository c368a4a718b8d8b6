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

The command that loads a run and prints completions is ``jaxrlhf.commands.generate``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models.decoder import Decoder, KVCache

__all__ = ["Generation", "Sampling", "generate", "left_pad", "sample_next"]


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
    batch, prompt_length = prompt["tokens"].shape
    cache = KVCache.empty(model.config, batch, prompt_length + max_new_tokens)
    hidden, cache = model.extend(
        prompt["tokens"], cache, positions=prompt["positions"], segment_ids=prompt["segment_ids"]
    )

    def choose(hidden_last, step, done):
        logits = model.logits(hidden_last)
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
