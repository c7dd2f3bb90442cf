"""Policy-gradient losses, KL estimators and loss aggregation (docs/method.md §1). Pure jnp, float32.

A policy loss maps per-token arrays `[N, T]` (N sequences, T positions; `mask` marks response tokens) to a
per-token loss plus per-token indicators for metrics. Aggregation never divides by a micro-batch quantity: a loss is
`sum(weights * loss_tok) / denominator`, where `token_weights` depends only on each sequence's own mask and
`denominator` is computed once on the whole (global) batch, so any micro-batch split sums to the same result.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from arm_jax.registry import Registry

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Options of the learner's objective (hashable: it is a static argument of the jitted step). Each entry:
    name (default): meaning, formula, paper.

    policy_loss ('ppo_clip'): 'ppo_clip' (Schulman et al. 2017), 'gspo' (Zheng et al. 2025), 'clip_cov' or
        'kl_cov' (Cui et al. 2025); see each function.
    eps_low (0.2), eps_high (0.28): the clip range [1 - eps_low, 1 + eps_high] of the importance ratio; 0.2 / 0.28
        is DAPO's Clip-Higher (Yu et al. 2025), the ProGRPO default; GRPO uses 0.2 / 0.2, GSPO's paper 3e-4 / 4e-4.
    dual_clip_c (None = off): dual-clip bound c > 1 for negative advantages (Ye et al. 2020; verl uses 3.0).
    agg_mode ('token-mean'): 'token-mean' (DAPO: over all response tokens of the batch), 'seq-mean-token-mean'
        (GRPO: mean over each sequence, then over sequences), 'seq-mean-token-sum-norm' (Dr.GRPO: token sums /
        max_len, mean over sequences).
    max_len (None): the constant of 'seq-mean-token-sum-norm' (the maximum response length); None: `RLConfig` sets
        it to its `max_new_tokens` (Dr.GRPO's choice); a Learner used directly needs it for that mode.
    kl_coef (0.0): beta of beta * KL(pi_theta || pi_ref) per token (0: no reference model needed).
    kl_estimator ('k3'): Schulman's k1 = -d, k2 = d^2 / 2, k3 = e^d - d - 1 with d = ref_logp - logp.
    entropy_coef (0.0): entropy bonus, subtracted from the loss.
    clip_cov_ratio (2e-4), clip_cov_lb (1.0), clip_cov_ub (5.0): Clip-Cov (Cui et al. 2025, "The Entropy Mechanism
        of RL for Reasoning LMs"): a random `ratio` share of the tokens whose centred cov(logp, A) lies in (lb, ub)
        and that PPO did not already clip get no gradient.
    kl_cov_ratio (2e-4, verl's), kl_cov_coef (1.0): KL-Cov (same paper): the top `ratio` tokens by cov(logp, A)
        get a `coef * |logp - logp_old|` penalty, the others the unclipped -A * ratio.
    Numerical guards (verl's): every importance log-ratio is clamped to +-LOG_RATIO_CLAMP (20) before `exp`, and
    the k3 estimate's log-ratio to +-20 and its value to +-KL_CLAMP (10); the learner reports how often each fired.
    """

    policy_loss: str = "ppo_clip"
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip_c: Optional[float] = None
    agg_mode: str = "token-mean"
    max_len: Optional[int] = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    clip_cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-4
    kl_cov_coef: float = 1.0

    def __post_init__(self):
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"LossConfig.policy_loss={self.policy_loss!r}; registered: {sorted(POLICY_LOSSES)}")
        if self.agg_mode not in AGG_MODES:
            raise ValueError(f"LossConfig.agg_mode={self.agg_mode!r}; one of {AGG_MODES}")
        if self.max_len is not None and self.max_len <= 0:
            raise ValueError(f"LossConfig.max_len must be a positive number of tokens, got {self.max_len}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"LossConfig.kl_estimator={self.kl_estimator!r}; one of {KL_ESTIMATORS}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"LossConfig.dual_clip_c must be > 1, got {self.dual_clip_c}")


POLICY_LOSSES = Registry("policy loss")
register = POLICY_LOSSES.register
LOG_RATIO_CLAMP = 20.0
KL_CLAMP = 10.0


def _ratio(log_ratio):
    """exp(clip(log_ratio, +-20)) and where the clamp fired (bool)."""
    clamped = jnp.abs(log_ratio) > LOG_RATIO_CLAMP
    return jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)), clamped


