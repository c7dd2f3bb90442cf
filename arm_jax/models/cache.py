"""The decode cache as a typed pytree, shared by both model families."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from arm_jax.sharding import constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer cache entries over S slots. Dense family: layers[i] = {'k', 'v': [B, K, S, Dh]} (heads-major, no
    transpose when decoding); MLA: {'latent': [B, S, kv_lora_rank + qk_rope_head_dim]} (the latent-only cache).
    axes (static): ((entry, logical axes), ...), which `constrained` applies under the current mesh."""

    layers: list
    axes: tuple = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def zeros(cls, num_layers: int, shapes: dict[str, Sequence[int]], dtype, axes: dict[str, tuple]) -> "KVCache":
        """A zero cache of num_layers layers, entries of these shapes and dtype, constrained to their axes."""
        layer = lambda: {k: constrain(jnp.zeros(tuple(s), dtype), axes[k]) for k, s in shapes.items()}  # noqa: E731
        return cls([layer() for _ in range(num_layers)], tuple(sorted(axes.items())))

    def __getitem__(self, i: int) -> dict:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def with_layers(self, layers: list) -> "KVCache":
        """The same cache layout holding `layers` (one updated entry dict per layer)."""
        return KVCache(list(layers), self.axes)

    def constrained(self) -> "KVCache":
        """Every entry constrained to its logical axes (keeps the cache sharded through a while_loop)."""
        axes = dict(self.axes)
        return self.with_layers([{k: constrain(v, axes[k]) for k, v in layer.items()} for layer in self.layers])


def write_slots(buffer: jax.Array, new: jax.Array, index, axis: int) -> jax.Array:
    """Writes `new` [B, ..., T, ...] into `buffer` [B, ..., S, ...] at slots [index, index + T) along `axis`.
    index: a scalar (the same slots in every row: lockstep decode, prefill) or [B] int (row b at index[b]: the
    refill engine, whose slots are at different steps)."""
    new = new.astype(buffer.dtype)
    if jnp.ndim(index) == 0:
        return lax.dynamic_update_slice_in_dim(buffer, new, index, axis=axis)
    return jax.vmap(lambda b, n, i: lax.dynamic_update_slice_in_dim(b, n, i, axis=axis - 1))(buffer, new, index)
