"""Sharded training math equals single-device math, and parameters are sharded as the rules say.

The model has 8 query heads over 2 KV heads, so a tensor axis of 4 must split
the queries and replicate the KV projections. The reference is the same loss
and gradients on one device.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from model_fixtures import packed_batch, tiny_config

from jaxrlhf.models import init_model, make_logprob_fn
from jaxrlhf.ops import losses
from jaxrlhf.parallel import MeshConfig, make_mesh, partition_specs, shard_module

CONFIG = tiny_config(layer_types=(), qkv_bias=True, o_bias=True, mlp_bias=True)


def _batch():
    return packed_batch(np.random.default_rng(5), 8, 16, CONFIG.vocab_size)


def _loss_and_grads(model, batch):
    graphdef, params = nnx.split(model)
    logprob_fn = make_logprob_fn(graphdef, chunk_size=8)

    def loss(params, batch):
        lp = logprob_fn(params, batch["tokens"], batch["positions"], batch["segment_ids"])
        return losses.sft_loss(lp, batch["loss_mask"])[0]

    loss, grads = jax.jit(jax.value_and_grad(loss))(params, batch)
    return loss, nnx.to_pure_dict(grads)  # values only: the metadata (out_sharding) differs by mesh


@pytest.fixture(scope="module")
def single_device():
    model = init_model(CONFIG, seed=3)
    return nnx.to_pure_dict(nnx.state(model)), _loss_and_grads(model, jax.tree.map(jnp.asarray, _batch()))


def _expected_specs(tensor_splits_kv: bool) -> dict[tuple, P]:
    """What DEFAULT_RULES must give, written out by hand: fsdp on the model dim, tensor on heads/mlp/vocab."""
    kv = "tensor" if tensor_splits_kv else None
    return {
        ("embed",): P("tensor", "fsdp"),
        ("lm_head",): P("fsdp", "tensor"),
        ("final_norm", "scale"): P(None),
        ("layers", "attn_norm", "scale"): P(None, None),
        ("layers", "attn", "q_proj"): P(None, "fsdp", "tensor", None),
        ("layers", "attn", "k_proj"): P(None, "fsdp", kv, None),
        ("layers", "attn", "v_proj"): P(None, "fsdp", kv, None),
        ("layers", "attn", "o_proj"): P(None, "tensor", None, "fsdp"),
        ("layers", "attn", "q_bias"): P(None, "tensor", None),
        ("layers", "attn", "k_bias"): P(None, kv, None),
        ("layers", "attn", "v_bias"): P(None, kv, None),
        ("layers", "attn", "o_bias"): P(None, "fsdp"),
        ("layers", "mlp", "gate_proj"): P(None, "fsdp", "tensor"),
        ("layers", "mlp", "up_proj"): P(None, "fsdp", "tensor"),
        ("layers", "mlp", "down_proj"): P(None, "tensor", "fsdp"),
        ("layers", "mlp", "gate_bias"): P(None, "tensor"),
        ("layers", "mlp", "up_bias"): P(None, "tensor"),
        ("layers", "mlp", "down_bias"): P(None, "fsdp"),
        ("layers", "mlp_norm", "scale"): P(None, None),
    }


@pytest.mark.parametrize(
    "mesh_shape, scan_layers, remat",
    [
        ((8, 1, 1), True, "none"),
        ((1, 8, 1), False, "full"),
        ((2, 2, 2), True, "dots_saveable"),
        ((1, 2, 4), True, "full"),
    ],
)
def test_sharded_loss_and_gradients_equal_single_device(single_device, mesh_shape, scan_layers, remat):
    reference_params, reference = single_device
    mesh = make_mesh(MeshConfig(*mesh_shape))
    config = dataclasses.replace(CONFIG, scan_layers=scan_layers, remat=remat)
    model = init_model(config, seed=3, mesh=mesh)
    # The initial values do not depend on the sharding (partitionable RNG).
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(model)), reference_params)

    expected = _expected_specs(tensor_splits_kv=mesh_shape[2] <= 2)
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        spec = expected[path]
        assert variable[...].sharding.is_equivalent_to(NamedSharding(mesh, spec), variable.ndim), path
        assert variable.get_metadata()["out_sharding"] == tuple(spec), path
    if mesh_shape == (1, 2, 4):  # the 2 KV heads are whole on each device, the 8 query heads 2 per device
        assert model.layers.attn.k_proj[...].addressable_shards[0].data.shape == (2, 16, 2, 8)
        assert model.layers.attn.q_proj[...].addressable_shards[0].data.shape == (2, 16, 2, 8)

    batch = jax.device_put(_batch(), NamedSharding(mesh, P(("data", "fsdp"))))
    with jax.set_mesh(mesh):
        loss, grads = _loss_and_grads(model, batch)
    # f32 sums in another order (the embedding gradient adds many rows): a few ulps apart.
    chex.assert_trees_all_close((loss, grads), reference, rtol=1e-5, atol=1e-6)


def test_shard_module_and_optimizer_state_follow_the_params():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    model = shard_module(init_model(CONFIG, seed=3), mesh)
    specs = dict(nnx.to_flat_state(partition_specs(model, mesh)))
    assert specs[("layers", "attn", "k_proj")].get_value() == P(None, "fsdp", None, None)
    assert nnx.get_partition_spec(nnx.state(model))["layers"]["attn"]["q_proj"].get_value() == P(
        None, "fsdp", "tensor", None
    )
    with jax.set_mesh(mesh):
        optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    mu = optimizer.opt_state[0].mu
    assert mu["layers"]["mlp"]["down_proj"][...].sharding.is_equivalent_to(
        NamedSharding(mesh, P(None, "tensor", "fsdp")), 3
    )
