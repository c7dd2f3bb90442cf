"""Group-relative advantage estimators, registered by name (docs/method.md §1-§2). Pure jnp, float32.

Layout: a batch holds P prompts with G responses each; rewards are [P, G] and the response rows of every
per-token array are ordered p * G + g. `group_rewards` checks that layout against prompt ids.

One interface: every estimator is `fn(inp: AdvantageInput, opts: <its options dataclass>) -> AdvantageOutput`,
registered with its options class (`estimator(name, OptionsClass)`). `make_options(name, kwargs)` builds the
options and rejects an unknown one by name; `compute(name, inp, opts)` runs it; the public
`advantages(name, rewards, **kwargs)` does both from keyword arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from arm_jax.algorithms.confidence import answer_confidence, masked_mean_logp, prompt_confidence
from arm_jax.registry import Registry

ADVANTAGES = Registry("advantage estimator")


@dataclasses.dataclass(frozen=True)
class AdvantageInput:
    """What an estimator may read (the loop fills every field; direct callers give what their estimator needs).

    rewards [P, G]: the (possibly shaped) total. accuracy [P, G]: the verifier's signal, > 0 = correct (default:
    rewards). resp_logp, resp_mask [P*G, T]: logp_old of the response tokens and their mask. prompt_logp,
    prompt_mask [P, Tp]: the prompts' log-probs and the question tokens c(q) averages. mean_logp [P, G]: mean token
    log-prob of each response (default from resp_logp / resp_mask)."""

    rewards: Any
    accuracy: Any = None
    resp_logp: Any = None
    resp_mask: Any = None
    prompt_logp: Any = None
    prompt_mask: Any = None
    mean_logp: Any = None

    @property
    def correct(self) -> jax.Array:
        """[P, G] bool: the verifier's accuracy > 0 (rewards > 0 without one)."""
        return jnp.asarray(self.rewards if self.accuracy is None else self.accuracy, jnp.float32) > 0

    def require(self, name: str, *fields: str) -> None:
        """A ValueError naming the inputs the estimator needs and did not get."""
        missing = [f for f in fields if getattr(self, f) is None]
        if missing:
            raise ValueError(f"advantage estimator {name!r} needs {', '.join(missing)}")


@dataclasses.dataclass
class AdvantageOutput:
    """adv [P, G] float32; diagnostics: per-group / per-response arrays worth logging (ARM: c_q [P], c_o [P, G],
    term [P, G])."""

    adv: jax.Array
    diagnostics: dict = dataclasses.field(default_factory=dict)


def estimator(name: str, options: type):
    """Registers `fn(inp, opts) -> AdvantageOutput` under `name` with its options dataclass."""
    def deco(fn):
        fn.options = options
        return ADVANTAGES.register(name)(fn)
    return deco


def make_options(name: str, kwargs=()):
    """The options dataclass of estimator `name` from ((key, value), ...) or a dict; an unknown key is a
    ValueError naming it and the valid ones."""
    cls = ADVANTAGES.get_fn(name).options
    kwargs = dict(kwargs)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"advantage estimator {name!r} has no option {', '.join(map(repr, unknown))}; its options "
                         f"({cls.__name__}): {valid}")
    return cls(**kwargs)


def compute(name: str, inp: AdvantageInput, opts=None) -> AdvantageOutput:
    """Runs estimator `name` on `inp` with `opts` (default: its options' defaults)."""
    fn = ADVANTAGES.get_fn(name)
    return fn(inp, opts if opts is not None else fn.options())


_INPUT_FIELDS = {f.name for f in dataclasses.fields(AdvantageInput)} - {"rewards"}


def advantages(name: str, rewards, **kwargs) -> jax.Array:
    """Public entry point (docs/method.md §9): rewards [P, G] plus the estimator's inputs (accuracy, resp_logp,
    resp_mask, prompt_logp, prompt_mask, mean_logp) and options as keywords -> advantages [P, G]."""
    fields = {k: kwargs.pop(k) for k in list(kwargs) if k in _INPUT_FIELDS}
    opts = make_options(name, kwargs)
    return compute(name, AdvantageInput(jnp.asarray(rewards, jnp.float32), **fields), opts).adv


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


