"""Where the rollout runs: on the learner's mesh (colocated, the default) or on a mesh of its own (disaggregated,
`RLConfig.rollout_devices`), and how the learner's new weights reach it.

A disaggregated run splits the devices in two: every process gives the same number of its own devices to the
rollout mesh and keeps the rest for the learner's, so each process holds devices of both meshes and its rows of a
batch stay on it. After each update the weights move learner -> rollout mesh device to device (`transfer`), in the
rollout mesh's own layout (`rollout_mesh_shape`, ZeRO-sharded by the same rules as the learner's, or replicated per
chip with `rollout_param_layout='replicated'`), never through the host.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from arm_jax.config import ConfigError, ModelConfig
from arm_jax.sharding import DEFAULT_RULES, LogicalRules, make_mesh


def rollout_device_count(value, total: int) -> int:
    """RLConfig.rollout_devices as a device count: an int is a count, a float in (0, 1) a fraction of `total`."""
    if isinstance(value, float) and not value.is_integer():
        if not 0.0 < value < 1.0:
            raise ConfigError(f"RLConfig.rollout_devices={value}: a fraction must lie in (0, 1)")
        n = int(round(value * total))
    else:
        n = int(value)
    if not 0 < n < total:
        raise ConfigError(f"RLConfig.rollout_devices={value} gives {n} of {total} devices to the rollout: at least 1 "
                          f"must go to each side")
    return n


def split_devices(rollout_devices, devices: Optional[Sequence] = None) -> tuple[list, list]:
    """(learner devices, rollout devices): every process gives rollout_devices / process_count of its own devices
    (its last ones) to the rollout; both lists ordered process by process."""
    devices = list(devices) if devices is not None else jax.devices()
    n = rollout_device_count(rollout_devices, len(devices))
    procs = sorted({d.process_index for d in devices})
    if n % len(procs):
        raise ConfigError(f"RLConfig.rollout_devices={rollout_devices} ({n} devices) does not divide over "
                          f"{len(procs)} processes: each process holds devices of both meshes")
    per = n // len(procs)
    learner, rollout = [], []
    for p in procs:
        mine = [d for d in devices if d.process_index == p]
        if per >= len(mine):
            raise ConfigError(f"RLConfig.rollout_devices={rollout_devices}: process {p} would give all of its "
                              f"{len(mine)} devices to the rollout")
        learner += mine[:len(mine) - per]
        rollout += mine[len(mine) - per:]
    return learner, rollout


def default_rollout_shape(axis_names: Sequence[str]) -> tuple:
    """RLConfig.rollout_mesh_shape's default for a learner mesh with these axes: every rollout device on 'fsdp'."""
    return tuple(-1 if a == "fsdp" else 1 for a in axis_names)


def rollout_mesh(learner_mesh: Mesh, rollout_devices, shape: Optional[tuple] = None,
                 devices: Optional[Sequence] = None) -> Mesh:
    """The rollout's mesh over the devices `learner_mesh` leaves out (`split_devices` of `devices`, default all,
    which must give the learner exactly `learner_mesh`'s devices). shape: its (data, fsdp, tensor[, expert])
    shape, -1 the rest (default: all on 'fsdp', the learner's axes otherwise 1)."""
    learner, rollout = split_devices(rollout_devices, devices)
    if set(learner) != set(learner_mesh.devices.flat):
        raise ConfigError(f"RLConfig.rollout_devices={rollout_devices}: the learner's mesh holds "
                          f"{learner_mesh.devices.size} devices, not the {len(learner)} the split leaves it; build "
                          f"it with make_mesh(shape, devices=split_devices(rollout_devices)[0]) (the launcher does)")
    names = learner_mesh.axis_names
    if shape is None:
        shape = default_rollout_shape(names)
    if len(shape) != len(names):
        raise ConfigError(f"RLConfig.rollout_mesh_shape={shape} must have one entry per learner mesh axis {names}")
    mesh = make_mesh(tuple(shape), devices=rollout)
    if mesh.devices.size != len(rollout):
        raise ConfigError(f"RLConfig.rollout_mesh_shape={shape} uses {mesh.devices.size} of the rollout's "
                          f"{len(rollout)} devices")
    return mesh


