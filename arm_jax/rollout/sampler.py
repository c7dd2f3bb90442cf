"""The rollout engine: prefill, then decode over a preallocated KV cache (docs/method.md §4).

Prompts are left-padded to a common length Tp (rounded up to `pad_multiple` to bound recompiles) and repeated n
times (row b * n + j is sample j of prompt b). Rows go through the engine in passes of at most `rows_per_pass`
(the memory lever: the cache is [rows, Tp + N, K, Dh] per layer). Per pass, one jitted call prefills the cache with
the prompts (a Tp x Tp self-attention over the prompt only), and a second, which takes the cache over (donated,
updated in place), runs a `lax.while_loop` that decodes one token per row per step and stops as soon as every row
has produced a stop id or N tokens. Row r's PRNG stream is fold_in(fold_in(fold_in(key(seed), step), r), t), so a
rollout is reproducible and does not depend on the mesh or the passes. The sampler runs the learner's own model
code on the learner's own parameter arrays (or their replicated compute-dtype copy, `rollout_params`), cast to the
compute dtype once at the start of each call exactly as the learner casts them, so its temperature-1 log-probs are
the learner's logp_old.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from arm_jax import distributed
from arm_jax.models import compute_params, init_cache, merge_for_compute
from arm_jax.policy import Policy, place_batch
from arm_jax.rollout.sampling import SamplingFlags, flags_for, sample_next
from arm_jax.models.logprobs import positions_from_mask


@dataclasses.dataclass
class Rollout:
    """Sampled responses, row b * n + j = sample j of prompt b (numpy arrays).

    tokens [R, N] int32 (0 after the end), mask [R, N] (1 on generated tokens incl. the stop token),
    logp [R, N] float32 log-prob of each sampled token under the temperature-1 distribution (logp_old),
    logp_sampling [R, N] under the distribution actually sampled from (temperature, top-k/p, min-p),
    lengths [R], truncated [R] (no stop id within max_new_tokens),
    prompt_tokens / prompt_mask [R, Tp] the left-padded prompts, prompt_index [R] = b.
    """

    tokens: np.ndarray
    mask: np.ndarray
    logp: np.ndarray
    logp_sampling: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray
    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray
    prompt_index: np.ndarray

    def sequences(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, attention_mask, loss_mask) [R, Tp + N] of prompt + response, the learner's layout."""
        tokens = np.concatenate([self.prompt_tokens, self.tokens], axis=1)
        attn = np.concatenate([self.prompt_mask, self.mask], axis=1)
        loss_mask = np.concatenate([np.zeros_like(self.prompt_mask), self.mask], axis=1)
        return tokens, attn, loss_mask


def _prefill(graphdef, params, prompt_tokens, prompt_mask, *, max_new_tokens: int):
    """Pure: prompts [R, Tp] -> (cache [R, Tp + N] holding the prompts' k/v, logits [R, V] of the first new token).
    Attention is the Tp x Tp self-attention over the prompt (splash on TPUs), never over the N empty slots."""
    model = merge_for_compute(graphdef, params)  # cast to the compute dtype once per call
    R, Tp = prompt_tokens.shape
    cache = init_cache(model.cfg, R, Tp + max_new_tokens)
    with jax.named_scope("prefill"):
        hidden, cache = model(prompt_tokens, positions_from_mask(prompt_mask), prompt_mask.astype(bool), cache, 0)
        logits = model.logits(hidden[:, -1])  # left padding: the last prompt slot is real
    return cache, logits