def _grpo(rewards: jax.Array, std_ddof: int = 1, eps: float = 1e-6, scale_by_std: bool = True) -> jax.Array:
    centred = rewards - jnp.mean(rewards, axis=-1, keepdims=True)
    if not scale_by_std:
        return centred
    G = rewards.shape[-1]
    if G - std_ddof <= 0:
        raise ValueError(f"std with ddof={std_ddof} needs G > {std_ddof}, got G={G}")
    std = jnp.sqrt(jnp.sum(centred ** 2, axis=-1, keepdims=True) / (G - std_ddof))
    return centred / (std + eps)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """std_ddof: 1 (unbiased, as verl, TRL and tunix; default) or 0. eps: 1e-6. scale_by_std: False = Dr.GRPO."""

    std_ddof: int = 1
    eps: float = 1e-6
    scale_by_std: bool = True


@estimator("grpo", GRPOConfig)
def grpo(inp: AdvantageInput, opts: GRPOConfig) -> AdvantageOutput:
    """GRPO (Shao et al. 2024, DeepSeekMath): A_i = (r_i - mean(r)) / (std(r) + eps) within each group."""
    return AdvantageOutput(_grpo(jnp.asarray(inp.rewards, jnp.float32), opts.std_ddof, opts.eps, opts.scale_by_std))


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The estimator has no options."""


@estimator("drgrpo", NoOptions)
def drgrpo(inp: AdvantageInput, opts: NoOptions) -> AdvantageOutput:
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = r_i - mean(r), no std scaling
    (pair with the 'seq-mean-token-sum-norm' aggregation)."""
    return AdvantageOutput(_grpo(jnp.asarray(inp.rewards, jnp.float32), scale_by_std=False))


@estimator("rloo", NoOptions)
def rloo(inp: AdvantageInput, opts: NoOptions) -> AdvantageOutput:
    """RLOO (Ahmadian et al. 2024): A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r))."""
    rewards = jnp.asarray(inp.rewards, jnp.float32)
    G = rewards.shape[-1]
    if G < 2:
        raise ValueError("rloo needs G >= 2")
    return AdvantageOutput((rewards - jnp.mean(rewards, axis=-1, keepdims=True)) * (G / (G - 1)))


def _comb_ratio(a: jax.Array, n: int, k: int) -> jax.Array:
    """C(a, k) / C(n, k) for integer arrays a <= n (0 when a < k), as a stable product of k factors."""
    i = jnp.arange(k, dtype=jnp.float32)
    a = a.astype(jnp.float32)[..., None]
    factors = jnp.clip((a - i) / (n - i), 0.0, None)
    return jnp.prod(factors, axis=-1)


@dataclasses.dataclass(frozen=True)
class PassKConfig:
    """k: the Pass@k being optimized (4; 1 <= k <= G). eps: added to sigma (1e-6)."""

    k: int = 4
    eps: float = 1e-6


@estimator("passk", PassKConfig)
def passk(inp: AdvantageInput, opts: PassKConfig) -> AdvantageOutput:
    """Analytic Pass@k advantage (Chen et al. 2025, "Pass@k Training for Adaptively Balancing Exploration and
    Exploitation of LRMs"): the expectation, over all k-subsets containing a response, of the subset's
    standardized max reward. With N = G responses of which n_neg are wrong (correct = the verifier's accuracy):
      R = 1 - C(n_neg, k) / C(N, k),  sigma = sqrt(R (1 - R)),
      A_correct = (1 - R) / sigma,
      A_wrong   = (1 - R - C(n_neg - 1, k - 1) / C(N - 1, k - 1)) / sigma;  groups with sigma = 0 get 0.
    """
    correct = inp.correct
    N, k = correct.shape[-1], opts.k
    if not 1 <= k <= N:
        raise ValueError(f"passk needs 1 <= k <= G, got k={k}, G={N}")
    n_neg = jnp.sum(~correct, axis=-1)
    R = 1.0 - _comb_ratio(n_neg, N, k)
    sigma = jnp.sqrt(R * (1.0 - R))
    wrong_all = _comb_ratio(n_neg - 1, N - 1, k - 1)  # share of subsets holding i that are all wrong
    a_pos = (1.0 - R) / (sigma + opts.eps)
    a_neg = (1.0 - R - wrong_all) / (sigma + opts.eps)
    adv = jnp.where(correct, a_pos[..., None], a_neg[..., None])
    return AdvantageOutput(jnp.where(sigma[..., None] > 0, adv, 0.0))


