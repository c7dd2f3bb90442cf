"""Device mesh and the one logical-axis rules object.

Every parameter and activation carries logical axis names (`batch`, `seq`, `embed`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `vocab`, `expert`). `LogicalRules` maps them to mesh axes ('data', 'fsdp', 'tensor'). The mapping
is shape-aware: a mesh axis that does not divide a dimension (e.g. 2 kv heads on a tensor axis of 8) is dropped for
that dimension, which replicates it instead of failing, so one rules object serves every model size and mesh; each
such fallback is logged once (logger `arm_jax.sharding`), so a replicated weight or batch is never silent.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from arm_jax.config import ConfigError, MeshConfig

LogicalAxes = tuple[Optional[str], ...]
log = logging.getLogger(__name__)
_FALLBACKS: set = set()  # (logical axis, dimension size, mesh axis, its size) already logged


def _log_fallback(logical: str, dim: int, axis: str, size: int) -> None:
    key = (logical, dim, axis, size)
    if key not in _FALLBACKS:
        _FALLBACKS.add(key)
        log.warning("sharding: a %r dimension of size %d does not divide over mesh axis %r (size %d): it is "
                    "replicated over that axis", logical, dim, axis, size)


@dataclasses.dataclass(frozen=True)
class LogicalRules:
    """logical axis name -> tuple of mesh axis names (sharded over their product, in order)."""

    rules: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("batch", ("data", "fsdp", "expert")),
        ("embed", ("fsdp", "expert")),
        ("heads", ("tensor",)),
        ("kv_heads", ("tensor",)),
        ("mlp", ("tensor",)),
        ("vocab", ("tensor",)),
        ("expert", ("expert",)),
        ("lora_rank", ("fsdp", "expert")),  # LoRA's inner axis: ZeRO-shards an adapter whose kernel axes do not
        ("seq", ()),
        ("head_dim", ()),
        ("norm", ()),
    )

    def mesh_axes(self, logical: Optional[str]) -> tuple[str, ...]:
        """The mesh axes a logical axis maps to (() for None); a KeyError names an unknown logical axis."""
        if logical is None:
            return ()
        for name, axes in self.rules:
            if name == logical:
                return axes
        raise KeyError(f"logical axis {logical!r} has no rule (known: {[n for n, _ in self.rules]})")

    def spec(self, logical_axes: Sequence[Optional[str]], shape: Optional[Sequence[int]] = None,
             mesh: Optional[Mesh | jax.sharding.AbstractMesh] = None) -> PartitionSpec:
        """PartitionSpec for an array with these logical axes.

        With `shape` and `mesh`, mesh axes absent from the mesh, of size 1, already used by an earlier dimension,
        or not dividing the dimension are dropped (the dimension is then less sharded, never wrongly sharded).
        """
        used: set[str] = set()
        out = []
        for d, logical in enumerate(logical_axes):
            chosen = []
            for axis in self.mesh_axes(logical):
                if axis in used:
                    continue
                if mesh is not None:
                    size = dict(mesh.shape).get(axis)
                    if size is None or size == 1:
                        continue
                    if shape is not None and shape[d] % (math.prod(_sizes(mesh, chosen)) * size):
                        _log_fallback(logical, int(shape[d]), axis, int(size))
                        continue
                chosen.append(axis)
            used.update(chosen)
            out.append(None if not chosen else (chosen[0] if len(chosen) == 1 else tuple(chosen)))
        return PartitionSpec(*out)

    def sharding(self, logical_axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
        """NamedSharding on `mesh` for an array of `shape` with these logical axes (shape-aware, see `spec`)."""
        return NamedSharding(mesh, self.spec(logical_axes, shape, mesh))


DEFAULT_RULES = LogicalRules()


def _sizes(mesh, axes):
    shape = dict(mesh.shape)
    return [shape[a] for a in axes]


def make_mesh(config: MeshConfig | Sequence[int] | None = None, devices: Optional[Sequence] = None) -> Mesh:
    """Builds the ('data', 'fsdp', 'tensor') mesh from a MeshConfig (or a shape tuple); -1 takes the rest of the
    devices; a fully specified shape uses the first prod(shape) devices.

    Axes are `Auto` (GSPMD propagation), so sharding constraints inside jitted code work.
    """
    if config is None:
        config = MeshConfig()
    elif not isinstance(config, MeshConfig):
        config = MeshConfig(shape=tuple(config))
    devices = list(devices) if devices is not None else jax.devices()
    n = len(devices)
    shape = list(config.shape)
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n % known:
            raise ConfigError(f"mesh.shape {tuple(config.shape)}: {n} devices are not divisible by {known}")
        shape[shape.index(-1)] = n // known
    if math.prod(shape) > n:
        raise ConfigError(f"mesh.shape {tuple(config.shape)} needs {math.prod(shape)} devices, but {n} are "
                          f"available")
    # a fully specified shape smaller than the machine uses the first devices (e.g. the CPU quick-start's (1,1,1))
    device_array = np.asarray(devices[:math.prod(shape)], dtype=object).reshape(shape)
    return Mesh(device_array, config.axis_names,
                axis_types=(jax.sharding.AxisType.Auto,) * len(config.axis_names))


def constrain(x: jax.Array, logical_axes: LogicalAxes, rules: LogicalRules = DEFAULT_RULES) -> jax.Array:
    """`with_sharding_constraint` by logical axes under the current mesh (`jax.set_mesh`); a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, rules.spec(logical_axes, x.shape, mesh))


def batch_devices(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> int:
    """How many devices the batch dimension is split over (the product of the mesh's batch axes)."""
    return math.prod(dict(mesh.shape).get(a, 1) for a in rules.mesh_axes("batch"))


def batch_shards(n: int, rules: LogicalRules = DEFAULT_RULES) -> int:
    """How many blocks a batch dimension of size n is split into under the current mesh (`jax.set_mesh`; 1
    without one): the per-device share of a traced [n, ...] batch is n / batch_shards(n)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return 1
    entry = rules.spec(("batch",), (n,), mesh)[0]
    axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    return math.prod(dict(mesh.shape)[a] for a in axes)


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a [B, ...] input: batch over ('data', 'fsdp') where it divides, the rest replicated."""
    return rules.sharding(("batch",) + (None,) * (len(shape) - 1), shape, mesh)


def target_platform() -> str:
    """The platform the code being traced will run on: that of the mesh set by `jax.set_mesh` (which may be a TPU
    topology compiled for ahead of time from a CPU host, `arm_jax.plan`), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh is None or mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()
