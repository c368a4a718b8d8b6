"""Sequence parallelism (mesh.sequence_parallel): the residual stream between layers is split along the
sequence over the tensor ranks. Loss and gradients are unchanged; what remat keeps of it shrinks by the
tensor factor (compiled memory)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models import init_model, make_logprob_fn
from jaxrlhf.models.presets import preset
from jaxrlhf.ops import losses
from jaxrlhf.parallel import MeshConfig, make_mesh
from jaxrlhf.train.optim import OptimConfig, make_optimizer
from jaxrlhf.train.prefetch import batch_sharding
from jaxrlhf.train.step_assembly import abstract_train_state, build_train_step

MESH = MeshConfig(data=1, fsdp=2, tensor=4)


def _config(hidden=256, layers=4, **kw):
    return dataclasses.replace(
        preset("llama3-8b"), hidden_size=hidden, intermediate_size=4 * hidden, num_layers=layers, num_heads=8,
        num_kv_heads=4, head_dim=hidden // 8, vocab_size=4096, **kw,
    )  # fmt: skip


def test_loss_and_gradients_are_unchanged():
    mesh = make_mesh(MESH)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 4096, (4, 64)), jnp.int32)
    mask = jnp.ones_like(tokens).at[:, 0].set(0)

    def loss_and_grads(sequence_parallel):
        config = _config(dtype="float32", sequence_parallel=sequence_parallel)
        graphdef, params = nnx.split(init_model(config, seed=2, mesh=mesh))
        fn = make_logprob_fn(graphdef, chunk_size=32, packed=False)

        def loss(params):
            return losses.sft_loss(fn(params, tokens, None, None), mask)[0]

        with jax.set_mesh(mesh):
            value, grads = jax.jit(jax.value_and_grad(loss))(params)
        return value, nnx.to_pure_dict(grads)

    chex.assert_trees_all_close(loss_and_grads(True), loss_and_grads(False), rtol=1e-5, atol=1e-6)


def test_the_remat_checkpoints_shrink_by_the_tensor_factor():
    mesh = make_mesh(MESH)
    rows, length = 4, 2048  # long enough that the checkpoints, not the attention's transients, set the peak

    def temporaries(sequence_parallel):
        config = _config(hidden=1024, layers=8, remat="full", sequence_parallel=sequence_parallel)
        tx, schedule = make_optimizer(OptimConfig(), 10)
        graphdef, state = abstract_train_state(config, tx, mesh)
        batch = {
            k: jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=batch_sharding(mesh, 2))
            for k in ("tokens", "loss_mask", "segment_ids", "positions")
        }
        step = build_train_step(
            "sft", logprob_fn=make_logprob_fn(graphdef, chunk_size=256, packed=False), tx=tx, schedule=schedule,
            state_shardings=jax.tree.map(lambda x: x.sharding, state),
        )  # fmt: skip
        with jax.set_mesh(mesh):
            return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

    config = _config(hidden=1024, layers=8)
    # Full remat keeps each layer's input: [rows / fsdp, length, hidden] in bf16 per layer and device.
    checkpoints = config.num_layers * (rows // MESH.fsdp) * length * config.hidden_size * 2
    saved = temporaries(False) - temporaries(True)
    assert saved >= checkpoints * (1 - 1 / MESH.tensor), (saved, checkpoints)
