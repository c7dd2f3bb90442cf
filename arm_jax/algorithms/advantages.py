"""Group-relative advantage estimators, registered by name (docs/method.md §1). Pure jnp, float32.

Layout: a batch holds P prompts with G responses each; rewards are [P, G] and the response rows of every
per-token array are ordered p * G + g. `group_rewards` checks that layout against prompt ids.
Call `advantages(name, rewards, **kwargs)`; each estimator documents its formula, defaults and paper.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from arm_jax.algorithms.confidence import answer_confidence, prompt_confidence
from arm_jax.registry import Registry

ADVANTAGES = Registry("advantage estimator")
register = ADVANTAGES.register


def advantages(name: str, rewards, **kwargs) -> jax.Array:
    """Dispatches to a registered estimator: rewards [P, G] (+ its keyword arguments) -> advantages [P, G]."""
    return ADVANTAGES.get_fn(name)(jnp.asarray(rewards, jnp.float32), **kwargs)


def group_rewards(rewards, group_size: int, prompt_ids=None) -> np.ndarray:
    """Flat per-response rewards [P * G] (row p * G + g) -> [P, G], checking that every group holds one prompt.

    prompt_ids: [P * G] identifiers (ints or strings) of the prompt each row answers; a group that mixes prompts,
    or a batch not divisible by G, is an error rather than a silent reshape.
    """
    rewards = np.asarray(rewards, np.float32).reshape(-1)
    if group_size <= 0 or rewards.size % group_size:
        raise ValueError(f"{rewards.size} responses cannot be split into groups of G={group_size}")
    if prompt_ids is not None:
        ids = np.asarray(prompt_ids).reshape(-1, group_size)
        if ids.shape[0] * group_size != rewards.size:
            raise ValueError(f"prompt_ids has {ids.size} entries for {rewards.size} responses")
        bad = np.nonzero(~np.all(ids == ids[:, :1], axis=1))[0]
        if bad.size:
            raise ValueError(f"group {bad[0]} (rows {bad[0] * group_size}..{(bad[0] + 1) * group_size - 1}) mixes "
                             f"prompt ids {sorted(set(ids[bad[0]].tolist()))}; rows must be ordered p * G + g")
    return rewards.reshape(-1, group_size)


# ----------------------------------------------------------------------------------------- estimators


@register("grpo")
def grpo(rewards: jax.Array, *, std_ddof: int = 1, eps: float = 1e-6, scale_by_std: bool = True,
         **_) -> jax.Array:
    """GRPO (Shao et al. 2024, DeepSeekMath): A_i = (r_i - mean(r)) / (std(r) + eps) within each group.

    std_ddof: 1 (unbiased, as verl, TRL and tunix; default) or 0. scale_by_std=False gives Dr.GRPO. eps = 1e-6.
    """
    centred = rewards - jnp.mean(rewards, axis=-1, keepdims=True)
    if not scale_by_std:
        return centred
    G = rewards.shape[-1]
    if G - std_ddof <= 0:
        raise ValueError(f"std with ddof={std_ddof} needs G > {std_ddof}, got G={G}")
    std = jnp.sqrt(jnp.sum(centred ** 2, axis=-1, keepdims=True) / (G - std_ddof))
    return centred / (std + eps)


@register("drgrpo")
def drgrpo(rewards: jax.Array, **_) -> jax.Array:
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = r_i - mean(r), no std scaling
    (pair with the 'seq-mean-token-sum-norm' aggregation)."""
    return grpo(rewards, scale_by_std=False)


@register("rloo")
def rloo(rewards: jax.Array, **_) -> jax.Array:
    """RLOO (Ahmadian et al. 2024): A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r))."""
    G = rewards.shape[-1]
    if G < 2:
        raise ValueError("rloo needs G >= 2")
    return (rewards - jnp.mean(rewards, axis=-1, keepdims=True)) * (G / (G - 1))


def _comb_ratio(a: jax.Array, n: int, k: int) -> jax.Array:
    """C(a, k) / C(n, k) for integer arrays a <= n (0 when a < k), as a stable product of k factors."""
    i = jnp.arange(k, dtype=jnp.float32)
    a = a.astype(jnp.float32)[..., None]
    factors = jnp.clip((a - i) / (n - i), 0.0, None)
    return jnp.prod(factors, axis=-1)


