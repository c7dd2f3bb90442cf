"""The rollout engine: prefill, then decode over a preallocated KV cache (docs/method.md §4).

Prompts are left-padded to a common length Tp, a bucket length (`bucket_length`: 16, 24, 32, 48, 64, 96, ...: two
per octave, at most a third of padding), so a run compiles each program once per bucket whatever its prompts' exact
lengths, and repeated n
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
from arm_jax.models import compute_params
from arm_jax.policy import Policy, place_batch
from arm_jax.rollout import refill, steps
from arm_jax.buckets import bucket_length
from arm_jax.rollout.sampling import SamplingParams
from arm_jax.rollout.types import RolloutStats, Samples


@dataclasses.dataclass
class Rollout:
    """Sampled responses, row b * n + j = sample j of prompt b (numpy arrays).

    tokens [R, N] int32 (0 after the end), mask [R, N] (1 on generated tokens incl. the stop token),
    logp [R, N] float32 log-prob of each sampled token under the temperature-1 distribution (logp_old),
    logp_sampling [R, N] under the distribution actually sampled from (temperature, top-k/p, min-p),
    lengths [R], truncated [R] (no stop id within the row's budget),
    prompt_tokens / prompt_mask [R, Tp] the left-padded prompts, prompt_index [R] = b,
    stats: the work the engine did (`RolloutStats`: useful-token fraction, prefill tokens),
    routing [R, N, L_moe, k] (MoE models): the experts, per MoE layer, of the forward that produced each token's
    logits (routing replay, `replay_routing`), prompt_routing [R, Tp, L_moe, k] those of the prompt positions.
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
    stats: Optional[RolloutStats] = None
    routing: Optional[np.ndarray] = None
    prompt_routing: Optional[np.ndarray] = None

    def trimmed(self) -> "Rollout":
        """The same rollout with its response columns cut to what the learner and log-prob passes need: Tp + N'
        = bucket_length(Tp + longest response, over every process), capped at the budget. The cut columns are
        padding of every row (mask 0), so losses, log-probs and confidences are unchanged; the passes then cost
        the tokens generated, not the budget, and compile once per bucket."""
        Tp, N = self.prompt_tokens.shape[1], self.tokens.shape[1]
        longest = distributed.global_max(int(self.lengths.max()) if self.lengths.size else 0)
        width = min(N, max(1, bucket_length(Tp + longest) - Tp))
        if width == N:
            return self
        cut = {k: getattr(self, k)[:, :width] for k in ("tokens", "mask", "logp", "logp_sampling")}
        if self.routing is not None:
            cut["routing"] = self.routing[:, :width]
        return dataclasses.replace(self, **cut)

    def sequences(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, attention_mask, loss_mask) [R, Tp + N] of prompt + response, the learner's layout."""
        tokens = np.concatenate([self.prompt_tokens, self.tokens], axis=1)
        attn = np.concatenate([self.prompt_mask, self.mask], axis=1)
        loss_mask = np.concatenate([np.zeros_like(self.prompt_mask), self.mask], axis=1)
        return tokens, attn, loss_mask

    def replay_routing(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """The sampler's experts in the learner's layout [R, Tp + N]: (ids [R, Tp + N, L_moe, k], use [R, Tp + N]
        bool). The prompt's real positions replay the prefill's experts; token i's logits come from position
        Tp - 1 + i (the last prompt token for i = 0, else response token i - 1), so that position replays
        routing[:, i] where token i is real; the last response token and padding are routed afresh (nothing
        reads them). None without a recording."""
        if self.routing is None:
            return None
        R, Tp = self.prompt_tokens.shape
        N = self.tokens.shape[1]
        ids = np.zeros((R, Tp + N) + self.routing.shape[2:], self.routing.dtype)
        use = np.zeros((R, Tp + N), bool)
        if self.prompt_routing is not None:
            ids[:, :Tp] = self.prompt_routing
            use[:, :Tp] = self.prompt_mask.astype(bool)
        ids[:, Tp - 1:Tp - 1 + N] = np.where(self.mask.astype(bool)[..., None, None], self.routing,
                                             ids[:, Tp - 1:Tp - 1 + N])
        use[:, Tp - 1:Tp - 1 + N] |= self.mask.astype(bool)
        return ids, use


PARAM_LAYOUTS = ("train", "replicated")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """The rollout engine's memory and speed levers (`generate`'s engine, slots, chunk_steps, rows_per_pass,
    param_layout; RLConfig's rollout_* options), one object for the RL rollout and the held-out evaluation."""

    engine: str = "refill"
    slots: Optional[int] = None
    chunk_steps: int = 32
    rows_per_pass: Optional[int] = None
    param_layout: str = "train"

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


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


def row_keys(seed: int, step: int, rows: int, offset: int = 0) -> jax.Array:
    """Per-row PRNG keys [rows] = fold_in(fold_in(key(seed), step), offset + row)."""
    base = jax.random.fold_in(jax.random.key(seed), step)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(offset + jnp.arange(rows))


def left_pad(prompts: Sequence[Sequence[int]], pad_multiple: int = 1, pad_id: int = 0, length: int = 0,
             buckets: bool = False):
    """list of token-id lists -> (tokens, mask) [B, Tp] left-padded, Tp = max(longest, length) rounded up to a
    multiple of pad_multiple, or to `bucket_length` with buckets=True."""
    Tp = max(max(len(p) for p in prompts), length)
    Tp = bucket_length(Tp) if buckets else int(math.ceil(Tp / pad_multiple) * pad_multiple)
    tokens = np.full((len(prompts), Tp), pad_id, np.int32)
    mask = np.zeros((len(prompts), Tp), np.int32)
    for b, p in enumerate(prompts):
        if len(p):
            tokens[b, Tp - len(p):] = p
            mask[b, Tp - len(p):] = 1
    return tokens, mask


ENGINES = ("refill", "lockstep")


def budgets_for(max_new_tokens, prompts: int) -> np.ndarray:
    """max_new_tokens (an int, or one int per prompt) -> budgets [prompts] int32; errors name the argument."""
    budgets = np.asarray(max_new_tokens)
    if budgets.ndim == 0:
        budgets = np.full((prompts,), budgets)
    if budgets.shape != (prompts,) or not np.issubdtype(budgets.dtype, np.integer) or budgets.min() <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer or one positive integer per prompt "
                         f"({prompts} prompts), got {max_new_tokens!r}")
    return budgets.astype(np.int32)


def _validate(policy: Policy, prompts, budgets, temperature, top_p, top_k, min_p, n, engine):
    for b, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{b}] is empty: every prompt needs at least one token")
        arr = np.asarray(p)
        if arr.min() < 0 or arr.max() >= policy.config.vocab_size:
            raise ValueError(f"prompts[{b}] has token ids outside [0, vocab_size={policy.config.vocab_size})")
    longest = max(len(p) for p in prompts)
    limit = policy.config.max_position_embeddings
    if longest + int(budgets.max()) > limit:
        raise ValueError(f"prompt length {longest} + max_new_tokens {int(budgets.max())} exceeds the model's "
                         f"context (max_position_embeddings={limit})")
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
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")


