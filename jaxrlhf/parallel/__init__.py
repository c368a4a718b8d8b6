"""Device mesh, the logical-axis sharding rules, and multi-process start-up.

    from jaxrlhf.parallel import MeshConfig, make_mesh, initialize_distributed
    initialize_distributed()                      # no-op on a single process
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
"""

from jaxrlhf.parallel.distributed import detect_cluster, initialize_distributed
from jaxrlhf.parallel.mesh import AXIS_NAMES, MeshConfig, make_mesh, resolve_mesh_shape
from jaxrlhf.parallel.rules import (
    DEFAULT_RULES,
    LOGICAL_AXES,
    Rules,
    annotate_out_sharding,
    constrain,
    logical_to_spec,
    named_shardings,
    partition_specs,
    shard_module,
)

__all__ = [
    "AXIS_NAMES",
    "DEFAULT_RULES",
    "LOGICAL_AXES",
    "MeshConfig",
    "Rules",
    "annotate_out_sharding",
    "constrain",
    "detect_cluster",
    "initialize_distributed",
    "logical_to_spec",
    "make_mesh",
    "named_shardings",
    "partition_specs",
    "resolve_mesh_shape",
    "shard_module",
]
