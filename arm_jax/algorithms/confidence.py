"""Generative-probability confidences used by ARM (docs/method.md §1). Pure jnp, float32, no gradient.

Answer confidence ("low-probability token length normalization"): for response i with n_i response tokens,
k_i = max(1, ceil(rho * n_i)) and T_low(i) the k_i positions with the lowest log-prob (ties: lowest index first);
c(o_i|q) = exp(mean_{t in T_low(i)} logp[i, t]) in (0, 1]. rho = 1 gives the length-normalized likelihood.

Prompt confidence ("prompt perplexity"): c(q) = 1 / PPL(q) = exp(mean_j logp(q_j | q_<j)) over the masked prompt
tokens (the question span, first token excluded by the mask); mode 'low_frac' applies the rho-lowest selection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# ceil(rho * n) is evaluated with this slack so that float32 rounding (0.2 * 15 = 3.0000000447) cannot add a token.
_CEIL_SLACK = 1e-4


def num_low_tokens(n: jax.Array, rho: float | jax.Array) -> jax.Array:
    """k = max(1, ceil(rho * n)) as int32 (n: number of counted tokens)."""
    k = jnp.ceil(jnp.asarray(rho, jnp.float32) * n.astype(jnp.float32) - _CEIL_SLACK).astype(jnp.int32)
    return jnp.maximum(k, 1)


def low_fraction_mean_logp(logp: jax.Array, mask: jax.Array, rho: float | jax.Array) -> jax.Array:
    """Mean of the k = max(1, ceil(rho * n)) lowest masked log-probs per row. logp, mask: [N, T] -> [N] float32.

    A row with no counted token gets 0 (confidence 1): it carries no evidence either way.
    """
    logp = jax.lax.stop_gradient(logp.astype(jnp.float32))
    mask = mask.astype(bool)
    n = jnp.sum(mask, axis=-1)
    k = num_low_tokens(n, rho)
    keyed = jnp.where(mask, logp, jnp.inf)
    order = jnp.argsort(keyed, axis=-1, stable=True)  # ascending; ties keep the lowest index first
    sorted_vals = jnp.take_along_axis(keyed, order, axis=-1)
    take = jnp.arange(logp.shape[-1])[None, :] < k[:, None]
    total = jnp.sum(jnp.where(take & jnp.isfinite(sorted_vals), sorted_vals, 0.0), axis=-1)
    return jnp.where(n > 0, total / k.astype(jnp.float32), 0.0)


def masked_mean_logp(logp: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean masked log-prob per row: [N, T] -> [N] float32 (0 for an empty row)."""
    logp = jax.lax.stop_gradient(logp.astype(jnp.float32))
    mask = mask.astype(jnp.float32)
    n = jnp.sum(mask, axis=-1)
    return jnp.sum(logp * mask, axis=-1) / jnp.maximum(n, 1.0)


def answer_confidence(resp_logp: jax.Array, resp_mask: jax.Array, rho: float | jax.Array = 0.2) -> jax.Array:
    """c(o|q): [N, T] response log-probs and mask -> [N] in (0, 1]."""
    return jnp.exp(low_fraction_mean_logp(resp_logp, resp_mask, rho))


def prompt_confidence(prompt_logp: jax.Array, prompt_mask: jax.Array, mode: str = "mean",
                      rho: float | jax.Array = 0.2) -> jax.Array:
    """c(q) = 1 / PPL(q) over the masked prompt tokens: [P, Tp] -> [P]. mode: 'mean' or 'low_frac'."""
    if mode == "mean":
        return jnp.exp(masked_mean_logp(prompt_logp, prompt_mask))
    if mode == "low_frac":
        return jnp.exp(low_fraction_mean_logp(prompt_logp, prompt_mask, rho))
    raise ValueError(f"prompt_conf_mode must be 'mean' or 'low_frac', got {mode!r}")
