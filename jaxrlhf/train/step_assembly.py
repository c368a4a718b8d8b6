"""The one place a jitted train step and its train state are put together.

``jaxrlhf sft|dpo``, the dry run and ``jaxrlhf bench`` all build their step with
``build_train_step`` and their state with ``new_train_state`` (real arrays) or
``abstract_train_state`` (shapes only), so what is planned and benchmarked is what
trains: the same shardings in and out, the same donation, Adam moments sharded
like their parameters.

A policy is ``(graphdef, trainable, frozen)`` (``split_policy``): full
fine-tuning trains every parameter (``frozen`` is None); a LoRA policy trains
its adapters, and its base is ``frozen``, an argument of the step, never in the
train state, its gradients or its checkpoints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxrlhf.models import Decoder, ModelConfig
from jaxrlhf.models.lora import split_adapters
from jaxrlhf.parallel.rules import named_shardings
from jaxrlhf.train import kto_steps, steps
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


def split_policy(model: Decoder):
    """``(graphdef, trainable, frozen)``: every parameter and None, or a LoRA model's adapters and its base."""
    if model.config.lora is None:
        graphdef, params = nnx.split(model)
        return graphdef, params, None
    return split_adapters(model)


def abstract_policy(model_config, mesh):
    """``split_policy`` of a decoder as sharded ``ShapeDtypeStruct``s: nothing is allocated."""
    graphdef, trainable, frozen = split_policy(nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0))))
    trainable = _abstract(trainable, named_shardings(trainable, mesh))
    return graphdef, trainable, None if frozen is None else _abstract(frozen, named_shardings(frozen, mesh))


def abstract_params(model_config, mesh):
    """``(graphdef, params)`` of a plain decoder as sharded ``ShapeDtypeStruct``s: nothing is allocated."""
    graphdef, params, _ = abstract_policy(model_config, mesh)
    return graphdef, params


def abstract_train_state(model_config, tx, mesh):
    """``(graphdef, state)`` where ``state`` is a ``TrainState`` of sharded ``ShapeDtypeStruct``s: the
    shape of training on ``mesh`` without allocating it (a dry-run input, a checkpoint's restore target).
    A LoRA policy's state holds its adapters only (``abstract_policy`` gives the frozen base)."""
    graphdef, params, _ = abstract_policy(model_config, mesh)
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


def describe_trainable(trainable, frozen, config: ModelConfig) -> str:
    """One line on what trains: counts and bytes of the trained parameters (and of the frozen base)."""
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    nbytes = lambda tree: sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    line = f"trainable parameters: {count(trainable):,} ({nbytes(trainable) / 2**20:,.1f} MiB)"
    if frozen is None:
        return line + " (full fine-tuning)"
    spec = config.lora
    quantized = "" if config.weight_qtype == "none" else f", stored {config.weight_qtype}"
    return (
        f"{line}: LoRA rank {spec.rank}, alpha {spec.alpha:g} on {', '.join(spec.targets)}; frozen base "
        f"{count(frozen):,} values ({nbytes(frozen) / 2**20:,.1f} MiB{quantized})"
    )


def build_train_step(
    task: str,
    *,
    logprob_fn: steps.LogprobFn,
    tx,
    schedule,
    state_shardings,
    micro_batches: int = 1,
    spec: steps.DpoLossSpec | kto_steps.KtoLossSpec | None = None,
    reference_logprob_fn: steps.LogprobFn | None = None,
    reference_is_frozen: bool = False,
    dropout: bool = False,
    pairs_per_row: int | None = None,
    aux_loss=None,
):
    """The jitted ``(state, batch, ref_params=None, frozen=None) -> (state, metrics)`` of ``task`` (sft | dpo | kto).

    The output state is pinned to ``state_shardings`` and the input state donated,
    so its buffers are reused in place step after step (batches arrive sharded).
    ``ref_params`` is DPO's or KTO's frozen reference (None: precomputed or reference-free)
    under ``reference_logprob_fn`` (default: the policy's); ``frozen`` a LoRA
    policy's base. ``reference_is_frozen``: the reference *is* the base (adapters
    off), so the step holds one copy of the weights, not two. ``dropout``: draw the
    policy's dropout masks from the state's key. ``pairs_per_row``: DPO rows are
    packed with that many pair slots (``run_config.pairs_per_row``). ``aux_loss``: a MoE policy's router
    losses (``train.router_loss.router_loss_of``; None for dense models).
    """
    if task not in ("sft", "dpo", "kto"):
        raise ValueError(f"unknown task {task!r}: sft, dpo or kto")
    common = dict(tx=tx, schedule=schedule, num_micro_batches=micro_batches, dropout=dropout, aux_loss=aux_loss)

    def step(state, batch, ref_params=None, frozen=None):
        policy = steps.bind_frozen(logprob_fn, frozen)
        if task == "sft":
            return steps.sft_step(state, batch, logprob_fn=policy, **common)
        reference = dict(ref_params=frozen if reference_is_frozen else ref_params, ref_logprob_fn=reference_logprob_fn)
        if task == "kto":
            spec_or_default = spec or kto_steps.KtoLossSpec()
            return kto_steps.kto_step(state, batch, logprob_fn=policy, spec=spec_or_default, **reference, **common)
        return steps.dpo_step(
            state, batch, logprob_fn=policy, spec=spec or steps.DpoLossSpec(), pairs_per_row=pairs_per_row,
            **reference, **common,
        )  # fmt: skip

    return jax.jit(step, out_shardings=(state_shardings, None), donate_argnums=(0,))
