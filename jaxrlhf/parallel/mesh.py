"""The device mesh: three named axes ("data", "fsdp", "tensor") sized from a config.

- ``data``: pure data parallelism; parameters are replicated along it.
- ``fsdp``: data parallelism whose parameters (and optimizer state) are sharded
  along it and gathered layer by layer when used.
- ``tensor``: tensor parallelism over attention heads, MLP width and vocabulary.

The batch is split over ``("data", "fsdp")``. Which parameter dimension lands on
which axis is decided by one table, ``jaxrlhf.parallel.rules.DEFAULT_RULES``.

All axes are ``AxisType.Auto``: the partitioner (GSPMD/Shardy) propagates
shardings from the parameter and activation annotations, as in MaxText/EasyLM,
instead of requiring every op to state its output sharding (Explicit axes,
``jax.make_mesh``'s default).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

__all__ = ["AXIS_NAMES", "MeshConfig", "make_mesh", "resolve_mesh_shape"]

AXIS_NAMES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ``("data", "fsdp", "tensor")`` axes; one of them may be -1 = all remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    sequence_parallel: bool = False
    """With tensor > 1: split the residual stream between layers along the sequence over the tensor ranks
    (Megatron-style sequence parallelism), so activations and remat checkpoints are not replicated on them."""


def resolve_mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Replace a -1 by the remaining device count and check that the product is ``num_devices``."""
    sizes = (config.data, config.fsdp, config.tensor)
    named = ", ".join(f"{name}={size}" for name, size in zip(AXIS_NAMES, sizes))
    if any(size == 0 or size < -1 for size in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {named}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (= the remaining devices), got {named}")
    known = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"cannot fill the -1 axis: {num_devices} devices are not a multiple of {known} ({named})")
        sizes = tuple(num_devices // known if size == -1 else size for size in sizes)
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {named} needs {math.prod(sizes)} devices but {num_devices} are available; "
            "set one axis to -1 to use all the rest"
        )
    return sizes


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all devices of all processes) with Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(config, len(devices))
    return jax.make_mesh(shape, AXIS_NAMES, axis_types=(AxisType.Auto,) * len(AXIS_NAMES), devices=devices)