@register("passk")
def passk(rewards: jax.Array, *, k: int = 4, eps: float = 1e-6, accuracy: Optional[jax.Array] = None,
          **_) -> jax.Array:
    """Analytic Pass@k advantage (Chen et al. 2025, "Pass@k Training for Adaptively Balancing Exploration and
    Exploitation of LRMs"): the expectation, over all k-subsets containing a response, of the subset's
    standardized max reward. With N = G responses of which n_neg are wrong (binary rewards, correct = r > 0):
      R = 1 - C(n_neg, k) / C(N, k),  sigma = sqrt(R (1 - R)),
      A_correct = (1 - R) / sigma,
      A_wrong   = (1 - R - C(n_neg - 1, k - 1) / C(N - 1, k - 1)) / sigma;  groups with sigma = 0 get 0.
    accuracy [P, G]: the verifier's pass/fail signal (the loop passes it; a shaped total such as a format bonus
    must not make a wrong answer "correct"). Default: rewards > 0.
    """
    N = rewards.shape[-1]
    if not 1 <= k <= N:
        raise ValueError(f"passk needs 1 <= k <= G, got k={k}, G={N}")
    correct = (rewards if accuracy is None else jnp.asarray(accuracy, jnp.float32)) > 0
    n_neg = jnp.sum(~correct, axis=-1)
    R = 1.0 - _comb_ratio(n_neg, N, k)
    sigma = jnp.sqrt(R * (1.0 - R))
    wrong_all = _comb_ratio(n_neg - 1, N - 1, k - 1)  # share of subsets holding i that are all wrong
    a_pos = (1.0 - R) / (sigma + eps)
    a_neg = (1.0 - R - wrong_all) / (sigma + eps)
    adv = jnp.where(correct, a_pos[..., None], a_neg[..., None])
    return jnp.where(sigma[..., None] > 0, adv, 0.0)


@register("unlikeliness")
def unlikeliness(rewards: jax.Array, *, mean_logp: jax.Array, beta_rank: float = 0.25, std_ddof: int = 1,
                 eps: float = 1e-6, accuracy: Optional[jax.Array] = None, **_) -> jax.Array:
    """Unlikeliness reward (He et al. 2025, "Rewarding the Unlikely: Lifting GRPO Beyond Distribution
    Sharpening"), then GRPO normalization. Within each group the correct samples are ranked by their mean token
    log-prob mean_logp [P, G], rank 0 = the least likely (ties by index), and
        r_i <- r_i * (1 - beta_rank * rank_i / G),
    so the least likely correct proof keeps its full reward and likelier ones are pushed less. Incorrect samples
    are unranked (their reward is kept). beta_rank = 0.25 (paper default). accuracy [P, G]: the verifier's
    signal defining "correct" when rewards are shaped (default rewards > 0).
    """
    G = rewards.shape[-1]
    correct = (rewards if accuracy is None else jnp.asarray(accuracy, jnp.float32)) > 0
    lp = jax.lax.stop_gradient(jnp.asarray(mean_logp, jnp.float32))
    key = jnp.where(correct, lp, jnp.inf)  # incorrect samples sort after every correct one
    order = jnp.argsort(key, axis=-1, stable=True)  # ascending: least likely first
    rank = jnp.argsort(order, axis=-1).astype(jnp.float32)
    shaped = jnp.where(correct, rewards * (1.0 - beta_rank * rank / G), rewards)
    return grpo(shaped, std_ddof=std_ddof, eps=eps)


