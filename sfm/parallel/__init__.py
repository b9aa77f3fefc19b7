"""Device mesh, logical-axis sharding rules and multi-process initialization."""

from sfm.parallel.config import DEFAULT_RULES, MESH_AXES, MeshConfig
from sfm.parallel.distributed import DistributedInfo, initialize_from_env
from sfm.parallel.mesh import build_mesh
from sfm.parallel.rules import (
    activation_constraint,
    activation_sharding,
    batch_sharding,
    constrain,
    logical_to_mesh_spec,
    param_shardings,
    shard_model,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "DistributedInfo",
    "MeshConfig",
    "activation_constraint",
    "activation_sharding",
    "batch_sharding",
    "build_mesh",
    "constrain",
    "initialize_from_env",
    "logical_to_mesh_spec",
    "param_shardings",
    "shard_model",
]
