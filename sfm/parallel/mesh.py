"""Build the (data, fsdp, tensor) device mesh from a `MeshConfig`: ICI x DCN sizes per axis."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from sfm.errors import ConfigError
from sfm.parallel.config import MESH_AXES, MeshConfig


def build_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Return a Mesh with axes MESH_AXES (Auto axis types) laid out as cfg's ICI x DCN shape."""
    devices = list(jax.devices() if devices is None else devices)
    dcn_shape = _checked_dcn_shape(cfg, len(devices))
    ici_shape = _resolved_ici_shape(cfg, len(devices) // math.prod(dcn_shape))
    device_array = _device_array(ici_shape, dcn_shape, devices)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _fields(prefix: str) -> tuple[str, ...]:
    return tuple(f"mesh.{prefix}_{axis}" for axis in MESH_AXES)


def _checked_dcn_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Validate the DCN sizes (positive, dividing the device count) and return them."""
    remaining = num_devices
    for field, size in zip(_fields("dcn"), cfg.dcn_shape, strict=True):
        if size < 1:
            raise ConfigError(f"{field}: must be a positive size, got {size}")
        if remaining % size:
            raise ConfigError(f"{field}: {size} does not divide {remaining} devices")
        remaining //= size
    return tuple(cfg.dcn_shape)


def _resolved_ici_shape(cfg: MeshConfig, per_slice: int) -> tuple[int, ...]:
    """Replace a single -1 in the ICI sizes by what is left of per_slice devices; check the rest."""
    fields = _fields("ici")
    wildcards = [f for f, size in zip(fields, cfg.ici_shape, strict=True) if size == -1]
    if len(wildcards) > 1:
        raise ConfigError(f"{', '.join(wildcards)}: at most one ici size may be -1")
    remaining = per_slice
    for field, size in zip(fields, cfg.ici_shape, strict=True):
        if size == -1:
            continue
        if size < 1:
            raise ConfigError(f"{field}: must be a positive size or -1, got {size}")
        if remaining % size:
            raise ConfigError(f"{field}: {size} does not divide {remaining} devices")
        remaining //= size
    if not wildcards and remaining != 1:
        raise ConfigError(
            f"mesh.ici_*: shape {cfg.ici_shape} uses {per_slice // remaining} of the "
            f"{per_slice} devices per slice; make the product equal or set one size to -1"
        )
    return tuple(remaining if size == -1 else size for size in cfg.ici_shape)


def _device_array(
    ici_shape: tuple[int, ...], dcn_shape: tuple[int, ...], devices: list[jax.Device]
) -> np.ndarray:
    """Arrange devices: topology-aware within a slice, hybrid across TPU slices, else dcn-major."""
    num_slices = math.prod(dcn_shape)
    if num_slices == 1:
        return mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
    slice_ids = {getattr(d, "slice_index", 0) for d in devices}
    if len(slice_ids) > 1:
        if len(slice_ids) != num_slices:
            raise ConfigError(
                f"mesh.dcn_*: shape {dcn_shape} needs {num_slices} slices, "
                f"the devices span {len(slice_ids)}"
            )
        return mesh_utils.create_hybrid_device_mesh(
            ici_shape, dcn_shape, devices, allow_split_physical_axes=True
        )
    return _dcn_major_reshape(ici_shape, dcn_shape, devices)


def _dcn_major_reshape(
    ici_shape: tuple[int, ...], dcn_shape: tuple[int, ...], devices: list[jax.Device]
) -> np.ndarray:
    """Reshape devices so each mesh index along an axis is dcn_index * ici_size + ici_index."""
    rank = len(ici_shape)
    blocks = np.asarray(devices, dtype=object).reshape(dcn_shape + ici_shape)
    interleaved = [
        axis for pair in zip(range(rank), range(rank, 2 * rank), strict=True) for axis in pair
    ]
    global_shape = tuple(d * i for d, i in zip(dcn_shape, ici_shape, strict=True))
    return blocks.transpose(interleaved).reshape(global_shape)