@dataclasses.dataclass(frozen=True)
class UnlikelinessConfig:
    """beta_rank: the rank penalty (0.25, the paper's default); std_ddof, eps: of the GRPO normalization."""

    beta_rank: float = 0.25
    std_ddof: int = 1
    eps: float = 1e-6


@estimator("unlikeliness", UnlikelinessConfig)
def unlikeliness(inp: AdvantageInput, opts: UnlikelinessConfig) -> AdvantageOutput:
    """Unlikeliness reward (He et al. 2025, "Rewarding the Unlikely: Lifting GRPO Beyond Distribution
    Sharpening"), then GRPO normalization. Within each group the correct samples are ranked by their mean token
    log-prob, rank 0 = the least likely (ties by index), and
        r_i <- r_i * (1 - beta_rank * rank_i / G),
    so the least likely correct proof keeps its full reward and likelier ones are pushed less. Incorrect samples
    are unranked (their reward is kept)."""
    rewards = jnp.asarray(inp.rewards, jnp.float32)
    P, G = rewards.shape
    if inp.mean_logp is None:
        inp.require("unlikeliness", "resp_logp", "resp_mask")
        mean_logp = masked_mean_logp(jnp.asarray(inp.resp_logp), jnp.asarray(inp.resp_mask)).reshape(P, G)
    else:
        mean_logp = jax.lax.stop_gradient(jnp.asarray(inp.mean_logp, jnp.float32))
    correct = inp.correct
    order = jnp.argsort(jnp.where(correct, mean_logp, jnp.inf), axis=-1, stable=True)  # least likely first
    rank = jnp.argsort(order, axis=-1).astype(jnp.float32)
    shaped = jnp.where(correct, rewards * (1.0 - opts.beta_rank * rank / G), rewards)
    return AdvantageOutput(_grpo(shaped, opts.std_ddof, opts.eps))


@dataclasses.dataclass(frozen=True)
class ARMConfig:
    """ARM's options (docs/method.md §1; arXiv:2602.05281).

    alpha: weight of the term alpha * (c(q) - c(o_i|q)) (1.0, the paper's). rho: share of lowest-log-prob answer
    tokens c(o|q) averages (0.2; 1 = plain length-normalized likelihood). scale_by_std, std_ddof, eps: the GRPO
    base (False = Dr.GRPO base). skip_all_correct: no term in all-correct groups (False: the paper keeps it, it
    equilibrates confidence among correct answers). correct_only: the term only on correct responses (False).
    prompt_conf_mode: c(q) as the mean question log-prob ('mean', 1/PPL) or its rho-lowest tokens ('low_frac').
    anchor: 'prompt' (c(q), the paper) or 'group_mean' (the group's mean c(o|q): removes the term's average shift,
    an ablation). mode: 'additive' (the paper) or 'multiplicative' (ablation: correct responses get
    w = n_c * softmax(-mult_beta * z) over their standardized log c(o|q), A~ = w A); mult_beta: its sharpness (1).
    """

    alpha: float = 1.0
    rho: float = 0.2
    scale_by_std: bool = True
    std_ddof: int = 1
    eps: float = 1e-6
    skip_all_correct: bool = False
    correct_only: bool = False
    prompt_conf_mode: str = "mean"
    anchor: str = "prompt"
    mode: str = "additive"
    mult_beta: float = 1.0

    def __post_init__(self):
        if self.anchor not in ("prompt", "group_mean"):
            raise ValueError(f"ARMConfig.anchor must be 'prompt' or 'group_mean', got {self.anchor!r}")
        if self.mode not in ("additive", "multiplicative"):
            raise ValueError(f"ARMConfig.mode must be 'additive' or 'multiplicative', got {self.mode!r}")
        if self.prompt_conf_mode not in ("mean", "low_frac"):
            raise ValueError(f"ARMConfig.prompt_conf_mode must be 'mean' or 'low_frac', got "
                             f"{self.prompt_conf_mode!r}")
        if not 0.0 < self.rho <= 1.0:
            raise ValueError(f"ARMConfig.rho must be in (0, 1], got {self.rho}")


