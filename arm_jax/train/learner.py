"""The learner: an optax step over micro-batches, exact whatever the split, with a non-finite guard.

A batch (one optimizer update) is a `TrainBatch` of arrays with leading dimension N (sequences = prompt +
response); the step splits N into `num_micro_batches` interleaved micro-batches (rows m, m + M, ...; every device
keeps a share), scans over them accumulating gradients of sum(w * loss_tok) / D with D computed on the whole batch, and
applies one optax update, unless the loss or the gradient norm is not finite: then parameters and optimizer state
are kept and `skipped` counts it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.sharding import NamedSharding, PartitionSpec

from arm_jax.algorithms import losses as L
from arm_jax import distributed
from arm_jax.config import ModelConfig
from arm_jax.models import compute_copy, compute_params
from arm_jax.models import lora
from arm_jax.models import packing
from arm_jax.models.qwen2 import Routing
from arm_jax.policy import Policy, logprobs_fn, packed_head_logprobs_fn, place_batch
from arm_jax.sharding import constrain
from arm_jax.train.metrics import LEARNER_METRICS, combine_micro, micro_identity
from arm_jax.models.logprobs import DEFAULT_CHUNK_SIZE

LossConfig = L.LossConfig

# -------------------------------------------------------------------------------------------- optimizer


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW (Loshchilov & Hutter 2019) with global-norm clipping and a warm-up + constant/cosine schedule. Its
    state is float32 whatever the parameter dtype, sharded like the parameters. Each entry: name (default): meaning.

    lr (1e-6): peak learning rate (the paper's RL setting; the quick-start uses 1e-4 on its tiny model).
    warmup_steps (0): linear warm-up from 0 over this many steps. A step is what the trainer steps: an RL step
        (`Learner(updates_per_step=num_iterations x num_minibatches)`, as RLRun builds it) or an SFT step (one
        update), so the paper's "10 warm-up steps" are 10 RL steps whatever the mini-batching.
    schedule ('constant'): 'constant' or 'cosine' (decays to lr * min_lr_ratio at total_steps).
    total_steps (1000): the cosine schedule's length in steps (as warmup_steps).
    min_lr_ratio (0.0): the cosine schedule's floor, as a fraction of lr.
    weight_decay (0.01): decoupled weight decay, w <- w - lr * weight_decay * w.
    b1 (0.9), b2 (0.999), eps (1e-8): Adam's moment decays and denominator epsilon.
    max_grad_norm (1.0): clip the global gradient norm to this before Adam (None = off).
    """

    lr: float = 1e-6
    warmup_steps: int = 0
    schedule: str = "constant"
    total_steps: int = 1000
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: Optional[float] = 1.0

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"OptimConfig.schedule must be 'constant' or 'cosine', got {self.schedule!r}")