def _clipped_surrogate(ratio, adv, cfg: LossConfig):
    """-min(r A, clip(r) A) with optional dual clip; returns (loss_tok, clip_low, clip_high) indicators."""
    clipped_ratio = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    loss = jnp.maximum(-adv * ratio, -adv * clipped_ratio)
    clip_low = (adv < 0) & (ratio < 1.0 - cfg.eps_low)
    clip_high = (adv > 0) & (ratio > 1.0 + cfg.eps_high)
    if cfg.dual_clip_c is not None:
        loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * cfg.dual_clip_c), loss)
    return loss, clip_low, clip_high


@register("ppo_clip")
def ppo_clip(logp, logp_old, adv, mask, cfg: LossConfig, rng=None):
    """Token-level PPO clip (Schulman et al. 2017) with Clip-Higher (eps_low != eps_high, DAPO) and dual clip:
    ratio = exp(logp - logp_old), loss = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A)."""
    ratio, clamped = _ratio(logp - logp_old)
    loss, lo, hi = _clipped_surrogate(ratio, adv, cfg)
    return loss, {"ratio": ratio, "clip_low": lo, "clip_high": hi, "ratio_clamped": clamped}


def _seq_mean(x, mask):
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


@register("gspo")
def gspo(logp, logp_old, adv, mask, cfg: LossConfig, rng=None):
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): the sequence ratio
    s_i = exp(mean_t (logp - logp_old)) is clipped, token form s_it = sg(s_i) * exp(logp_t - sg(logp_t)) so each
    token's gradient is s_i A_i grad logp_t. Pair with 'seq-mean-token-mean' and small eps (3e-4 / 4e-4)."""
    log_s = _seq_mean(logp - logp_old, mask)[:, None]
    ratio, clamped = _ratio(jax.lax.stop_gradient(log_s) + logp - jax.lax.stop_gradient(logp))
    loss, lo, hi = _clipped_surrogate(ratio, adv, cfg)
    return loss, {"ratio": ratio, "clip_low": lo, "clip_high": hi, "ratio_clamped": clamped}


def _centred_cov(logp, adv, mask):
    """Per-token (logp - mean logp)(A - mean A) over the valid tokens (no gradient), -inf where masked."""
    m = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    lp, a = jax.lax.stop_gradient(logp), jax.lax.stop_gradient(adv)
    cov = (lp - jnp.sum(lp * m) / n) * (a - jnp.sum(a * m) / n)
    return jnp.where(mask.astype(bool), cov, -jnp.inf), jnp.sum(m)


def _rank_desc(x):
    """Rank of every element of x (flattened) in descending order, 0 = largest; ties by index."""
    flat = x.reshape(-1)
    order = jnp.argsort(-flat, stable=True)
    return jnp.argsort(order).reshape(x.shape)


@register("clip_cov")
def clip_cov(logp, logp_old, adv, mask, cfg: LossConfig, rng=None):
    """Clip-Cov (Cui et al. 2025): PPO clip, but a random share `clip_cov_ratio` of the valid tokens whose centred
    covariance lies in (clip_cov_lb, clip_cov_ub) is detached (loss 0). Tokens PPO's clip already holds (the
    clipped term is the active one) are never selected, as in verl's `compute_policy_loss_clip_cov`. Statistics
    are per micro-batch, as in verl, so this loss is the one mode that depends on the micro-batch split."""
    ratio, clamped = _ratio(logp - logp_old)
    loss, lo, hi = _clipped_surrogate(ratio, adv, cfg)
    clipped_ratio = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    clipped_by_ppo = (-adv * clipped_ratio > -adv * ratio) & mask.astype(bool)
    cov, n_valid = _centred_cov(logp, adv, mask)
    candidate = (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub) & ~clipped_by_ppo
    budget = jnp.maximum(jnp.floor(cfg.clip_cov_ratio * n_valid), 1.0)
    key = rng if rng is not None else jax.random.key(0)
    score = jnp.where(candidate, jax.random.uniform(key, cov.shape), -1.0)
    chosen = candidate & (_rank_desc(score) < budget)
    loss = jnp.where(chosen, 0.0, loss)
    return loss, {"ratio": ratio, "clip_low": lo, "clip_high": hi, "cov_selected": chosen, "ratio_clamped": clamped}