@estimator("arm", ARMConfig)
def arm(inp: AdvantageInput, opts: ARMConfig) -> AdvantageOutput:
    """ARM / ProGRPO (arXiv:2602.05281, "Back to Basics: Revisiting Exploration in RL for LLM Reasoning via
    Generative Probabilities"), additive form:
        A~_i = A_i                               if no response of the group is correct (accuracy),
        A~_i = A_i + alpha * (c(q) - c(o_i|q))   otherwise,
    with A_i the GRPO advantage of the (shaped) rewards, c(o|q) the rho-lowest-token answer confidence and c(q)
    the prompt confidence (`arm_jax.algorithms.confidence`). Diagnostics: c_q [P], c_o [P, G], term [P, G]."""
    inp.require("arm", "resp_logp", "resp_mask", "prompt_logp", "prompt_mask")
    rewards = jnp.asarray(inp.rewards, jnp.float32)
    P, G = rewards.shape
    if inp.resp_logp.shape[0] != P * G:
        raise ValueError(f"resp_logp has {inp.resp_logp.shape[0]} rows, expected P*G = {P}*{G} (row p*G + g)")
    if inp.prompt_logp.shape[0] != P:
        raise ValueError(f"prompt_logp has {inp.prompt_logp.shape[0]} rows, expected P = {P}")
    correct = inp.correct
    base = _grpo(rewards, opts.std_ddof, opts.eps, opts.scale_by_std)
    c_o = answer_confidence(jnp.asarray(inp.resp_logp), jnp.asarray(inp.resp_mask), opts.rho).reshape(P, G)
    c_q = prompt_confidence(jnp.asarray(inp.prompt_logp), jnp.asarray(inp.prompt_mask), opts.prompt_conf_mode,
                            opts.rho)
    gate = jnp.broadcast_to(jnp.any(correct, axis=-1, keepdims=True), (P, G))
    if opts.skip_all_correct:
        gate = gate & ~jnp.all(correct, axis=-1, keepdims=True)
    if opts.correct_only:
        gate = gate & correct
    if opts.mode == "additive":
        ref = c_q[:, None] if opts.anchor == "prompt" else jnp.mean(c_o, axis=-1, keepdims=True)
        term = jnp.where(gate, opts.alpha * (ref - c_o), 0.0)
        adv = base + term
    else:
        log_c = jnp.log(c_o)
        cf = correct.astype(jnp.float32)
        n_c = jnp.sum(cf, axis=-1, keepdims=True)
        mean = jnp.sum(log_c * cf, axis=-1, keepdims=True) / jnp.maximum(n_c, 1.0)
        var = jnp.sum(((log_c - mean) ** 2) * cf, axis=-1, keepdims=True) / jnp.maximum(n_c, 1.0)
        z = (log_c - mean) / (jnp.sqrt(var) + opts.eps)
        w = n_c * jax.nn.softmax(jnp.where(correct, -opts.mult_beta * z, -jnp.inf), axis=-1)
        adv = jnp.where(gate & correct, w, 1.0) * base
        term = adv - base
    return AdvantageOutput(adv, {"c_q": c_q, "c_o": c_o, "term": term, "base": base, "gate": gate})


def arm_advantages(rewards, resp_logp, resp_mask, prompt_logp, prompt_mask, *, alpha: float = 1.0,
                   rho: float = 0.2, scale_by_std: bool = True, eps: float = 1e-6,
                   skip_all_correct: bool = False, correct_only: bool = False, **kwargs) -> jax.Array:
    """Public ARM entry point (docs/method.md §9): rewards [P, G]; resp_* [P*G, T] (row p*G + g); prompt_* [P, Tp]
    (mask = question tokens whose log-prob counts) -> A~ [P, G] float32. Other ARMConfig options and `accuracy`
    as keywords."""
    accuracy = kwargs.pop("accuracy", None)
    opts = make_options("arm", dict(alpha=alpha, rho=rho, scale_by_std=scale_by_std, eps=eps,
                                    skip_all_correct=skip_all_correct, correct_only=correct_only, **kwargs))
    inp = AdvantageInput(jnp.asarray(rewards, jnp.float32), accuracy, jnp.asarray(resp_logp), jnp.asarray(resp_mask),
                         jnp.asarray(prompt_logp), jnp.asarray(prompt_mask))
    return arm(inp, opts).adv