def make_schedule(cfg: OptimConfig, updates_per_step: int = 1) -> optax.Schedule:
    """The learning-rate schedule over optimizer updates: linear warm-up from 0 over warmup_steps x
    updates_per_step updates, then constant or cosine to lr * min_lr_ratio at total_steps x updates_per_step."""
    if updates_per_step < 1:
        raise ValueError(f"updates_per_step must be >= 1, got {updates_per_step}")
    warmup, total = cfg.warmup_steps * updates_per_step, cfg.total_steps * updates_per_step
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    else:
        main = optax.cosine_decay_schedule(cfg.lr, max(1, total - warmup), cfg.min_lr_ratio)
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def _float32_state(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs `inner` on float32 copies of gradients and parameters, so its state (Adam moments) is float32."""
    to32 = functools.partial(jax.tree.map, lambda x: x.astype(jnp.float32))

    def init(params):
        return inner.init(to32(params))

    def update(grads, state, params=None):
        return inner.update(to32(grads), state, None if params is None else to32(params))

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig, updates_per_step: int = 1) -> optax.GradientTransformation:
    """Global-norm clipping (max_grad_norm) + AdamW on the schedule, its state float32 whatever the parameters."""
    parts = [] if cfg.max_grad_norm is None else [optax.clip_by_global_norm(cfg.max_grad_norm)]
    parts.append(optax.adamw(make_schedule(cfg, updates_per_step), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    return _float32_state(optax.chain(*parts))


# ------------------------------------------------------------------------------------------------- state


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """params: the policy parameters (nnx.State); opt_state: optax state; step: updates applied; skipped: updates
    rejected by the non-finite guard."""

    params: Any
    opt_state: Any
    step: jax.Array
    skipped: jax.Array


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh TrainState around `params` (the master weights): optimizer state from `optimizer.init`, counters 0."""
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def train_state_shardings(params, optimizer: optax.GradientTransformation, mesh) -> TrainState:
    """The TrainState's shardings, ZeRO-style: every optimizer-state tree shaped like the parameters (Adam's mu
    and nu, ...) is sharded exactly like them (`optax.tree_map_params`), scalars (step counts) are replicated.
    params: arrays or ShapeDtypeStructs carrying `.sharding`."""
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(optimizer.init, params)
    is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract_opt, param_sh,
                                   transform_non_params=lambda _: replicated, is_leaf=is_sharding)
    return TrainState(param_sh, opt_sh, replicated, replicated)


def init_state_sharded(params, optimizer: optax.GradientTransformation, mesh) -> TrainState:
    """`init_train_state` with explicit output shardings (`train_state_shardings`): the masters are new buffers
    (a later donation of the state never invalidates `params`) and the optimizer state is created sharded."""
    shardings = train_state_shardings(params, optimizer, mesh)

    def init(p):
        return init_train_state(jax.tree.map(lambda x: jnp.array(x, copy=True), p), optimizer)

    with jax.set_mesh(mesh):
        return jax.jit(init, out_shardings=shardings)(params)


# -------------------------------------------------------------------------------------------------- batch


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainBatch:
    """One optimizer update's sequences (a pytree; leading dimension N):
    tokens, attention_mask [N, L]: the full sequences (left-padded prompt, response, right padding);
    loss_mask [N, L]: 1 on response tokens whose log-prob is trained (EOS included);
    advantages [N] or [N, L]: A~ per sequence (broadcast to its tokens) or per token;
    logp_old [N, L]: log-probs of the sampling policy at the rollout temperature (detached);
    ref_logp [N, L]: reference-model log-probs (read only when kl_coef > 0; zeros otherwise);
    is_weights [N, L] (None = 1): the rollout correction's importance weights (`algorithms.rollout_correction`),
        constants multiplying each token's policy-gradient term (not the KL or entropy terms);
    pack_tokens, pack_segments, pack_positions [M * R, C], pack_head_cols [M * R, H] and pack_index [N, L]: the
        same sequences packed (`models.packing`, filled by `Learner.step` when packing is on): the forward runs over
        the packed rows, the LM head only at the loss tokens' positions (head_cols), and their log-probs and
        entropies come back to the [N, L] layout through pack_index (0 elsewhere, where the loss has weight 0);
        None: the padded forward;
    routing_ids [N, L, L_moe, k], routing_use [N, L] (MoE routing replay, `Rollout.replay_routing`): the forward
        uses the sampler's experts where routing_use is set (gate weights recomputed, so the router still learns);
        pack_routing_ids / pack_routing_use: the same in the packed layout (filled by `Learner.step`)."""

    tokens: Any
    attention_mask: Any
    loss_mask: Any
    advantages: Any
    logp_old: Any
    ref_logp: Any = None
    is_weights: Any = None
    pack_tokens: Any = None
    pack_segments: Any = None
    pack_positions: Any = None
    pack_index: Any = None
    pack_head_cols: Any = None
    routing_ids: Any = None
    routing_use: Any = None
    pack_routing_ids: Any = None
    pack_routing_use: Any = None

    @classmethod
    def of(cls, batch) -> "TrainBatch":
        """A TrainBatch from a TrainBatch or a mapping with these keys (an unknown key is an error)."""
        if isinstance(batch, cls):
            return batch
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(batch) - names)
        if unknown:
            raise ValueError(f"TrainBatch has no field {unknown}; fields: {sorted(names)}")
        return cls(**batch)

    @property
    def size(self) -> int:
        """N, the number of sequences."""
        return self.tokens.shape[0]