def lockstep(policy: Policy, params, tokens, mask, keys, budgets, n: int, sampling: SamplingParams,
             rows_per_pass: Optional[int]) -> Samples:
    """The lockstep engine: this process's prompts [P, Tp] repeated n times, in passes of rows_per_pass rows (over
    all processes); per pass one prefill of every row and one decode loop that runs until its last row ends.
    keys [P * n, 2] and budgets [P * n] per row."""
    tokens, mask = np.repeat(tokens, n, axis=0), np.repeat(mask, n, axis=0)
    R, Tp = tokens.shape
    N = int(distributed.global_max(int(budgets.max())))
    passes = distributed.row_passes(R, rows_per_pass, "rows_per_pass", "rollout rows (prompts x n)")
    outs, slot_steps, steps_run = [], 0, 0
    for rows in passes:
        p_tokens, p_mask, p_keys, p_budget = place_batch(policy, tokens[rows], mask[rows], keys[rows], budgets[rows])
        cache, logits, routing = steps.prefill_jit(policy.graphdef, params, p_tokens, p_mask, max_new_tokens=N)
        out = steps.decode_jit(policy.graphdef, params, cache, logits, p_mask, jax.random.wrap_key_data(p_keys),
                               p_budget, *sampling.traced(), routing, max_new_tokens=N, flags=sampling.flags)
        # out[6]: the spent cache, freed here; out[7]: the experts behind each token (MoE models)
        outs.append([distributed.to_local(x) for x in out[:5]] + [
            None if x is None else distributed.to_local(x) for x in (out[7], routing)])
        steps_run += int(out[5])
        slot_steps += int(out[5]) * p_tokens.shape[0]
    toks, gen_mask, lp, lps, stopped, routing, prompt_routing = (
        None if parts[0] is None else np.concatenate(parts, axis=0) for parts in zip(*outs))
    procs = distributed.process_count()
    stats = RolloutStats("lockstep", samples=R * procs, generated_tokens=distributed.global_sum(int(gen_mask.sum())),
                         slot_steps=slot_steps, decode_steps=steps_run, prefill_tokens=R * procs * Tp,
                         prefill_calls=len(passes), chunks=len(passes))
    return Samples(toks, gen_mask, lp, lps, stopped, stats, routing, prompt_routing)


