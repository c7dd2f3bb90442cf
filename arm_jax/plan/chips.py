"""TPU chips (published peak figures) and slice names -> XLA topologies.

Figures are Google Cloud's published per-chip specifications (bf16 peak, HBM bandwidth, bidirectional inter-chip
interconnect bandwidth), read 2026-12 from the pages in `source`; they bound time from below, they are not
measurements. `hbm_bytes` is what XLA's TPU compiler lets one program use (its out-of-memory message: "exceeds
available HBM (15.75G)" on v5e, 95.74G on v5p, 31.25G on v6e; published capacities 16 GB, 95 GB, 32 GB).
Slice names follow Cloud TPU's accelerator types: v5p counts TensorCores (2 per chip, so v5p-32
is 16 chips), v5e (v5litepod) and v6e count chips.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

import jax

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip. peak_flops: bf16 FLOP/s; hbm_bytes: HBM one program may use; hbm_bandwidth: bytes/s;
    ici_bandwidth: bidirectional inter-chip bytes/s per chip (None: not applicable / unknown); cores_per_chip: the
    TensorCores a slice name counts; device_kind: what `jax.Device.device_kind` reports."""

    name: str
    device_kind: str
    peak_flops: float
    hbm_bytes: float
    hbm_bandwidth: float
    ici_bandwidth: Optional[float]
    cores_per_chip: int
    source: str


CHIPS = {
    "v5e": Chip("v5e", "TPU v5 lite", 197e12, 15.75 * GiB, 819e9, 400e9, 1, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", "TPU v5", 459e12, 95.74 * GiB, 2765e9, 1200e9, 2, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", "TPU v6 lite", 918e12, 31.25 * GiB, 1638e9, 800e9, 1, "https://cloud.google.com/tpu/docs/v6e"),
}

# chips -> the slice's physical shape (Cloud TPU's supported single-slice topologies)
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8"}


def topology_name(slice_name: str) -> tuple[Chip, str]:
    """'v5p-32' -> (v5p, 'v5p:2x2x4'); 'v5e-16' -> (v5e, 'v5e:4x4'); an XLA name ('v5p:2x2x4') passes through."""
    m = re.fullmatch(r"(v5e|v5p|v6e):(\d+(?:x\d+)+)", slice_name)
    if m:
        return CHIPS[m.group(1)], slice_name
    m = re.fullmatch(r"(v5e|v5litepod|v5p|v6e)-(\d+)", slice_name)
    if not m:
        raise ValueError(f"topology {slice_name!r}: expected a slice name such as v5p-32, v5e-16, v6e-8, an XLA "
                         f"topology such as v5p:2x2x4, or 'local'")
    chip = CHIPS["v5e" if m.group(1) == "v5litepod" else m.group(1)]
    count = int(m.group(2))
    if count % chip.cores_per_chip:
        raise ValueError(f"{slice_name}: {chip.name} slice names count {chip.cores_per_chip} cores per chip")
    chips = count // chip.cores_per_chip
    shapes = _SHAPES_3D if chip.name == "v5p" else _SHAPES_2D
    if chips not in shapes:
        raise ValueError(f"{slice_name}: no {chip.name} slice of {chips} chips (known: "
                         f"{', '.join(f'{chip.name}-{c * chip.cores_per_chip}' for c in shapes)})")
    return chip, f"{chip.name}:{shapes[chips]}"


@dataclasses.dataclass(frozen=True)
class Target:
    """What a plan compiles for: the devices (abstract TPU devices of a topology, or this machine's), the chip's
    figures (None for `local`: no roofline), and a label."""

    label: str
    devices: tuple
    chip: Optional[Chip]

    @property
    def num_chips(self) -> int:
        return len(self.devices)


def sub_topology(chip: Chip, chips: int) -> str:
    """An XLA topology name of `chips` chips of `chip`: a Cloud slice shape where there is one, else 2 x 2 x n/4
    (v5p) or 2 x n/2 (v5e, v6e; n a multiple of a host's 4 chips), which the compiler accepts."""
    shapes = _SHAPES_3D if chip.name == "v5p" else _SHAPES_2D
    if chips in shapes:
        return f"{chip.name}:{shapes[chips]}"
    if chip.name == "v5p" and chips % 4 == 0:
        return f"v5p:2x2x{chips // 4}"
    if chip.name != "v5p" and chips % 4 == 0:  # hosts hold 2 x 2 chips
        return f"{chip.name}:2x{chips // 2}"
    raise ValueError(f"no {chip.name} topology of {chips} chips to compile a side of a disaggregated plan for")


def split_target(target: Target, rollout_devices) -> tuple[tuple, tuple]:
    """(learner devices, rollout devices) of a disaggregated plan. On this machine (`local`): the run's own split
    (`rollout.placement.split_devices`). On a TPU slice each side is compiled for an abstract topology of its own
    chip count (XLA's TPU compiler compiles a program for all of a topology's devices, not a subset), so each side's
    ICI layout is that topology's rather than its share of the slice's."""
    from arm_jax.rollout.placement import rollout_device_count, split_devices
    if target.chip is None:
        learner, rollout = split_devices(rollout_devices, target.devices)
        return tuple(learner), tuple(rollout)
    n = rollout_device_count(rollout_devices, target.num_chips)
    sides = []
    for chips in (target.num_chips - n, n):
        sides.append(make_target(sub_topology(target.chip, chips)).devices)
    return sides[0], sides[1]


def make_target(topology: str) -> Target:
    """'local' = this machine's devices; otherwise a TPU slice compiled for ahead of time with libtpu (no TPU
    needed: `jax.experimental.topologies`). A missing libtpu is an error saying how to install it."""
    if topology == "local":
        return Target("local", tuple(jax.devices()), None)
    chip, name = topology_name(topology)
    # compiling only: several processes may load the TPU compiler at once (libtpu otherwise holds a lock file)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # libtpu absent or too old
        raise RuntimeError(f"cannot describe TPU topology {name!r} ({e}); install the TPU compiler with "
                           f"pip install -e \".[tpu]\" (libtpu)") from e
    return Target(f"{topology} ({name}, {len(desc.devices)} chips)", tuple(desc.devices), chip)