def _decode(graphdef, params, cache, logits, prompt_mask, row_keys, temperature, top_k, top_p, min_p, stop_ids,
            *, max_new_tokens: int, flags: SamplingFlags):
    """Pure: the prefilled cache -> (tokens, mask, logp, logp_sampling) [R, N], finished [R] and the final cache.
    One token per row per step until every row has stopped or N tokens. Returning the cache lets the jit alias it
    to the donated input: the loop updates the one buffer in place instead of copying it into its carry."""
    model = merge_for_compute(graphdef, params)  # once per call, before the loop
    R, Tp = prompt_mask.shape
    N = max_new_tokens
    kv_valid = jnp.concatenate([prompt_mask.astype(bool), jnp.zeros((R, N), bool)], axis=1)
    next_pos = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)

    def cond(state):
        i, _, _, _, _, done, *_ = state
        return (i < N) & ~jnp.all(done)

    @jax.named_scope("decode_step")
    def body(state):
        i, cache, kv_valid, logits, pos, done, toks, mask, lp, lps = state
        keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(row_keys)
        tok, logp, logp_s = sample_next(logits, keys, temperature, top_k, top_p, min_p, flags)
        live = ~done
        tok = jnp.where(live, tok, 0)
        toks = toks.at[:, i].set(tok)
        mask = mask.at[:, i].set(live)
        lp = lp.at[:, i].set(jnp.where(live, logp, 0.0))
        lps = lps.at[:, i].set(jnp.where(live, logp_s, 0.0))
        done = done | jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
        kv_valid = kv_valid.at[:, Tp + i].set(True)
        hidden, cache = model(tok[:, None], pos[:, None], kv_valid, cache, Tp + i)
        cache = cache.constrained()
        return (i + 1, cache, kv_valid, model.logits(hidden[:, 0]), pos + 1, done, toks, mask, lp, lps)

    zeros_f = jnp.zeros((R, N), jnp.float32)
    state = (jnp.zeros((), jnp.int32), cache, kv_valid, logits, next_pos, jnp.zeros((R,), bool),
             jnp.zeros((R, N), jnp.int32), jnp.zeros((R, N), bool), zeros_f, zeros_f)
    _, cache, _, _, _, done, toks, mask, lp, lps = jax.lax.while_loop(cond, body, state)
    return toks, mask, lp, lps, done, cache


_prefill_jit = jax.jit(_prefill, static_argnums=(0,), static_argnames=("max_new_tokens",))
_decode_jit = jax.jit(_decode, static_argnums=(0,), static_argnames=("max_new_tokens", "flags"), donate_argnums=(2,))

PARAM_LAYOUTS = ("train", "replicated")


def rollout_params(policy: Policy, layout: str = "train") -> nnx.State:
    """The parameters the sampler reads. 'train': the learner's own arrays (ZeRO-3 sharded: every decode step
    all-gathers every weight); 'replicated': one compute-dtype copy on every chip, made once per call (one
    all-gather of the weights per RL step, then decode steps move no weights; needs the compute-dtype model in
    each chip's memory beside the masters' shards)."""
    if layout == "train":
        return policy.params
    if layout != "replicated":
        raise ValueError(f"rollout param layout must be one of {PARAM_LAYOUTS}, got {layout!r}")
    with jax.set_mesh(policy.mesh):
        return replicate_jit(policy.mesh)(policy.params, policy.config)


@functools.lru_cache(maxsize=None)
def replicate_jit(mesh):
    """The jitted (params, cfg) -> compute-dtype copy on every chip of `mesh` ('replicated' layout), one per mesh."""
    return jax.jit(compute_params, static_argnums=(1,), out_shardings=NamedSharding(mesh, PartitionSpec()))


def row_keys(seed: int, step: int, rows: int) -> jax.Array:
    """Per-row PRNG keys [rows] = fold_in(fold_in(key(seed), step), row)."""
    base = jax.random.fold_in(jax.random.key(seed), step)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.arange(rows))


def left_pad(prompts: Sequence[Sequence[int]], pad_multiple: int = 1, pad_id: int = 0, length: int = 0):
    """list of token-id lists -> (tokens, mask) [B, Tp] left-padded, Tp = max(longest, length) rounded up to a
    multiple of pad_multiple."""
    Tp = max(max(len(p) for p in prompts), length)
    Tp = int(math.ceil(Tp / pad_multiple) * pad_multiple)
    tokens = np.full((len(prompts), Tp), pad_id, np.int32)
    mask = np.zeros((len(prompts), Tp), np.int32)
    for b, p in enumerate(prompts):
        if len(p):
            tokens[b, Tp - len(p):] = p
            mask[b, Tp - len(p):] = 1
    return tokens, mask