# -------------------------------------------------------------------------------------------------- loss


def micro_batch_loss(graphdef, params, mb: TrainBatch, denom: jax.Array, cfg: LossConfig, rng, temperature,
                     chunk_size: int, remat: bool, scan_layers: bool = False):
    """Contribution of one micro-batch to the batch loss, sum(w * loss_tok) / denom, and metric sums."""
    mb = TrainBatch.of(mb)
    if mb.pack_tokens is None:
        routing = None if mb.routing_ids is None else Routing(mb.routing_ids, mb.routing_use.astype(bool))
        logp, ent, *_ = logprobs_fn(graphdef, params, mb.tokens, mb.attention_mask, temperature,
                                    chunk_size=chunk_size, remat=remat, routing=routing, scan_layers=scan_layers)
    else:  # the forward over the packed rows, the LM head at the loss positions, gathered to the padded layout
        routing = (None if mb.pack_routing_ids is None
                   else Routing(mb.pack_routing_ids, mb.pack_routing_use.astype(bool)))
        logp_p, ent_p = packed_head_logprobs_fn(graphdef, params, mb.pack_tokens, mb.pack_segments,
                                                mb.pack_positions, mb.pack_head_cols, temperature,
                                                chunk_size=chunk_size, remat=remat, routing=routing,
                                                scan_layers=scan_layers)
        logp, ent = packing.unpack(logp_p, mb.pack_index), packing.unpack(ent_p, mb.pack_index)
    mask = mb.loss_mask.astype(jnp.float32)
    adv = mb.advantages.astype(jnp.float32)
    adv = adv[:, None] if adv.ndim == 1 else adv
    adv = jnp.broadcast_to(adv, logp.shape)
    pg, ind = L.POLICY_LOSSES.get_fn(cfg.policy_loss)(logp, mb.logp_old, adv, mask, cfg, rng)
    if mb.is_weights is not None:  # rollout correction: pi_old / mu per token, a constant
        pg = pg * jax.lax.stop_gradient(mb.is_weights.astype(jnp.float32))
    loss_tok = pg
    kl = jnp.zeros_like(logp)
    kl_clamped = jnp.zeros(logp.shape, bool)
    if cfg.kl_coef:
        kl, kl_clamped = L.kl_penalty(logp, mb.ref_logp, cfg.kl_estimator, return_clamped=True)
        loss_tok = loss_tok + cfg.kl_coef * kl
    if cfg.entropy_coef:
        loss_tok = loss_tok - cfg.entropy_coef * ent
    w = L.token_weights(mask, cfg.agg_mode, cfg.max_len)
    loss = jnp.sum(w * loss_tok) / denom
    ratio = jax.lax.stop_gradient(ind["ratio"])
    valid = mask > 0
    sums = {
        "loss": loss, "pg_loss": jnp.sum(w * pg) / denom,
        "kl": jnp.sum(jax.lax.stop_gradient(kl) * mask), "entropy": jnp.sum(jax.lax.stop_gradient(ent) * mask),
        "clip_frac_low": jnp.sum(ind["clip_low"] * mask), "clip_frac_high": jnp.sum(ind["clip_high"] * mask),
        "ratio_mean": jnp.sum(ratio * mask), "tokens": jnp.sum(mask),
        "ratio_clamped": jnp.sum(ind["ratio_clamped"] * mask), "kl_clamped": jnp.sum(kl_clamped * mask),
        "ratio_min": jnp.min(jnp.where(valid, ratio, jnp.inf)), "ratio_max": jnp.max(jnp.where(valid, ratio, -jnp.inf)),
    }
    return loss, sums


