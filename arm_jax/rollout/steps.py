"""The rollout's device programs: pure functions of (graphdef, params, arrays), jitted with fixed shapes. The host
drivers that call them are `sampler.py` (lockstep) and `refill.py` (slot refilling).

  prefill        prompts [R, Tp] -> their k/v in a cache of Tp + N slots, the first new token's logits [R, V];
  decode         lockstep: every row one token per step until all rows stop (or reach their budget);
  insert         refill: copies prefilled prompts' k/v and logits into chosen decode slots (the rest untouched);
  decode_chunk   refill: at most K steps over S slots, each at its own step, returning early once enough slots
                 finished for the host to refill them;
  compact        refill: keeps a subset of each batch shard's slots (the tail, when no prompt is waiting).

A sample's randomness is fold_in(key of its row, i) for its i-th new token, whatever engine, slot or chunk draws
it (`sampler.row_keys`), so both engines return the same tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from arm_jax.models import init_cache, merge_for_compute
from arm_jax.models.cache import KVCache
from arm_jax.models.logprobs import positions_from_mask
from arm_jax.models.moe import routing_layout
from arm_jax.rollout.sampling import SamplingFlags, sample_next
from arm_jax.sharding import constrain


def _forward(model, *args, **kw):
    """model(...) -> (hidden, cache, the experts each token used [B, T, L_moe, k] in the compact recording dtype,
    or None for a model without MoE layers: `moe.routing_layout`)."""
    layout = routing_layout(model.cfg)
    if layout is None:
        return (*model(*args, **kw), None)
    hidden, cache, used, _ = model(*args, **kw, return_routing=True)
    return hidden, cache, used.astype(layout[2])


def _prefill(graphdef, params, prompt_tokens, prompt_mask, *, max_new_tokens: int):
    """Pure: prompts [R, Tp] -> (cache [R, Tp + N] holding the prompts' k/v, logits [R, V] of the first new token,
    the experts every prompt position used [R, Tp, L_moe, k] (MoE models; else None; the last position's produced
    token 0).
    Attention is the Tp x Tp self-attention over the prompt (splash on TPUs), never over the N empty slots."""
    model = merge_for_compute(graphdef, params)  # cast to the compute dtype once per call
    R, Tp = prompt_tokens.shape
    cache = init_cache(model.cfg, R, Tp + max_new_tokens)
    with jax.named_scope("prefill"):
        hidden, cache, used = _forward(model, prompt_tokens, positions_from_mask(prompt_mask),
                                       prompt_mask.astype(bool), cache, 0)
        logits = model.logits(hidden[:, -1])  # left padding: the last prompt slot is real
    return cache, logits, used


def _record(buf, column, value, live):
    """buf [R, C, ...] with value [R, ...] written at `column` for the live rows (None passes through)."""
    if buf is None:
        return None
    keep = live.reshape(live.shape + (1,) * (value.ndim - 1))
    return buf.at[:, column].set(jnp.where(keep, value, jnp.zeros_like(value)))


def _sample_step(logits, keys, live, column, outs, sampling, flags: SamplingFlags):
    """One token per row from logits [R, V] with keys [R] for the `live` rows (0 elsewhere), recorded at `column`
    of outs = (tokens, emitted, logp, logp_sampling) [R, C]. Returns (tokens [R], stop [R]: a live row drew a
    stop id, outs)."""
    temperature, top_k, top_p, min_p, stop_ids = sampling
    tok, logp, logp_s = sample_next(logits, keys, temperature, top_k, top_p, min_p, flags)
    tok = jnp.where(live, tok, 0)
    toks, emitted, lp, lps = outs
    outs = (toks.at[:, column].set(tok), emitted.at[:, column].set(live),
            lp.at[:, column].set(jnp.where(live, logp, 0.0)), lps.at[:, column].set(jnp.where(live, logp_s, 0.0)))
    return tok, live & jnp.any(tok[:, None] == stop_ids[None, :], axis=-1), outs


def _decode(graphdef, params, cache, logits, prompt_mask, row_keys, budget, temperature, top_k, top_p, min_p,
            stop_ids, routing=None, *, max_new_tokens: int, flags: SamplingFlags):
    """Pure, lockstep: the prefilled cache -> (tokens, mask, logp, logp_sampling) [R, N], stopped [R] (ended by a
    stop id), steps run, the final cache, and (MoE models, given the prefill's `routing` [R, Tp, L_moe, k]) the
    experts [R, N, L_moe, k] of the forward that produced each token's logits, else None. Row r emits tokens until
    a stop id or budget[r] (<= N) tokens; the loop ends when every row has. Returning the cache lets the jit alias
    it to the donated input: the loop updates the one buffer in place instead of copying it into its carry."""
    model = merge_for_compute(graphdef, params)  # once per call, before the loop
    sampling = (temperature, top_k, top_p, min_p, stop_ids)
    R, Tp = prompt_mask.shape
    N = max_new_tokens
    kv_valid = jnp.concatenate([prompt_mask.astype(bool), jnp.zeros((R, N), bool)], axis=1)
    next_pos = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)

    def cond(state):
        i, _, _, _, _, _, done, *_ = state
        return (i < N) & ~jnp.all(done)

    @jax.named_scope("decode_step")
    def body(state):
        i, cache, kv_valid, logits, used, pos, done, stopped, recorded, *outs = state
        keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(row_keys)
        recorded = _record(recorded, i, used, ~done)  # the routing behind token i's logits
        tok, stop, outs = _sample_step(logits, keys, ~done, i, outs, sampling, flags)
        stopped = stopped | stop
        done = done | stop | (i + 1 >= budget)
        kv_valid = kv_valid.at[:, Tp + i].set(True)
        hidden, cache, new_used = _forward(model, tok[:, None], pos[:, None], kv_valid, cache, Tp + i)
        cache = cache.constrained()
        used = None if used is None else new_used[:, 0]
        return (i + 1, cache, kv_valid, model.logits(hidden[:, 0]), used, pos + 1, done, stopped, recorded, *outs)

    zeros_f = jnp.zeros((R, N), jnp.float32)
    no = jnp.zeros((R,), bool)
    routing = None if routing is None else routing[:, -1]  # the prompt's last position: token 0's routing
    recorded = None if routing is None else jnp.zeros((R, N) + routing.shape[1:], routing.dtype)
    state = (jnp.zeros((), jnp.int32), cache, kv_valid, logits, routing, next_pos, no, no, recorded,
             jnp.zeros((R, N), jnp.int32), jnp.zeros((R, N), bool), zeros_f, zeros_f)
    steps, cache, _, _, _, _, _, stopped, recorded, toks, mask, lp, lps = jax.lax.while_loop(cond, body, state)
    return toks, mask, lp, lps, stopped, steps, cache, recorded


# ------------------------------------------------------------------------------------------------ refill


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
    """The refill engine's S decode slots (device arrays, slot axis first, sharded over the batch axes).

    cache: KVCache [S, ..., L], L = Tp + N: a slot holds its prompt's k/v at [0, Tp) (left-padded, as lockstep)
        and its i-th new token's at Tp + i, so a sample sees exactly the cache lockstep would give its row;
    kv_valid [S, L] bool; logits [S, V] float32 of the slot's next token; pos [S] int32 its position id;
    step [S] int32 its index i (tokens emitted so far); budget [S] int32 its sample's max new tokens;
    live [S] bool (holds a sample that has not finished); keys [S, 2] uint32 its sample's key data;
    routing [S, L_moe, k] (MoE models, else None): the experts of the forward that produced `logits`.
    """

    cache: KVCache
    kv_valid: jax.Array
    logits: jax.Array
    pos: jax.Array
    step: jax.Array
    budget: jax.Array
    live: jax.Array
    keys: jax.Array
    routing: Optional[jax.Array] = None

    def constrained(self) -> "Slots":
        rows = {f.name: None if x is None else constrain(x, ("batch",) + (None,) * (x.ndim - 1))
                for f in dataclasses.fields(self) if f.name != "cache" for x in [getattr(self, f.name)]}
        return Slots(cache=self.cache.constrained(), **rows)


def _empty_slots(graphdef, params, *, slots: int, length: int):
    """Pure: S empty slots (nothing live) with a cache of `length` slots each."""
    cfg = merge_for_compute(graphdef, params).cfg
    zeros = lambda shape, dt: jnp.zeros(shape, dt)  # noqa: E731
    layout = routing_layout(cfg)
    return Slots(cache=init_cache(cfg, slots, length), kv_valid=zeros((slots, length), bool),
                 logits=zeros((slots, cfg.vocab_size), jnp.float32), pos=zeros((slots,), jnp.int32),
                 step=zeros((slots,), jnp.int32), budget=zeros((slots,), jnp.int32), live=zeros((slots,), bool),
                 keys=zeros((slots, 2), jnp.uint32),
                 routing=None if layout is None else zeros((slots,) + layout[:2], layout[2])).constrained()


def _seq_axis(cache: KVCache, entry: str) -> int:
    return dict(cache.axes)[entry].index("seq")


def _insert(slots: Slots, prefix: KVCache, prefix_logits, prefix_mask, targets, sources, keys, budget,
            prefix_routing=None) -> Slots:
    """Pure: slot targets[m] takes prefilled prompt sources[m] (a row of prefix [A, ..., Tp], prefix_logits
    [A, V], prefix_mask [A, Tp], prefix_routing [A, Tp, L_moe, k] for MoE models) with key data keys[m] and
    budget[m]; targets[m] >= S is no slot (dropped). A scatter into the donated slots: only the M new rows' prompt
    regions are written, in place, and the generated slots after them stay masked out by kv_valid until written."""
    Tp = prefix_mask.shape[1]
    S, L = slots.kv_valid.shape
    put = lambda buf, rows: buf.at[targets].set(rows.astype(buf.dtype), mode="drop")  # noqa: E731
    layers = []
    for old, new in zip(slots.cache.layers, prefix.layers):
        layer = {}
        for name, buf in old.items():
            index = [targets] + [slice(None)] * (buf.ndim - 1)
            index[_seq_axis(slots.cache, name)] = slice(0, Tp)
            rows = jnp.take(new[name], sources, axis=0).astype(buf.dtype)
            layer[name] = buf.at[tuple(index)].set(rows, mode="drop")
        layers.append(layer)
    pmask = jnp.take(prefix_mask, sources, axis=0)
    kv_rows = jnp.concatenate([pmask.astype(bool), jnp.zeros((pmask.shape[0], L - Tp), bool)], axis=1)
    return Slots(cache=slots.cache.with_layers(layers), kv_valid=put(slots.kv_valid, kv_rows),
                 logits=put(slots.logits, jnp.take(prefix_logits, sources, axis=0)),
                 pos=put(slots.pos, jnp.sum(pmask, axis=1)), step=put(slots.step, jnp.zeros_like(sources)),
                 budget=put(slots.budget, budget), live=put(slots.live, jnp.ones_like(targets, bool)),
                 keys=put(slots.keys, keys),
                 routing=slots.routing if prefix_routing is None else put(
                     slots.routing, jnp.take(prefix_routing[:, -1], sources, axis=0))).constrained()


def _decode_chunk(graphdef, params, slots: Slots, exit_below, temperature, top_k, top_p, min_p, stop_ids, *,
                  prompt_slots: int, chunk: int, flags: SamplingFlags, window: Optional[int] = None):
    """Pure, refill: up to `chunk` decode steps over the S slots, each slot at its own step: slot s samples its
    next token with fold_in(keys[s], step[s]), writes its k/v at prompt_slots + step[s] and stops at a stop id or
    its budget. The loop returns after `chunk` steps, when nothing is live, or as soon as at most `exit_below`
    slots are live (the host then refills or compacts). window (static): attention reads only the cache's first
    `window` slots (the host's bound on every slot's furthest write this chunk; None = all). Returns (slots, tokens,
    emitted, logp, logp_sampling) [S, chunk] (column k: the k-th step of this chunk), stopped [S] (ended by a stop
    id in this chunk), live [S] after it (a buffer of its own: the slots are donated to the next chunk, which a
    pipelined host dispatches before reading this one's results), the experts [S, chunk, L_moe, k] behind each
    emitted token's logits (MoE models, else None) and the steps run."""
    model = merge_for_compute(graphdef, params)
    sampling = (temperature, top_k, top_p, min_p, stop_ids)
    S, L = slots.kv_valid.shape
    K = chunk
    W = L if window is None else min(window, L)
    slot_ids = jnp.arange(L)[None, :]

    def cond(state):
        k, s, *_ = state
        n_live = jnp.sum(s.live)
        return (k < K) & (n_live > 0) & (n_live > exit_below)

    @jax.named_scope("decode_step")
    def body(state):
        k, s, stopped, recorded, *outs = state
        keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(s.keys), s.step)
        live = s.live
        recorded = _record(recorded, k, s.routing, live)  # the routing behind the token drawn now
        tok, stop, outs = _sample_step(s.logits, keys, live, k, outs, sampling, flags)
        write = prompt_slots + s.step  # [S]: each slot's next cache slot (dead slots write harmlessly)
        kv_valid = s.kv_valid | ((slot_ids == write[:, None]) & live[:, None])
        hidden, cache, used = _forward(model, tok[:, None], s.pos[:, None], kv_valid[:, :W], s.cache, write)
        step = s.step + live
        s = Slots(cache=cache, kv_valid=kv_valid, logits=model.logits(hidden[:, 0]), pos=s.pos + live, step=step,
                  budget=s.budget, live=live & ~stop & (step < s.budget), keys=s.keys,
                  routing=None if used is None else used[:, 0]).constrained()
        return k + 1, s, stopped | stop, recorded, *outs

    zeros_f = jnp.zeros((S, K), jnp.float32)
    recorded = None if slots.routing is None else jnp.zeros((S, K) + slots.routing.shape[1:], slots.routing.dtype)
    state = (jnp.zeros((), jnp.int32), slots, jnp.zeros((S,), bool), recorded, jnp.zeros((S, K), jnp.int32),
             jnp.zeros((S, K), bool), zeros_f, zeros_f)
    steps, slots, stopped, recorded, toks, emitted, lp, lps = jax.lax.while_loop(cond, body, state)
    return slots, toks, emitted, lp, lps, stopped, jnp.copy(slots.live), recorded, steps


def _compact(slots: Slots, keep) -> Slots:
    """Pure: keep [n, S' / n] local indices -> the S' slots where shard d (of the n batch shards, contiguous blocks
    of S / n slots) keeps its slots keep[d]. A gather inside each shard's block: no slot crosses a shard."""
    n, per = keep.shape

    def take(x):
        blocks = x.reshape((n, x.shape[0] // n) + x.shape[1:])
        idx = keep.reshape((n, per) + (1,) * (x.ndim - 1))
        return jnp.take_along_axis(blocks, idx, axis=1).reshape((n * per,) + x.shape[1:])

    return jax.tree.map(take, slots).constrained()


prefill_jit = jax.jit(_prefill, static_argnums=(0,), static_argnames=("max_new_tokens",))
decode_jit = jax.jit(_decode, static_argnums=(0,), static_argnames=("max_new_tokens", "flags"), donate_argnums=(2,))
empty_slots_jit = jax.jit(_empty_slots, static_argnums=(0,), static_argnames=("slots", "length"))
insert_jit = jax.jit(_insert, donate_argnums=(0,))
decode_chunk_jit = jax.jit(_decode_chunk, static_argnums=(0,),
                           static_argnames=("prompt_slots", "chunk", "flags", "window"), donate_argnums=(2,))
compact_jit = jax.jit(_compact)  # smaller output: nothing to alias
