"""The sampler-learner gap: its size, measured every step, and the importance-sampling corrections for it
(docs/method.md §10). Pure jnp over numpy or jax arrays, float32.

Three policies meet in one update (decoupled PPO, Hilton et al. 2022; AReaL's "proximal policy"; verl's rollout
correction): the *behaviour* policy mu that sampled the tokens (the rollout engine: its weights may be k steps old,
its numerics bf16 and batched otherwise, its distribution truncated by top-p / top-k), with log-probs
`logp_sampler` = `Rollout.logp_sampling`; the *proximal* policy pi_old, the learner's weights before this step's
updates, with log-probs `logp_old` recomputed by the log-prob pass; and the policy being trained, pi_theta. PPO's
ratio and clip are taken against pi_old; the correction weights each token's policy-gradient term by

    w = pi_old / mu  (per token: r_t = exp(logp_old_t - logp_sampler_t); per sequence: rho = prod_t r_t)

so that E_mu[w grad log pi A] is (up to the truncation) E_pi_old[grad log pi A], the on-policy gradient:

    'none'    w = 1 (the synchronous loop's choice until now: the gap is ignored, only measured).
    'tis'     token-level truncated IS (Yao et al. 2025, "Your efficient RL framework secretly brings you
              off-policy RL training"; verl's rollout_is='token'): w_t = min(r_t, C).
    'mis'     sequence-level masked IS (Liu et al. 2025, "When speed kills stability"; verl's 'seq-mis'):
              w = rho for every token of a sequence whose rho lies in [1/C, C]; sequences outside are dropped
              (loss mask 0: they leave the loss's denominator too).
    'icepop'  token-level masked IS (IcePop, Ling team 2025; verl's token rejection): w_t = r_t where r_t lies in
              [1/C, C] (IcePop's [0.5, 2] at C = 2); tokens outside are dropped (loss mask 0).

The weights are computed once per rollout batch on the whole batch (they are constants: no gradient) and multiply
the policy-gradient term only, not the KL or entropy terms, as in verl. Log-ratios are clamped to +-20 before `exp`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

CORRECTIONS = ("none", "tis", "mis", "icepop")
LOG_RATIO_CLAMP = 20.0


def _log_ratio(logp_old, logp_sampler, mask):
    """d = logp_old - logp_sampler on `mask`'s tokens, 0 elsewhere, clamped to +-20 (float32 [N, T])."""
    m = jnp.asarray(mask, jnp.float32)
    d = (jnp.asarray(logp_old, jnp.float32) - jnp.asarray(logp_sampler, jnp.float32)) * m
    return jnp.clip(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), m


def correction_weights(logp_old, logp_sampler, mask, mode: str, threshold: float = 2.0):
    """The correction of one rollout batch. logp_old (pi_old), logp_sampler (mu), mask [N, T] (the response
    tokens the loss may train; all three in the same layout). threshold: C of the module docstring (> 1).

    Returns (weights [N, T] float32, the loss mask with dropped tokens / sequences zeroed [N, T] float32, and
    counts {'tokens', 'clipped' (TIS: tokens with r_t > C), 'masked_tokens' (ICEPOP, MIS: tokens dropped),
    'sequences', 'masked_sequences' (MIS), 'weight_sum' (over the kept tokens)} as float32 scalars: sums, so the
    caller can add them over processes before dividing)."""
    if mode not in CORRECTIONS:
        raise ValueError(f"RLConfig.rollout_correction={mode!r}; one of {CORRECTIONS}")
    if not threshold > 1.0:
        raise ValueError(f"RLConfig.rollout_correction_threshold must be > 1 (the band is [1/C, C]), got {threshold}")
    d, m = _log_ratio(logp_old, logp_sampler, mask)
    r = jnp.exp(d)
    seq = jnp.sum(m, axis=-1) > 0
    zero = jnp.zeros((), jnp.float32)
    clipped = masked_seq = zero
    keep = m
    if mode == "none":
        w = m
    elif mode == "tis":
        w = jnp.minimum(r, threshold) * m
        clipped = jnp.sum((r > threshold) * m)
    elif mode == "mis":
        rho_log = jnp.sum(d, axis=-1, keepdims=True)  # each token's clamped log-ratio, summed over its sequence
        inside = (jnp.abs(rho_log) <= np.log(threshold)).astype(jnp.float32)
        keep = m * inside
        w = jnp.exp(jnp.clip(rho_log, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) * keep
        masked_seq = jnp.sum(seq * (1.0 - inside[:, 0]))
    else:  # icepop
        keep = m * ((r >= 1.0 / threshold) & (r <= threshold))
        w = r * keep
    counts = {"tokens": jnp.sum(m), "clipped": clipped, "masked_tokens": jnp.sum(m) - jnp.sum(keep),
              "sequences": jnp.sum(seq).astype(jnp.float32), "masked_sequences": masked_seq,
              "weight_sum": jnp.sum(w)}
    return w.astype(jnp.float32), keep.astype(jnp.float32), counts


def correction_metrics(counts: dict) -> dict:
    """'correction/*' metrics from `correction_weights`' counts (summed over processes)."""
    tokens = max(float(counts["tokens"]), 1.0)
    kept = max(tokens - float(counts["masked_tokens"]), 1.0)
    return {"correction/clipped_frac": float(counts["clipped"]) / tokens,
            "correction/masked_token_frac": float(counts["masked_tokens"]) / tokens,
            "correction/masked_seq_frac": float(counts["masked_sequences"]) / max(float(counts["sequences"]), 1.0),
            "correction/weight_mean": float(counts["weight_sum"]) / kept}


def mismatch_metrics(logp_old, logp_sampler, mask) -> dict:
    """The sampler-vs-learner gap over a batch's response tokens (pass the global batch). With d = logp_old -
    logp_sampler per token and rho = exp(sum_t d) per sequence:
    'mismatch/abs_logp_diff_mean', '..._max': mean and max |d|;
    'mismatch/kl_k3': mean of k3 = e^d - d - 1, Schulman's estimator of KL(mu || pi_old) from mu's samples;
    'mismatch/ratio_mean': mean token ratio e^d (1 when unbiased; TRL #6789's 0.896 under top-p 0.8);
    'mismatch/seq_ratio_p05', '_p50', '_p95': quantiles of rho over the sequences."""
    d, m = (np.asarray(x, np.float64) for x in _log_ratio(logp_old, logp_sampler, mask))
    valid = m > 0
    if not valid.any():
        return {}
    dv = d[valid]
    seq = valid.any(axis=-1)
    rho = np.exp(np.clip(d.sum(axis=-1)[seq], -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    p05, p50, p95 = np.quantile(rho, [0.05, 0.5, 0.95])
    return {"mismatch/abs_logp_diff_mean": float(np.abs(dv).mean()), "mismatch/abs_logp_diff_max":
            float(np.abs(dv).max()), "mismatch/kl_k3": float(np.mean(np.expm1(dv) - dv)),
            "mismatch/ratio_mean": float(np.exp(dv).mean()), "mismatch/seq_ratio_p05": float(p05),
            "mismatch/seq_ratio_p50": float(p50), "mismatch/seq_ratio_p95": float(p95)}
