"""Logical axis names -> mesh axes: the one table that decides how everything is sharded.

Every parameter carries a tuple of logical axis names in its ``logical_axes``
metadata (e.g. ``("embed", "heads", "head_dim")`` for a query projection), and
activations are annotated the same way at layer boundaries. ``DEFAULT_RULES``
maps each name to mesh axes; changing the parallelism strategy means editing
this table, never the model.

A rule is a preference, not a demand: ``logical_to_spec`` keeps a mesh axis for
a dimension only if the dimension divides evenly over it (and the axis is not
already used by another dimension), and replicates otherwise. So 2 KV heads on
a tensor axis of 4 are replicated while 8 query heads are split, and a batch
of 2 on ``("data", "fsdp") = (2, 2)`` is split over ``data`` only.

For parameters (nnx Variables with ``logical_axes`` metadata), FSDP falls back
to another dimension when the one the rules name does not divide (``embed`` of
896 on 6 devices: the MLP width, or the vocabulary, takes ``fsdp`` instead), so a
parameter is replicated only when no dimension divides:

- ``partition_specs(tree, mesh)`` -> the same tree with a ``PartitionSpec`` per
  Variable (for ``jax.jit`` in/out shardings);
- ``shard_module(module, mesh)`` moves a module's arrays onto the mesh and
  records each spec as the Variable's ``out_sharding`` metadata, which is what
  ``nnx.get_partition_spec`` and an ``nnx.Optimizer`` built under
  ``jax.set_mesh(mesh)`` read to shard the optimizer state the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "LOGICAL_AXES",
    "DEFAULT_RULES",
    "Rules",
    "logical_to_spec",
    "constrain",
    "partition_specs",
    "named_shardings",
    "shard_module",
    "annotate_out_sharding",
    "mesh_axes_for",
    "spec_axes",
    "wants_fsdp",
]

LOGICAL_AXES = "logical_axes"  # the nnx Variable metadata key holding the logical names

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: Rules = (
    # Activations. The batch is split over every data-parallel axis; sequence and
    # hidden stay whole at layer boundaries (the tensor axis splits heads/mlp inside).
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("act_embed", None),
    # Parameters. FSDP shards the model dimension; tensor parallelism splits what
    # Megatron splits: heads, MLP width and vocabulary.
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("lora_rank", None),  # LoRA's A [in, r] / B [r, out] shard like the weight's input / output
    # Mixture of experts (models.moe): expert parallelism over fsdp, each device holding whole experts; the
    # small router [embed, router] is replicated along its expert dimension.
    ("expert", "fsdp"),
    ("router", None),
)


def _mesh_axes_for(name: str | None, rules: Rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    known = ", ".join(logical for logical, _ in rules)
    raise KeyError(f"logical axis {name!r} has no sharding rule; known names: {known}")


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh_shape: Mapping[str, int],
    rules: Rules = DEFAULT_RULES,
) -> PartitionSpec:
    """The ``PartitionSpec`` for an array of ``shape`` whose dimensions have these logical names.

    ``mesh_shape`` maps mesh axis names to sizes (``dict(mesh.shape)``; a Mesh or
    an AbstractMesh). Mesh axes the mesh lacks are ignored; a mesh axis is kept
    for a dimension only while the dimension stays divisible by the product of
    the axes kept so far, and each mesh axis is used at most once per array.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    entries = []
    for name, size in zip(logical_axes, shape):
        kept: list[str] = []
        shards = 1
        for axis in _mesh_axes_for(name, rules):
            if axis not in mesh_shape or axis in used:
                continue
            if size % (shards * mesh_shape[axis]) == 0:
                kept.append(axis)
                shards *= mesh_shape[axis]
        used.update(kept)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*entries)


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> jax.Array:
    """Sharding constraint on an activation, if a mesh is set (``jax.set_mesh``); else ``x`` unchanged.

    Without a mesh context there is nothing to constrain to: single-device runs
    and jits that only carry in/out shardings leave placement to the partitioner.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, dict(mesh.shape), rules))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _entry_axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def mesh_axes_for(name: str, rules: Rules = DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes the rules map the logical axis ``name`` to (e.g. ``batch`` -> ``("data", "fsdp")``)."""
    return _mesh_axes_for(name, rules)