def rollout_shardings(params, config: ModelConfig, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """The parameters' shardings on `mesh` by the same logical-axis rules as the learner's (a pytree like
    `params`)."""
    from arm_jax.models import abstract_model, param_shardings
    tree = param_shardings(abstract_model(config)[1], mesh, rules)
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, NamedSharding))
    treedef = jax.tree.structure(params)
    if len(leaves) != treedef.num_leaves:
        raise ValueError(f"{treedef.num_leaves} parameter arrays but {len(leaves)} shardings for {config.model_type}")
    return jax.tree.unflatten(treedef, leaves)


def _bounds(index: tuple, shape: tuple) -> list[tuple[int, int]]:
    return [(s.start or 0, dim if s.stop is None else s.stop) for s, dim in zip(index, shape)]


@functools.lru_cache(maxsize=None)
def _assemble(shape: tuple, dtype, dsts: tuple):
    """A jitted block of `shape` from disjoint pieces placed at `dsts` ((start, stop) per dimension), on the
    pieces' device (no host-to-device constants: the indices are static)."""
    def build(*pieces):
        block = jnp.zeros(shape, dtype)
        for dst, piece in zip(dsts, pieces):
            block = jax.lax.dynamic_update_slice(block, piece, tuple(a for a, _ in dst))
        return block
    return jax.jit(build)


@functools.lru_cache(maxsize=None)
def _cut(bounds: tuple):
    """A jitted static slice ((start, stop) per dimension): no index constants cross from the host."""
    return jax.jit(lambda x: x[tuple(slice(a, b) for a, b in bounds)])


def _transfer_one(x: jax.Array, target: NamedSharding, name: str) -> jax.Array:
    """x on the target sharding from this process's own shards of x: each target block is cut from (or pieced
    together from) source shards, copied device to device."""
    shape = x.shape
    sources = {}
    for shard in x.addressable_shards:  # one source per distinct block (replicas hold the same data)
        sources.setdefault(tuple(_bounds(shard.index, shape)), shard.data)
    blocks = []
    for device, index in target.addressable_devices_indices_map(shape).items():
        want = _bounds(index, shape)
        pieces, covered = [], 0
        for have, data in sources.items():
            lo = [max(a, c) for (a, _), (c, _) in zip(have, want)]
            hi = [min(b, d) for (_, b), (_, d) in zip(have, want)]
            if any(h <= lo_ for lo_, h in zip(lo, hi)):
                continue
            src = tuple(slice(lo_ - a, h - a) for lo_, h, (a, _) in zip(lo, hi, have))
            dst = tuple(slice(lo_ - c, h - c) for lo_, h, (c, _) in zip(lo, hi, want))
            whole = all(s.stop - s.start == b - a for s, (a, b) in zip(src, have))
            part = data if whole else _cut(tuple((a.start, a.stop) for a in src))(data)  # on the source device
            pieces.append((dst, jax.device_put(part, device)))
            covered += math.prod(h - lo_ for lo_, h in zip(lo, hi))
        size = math.prod(b - a for a, b in want)
        if covered < size:
            raise ValueError(f"parameter {name}: this process holds {covered} of the {size} elements its rollout "
                             f"devices need; the learner and rollout meshes must split every sharded dimension "
                             f"over the processes alike (same process order on the sharded axes)")
        if len(pieces) == 1 and all(s.stop - s.start == b - a for s, (a, b) in zip(pieces[0][0], want)):
            blocks.append(pieces[0][1])
            continue
        dsts = tuple(tuple((d.start, d.stop) for d in dst) for dst, _ in pieces)
        blocks.append(_assemble(tuple(b - a for a, b in want), x.dtype, dsts)(*(p for _, p in pieces)))
    return jax.make_array_from_single_device_arrays(shape, target, blocks)


def transfer(params, shardings):
    """`params` (arrays on the learner's mesh) on `shardings` (a like pytree on the rollout mesh), moved device to
    device from each process's own shards: no host copy, no cross-process transfer (the meshes are built by
    `split_devices` so every process holds the data its rollout devices need). New buffers: the learner may
    donate its own afterwards."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    targets = treedef.flatten_up_to(shardings)
    out = [_transfer_one(x, t, jax.tree_util.keystr(path)) for (path, x), t in zip(flat, targets)]
    return jax.tree.unflatten(treedef, out)