def generate(policy: Policy, prompts: Sequence[Sequence[int]], *, max_new_tokens, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, n: int = 1, seed: int = 0, step: int = 0,
             stop_ids: Optional[Sequence[int]] = None, pad_multiple: int = 8, engine: str = "refill",
             slots: Optional[int] = None, chunk_steps: int = 32, rows_per_pass: Optional[int] = None,
             param_layout: str = "train", prompt_buckets: bool = True, live_window: bool = True,
             pipeline: bool = True, row_offset: int = 0) -> Rollout:
    """Samples n responses per prompt (docs/method.md §9 `aj.generate`). stop_ids default to the checkpoint's EOS ids.

    max_new_tokens: the budget N of every sample, or one budget per prompt (the Rollout is [R, max budget]).
    engine: 'refill' (default, `rollout.refill`): `slots` decode slots (over all processes; None = rows_per_pass,
        else every row), each prompt prefilled once and its k/v copied into its n samples' slots, finished slots
        refilled between chunks of `chunk_steps` decode steps; 'lockstep': every row of a pass prefilled and decoded
        together until its last row ends, in passes of rows_per_pass rows (None = all; must divide the rows).
    Both engines return the same tokens: row r's keys are fixed by its index (`row_keys`), its i-th token's by i.
    param_layout: `rollout_params`. prompt_buckets: prompt width Tp = `bucket_length` of the longest prompt (fixed
    shapes across calls; default), else the longest rounded up to pad_multiple. live_window (refill): decode
    attention reads only the live part of the cache (`refill.refill`); False reads all Tp + N slots (as before).
    pipeline (refill): dispatch a decode chunk before the last one's results are read wherever the next chunk does
    not depend on them (`refill.refill`); False waits for every chunk (as before; same results).
    With several processes, `prompts` are this process's prompts (the same number on every process) and the Rollout
    holds their rows; row keys follow the global row index, so results do not depend on the process count.
    row_offset: the first row's index in a larger set split over calls (its keys are those rows'), so a set's
    samples do not depend on how it is split (the evaluation's chunks).
    """
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    budgets = budgets_for(max_new_tokens, len(prompts))
    _validate(policy, prompts, budgets, temperature, top_p, top_k, min_p, n, engine)
    stop = tuple(stop_ids) if stop_ids is not None else tuple(policy.config.eos_token_ids)
    sampling = SamplingParams(float(temperature), int(top_k), float(top_p), float(min_p), tuple(int(s) for s in stop))
    tokens, mask = left_pad(prompts, pad_multiple, length=distributed.global_max(max(len(p) for p in prompts)),
                            buckets=prompt_buckets)
    R = tokens.shape[0] * n
    procs = distributed.process_count()
    keys = jax.random.key_data(row_keys(seed, step, R * procs, row_offset))
    keys = np.asarray(keys)[distributed.local_slice(keys.shape[0])]
    row_budgets = np.repeat(budgets, n)
    params = rollout_params(policy, param_layout)
    with jax.set_mesh(policy.mesh):
        if engine == "lockstep":
            out = lockstep(policy, params, tokens, mask, keys, row_budgets, n, sampling, rows_per_pass)
        else:
            out = refill.refill(policy, params, tokens, mask, keys, row_budgets, n, sampling,
                                slots=slots or rows_per_pass or R * procs, chunk_steps=chunk_steps,
                                live_window=live_window, pipeline=pipeline)
    return Rollout(tokens=out.tokens, mask=out.mask.astype(np.int32), logp=out.logp, logp_sampling=out.logp_sampling,
                   lengths=out.mask.sum(axis=1).astype(np.int32), truncated=~out.stopped,
                   prompt_tokens=np.repeat(tokens, n, axis=0), prompt_mask=np.repeat(mask, n, axis=0),
                   prompt_index=np.repeat(np.arange(len(prompts)), n), stats=out.stats, routing=out.routing,
                   prompt_routing=out.prompt_routing)