def spec_axes(spec: PartitionSpec) -> set[str]:
    """Every mesh axis a ``PartitionSpec`` shards over."""
    return {axis for entry in spec for axis in _entry_axes(entry)}


def wants_fsdp(logical_axes, rules: Rules = DEFAULT_RULES) -> bool:
    """Whether the rules mean to shard a parameter with these logical axes over ``fsdp``."""
    return any("fsdp" in _mesh_axes_for(name, rules) for name in logical_axes)


def _fsdp_fallback(spec: PartitionSpec, logical_axes, shape, mesh_shape: Mapping[str, int], rules: Rules):
    """FSDP along another dimension when the one the rules name does not divide (hidden 896 on 6 devices).

    Only for parameters the rules mean to shard over ``fsdp``; the largest
    dimension (never the stacked ``layers`` one) that still divides takes it. A
    parameter with no such dimension stays replicated, and the dry run reports it.
    """
    fsdp = mesh_shape.get("fsdp", 1)
    entries = list(spec) + [None] * (len(shape) - len(spec))
    used = spec_axes(PartitionSpec(*entries))
    if fsdp == 1 or "fsdp" in used or not wants_fsdp(logical_axes, rules):
        return spec
    order = sorted((i for i, name in enumerate(logical_axes) if name != "layers"), key=lambda i: -shape[i])
    for i in order:
        axes = _entry_axes(entries[i])
        shards = 1
        for axis in axes:
            shards *= mesh_shape[axis]
        if shape[i] % (shards * fsdp) == 0:
            entries[i] = "fsdp" if not axes else (*axes, "fsdp")
            return PartitionSpec(*entries)
    return spec


def _variable_spec(variable: nnx.Variable, mesh_shape: Mapping[str, int], rules: Rules) -> PartitionSpec:
    logical_axes = variable.get_metadata().get(LOGICAL_AXES)
    if logical_axes is None:
        return PartitionSpec()
    spec = logical_to_spec(logical_axes, variable.shape, mesh_shape, rules)
    return _fsdp_fallback(spec, logical_axes, variable.shape, mesh_shape, rules)


def partition_specs(tree, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """``tree`` (a module, an ``nnx.State`` or any pytree of Variables) with each Variable holding its PartitionSpec.

    Works on abstract trees too (``nnx.eval_shape``), so shardings can be chosen
    before any parameter exists. Variables without ``logical_axes`` are replicated.
    """
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    mesh_shape = dict(mesh.shape)
    return jax.tree.map(
        lambda v: v.replace(_variable_spec(v, mesh_shape, rules)) if _is_variable(v) else PartitionSpec(),
        tree,
        is_leaf=_is_variable,
    )


def named_shardings(tree, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Like ``partition_specs`` with a ``NamedSharding`` on ``mesh`` per Variable."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), partition_specs(tree, mesh, rules))


def shard_module(module: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Move ``module``'s arrays onto ``mesh`` as the rules say (in place), record the specs, return it."""
    state = nnx.state(module)
    specs = partition_specs(state, mesh, rules)
    nnx.update(module, jax.device_put(state, named_shardings(state, mesh, rules)))
    annotate_out_sharding(module, specs)
    return module


def annotate_out_sharding(module: nnx.Module, specs) -> None:
    """Record each Variable's physical spec as ``out_sharding`` metadata (what flax reads)."""
    flat_specs = dict(nnx.to_flat_state(specs))
    for path, variable in nnx.to_flat_state(nnx.state(module)):
        spec = flat_specs[path].get_value()
        variable.set_metadata(out_sharding=tuple(spec) + (None,) * (variable.ndim - len(spec)))
