"""The one place a jitted train step and its train state are put together.

``jaxrlhf sft|dpo``, the dry run and ``jaxrlhf bench`` all build their step with
``build_train_step`` and their state with ``new_train_state`` (real arrays) or
``abstract_train_state`` (shapes only), so what is planned and benchmarked is what
trains: the same shardings in and out, the same donation, Adam moments sharded
like their parameters.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxrlhf.models import Decoder
from jaxrlhf.parallel.rules import named_shardings
from jaxrlhf.train import steps
from jaxrlhf.train.optim import init_opt_state, opt_state_shardings


def new_train_state(params, tx, mesh, *, seed: int) -> steps.TrainState:
    """A fresh train state for ``params`` (already on ``mesh``): optimizer state in its shards, step 0."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return steps.TrainState(
        params=params,
        opt_state=init_opt_state(tx, params, mesh),
        step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
        rng=jax.device_put(jax.random.PRNGKey(seed), replicated),
    )


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_params(model_config, mesh):
    """``(graphdef, params)`` of a decoder as sharded ``ShapeDtypeStruct``s: nothing is allocated."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0))))
    return graphdef, _abstract(state, named_shardings(state, mesh))


def abstract_train_state(model_config, tx, mesh):
    """``(graphdef, state)`` where ``state`` is a ``TrainState`` of sharded ``ShapeDtypeStruct``s: the
    shape of training on ``mesh`` without allocating it (a dry-run input, a checkpoint's restore target)."""
    graphdef, params = abstract_params(model_config, mesh)
    opt_state = jax.eval_shape(tx.init, params)
    opt_state = _abstract(opt_state, opt_state_shardings(tx, params, jax.tree.map(lambda x: x.sharding, params), mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    state = steps.TrainState(
        params=params,
        opt_state=opt_state,
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
    )
    return graphdef, state


def build_train_step(
    task: str,
    *,
    logprob_fn: steps.LogprobFn,
    tx,
    schedule,
    state_shardings,
    micro_batches: int = 1,
    spec: steps.DpoLossSpec | None = None,
):
    """The jitted ``(state, batch, ref_params=None) -> (state, metrics)`` of ``task`` (sft | dpo).

    The output state is pinned to ``state_shardings`` and the input state donated,
    so its buffers are reused in place step after step (batches arrive sharded).
    ``ref_params`` is DPO's frozen reference (None: precomputed or reference-free).
    """
    if task == "sft":
        sft = functools.partial(
            steps.sft_step, logprob_fn=logprob_fn, tx=tx, schedule=schedule, num_micro_batches=micro_batches
        )

        def step(state, batch, ref_params=None):
            return sft(state, batch)
    elif task == "dpo":
        dpo = functools.partial(
            steps.dpo_step,
            logprob_fn=logprob_fn,
            tx=tx,
            schedule=schedule,
            spec=spec or steps.DpoLossSpec(),
            num_micro_batches=micro_batches,
        )

        def step(state, batch, ref_params=None):
            return dpo(state, batch, ref_params=ref_params)
    else:
        raise ValueError(f"unknown task {task!r}: sft or dpo")
    return jax.jit(step, out_shardings=(state_shardings, None), donate_argnums=(0,))
