"""Mesh sizing, the logical-axis rules and activation constraints (8 fake CPU devices)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from jaxrlhf.parallel import DEFAULT_RULES, MeshConfig, constrain, logical_to_spec, make_mesh, resolve_mesh_shape


@pytest.mark.parametrize(
    "config, shape",
    [
        (MeshConfig(), (1, 8, 1)),
        (MeshConfig(data=-1, fsdp=2, tensor=2), (2, 2, 2)),
        (MeshConfig(data=1, fsdp=2, tensor=-1), (1, 2, 4)),
        (MeshConfig(data=8, fsdp=1, tensor=1), (8, 1, 1)),
    ],
)
def test_mesh_shape_fills_the_minus_one(config, shape):
    assert resolve_mesh_shape(config, 8) == shape
    mesh = make_mesh(config)
    assert tuple(mesh.shape.values()) == shape and mesh.axis_names == ("data", "fsdp", "tensor")
    assert mesh.axis_types == (AxisType.Auto,) * 3


@pytest.mark.parametrize(
    "config, message",
    [
        (MeshConfig(data=-1, fsdp=-1), "at most one mesh axis may be -1"),
        (MeshConfig(data=3, fsdp=-1), "not a multiple of 3"),
        (MeshConfig(data=2, fsdp=2, tensor=1), "needs 4 devices but 8 are available"),
        (MeshConfig(data=0), "positive or -1"),
    ],
)
def test_mesh_shape_errors_say_what_is_wrong(config, message):
    with pytest.raises(ValueError, match=message):
        resolve_mesh_shape(config, 8)


MESH_1x2x4 = {"data": 1, "fsdp": 2, "tensor": 4}
MESH_2x2x2 = {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize(
    "axes, shape, mesh, spec",
    [
        (("embed", "heads", "head_dim"), (32, 8, 16), MESH_1x2x4, P("fsdp", "tensor", None)),
        # 2 KV heads cannot be split 4 ways: replicated, never an error.
        (("embed", "kv_heads", "head_dim"), (32, 2, 16), MESH_1x2x4, P("fsdp", None, None)),
        (("layers", "embed", "mlp"), (4, 32, 64), MESH_1x2x4, P(None, "fsdp", "tensor")),
        (("vocab", "embed"), (102, 30), MESH_1x2x4, P(None, "fsdp")),
        # The batch takes every data-parallel axis that divides it, in order.
        (("batch", "seq", "act_embed"), (8, 16, 32), MESH_2x2x2, P(("data", "fsdp"), None, None)),
        (("batch", "seq", "act_embed"), (2, 16, 32), MESH_2x2x2, P("data", None, None)),
        (("batch", "seq", "act_embed"), (6, 16, 32), {"data": 4, "fsdp": 3, "tensor": 1}, P("fsdp", None, None)),
        ((None, "norm"), (3, 32), MESH_1x2x4, P(None, None)),
    ],
)
def test_logical_to_spec(axes, shape, mesh, spec):
    assert logical_to_spec(axes, shape, mesh) == spec


def test_a_mesh_axis_is_used_once_per_array():
    rules = (("a", "tensor"), ("b", "tensor"))
    assert logical_to_spec(("a", "b"), (8, 8), MESH_1x2x4, rules) == P("tensor", None)


def test_unknown_logical_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="'embd' has no sharding rule; known names: batch, seq"):
        logical_to_spec(("embd",), (8,), MESH_1x2x4, DEFAULT_RULES)
    with pytest.raises(ValueError, match="do not match shape"):
        logical_to_spec(("embed",), (8, 8), MESH_1x2x4)


def test_constrain_is_a_no_op_without_a_mesh_and_shards_with_one():
    x = jnp.ones((8, 4, 16))
    assert constrain(x, ("batch", "seq", "act_embed")) is x
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh):
        y = jax.jit(lambda x: constrain(x * 2, ("batch", "seq", "act_embed")))(x)
    assert y.sharding.is_equivalent_to(jax.NamedSharding(mesh, P(("data", "fsdp"), None, None)), 3)
