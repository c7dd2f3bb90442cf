"""Multi-process (multi-host) helpers: the one place that knows host arrays are process-local.

Convention: on the host every [B, ...] array a process holds is its *local* rows; the global batch is the
concatenation over processes in process order (process p holds rows [p * B_local, (p + 1) * B_local)). With one
process these are plain `device_put` / `np.asarray`, so single-host code pays nothing. The batch axes of the mesh
must list devices process by process (`jax.make_mesh` / `arm_jax.make_mesh` do), which `to_global` checks.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from arm_jax.sharding import DEFAULT_RULES, LogicalRules, batch_sharding


def process_count() -> int:
    """Number of JAX processes (1 without jax.distributed)."""
    return jax.process_count()


def process_index() -> int:
    """This process's index (0 without jax.distributed)."""
    return jax.process_index()


def to_global(mesh: Mesh, local: np.ndarray, rules: LogicalRules = DEFAULT_RULES) -> jax.Array:
    """Process-local rows [B_local, ...] -> a global array [B_local * processes, ...] sharded over the batch axes."""
    n = process_count()
    if n == 1:
        local = local if isinstance(local, jax.Array) else np.asarray(local)
        return jax.device_put(local, batch_sharding(mesh, local.shape, rules))
    local = np.asarray(local)
    global_shape = (local.shape[0] * n,) + local.shape[1:]
    sharding = batch_sharding(mesh, global_shape, rules)
    rows = _local_row_range(sharding, global_shape)
    if rows != (process_index() * local.shape[0], (process_index() + 1) * local.shape[0]):
        raise ValueError(f"the mesh's batch sharding gives process {process_index()} rows {rows} of a global batch "
                         f"of {global_shape[0]}, not its block of {local.shape[0]}: the batch must divide over the "
                         f"mesh's batch axes and the mesh must list devices process by process")
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def _local_row_range(sharding, global_shape) -> tuple[int, int]:
    starts, stops = [], []
    for idx in sharding.addressable_devices_indices_map(global_shape).values():
        s = idx[0] if idx else slice(None)
        starts.append(s.start or 0)
        stops.append(global_shape[0] if s.stop is None else s.stop)
    return min(starts), max(stops)


def to_local(x: jax.Array) -> np.ndarray:
    """A batch-sharded global array -> this process's rows as NumPy (all rows with one process)."""
    if process_count() == 1 or x.is_fully_addressable:
        return np.asarray(x)
    by_start: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        s = shard.index[0] if shard.index else slice(None)
        by_start.setdefault(s.start or 0, np.asarray(shard.data))
    return np.concatenate([by_start[k] for k in sorted(by_start)], axis=0)


def allgather(local: np.ndarray) -> np.ndarray:
    """Concatenates every process's array along axis 0 (same shape on every process)."""
    local = np.asarray(local)
    if process_count() == 1:
        return local
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def global_max(value: int) -> int:
    """The maximum of an integer over processes."""
    return int(np.max(allgather(np.asarray([value], np.int64))))


def barrier(name: str) -> None:
    """Waits until every process reaches the same named point (a no-op with one process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def local_slice(n_global: int) -> slice:
    """The rows [p * n / P, (p + 1) * n / P) of a global count that this process owns."""
    n = process_count()
    if n_global % n:
        raise ValueError(f"{n_global} rows do not divide over {n} processes")
    per = n_global // n
    return slice(process_index() * per, (process_index() + 1) * per)



def row_passes(local_rows: int, per_pass: "int | None", name: str, rows: str = "rows") -> list[slice]:
    """This process's row slices for passes of `per_pass` rows over all processes (None = one pass of all). The
    global row count must divide by per_pass and per_pass by the process count; the error names `name`."""
    procs = process_count()
    if per_pass is None:
        return [slice(0, local_rows)]
    local = per_pass // procs
    if per_pass % procs or local < 1 or local_rows % local:
        raise ValueError(f"{name}={per_pass} must divide the {local_rows * procs} {rows} and be a multiple of the "
                         f"{procs} processes")
    return [slice(start, start + local) for start in range(0, local_rows, local)]


def global_sum(value: int) -> int:
    """The sum of an integer over processes."""
    return int(np.sum(allgather(np.asarray([value], np.int64))))