def arm_terms(rewards, resp_logp, resp_mask, prompt_logp, prompt_mask, *, alpha=1.0, rho=0.2,
              scale_by_std=True, std_ddof=1, eps=1e-6, skip_all_correct=False, correct_only=False,
              accuracy: Optional[jax.Array] = None, prompt_conf_mode: str = "mean", anchor: str = "prompt",
              mode: str = "additive", mult_beta: float = 1.0) -> dict[str, jax.Array]:
    """ARM advantages and their ingredients (see `arm`): a dict with 'adv' [P, G], 'base' [P, G] (GRPO/Dr.GRPO),
    'c_q' [P], 'c_o' [P, G], 'term' [P, G] (what ARM added; 0 where gated off), 'gate' [P, G] bool."""
    rewards = jnp.asarray(rewards, jnp.float32)
    P, G = rewards.shape
    if resp_logp.shape[0] != P * G:
        raise ValueError(f"resp_logp has {resp_logp.shape[0]} rows, expected P*G = {P}*{G} (row p*G + g)")
    if prompt_logp.shape[0] != P:
        raise ValueError(f"prompt_logp has {prompt_logp.shape[0]} rows, expected P = {P}")
    correct = (rewards if accuracy is None else jnp.asarray(accuracy, jnp.float32)) > 0
    base = grpo(rewards, std_ddof=std_ddof, eps=eps, scale_by_std=scale_by_std)
    c_o = answer_confidence(resp_logp, resp_mask, rho).reshape(P, G)
    c_q = prompt_confidence(prompt_logp, prompt_mask, prompt_conf_mode, rho)
    any_correct = jnp.any(correct, axis=-1, keepdims=True)
    gate = jnp.broadcast_to(any_correct, (P, G))
    if skip_all_correct:
        gate = gate & ~jnp.all(correct, axis=-1, keepdims=True)
    if correct_only:
        gate = gate & correct
    if mode == "additive":
        if anchor == "prompt":
            ref = c_q[:, None]
        elif anchor == "group_mean":
            ref = jnp.mean(c_o, axis=-1, keepdims=True)
        else:
            raise ValueError(f"arm anchor must be 'prompt' or 'group_mean', got {anchor!r}")
        term = jnp.where(gate, alpha * (ref - c_o), 0.0)
        adv = base + term
    elif mode == "multiplicative":
        # Ablation, not the paper: among correct responses w = n_c * softmax(-beta * z), z = standardized log c(o|q).
        log_c = jnp.log(c_o)
        cf = correct.astype(jnp.float32)
        n_c = jnp.sum(cf, axis=-1, keepdims=True)
        mean = jnp.sum(log_c * cf, axis=-1, keepdims=True) / jnp.maximum(n_c, 1.0)
        var = jnp.sum(((log_c - mean) ** 2) * cf, axis=-1, keepdims=True) / jnp.maximum(n_c, 1.0)
        z = (log_c - mean) / (jnp.sqrt(var) + eps)
        logits = jnp.where(correct, -mult_beta * z, -jnp.inf)
        w = n_c * jax.nn.softmax(logits, axis=-1)
        w = jnp.where(gate & correct, w, 1.0)
        adv = w * base
        term = adv - base
    else:
        raise ValueError(f"arm mode must be 'additive' or 'multiplicative', got {mode!r}")
    return {"adv": adv, "base": base, "c_q": c_q, "c_o": c_o, "term": term, "gate": gate}


@register("arm")
def arm(rewards: jax.Array, **kwargs) -> jax.Array:
    """ARM / ProGRPO (arXiv:2602.05281, "Back to Basics: Revisiting Exploration in RL for LLM Reasoning via
    Generative Probabilities"), additive form:
        Ã_i = A_i                               if no response of the group is correct,
        Ã_i = A_i + alpha * (c(q) - c(o_i|q))   otherwise,
    with A_i the GRPO advantage (Dr.GRPO when scale_by_std=False), c(o|q) the rho-lowest-token answer confidence
    and c(q) the prompt confidence (`arm_jax.algorithms.confidence`). Defaults alpha = 1, rho = 0.2.
    Keyword arguments: resp_logp, resp_mask [P*G, T]; prompt_logp, prompt_mask [P, Tp]; alpha; rho;
    scale_by_std; std_ddof (1); eps (1e-6); skip_all_correct (False: all-correct groups, where A = 0, still get
    the term); correct_only (False); accuracy [P, G] (the verifier's signal gating "correct" when rewards are
    shaped; default rewards > 0); prompt_conf_mode ('mean' | 'low_frac'); anchor ('prompt' | 'group_mean', an
    ablation that replaces c(q) by the group's mean c(o|q)); mode ('additive' | 'multiplicative' ablation) and
    mult_beta.
    """
    return arm_terms(rewards, **kwargs)["adv"]


def arm_advantages(rewards, resp_logp, resp_mask, prompt_logp, prompt_mask, *, alpha: float = 1.0,
                   rho: float = 0.2, scale_by_std: bool = True, eps: float = 1e-6,
                   skip_all_correct: bool = False, correct_only: bool = False, **kwargs) -> jax.Array:
    """Public ARM entry point (docs/method.md §9): rewards [P, G]; resp_* [P*G, T] (row p*G + g); prompt_* [P, Tp] (mask
    = question tokens whose log-prob counts) -> Ã [P, G] float32."""
    return arm_terms(jnp.asarray(rewards, jnp.float32), jnp.asarray(resp_logp), jnp.asarray(resp_mask),
                     jnp.asarray(prompt_logp), jnp.asarray(prompt_mask), alpha=alpha, rho=rho,
                     scale_by_std=scale_by_std, eps=eps, skip_all_correct=skip_all_correct,
                     correct_only=correct_only, **kwargs)["adv"]

