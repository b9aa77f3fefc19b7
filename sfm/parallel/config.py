"""Typed configuration of the device mesh and of the logical-axis sharding rules."""

from __future__ import annotations

import dataclasses

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axes (None = replicated). Data, not code: presets override it.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv", None),
    ("qkv", None),
    ("vocab", ("tensor",)),
    ("conv_kernel", None),
    ("conv_in", ("fsdp",)),
    ("conv_out", ("tensor",)),
    ("codebook", None),
    ("codebook_entries", None),
    ("codebook_dim", None),
    ("norm", None),
    ("layers", None),
    ("steps", None),
    ("depth_embed", None),
    ("time", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape as ICI (within a slice) x DCN (across slices) sizes per axis.

    A size of -1 in `ici` takes all remaining devices (at most one axis may use it).
    """

    ici_data: int = -1
    ici_fsdp: int = 1
    ici_tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    rules: tuple[tuple[str, tuple[str, ...] | None], ...] = DEFAULT_RULES

    @property
    def ici_shape(self) -> tuple[int, ...]:
        return (self.ici_data, self.ici_fsdp, self.ici_tensor)

    @property
    def dcn_shape(self) -> tuple[int, ...]:
        return (self.dcn_data, self.dcn_fsdp, self.dcn_tensor)
