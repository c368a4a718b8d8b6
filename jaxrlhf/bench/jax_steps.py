"""Our jitted SFT/DPO steps assembled the way ``jaxrlhf sft|dpo`` assembles them, on random weights.

Same pieces as ``jaxrlhf sft|dpo``: ``init_model`` on the mesh, AdamW from
``make_optimizer``, the train state of ``new_train_state`` (moments sharded like
their parameters) and the jitted step of ``build_train_step`` (the state's
shardings in and out, the state donated), batches sharded over the data axes.
Steps are compiled ahead of time so that XLA's memory analysis of the exact
executable that is timed can be read.

``full_logits_logprob_fn`` is the naive path the chunked LM head is measured
against: ``hidden @ lm_head`` materialised as ``[B, T, V]`` logits, then the same
``token_logprobs``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxrlhf.models import init_model, make_logprob_fn
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.ops import logprobs
from jaxrlhf.train import steps
from jaxrlhf.train.optim import OptimConfig, make_optimizer
from jaxrlhf.train.prefetch import batch_sharding, place_batch, rows_sharded
from jaxrlhf.train.step_assembly import build_train_step, new_train_state


def place(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host batch -> global arrays with the trainer's batch sharding."""
    return place_batch(batch, rows_sharded(mesh))


def abstract_sft_batch(rows: int, seq_len: int, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes, dtypes and shardings of an SFT batch, for compiling a step without allocating its batch."""
    sharding = batch_sharding(mesh, 2)
    keys = ("tokens", "loss_mask", "segment_ids", "positions")
    return {key: jax.ShapeDtypeStruct((rows, seq_len), jnp.int32, sharding=sharding) for key in keys}


def full_logits_logprob_fn(graphdef: nnx.GraphDef):
    """The naive path: ``[B, T, V]`` logits in the compute dtype, then ``token_logprobs`` (f32 log-softmax)."""

    def logprob_fn(params, tokens, positions, segment_ids):
        model = nnx.merge(graphdef, params)
        # One example per row, as in the chunked path: no segment mask in attention.
        hidden = model(tokens, positions=positions, segment_ids=None)
        soft_cap = model.config.final_logit_softcapping
        return logprobs.token_logprobs(
            hidden @ model.lm_head_matrix(), tokens, segment_ids=segment_ids, soft_cap=soft_cap
        )

    return logprob_fn


@dataclasses.dataclass
class Policy:
    """A random policy, its AdamW state and what a jitted step needs to know about them."""

    config: ModelConfig
    mesh: Mesh
    graphdef: nnx.GraphDef
    state: steps.TrainState
    tx: object
    schedule: object

    def logprob_fn(self, *, chunked: bool, chunk_size: int | None = None, packed: bool = False):
        if chunked:
            # Benchmark rows hold one example each (padded like DPO rows) unless packed: the trainer's paths.
            return make_logprob_fn(self.graphdef, chunk_size=chunk_size, packed=packed)
        return full_logits_logprob_fn(self.graphdef)


def build_policy(config: ModelConfig, mesh: Mesh, *, seed: int = 0, optim: OptimConfig = OptimConfig()) -> Policy:
    """Random parameters on ``mesh`` and a fresh AdamW state, as the trainer builds them (minus the checkpoint)."""
    graphdef, params = nnx.split(init_model(config, seed=seed, mesh=mesh))
    tx, schedule = make_optimizer(optim, total_steps=1000)
    return Policy(config, mesh, graphdef, new_train_state(params, tx, mesh, seed=seed), tx, schedule)


def running_as(policy: Policy, config: ModelConfig) -> Policy:
    """``policy``'s parameters and optimizer state (the same arrays) run as ``config`` says (scan_layers, remat,
    attention): how the layers run does not change the parameter layout, so both can take turns on one state."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_model(config, mesh=policy.mesh)))
    return dataclasses.replace(policy, config=config, graphdef=graphdef)


def build_reference(config: ModelConfig, mesh: Mesh, *, dtype: str, seed: int = 0):
    """Frozen reference parameters stored in ``dtype`` (``dpo.reference_dtype``), sharded like the policy."""
    return nnx.split(init_model(dataclasses.replace(config, param_dtype=dtype), seed=seed, mesh=mesh))[1]


def _compile(policy: Policy, task: str, logprob_fn, batch, *extra, spec: steps.DpoLossSpec | None = None,
             pairs_per_row: int | None = None):  # fmt: skip
    step = build_train_step(
        task,
        logprob_fn=logprob_fn,
        tx=policy.tx,
        schedule=policy.schedule,
        state_shardings=jax.tree.map(lambda x: x.sharding, policy.state),
        spec=spec,
        pairs_per_row=pairs_per_row,
    )
    with jax.set_mesh(policy.mesh):
        return step.lower(policy.state, batch, *extra).compile()


def compile_sft(policy: Policy, batch, *, chunked: bool = True, chunk_size: int | None = None, packed: bool = False):
    """The SFT step compiled for ``batch`` (arrays or ``abstract_batch``): ``(state, batch) -> (state, metrics)``."""
    return _compile(policy, "sft", policy.logprob_fn(chunked=chunked, chunk_size=chunk_size, packed=packed), batch)


def compile_dpo(
    policy: Policy, batch, spec: steps.DpoLossSpec, ref_params=None, *, chunk_size: int | None = None,
    pairs_per_row: int | None = None,
):  # fmt: skip
    """The DPO step compiled for ``batch``: ``(state, batch, ref_params) -> (state, metrics)``.

    The reference is whatever the batch and ``ref_params`` say: ``batch["ref_logps"]``
    (precomputed), else ``ref_params`` (frozen model in the step). ``pairs_per_row``:
    packed pair-rows (the segment-masked attention and per-segment sums).
    """
    logprob_fn = policy.logprob_fn(chunked=True, chunk_size=chunk_size, packed=pairs_per_row is not None)
    return _compile(policy, "dpo", logprob_fn, batch, ref_params, spec=spec, pairs_per_row=pairs_per_row)


def step_caller(compiled, policy: Policy, *args):
    """A zero-argument call running one step and advancing ``policy.state`` (the old state is donated).

    It returns the new state with the metrics: the metrics are ready before the
    optimizer update is, so waiting for them alone would not time the whole step.
    """

    def call():
        with jax.set_mesh(policy.mesh):
            policy.state, metrics = compiled(policy.state, *args)
        return policy.state, metrics

    return call
