"""The micro-batch machinery the SFT, DPO and KTO steps share: the train state, splitting a global batch into
strided micro-batches, a dropout key per micro-batch, summing ``(loss, grads, metrics)`` over them in one scan,
running a function over them one at a time, and applying the update."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

__all__ = [
    "DROPOUT_RNG",
    "TrainState",
    "accumulate",
    "apply_gradients",
    "dropout_kwargs",
    "per_micro_batch",
    "split_micro_batches",
    "step_rng",
    "with_rngs",
]

DROPOUT_RNG = "dropout_rng"  # a micro-batch's dropout key, when the policy has dropout


@struct.dataclass
class TrainState:
    params: object
    opt_state: object
    step: jax.Array
    rng: jax.Array


def dropout_kwargs(mb: dict) -> dict:
    """``rng=`` for the policy's training forward when the micro-batch carries a dropout key."""
    return {"rng": mb[DROPOUT_RNG]} if DROPOUT_RNG in mb else {}


def step_rng(state: TrainState) -> jax.Array:
    """This step's dropout key: a function of the checkpointed key and step, so resumed runs redraw the same masks."""
    return jax.random.fold_in(state.rng, state.step)


def split_micro_batches(batch: dict, num_micro_batches: int) -> dict:
    """[B, ...] -> [n, B / n, ...], micro-batch i taking rows i, i + n, ...

    Strided rows keep every micro-batch spread over all devices of a batch-sharded
    array instead of parking micro-batch 0 on the first few.
    """

    def split(x):
        if x.shape[0] % num_micro_batches:
            raise ValueError(f"global batch {x.shape[0]} is not divisible by {num_micro_batches} micro-batches")
        x = x.reshape(x.shape[0] // num_micro_batches, num_micro_batches, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def with_rngs(micro_batches: dict, num_micro_batches: int, rng) -> dict:
    """One dropout key per micro-batch (none without dropout)."""
    if rng is None:
        return micro_batches
    return {**micro_batches, DROPOUT_RNG: jax.random.split(rng, num_micro_batches)}


def accumulate(loss_and_grad, params, micro_batches):
    """Sum (loss, grads, metrics) of ``loss_and_grad(params, micro_batch)`` over the micro-batches."""

    def body(carry, micro_batch):
        (loss, metrics), grads = loss_and_grad(params, micro_batch)
        total = jax.tree.map(jnp.add, carry, (loss, grads, metrics))
        return total, None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: _flat(loss_and_grad(params, first))))
    total, _ = jax.lax.scan(body, zeros, micro_batches)
    return total


def _flat(out):
    (loss, metrics), grads = out
    return loss, grads, metrics


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation) -> TrainState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1)


def per_micro_batch(fn, batch: dict, num_micro_batches: int):
    """``fn`` over the micro-batches of ``batch`` one at a time (as training runs them): ``[n, ...]`` outputs."""
    if num_micro_batches == 1:
        return jax.tree.map(lambda x: x[None], fn(batch))
    return jax.lax.map(fn, split_micro_batches(batch, num_micro_batches))