@register("kl_cov")
def kl_cov(logp, logp_old, adv, mask, cfg: LossConfig, rng=None):
    """KL-Cov (Cui et al. 2025): loss = -A ratio (no clip) + kl_cov_coef |logp - logp_old| on the top
    `kl_cov_ratio` share of valid tokens by centred covariance (per micro-batch, as in verl)."""
    ratio, clamped = _ratio(logp - logp_old)
    cov, n_valid = _centred_cov(logp, adv, mask)
    budget = jnp.maximum(jnp.floor(cfg.kl_cov_ratio * n_valid), 1.0)
    chosen = mask.astype(bool) & (_rank_desc(cov) < budget)
    loss = -adv * ratio + jnp.where(chosen, cfg.kl_cov_coef * jnp.abs(logp - logp_old), 0.0)
    zeros = jnp.zeros_like(mask, bool)
    return loss, {"ratio": ratio, "clip_low": zeros, "clip_high": zeros, "cov_selected": chosen,
                  "ratio_clamped": clamped}


def kl_penalty(logp, ref_logp, estimator: str = "k3", return_clamped: bool = False):
    """Per-token KL(pi || pi_ref) estimators (Schulman 2020), with d = ref_logp - logp:
    k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 (unbiased, non-negative). k3 clamps d to +-20 and its value to
    +-10 (verl's `low_var_kl`). return_clamped: also return where a clamp fired (bool, [N, T])."""
    d = ref_logp - logp
    clamped = jnp.zeros(d.shape, bool)
    if estimator == "k1":
        kl = -d
    elif estimator == "k2":
        kl = 0.5 * d * d
    elif estimator == "k3":
        dc = jnp.clip(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        raw = jnp.exp(dc) - dc - 1.0
        kl = jnp.clip(raw, -KL_CLAMP, KL_CLAMP)
        clamped = (jnp.abs(d) > LOG_RATIO_CLAMP) | (jnp.abs(raw) > KL_CLAMP)
    else:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    return (kl, clamped) if return_clamped else kl


# ---------------------------------------------------------------------------------------------- aggregation


def token_weights(mask, agg_mode: str, max_len: Optional[int] = None):
    """Per-token weights w [N, T]: the loss is sum(w * loss_tok) / denominator(global mask)."""
    m = mask.astype(jnp.float32)
    if agg_mode == "token-mean":
        return m
    if agg_mode == "seq-mean-token-mean":
        return m / jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0)
    if agg_mode == "seq-mean-token-sum-norm":
        if not max_len:
            raise ValueError("LossConfig.max_len is required for agg_mode='seq-mean-token-sum-norm'")
        return m / float(max_len)
    raise ValueError(f"agg_mode must be one of {AGG_MODES}, got {agg_mode!r}")


def denominator(mask, agg_mode: str):
    """The global normalizer: number of response tokens ('token-mean') or of sequences with at least one
    response token (the seq-mean modes), computed once on the whole batch. At least 1."""
    m = mask.astype(jnp.float32)
    if agg_mode == "token-mean":
        return jnp.maximum(jnp.sum(m), 1.0)
    return jnp.maximum(jnp.sum(jnp.sum(m, axis=-1) > 0).astype(jnp.float32), 1.0)


# ------------------------------------------------------------------------------------------- DAPO extras


def truncation_mask(mask, truncated):
    """DAPO overlong filtering: zero the loss mask of truncated completions. mask [N, T], truncated [N] bool."""
    return mask * (~jnp.asarray(truncated, bool))[:, None].astype(mask.dtype)


def top_entropy_threshold(entropy, mask, keep_frac: float) -> float:
    """The entropy threshold keeping the `keep_frac` highest-entropy valid tokens (TRL's `top_entropy_quantile`):
    the (1 - keep_frac) quantile of the valid entropies. Pass the whole global batch (numpy arrays gathered from
    every process), so the selection depends neither on micro-batching nor on the process count."""
    import numpy as np
    vals = np.asarray(entropy)[np.asarray(mask) > 0]
    if keep_frac >= 1.0 or vals.size == 0:
        return -float("inf")
    return float(np.quantile(vals, 1.0 - keep_frac))


def top_entropy_mask(entropy, mask, keep_frac: float = 0.2, threshold: Optional[float] = None):
    """'Beyond the 80/20 rule' (Wang et al. 2025), with TRL's meaning of `top_entropy_quantile`: keep only the
    `keep_frac` fraction of valid tokens with the highest entropy (0.2 keeps the top 20 %, 1.0 keeps all).
    threshold: the global threshold from `top_entropy_threshold` (default: computed from these arrays).
    entropy, mask [N, T] -> mask of mask's dtype."""
    if not 0.0 < keep_frac <= 1.0:
        raise ValueError(f"top_entropy_quantile (fraction of tokens kept) must be in (0, 1], got {keep_frac}")
    if threshold is None:
        threshold = top_entropy_threshold(entropy, mask, keep_frac)
    valid = mask.astype(bool)
    return mask * (valid & (entropy >= threshold)).astype(mask.dtype)