def _split_micro(x: jax.Array, m: int) -> jax.Array:
    """[N, ...] -> [m, N / m, ...] with micro-batch j = rows j, j + m, j + 2m, ... (keeps every device busy)."""
    n = x.shape[0]
    return jnp.swapaxes(x.reshape((n // m, m) + x.shape[1:]), 0, 1)


def train_step(graphdef, optimizer, state: TrainState, batch: TrainBatch, rng, frozen=None, *, loss_cfg: LossConfig,
               num_micro_batches: int = 1, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
               remat: bool = False, model_cfg: Optional[ModelConfig] = None, scan_layers: bool = False):
    """One optimizer update on `batch` (pure; jit it with `graphdef`, `optimizer` and the keyword options static).
    Returns (new_state, metrics). frozen: LoRA's frozen base (compute dtype), merged with `state.params` (the
    adapters, the only trainable and optimized parameters) for every forward; None: `state.params` is the model.

    Mixed precision (model_cfg given): `state.params` are the masters (`model_cfg.param_dtype`, float32 by
    default); they are cast once to the compute dtype `model_cfg.dtype` before the micro-batch scan, forward and
    backward run in it, the per-micro-batch gradients (w.r.t. that copy, i.e. the upcast cotangent of the cast)
    are accumulated in float32, and the optimizer updates the masters in their own dtype."""
    batch = TrainBatch.of(batch)
    n = batch.size
    if n % num_micro_batches:
        raise ValueError(f"batch of {n} sequences is not divisible into num_micro_batches={num_micro_batches}")
    denom = L.denominator(batch.loss_mask, loss_cfg.agg_mode)
    micro = jax.tree.map(lambda x: _split_micro(x, num_micro_batches), batch)
    if frozen is None:
        loss_fn = micro_batch_loss
    else:  # gradients w.r.t. the adapters only; the base is a constant of the step
        def loss_fn(g, adapters, *args):
            return micro_batch_loss(g, lora.merge(frozen, adapters), *args)
    grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)
    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    with jax.named_scope("cast_to_compute_dtype"):
        params_c = state.params if model_cfg is None else compute_params(state.params, model_cfg)

    def body(carry, xs):
        grads, sums, i = carry
        mb = jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1)), xs)
        with jax.named_scope("loss_and_grad"):
            (_, s), g = grad_fn(graphdef, params_c, mb, denom, loss_cfg, jax.random.fold_in(rng, i), temperature,
                                chunk_size, remat, scan_layers)
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
        sums = {k: combine_micro(k, sums[k], v, jnp) for k, v in s.items()}
        return (grads, sums, i + 1), None

    init_sums = {k: jnp.asarray(micro_identity(k), jnp.float32) for k in LEARNER_METRICS}
    (grads, sums, _), _ = jax.lax.scan(body, (zero_grads, init_sums, 0), micro)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)
    with jax.named_scope("optimizer_update"):
        updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = TrainState(keep(new_params, state.params), keep(new_opt, state.opt_state),
                           state.step + finite.astype(jnp.int32), state.skipped + (~finite).astype(jnp.int32))
    tokens = jnp.maximum(sums["tokens"], 1.0)
    metrics = {k: v / tokens if LEARNER_METRICS[k].per_token else v for k, v in sums.items()}
    # ratio_clamped / kl_clamped: the share of tokens where the +-20 log-ratio / k3 clamp fired
    metrics.update(grad_norm=grad_norm, skipped=(~finite).astype(jnp.int32))
    return new_state, metrics


# ----------------------------------------------------------------------------------------------- Learner


