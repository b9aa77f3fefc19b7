"""Cloud TPU topologies by name, and their virtual devices for ahead-of-time compilation.

Topology names follow Cloud TPU: the number counts TensorCores on v4 and v5p (2 per chip,
one megacore device) and chips on v5e and v6e. An explicit shape such as `v5p:4x4x8` or
`v6e:8x16` is accepted too.

| name      | libtpu topology  | chips | devices | hosts | HBM / chip |
|-----------|------------------|-------|---------|-------|------------|
| v4-8      | v4:2x2x1         | 4     | 4       | 1     | 32 GiB     |
| v4-32     | v4:2x2x4         | 16    | 16      | 4     | 32 GiB     |
| v5p-8     | v5:2x2x1         | 4     | 4       | 1     | 95 GiB     |
| v5p-32    | v5:2x2x4         | 16    | 16      | 4     | 95 GiB     |
| v5p-64    | v5:2x4x4         | 32    | 32      | 8     | 95 GiB     |
| v5p-128   | v5:4x4x4         | 64    | 64      | 16    | 95 GiB     |
| v5p-256   | v5:4x4x8         | 128   | 128     | 32    | 95 GiB     |
| v5e-1     | v5e:1x1          | 1     | 1       | 1     | 16 GiB     |
| v5e-4     | v5e:2x2          | 4     | 4       | 1     | 16 GiB     |
| v5e-8     | v5e:2x4          | 8     | 8       | 1     | 16 GiB     |
| v5e-16    | v5e:4x4          | 16    | 16      | 4     | 16 GiB     |
| v5e-256   | v5e:16x16        | 256   | 256     | 64    | 16 GiB     |
| v6e-8     | v6e:2x4          | 8     | 8       | 1     | 32 GiB     |
| v6e-64    | v6e:8x8          | 64    | 64      | 16    | 32 GiB     |

v4 and v5p are 3-D (chip config "megacore", 4 chips per host as 2x2x1, wraparound links on
full 4x4x4 cubes and up); v5e and v6e are 2-D (4 chips per host, 8 on a single-host 2x4).

`topology_devices` gives a topology's devices from libtpu without any TPU attached
(sfm.train.aot compiles the train step over them; bench/depth_kernels.py the kernels).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax

from sfm.errors import SfmError, first_line

GiB = 1024**3


class TopologyError(SfmError, ValueError):
    """A topology name that is not a Cloud TPU slice, or one libtpu refuses; one line."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """A TPU generation as libtpu names it."""

    prefix: str  # libtpu topology prefix ("v5" for v5p)
    chip_config: str
    dims: int  # 2-D (v5e, v6e) or 3-D (v4, v5p) chip grid
    cores_per_chip: int  # what the Cloud TPU name counts per chip
    hbm_bytes: int


GENERATIONS: dict[str, Generation] = {
    "v4": Generation("v4", "megacore", 3, 2, 32 * GiB),
    "v5p": Generation("v5", "megacore", 3, 2, 95 * GiB),
    "v5e": Generation("v5e", "default", 2, 1, 16 * GiB),
    "v6e": Generation("v6e", "default", 2, 1, 32 * GiB),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A single-slice TPU topology: its Cloud name, chip grid and libtpu arguments."""

    name: str
    generation: Generation
    shape: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation.prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_host(self) -> tuple[int, int, int]:
        """4 chips per host as 2x2x1; a single-host 2-D slice of 8 chips is one 2x4 host."""
        if self.generation.dims == 2 and self.shape == (2, 4):
            return (2, 4, 1)
        padded = (*self.shape, 1, 1)[:3]
        return (min(padded[0], 2), min(padded[1], 2), 1)

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Wraparound (torus) links: 3-D slices of full 4x4x4 cubes and up."""
        torus = self.generation.dims == 3 and all(s % 4 == 0 for s in self.shape)
        return (torus,) * 3


def _grid(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU's chip grid for a power-of-two chip count (2x2x1, 2x2x2, 2x2x4, 2x4x4, ...)."""
    e = chips.bit_length() - 1
    if dims == 3 and chips == 4:
        return (2, 2, 1)
    base, extra = divmod(e, dims)
    return tuple(2 ** (base + (i >= dims - extra)) for i in range(dims))


def parse_topology(name: str) -> Topology:
    """The Topology of a Cloud TPU name ("v5p-128") or an explicit grid ("v5p:4x4x4")."""
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
    if m is None:
        known = ", ".join(GENERATIONS)
        raise TopologyError(
            f"topology {name!r}: expected <gen>-<N> or <gen>:<AxB[xC]> with gen {known}"
        )
    gen = GENERATIONS[m.group(1)]
    if m.group(3):
        shape = tuple(int(s) for s in m.group(3).split("x"))
        if len(shape) != gen.dims:
            raise TopologyError(f"topology {name!r}: {m.group(1)} slices are {gen.dims}-D grids")
        return Topology(name, gen, shape)
    count = int(m.group(2))
    chips, rest = divmod(count, gen.cores_per_chip)
    if rest or chips < 1 or chips & (chips - 1):
        unit = "TensorCores (2 per chip)" if gen.cores_per_chip == 2 else "chips"
        raise TopologyError(
            f"topology {name!r}: the number counts {unit} and must give a power-of-two chip "
            f"count; give an explicit grid ({m.group(1)}:AxB{'xC' * (gen.dims == 3)}) otherwise"
        )
    return Topology(name, gen, _grid(chips, gen.dims))


def topology_devices(topo: Topology) -> list[jax.Device]:
    """The topology's virtual TPU devices (needs libtpu; touches no TPU hardware)."""
    # Compiling only: do not take libtpu's single-user lock from a process using the chips.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=topo.libtpu_name,
            chip_config_name=topo.generation.chip_config,
            chips_per_host_bounds=topo.chips_per_host,
            wrap=topo.wrap,
            num_slices=1,
        )
    except Exception as err:  # libtpu missing or a name it refuses
        raise TopologyError(
            f"topology {topo.name} ({topo.libtpu_name}): {first_line(err)}"
        ) from err
    return list(desc.devices)