def _validate(policy: Policy, prompts, max_new_tokens, temperature, top_p, top_k, min_p, n):
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for b, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{b}] is empty: every prompt needs at least one token")
        arr = np.asarray(p)
        if arr.min() < 0 or arr.max() >= policy.config.vocab_size:
            raise ValueError(f"prompts[{b}] has token ids outside [0, vocab_size={policy.config.vocab_size})")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    longest = max(len(p) for p in prompts)
    limit = policy.config.max_position_embeddings
    if longest + max_new_tokens > limit:
        raise ValueError(f"prompt length {longest} + max_new_tokens {max_new_tokens} exceeds the model's context "
                         f"(max_position_embeddings={limit})")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 <= min_p < 1.0:
        raise ValueError(f"min_p must be in [0, 1), got {min_p}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")


def generate(policy: Policy, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, n: int = 1, seed: int = 0, step: int = 0,
             stop_ids: Optional[Sequence[int]] = None, pad_multiple: int = 8, rows_per_pass: Optional[int] = None,
             param_layout: str = "train") -> Rollout:
    """Samples n responses per prompt (docs/method.md §9 `aj.generate`). stop_ids default to the checkpoint's EOS ids.

    rows_per_pass: rows (prompts x n, over all processes) decoded together (None = all); must divide the rows.
    Samples do not depend on it: row r's keys are fixed by its index. param_layout: `rollout_params`.
    With several processes, `prompts` are this process's prompts (the same number on every process) and the
    Rollout holds their rows; row keys follow the global row index, so results do not depend on the process count.
    """
    _validate(policy, prompts, max_new_tokens, temperature, top_p, top_k, min_p, n)
    stop = list(stop_ids) if stop_ids is not None else list(policy.config.eos_token_ids)
    stop_arr = jnp.asarray(stop if stop else [-1], jnp.int32)
    tokens, mask = left_pad(prompts, pad_multiple, length=distributed.global_max(max(len(p) for p in prompts)))
    tokens, mask = np.repeat(tokens, n, axis=0), np.repeat(mask, n, axis=0)
    R = tokens.shape[0]
    procs = distributed.process_count()
    passes = distributed.row_passes(R, rows_per_pass, "rows_per_pass", "rollout rows (prompts x n)")
    keys = jax.random.key_data(row_keys(seed, step, R * procs))
    keys = np.asarray(keys)[distributed.local_slice(keys.shape[0])]
    params = rollout_params(policy, param_layout)
    sampling = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jnp.float32(min_p), stop_arr)
    outs = []
    with jax.set_mesh(policy.mesh):
        for rows in passes:
            p_tokens, p_mask, p_keys = place_batch(policy, tokens[rows], mask[rows], keys[rows])
            cache, logits = _prefill_jit(policy.graphdef, params, p_tokens, p_mask,
                                         max_new_tokens=int(max_new_tokens))
            out = _decode_jit(policy.graphdef, params, cache, logits, p_mask, jax.random.wrap_key_data(p_keys),
                              *sampling, max_new_tokens=int(max_new_tokens), flags=flags_for(top_k, top_p, min_p))
            outs.append([distributed.to_local(x) for x in out[:5]])  # out[5]: the spent cache, freed here
    toks, gen_mask, lp, lps, done = (np.concatenate(parts, axis=0) for parts in zip(*outs))
    return Rollout(tokens=toks, mask=gen_mask.astype(np.int32), logp=lp, logp_sampling=lps,
                   lengths=gen_mask.sum(axis=1).astype(np.int32), truncated=~done, prompt_tokens=tokens,
                   prompt_mask=mask, prompt_index=np.repeat(np.arange(len(prompts)), n))