class Learner:
    """Holds the jitted, donating train step for one policy and configuration.

    micro_batch_size: sequences per micro-batch (None = the whole batch in one pass); the batch must divide by it.
    remat: rematerialize each transformer block in the backward pass (less memory, ~30 % more compute).
    scan_layers: compile each run of identical blocks as one scanned body (`RLConfig.scan_layers`).
    temperature: the rollout temperature (logp_old and the trained log-probs use the same one).
    pack: each micro-batch's sequences run packed into rows of pack_length tokens (None: the padded
        width L), `models.packing`: the forward and backward cost about the valid tokens, not
        rows x the longest sequence; the loss, its gradients and the metrics are those of the padded layout (the
        same sequences per micro-batch, the same [N, L] loss arrays).

    The TrainState holds the policy's parameters as master weights (`ModelConfig.param_dtype`, float32 by
    default) and the optimizer state, each optimizer leaf sharded like its parameter; the step casts the masters
    to the compute dtype once per update (`train_step`) and its output keeps the state's shardings.
    """

    def __init__(self, policy: Policy, loss_cfg: LossConfig = LossConfig(), optim_cfg: OptimConfig = OptimConfig(),
                 *, micro_batch_size: Optional[int] = None, remat: bool = False, temperature: float = 1.0,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, updates_per_step: int = 1, pack: bool = False,
                 pack_length: Optional[int] = None, scan_layers: bool = False):
        self.policy = policy
        # LoRA (policy.config.lora): the state holds the adapters only; the base is frozen in the compute dtype
        self.frozen = None
        if policy.config.lora is not None:
            _, base = lora.split(policy.params)
            with jax.set_mesh(policy.mesh):
                if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(base)):  # abstract (the plan)
                    self.frozen = jax.eval_shape(lambda b: compute_copy(b, policy.config), base)
                else:
                    self.frozen = compute_copy(base, policy.config)
        self.pack, self.pack_length = pack, pack_length
        self.loss_cfg = loss_cfg
        self.optim_cfg = optim_cfg
        self.optimizer = make_optimizer(optim_cfg, updates_per_step)
        self.schedule = make_schedule(optim_cfg, updates_per_step)
        self.micro_batch_size = micro_batch_size
        self.state_shardings = train_state_shardings(self.trainable(policy.params), self.optimizer, policy.mesh)
        self._opts = dict(loss_cfg=loss_cfg, temperature=temperature, chunk_size=chunk_size, remat=remat,
                          model_cfg=policy.config, scan_layers=scan_layers)
        shardings = self.state_shardings

        def step(graphdef, optimizer, state, batch, rng, frozen=None, **opts):
            new_state, metrics = train_step(graphdef, optimizer, state, batch, rng, frozen, **opts)
            return jax.lax.with_sharding_constraint(new_state, shardings), metrics

        self._step = jax.jit(step, static_argnums=(0, 1),
                             static_argnames=("loss_cfg", "num_micro_batches", "temperature", "chunk_size",
                                              "remat", "model_cfg", "scan_layers"),
                             donate_argnums=(2,))

    def abstract_state(self) -> TrainState:
        """The TrainState's shapes, dtypes and shardings without allocating it (a restore target: resuming never
        holds a fresh state beside the restored one)."""
        shapes = jax.eval_shape(lambda p: init_train_state(p, self.optimizer), self.trainable(self.policy.params))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self.state_shardings)

    def init_state(self, params=None) -> TrainState:
        """A fresh TrainState (new buffers: `params` stays valid after the state is donated), created sharded."""
        params = self.policy.params if params is None else params
        return init_state_sharded(self.trainable(params), self.optimizer, self.policy.mesh)

    def trainable(self, params):
        """The parameters the optimizer updates: all of them, or LoRA's adapters."""
        return params if self.frozen is None else lora.split(params)[0]

    def full_params(self, trained):
        """The model's parameters from the state's: themselves, or the frozen base with these adapters."""
        return trained if self.frozen is None else lora.merge(self.frozen, trained)

    def base_params(self):
        """LoRA: the base without its adapters (B = 0), sharing the frozen arrays: the KL reference."""
        adapters = lora.split(self.policy.params)[0]
        return lora.merge(self.frozen, jax.tree.map(jnp.zeros_like, adapters))

    def num_micro_batches(self, n: int) -> int:
        """Micro-batches of micro_batch_size sequences in a global batch of n; n must divide."""
        mbs = self.micro_batch_size or n
        if n % mbs:
            raise ValueError(f"batch of {n} sequences (P*G) is not divisible by micro_batch_size={mbs}")
        return n // mbs

    def step(self, state: TrainState, batch: TrainBatch | dict, rng) -> tuple[TrainState, dict]:
        """One update; `state` is donated (do not reuse it). Batch arrays are placed on the mesh's batch axes."""
        batch = TrainBatch.of(batch)
        if batch.ref_logp is None:
            if self.loss_cfg.kl_coef:
                raise ValueError(f"LossConfig.kl_coef={self.loss_cfg.kl_coef} needs reference log-probs: the batch "
                                 f"has no ref_logp (give RLRun a ref_policy)")
            batch = dataclasses.replace(batch, ref_logp=jnp.zeros(batch.logp_old.shape, jnp.float32))
        n = batch.size * distributed.process_count()  # the global batch
        fill = None
        if self.pack:
            batch, fill = self._packed(batch, self.num_micro_batches(n))
        with jax.set_mesh(self.policy.mesh):
            leaves, tree = jax.tree.flatten(batch)
            placed = jax.tree.unflatten(tree, place_batch(self.policy, *leaves))
            state, metrics = self._step(self.policy.graphdef, self.optimizer, state, placed, rng, self.frozen,
                                        num_micro_batches=self.num_micro_batches(n), **self._opts)
        metrics["lr"] = self.schedule(state.step - 1 + metrics["skipped"])
        if fill is not None:
            metrics["pack_fill"] = fill  # real tokens / packed slots, all processes
        return state, metrics

    def _packed(self, batch: TrainBatch, num_micro: int) -> tuple[TrainBatch, float]:
        """The batch with its sequences packed per micro-batch (this process's rows; `models.packing.pack`)."""
        extras = {} if batch.routing_ids is None else {"routing_ids": np.asarray(batch.routing_ids),
                                                       "routing_use": np.asarray(batch.routing_use)}
        p = packing.pack(np.asarray(batch.tokens), np.asarray(batch.attention_mask), num_micro, self.pack_length,
                         packing.row_multiple(self.policy.mesh, self.policy.rules),
                         loss_mask=np.asarray(batch.loss_mask), extras=extras)
        real, slots = distributed.allgather(np.asarray([[(p.segment_ids > 0).sum(), p.segment_ids.size]])).sum(0)
        fill = float(real) / max(float(slots), 1.0)  # over every process's rows
        return dataclasses.replace(batch, pack_tokens=p.tokens, pack_segments=p.segment_ids,
                                   pack_positions=p.positions, pack_index=p.index, pack_head_cols=p.head_cols,
                                   routing_ids=None, routing_use=None,
                                   pack_routing_ids=p.extras.get("routing_ids"),
                                   pack_routing_use=p.extras.get("routing_use")), fill

    def update(self, state: TrainState, batch: TrainBatch | dict, rng, *, num_iterations: int = 1,
               num_minibatches: int = 1):
        """mu = num_iterations passes over the rollout batch, each split into `num_minibatches` optimizer updates
        (contiguous slices of whole groups, in a fresh random order each pass). logp_old stays the sampler's.
        With several processes `batch` is this process's rows and mini-batch j is every process's j-th slice."""
        batch = TrainBatch.of(batch)
        n = batch.size
        if n % num_minibatches:
            raise ValueError(f"batch of {n} sequences is not divisible into num_minibatches={num_minibatches}")
        size = n // num_minibatches
        history = []
        for it in range(num_iterations):
            order = (jax.random.permutation(jax.random.fold_in(rng, it), num_minibatches)
                     if num_minibatches > 1 else jnp.zeros((1,), jnp.int32))
            for j, mb_index in enumerate(order.tolist()):
                rows = slice(mb_index * size, (mb_index + 1) * size)
                mb = jax.tree.map(lambda v: v[rows], batch)
                state, metrics = self.step(state, mb, jax.random.fold_in(rng, it * num_minibatches + j))
                history.append(metrics)
        return state, history
