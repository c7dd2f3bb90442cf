"""The RL loop (docs/method.md §1-§3, §7): prompts -> rollout of G samples each -> rewards -> logp_old, reference
log-probs and confidences -> advantages -> mu updates -> metrics -> checkpoint -> periodic evaluation.

Everything random is derived from (seed, step), the data iterator's state and the train state are checkpointed
together, and the metric history rides in the checkpoint, so a run killed at any moment and relaunched with the same
command ends with the same parameters and the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Optional

import jax
import numpy as np

from arm_jax import distributed
from arm_jax.algorithms import advantages as adv_lib
from arm_jax.algorithms import losses as L
from arm_jax.data.pipeline import PromptBatches
from arm_jax.rewards.tasks import Task
from arm_jax.policy import Policy, token_logprobs
from arm_jax.rewards.registry import RewardComposer
from arm_jax.rollout.sampler import Rollout, generate
from arm_jax.sharding import DEFAULT_RULES
from arm_jax.train.checkpoint import Checkpointer
from arm_jax.train.learner import Learner, OptimConfig
from arm_jax.train.metrics import MetricsWriter


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """The RL run. Defaults are ProGRPO's (ARM + Clip-Higher + token-mean, docs/method.md §1).

    steps: RL steps (one rollout batch each). prompts_per_step (P) x group_size (G) responses per step.
    max_new_tokens, temperature, top_p, top_k: rollout sampling (temperature 1, full vocabulary by default).
    advantage: a registered estimator ('arm', 'grpo', 'drgrpo', 'rloo', 'passk', 'unlikeliness');
    advantage_kwargs: its options as ((name, value), ...), e.g. (('alpha', 1.0), ('rho', 0.2)): fields of the
    estimator's options dataclass (`ARMConfig`, `GRPOConfig`, `PassKConfig`, `UnlikelinessConfig`); an unknown
    name is an error when the RLConfig is built.
    loss, optim: `LossConfig`, `OptimConfig`. num_iterations (mu): passes over each rollout batch;
    num_minibatches: optimizer updates per pass; micro_batch_size: sequences per gradient micro-batch.
    dynamic_sampling: DAPO's filter (Yu et al. 2025), stated on advantages: groups whose advantages are all zero
    (for GRPO: equal rewards; for ARM: all wrong and equal, since ARM's term moves all-correct groups) are
    replaced from up to `max_sampling_rounds` extra prompt batches; `uninformative_groups` counts what is left.
    mask_truncated: DAPO's overlong filtering (no loss on truncated
    responses). top_entropy_quantile: TRL's option (Wang et al. 2025, "Beyond the 80/20 rule"): the fraction of
    highest-entropy response tokens trained on (0.2 = the top 20 %, 1.0 or None = all), the threshold taken over
    the whole global batch.
    eval_every, eval_n, eval_temperature, eval_prompts: held-out Pass@k every N steps (and before the first and
    after the last step), with n samples per prompt on the first eval_prompts prompts (None = all).
    checkpoint_every, keep_checkpoints, samples_every: outputs. seed: the root of every random stream.
    remat: rematerialize blocks in the backward pass. data_seed: the prompt shuffling seed.
    """

    steps: int = 100
    prompts_per_step: int = 32
    group_size: int = 8
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    advantage: str = "arm"
    advantage_kwargs: tuple = ()  # the estimator's defaults (ARMConfig: alpha 1, rho 0.2)
    loss: L.LossConfig = L.LossConfig()
    optim: OptimConfig = OptimConfig()
    num_iterations: int = 1
    num_minibatches: int = 1
    micro_batch_size: Optional[int] = None
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    mask_truncated: bool = False
    top_entropy_quantile: Optional[float] = None
    eval_every: int = 100
    eval_n: int = 8
    eval_temperature: float = 1.0
    eval_prompts: Optional[int] = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    samples_every: int = 50
    seed: int = 0
    data_seed: int = 0
    remat: bool = False

    def __post_init__(self):
        self.advantage_options  # an unknown estimator or option is an error here, naming it
        if self.loss.agg_mode == "seq-mean-token-sum-norm" and self.loss.max_len is None:
            # Dr.GRPO normalizes token sums by the generation budget
            object.__setattr__(self, "loss", dataclasses.replace(self.loss, max_len=self.max_new_tokens))

    @property
    def advantage_options(self):
        """The estimator's typed options (`ARMConfig`, `GRPOConfig`, ...) built from `advantage_kwargs`."""
        try:
            return adv_lib.make_options(self.advantage, self.advantage_kwargs)
        except (KeyError, ValueError) as e:
            raise ValueError(f"RLConfig.advantage={self.advantage!r}, advantage_kwargs={self.advantage_kwargs!r}: "
                             f"{e}") from e

    def validate(self, mesh) -> None:
        n = self.prompts_per_step * self.group_size
        if n % self.num_minibatches:
            raise ValueError(f"P*G = {n} is not divisible by RLConfig.num_minibatches={self.num_minibatches}")
        per_update = n // self.num_minibatches
        if self.micro_batch_size and per_update % self.micro_batch_size:
            raise ValueError(f"P*G/num_minibatches = {per_update} is not divisible by "
                             f"RLConfig.micro_batch_size={self.micro_batch_size}")
        batch_axes = DEFAULT_RULES.mesh_axes("batch")  # the axes the batch is sharded over (one rules object)
        batch_devices = math.prod(dict(mesh.shape).get(a, 1) for a in batch_axes)
        mb = self.micro_batch_size or per_update
        if mb % batch_devices:
            raise ValueError(f"the mesh's batch axes ({' x '.join(batch_axes)} = {batch_devices} devices) do not "
                             f"divide the micro-batch of {mb} sequences (RLConfig.micro_batch_size / P*G)")
        if self.prompts_per_step % distributed.process_count():
            raise ValueError(f"RLConfig.prompts_per_step={self.prompts_per_step} does not divide over "
                             f"{distributed.process_count()} processes")


def _advantages(cfg: RLConfig, rewards, accuracy, logp, rollout: Rollout, qmask):
    """-> (A~ [P, G], the estimator's diagnostics as numpy, e.g. ARM's c_q [P], c_o / term [P, G]). One call for
    every estimator: the input carries everything any of them reads (the verifier's accuracy is "correct")."""
    G = rewards.shape[1]
    Tp = rollout.prompt_tokens.shape[1]
    inp = adv_lib.AdvantageInput(rewards=rewards, accuracy=accuracy, resp_logp=logp[:, Tp:], resp_mask=rollout.mask,
                                 prompt_logp=logp[::G, :Tp], prompt_mask=qmask)
    out = adv_lib.compute(cfg.advantage, inp, cfg.advantage_options)
    diag = {k: np.asarray(out.diagnostics[k]) for k in ("c_q", "c_o", "term") if k in out.diagnostics}
    return np.asarray(out.adv), diag


@dataclasses.dataclass
class RoundBatch:
    """One rollout round with everything the update needs, P prompts x G samples (row p * G + g).

    records [P]; out: the Rollout; qmask [P, Tp] (question tokens of c(q)); texts [P*G]; rewards, accuracy,
    adv [P, G]; logp, ent [P*G, Tp + N] (temperature-`cfg.temperature` log-probs of the policy that sampled, i.e.
    logp_old, and entropies); ref_logp [P*G, Tp + N] or None; arm: ARM's arrays (c_q [P], c_o, term [P, G])."""

    records: list
    out: Rollout
    qmask: np.ndarray
    texts: list
    rewards: np.ndarray
    accuracy: np.ndarray
    logp: np.ndarray
    ent: np.ndarray
    ref_logp: Optional[np.ndarray]
    adv: np.ndarray
    arm: dict

    def informative(self, tol: float = 1e-6) -> np.ndarray:
        """[P] bool: groups whose advantages are not all zero (DAPO's filter, stated on advantages so that ARM's
        all-correct groups, which carry its only signal there, are kept)."""
        return np.any(np.abs(self.adv) > tol, axis=1)


def _arm_stats(arrays: dict, adv, accuracy) -> dict:
    """ARM diagnostics (docs/method.md §1) from the whole batch's arrays."""
    if not arrays:
        return {}
    correct = accuracy > 0
    return {"c_q_mean": float(np.mean(arrays["c_q"])), "c_o_mean": float(np.mean(arrays["c_o"])),
            "arm_term_mean": float(np.mean(arrays["term"])),
            "c_o_correct_group_std": _group_std(arrays["c_o"], correct),
            "frac_correct_negative_adv": float(np.mean(adv[correct] < 0)) if correct.any() else 0.0}


def _group_std(values, mask) -> float:
    stds = [np.std(v[m]) for v, m in zip(values, mask) if m.sum() > 1]
    return float(np.mean(stds)) if stds else 0.0


class RLRun:
    """One training run in `workdir`: builds the learner, restores the newest checkpoint, and steps."""

    def __init__(self, policy: Policy, task: Task, cfg: RLConfig, workdir: str, ref_policy: Optional[Policy] = None,
                 log_to_console: bool = True, checkpoint_dir: Optional[str] = None,
                 evaluator: Optional[Callable] = None):
        """checkpoint_dir: where orbax checkpoints go (default workdir/checkpoints; a gs:// bucket path on pods).
        evaluator(policy, task, rewards, n) -> metrics: the periodic held-out evaluation (required when
        cfg.eval_every > 0; `arm_jax.eval.heldout.HeldOutEval.from_rl_config(cfg)`)."""
        if cfg.eval_every and evaluator is None:
            raise ValueError(f"RLConfig.eval_every={cfg.eval_every} needs an evaluator: pass "
                             f"evaluator=arm_jax.eval.heldout.HeldOutEval.from_rl_config(cfg) or set eval_every=0")
        self.evaluator = evaluator
        cfg.validate(policy.mesh)
        self.policy, self.task, self.cfg, self.workdir = policy, task, cfg, workdir
        if cfg.loss.kl_coef and ref_policy is None:
            raise ValueError(f"LossConfig.kl_coef={cfg.loss.kl_coef} > 0 needs a reference policy: pass "
                             f"RLRun(..., ref_policy=...) (the launcher passes a frozen copy of the start)")
        self.ref = ref_policy if cfg.loss.kl_coef else None
        self.learner = Learner(policy, cfg.loss, cfg.optim, micro_batch_size=cfg.micro_batch_size, remat=cfg.remat,
                               temperature=cfg.temperature)
        self.rewards = RewardComposer(task.rewards)
        self.data = PromptBatches(task.train, cfg.prompts_per_step, seed=cfg.data_seed)
        self.ckpt = Checkpointer(checkpoint_dir or f"{workdir}/checkpoints", max_to_keep=cfg.keep_checkpoints)
        self.state = self.learner.init_state()
        self.step = 0
        history: list[dict] = []
        latest = self.ckpt.latest_step()
        if latest is not None:
            self.state, meta = self.ckpt.restore(latest, self.state)
            self.step = int(meta["step"])
            self.data.set_state(meta["data_state"])
            history = meta["history"]
        self.metrics = MetricsWriter(workdir, cfg.steps, history, enabled=jax.process_index() == 0,
                                     stream=sys.stdout if log_to_console else open(os.devnull, "w"))

    # ------------------------------------------------------------------------------------------ stages

    def current_policy(self) -> Policy:
        return self.policy.replace(params=self.state.params)

    def _rollout(self, records, step: int, round_: int = 0):
        cfg = self.cfg
        encoded = [self.task.encode(r) for r in records]
        prompts = [ids for ids, _ in encoded]
        t0 = time.time()
        out = generate(self.current_policy(), prompts, max_new_tokens=cfg.max_new_tokens,
                          temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, n=cfg.group_size,
                          seed=cfg.seed, step=step * (cfg.max_sampling_rounds + 1) + round_,
                          stop_ids=self.task.stop_ids)
        t1 = time.time()
        Tp = out.prompt_tokens.shape[1]
        qmask = np.zeros((len(records), Tp), np.float32)
        for b, (ids, q) in enumerate(encoded):
            qmask[b, Tp - len(ids):] = q
        texts = [self.task.decode(t[:n]) for t, n in zip(out.tokens, out.lengths)]
        examples = [records[i] for i in out.prompt_index]
        r = self.rewards(texts, examples, lengths=out.lengths, max_len=cfg.max_new_tokens)
        self._stage["rollout"] += t1 - t0
        self._stage["rewards"] += time.time() - t1
        G = cfg.group_size  # rows must be p * G + g: a group that mixes prompts is an error, not a silent reshape
        rewards = adv_lib.group_rewards(r["total"], G, prompt_ids=out.prompt_index)
        return out, qmask, texts, rewards, adv_lib.group_rewards(r["accuracy"], G)

    def _round(self, records, step: int, round_: int = 0) -> RoundBatch:
        """Rollout -> rewards -> logp_old / entropy (and reference log-probs) -> advantages for one prompt batch."""
        cfg = self.cfg
        out, qmask, texts, rewards, acc = self._rollout(records, step, round_)
        t0 = time.time()
        tokens, attn, _ = out.sequences()
        policy = self.current_policy()
        logp, ent = (distributed.to_local(x) for x in token_logprobs(policy, tokens, attn,
                                                                        temperature=cfg.temperature))
        ref_logp = None
        if self.ref is not None:
            ref_logp = distributed.to_local(token_logprobs(self.ref, tokens, attn, temperature=cfg.temperature)[0])
        self._stage["logprobs"] += time.time() - t0
        adv, arm = _advantages(cfg, rewards, acc, logp, out, qmask)
        return RoundBatch(list(records), out, qmask, texts, rewards, acc, np.asarray(logp, np.float32),
                          np.asarray(ent, np.float32), ref_logp, adv, arm)

    def _collect(self, step: int) -> tuple[RoundBatch, dict]:
        """One rollout batch, with DAPO dynamic sampling when enabled: groups whose advantages are all zero are
        replaced by informative groups of up to `max_sampling_rounds` extra prompt batches."""
        batch = self._round(next(self.data), step)
        stats = {}
        if self.cfg.dynamic_sampling:
            keep = batch.informative()
            rounds = 0
            while not distributed.allgather(keep).all() and rounds < self.cfg.max_sampling_rounds:
                rounds += 1
                batch = _merge(batch, keep, self._round(next(self.data), step, rounds), self.cfg.group_size)
                keep = batch.informative()
            everywhere = distributed.allgather(keep)
            stats = {"groups_refilled": int(rounds), "frac_groups_kept": float(everywhere.mean()),
                     "uninformative_groups": int((~everywhere).sum())}  # still all-zero after the last round
        return batch, stats

    def train_step(self) -> dict:
        """One RL step: collect a batch (rollout, rewards, logp_old, advantages; dynamic sampling), build the
        learner's masks (DAPO overlong filtering, top-entropy tokens over the global batch), run mu x
        num_minibatches updates, and return the step's metrics."""
        cfg, step = self.cfg, self.step
        self._stage = {"rollout": 0.0, "rewards": 0.0, "logprobs": 0.0}
        t = {"start": time.time()}
        rb, ds_stats = self._collect(step)
        records, out, texts, rewards, acc, adv = rb.records, rb.out, rb.texts, rb.rewards, rb.accuracy, rb.adv
        logp, ent, ref_logp, arm_arrays = rb.logp, rb.ent, rb.ref_logp, rb.arm
        tokens, attn, loss_mask = out.sequences()
        t["collected"] = time.time()
        Tp = out.prompt_tokens.shape[1]
        loss_mask = loss_mask.astype(np.float32)
        if cfg.mask_truncated:
            loss_mask = np.asarray(L.truncation_mask(loss_mask, out.truncated))
        if cfg.top_entropy_quantile is not None:  # one threshold over every process's tokens
            thr = L.top_entropy_threshold(distributed.allgather(ent), distributed.allgather(loss_mask),
                                          cfg.top_entropy_quantile)
            loss_mask = np.asarray(L.top_entropy_mask(ent, loss_mask, cfg.top_entropy_quantile, threshold=thr))
        batch = {"tokens": tokens, "attention_mask": attn, "loss_mask": loss_mask,
                 "advantages": adv.reshape(-1).astype(np.float32), "logp_old": logp.astype(np.float32)}
        if ref_logp is not None:
            batch["ref_logp"] = ref_logp.astype(np.float32)
        rng = jax.random.fold_in(jax.random.key(cfg.seed + 1), step)
        self.state, updates = self.learner.update(self.state, batch, rng, num_iterations=cfg.num_iterations,
                                                  num_minibatches=cfg.num_minibatches)
        jax.block_until_ready(self.state)
        t["update"] = time.time()
        # metrics over the global batch: every process contributes its rows
        g = {k: distributed.allgather(v) for k, v in dict(
            rewards=rewards, acc=acc, adv=adv, lengths=out.lengths, truncated=out.truncated,
            ent_sum=np.asarray([(ent[:, Tp:] * out.mask).sum()]), **arm_arrays).items()}
        resp_tokens = float(g["lengths"].sum())
        correct = g["acc"] > 0
        m = {
            "reward_mean": float(g["rewards"].mean()), "accuracy": float(g["acc"].mean()),
            "frac_all_correct": float(np.mean(correct.all(1))), "frac_all_wrong": float(np.mean(~correct.any(1))),
            "frac_mixed": float(np.mean(correct.any(1) & ~correct.all(1))),
            "adv_mean": float(g["adv"].mean()), "adv_std": float(g["adv"].std()),
            "entropy": float(g["ent_sum"].sum() / max(resp_tokens, 1)),
            "response_len_mean": float(g["lengths"].mean()), "response_len_max": int(g["lengths"].max()),
            "frac_truncated": float(g["truncated"].mean()),
            **_arm_stats({k: g[k] for k in arm_arrays}, g["adv"], g["acc"]), **ds_stats,
        }
        trained = distributed.allgather(np.asarray([loss_mask.sum()])).sum()
        m["frac_loss_tokens"] = float(trained / max(resp_tokens, 1))  # after overlong / top-entropy masking
        for k in ("loss", "pg_loss", "kl", "clip_frac_low", "clip_frac_high", "ratio_min", "ratio_mean",
                  "ratio_max", "grad_norm", "lr", "ratio_clamped", "kl_clamped"):
            m[k] = float(np.mean([float(u[k]) for u in updates])) if k not in ("ratio_min", "ratio_max") else \
                (min if k == "ratio_min" else max)(float(u[k]) for u in updates)
        m["skipped_updates"] = int(sum(int(u["skipped"]) for u in updates))
        m["time/rollout_s"], m["time/rewards_s"] = self._stage["rollout"], self._stage["rewards"]
        m["time/logprobs_s"] = self._stage["logprobs"]
        m["time/update_s"] = t["update"] - t["collected"]
        n_dev = self.policy.mesh.devices.size
        n_tok = tokens.size * distributed.process_count()
        m["tokens_per_s_per_device/rollout"] = resp_tokens / max(m["time/rollout_s"], 1e-9) / n_dev
        m["tokens_per_s_per_device/logprobs"] = n_tok / max(m["time/logprobs_s"], 1e-9) / n_dev
        m["tokens_per_s_per_device/update"] = n_tok * cfg.num_iterations / max(m["time/update_s"], 1e-9) / n_dev
        self.step += 1
        if cfg.samples_every and (self.step % cfg.samples_every == 0 or self.step == 1):
            self.metrics.samples(self.step, [{"prompt": records[int(out.prompt_index[i])]["question"],
                                              "completion": texts[i], "reward": float(rewards.reshape(-1)[i])}
                                             for i in range(min(4, len(texts)))])
        return m

    def evaluate(self, n: Optional[int] = None) -> dict:
        """The injected held-out evaluation (`evaluator(policy, task, rewards, n)`, e.g.
        `arm_jax.eval.heldout.HeldOutEval`) of the current policy."""
        if self.evaluator is None:
            raise ValueError("RLRun has no evaluator: pass evaluator=arm_jax.eval.heldout.HeldOutEval.from_rl_config"
                             "(cfg) (the launcher does) or set RLConfig.eval_every = 0")
        return self.evaluator(self.current_policy(), self.task, self.rewards, n)

    def checkpoint(self) -> None:
        meta = {"step": self.step, "data_state": self.data.get_state(), "history": self.metrics.history,
                "config": repr(self.cfg)}
        self.ckpt.save(self.step, self.state, json.loads(json.dumps(meta, default=str)))

    def run(self) -> list[dict]:
        cfg = self.cfg
        if self.step == 0 and cfg.eval_every:
            self.metrics.write(0, self.evaluate())
        while self.step < cfg.steps:
            m = self.train_step()
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                m.update(self.evaluate())
            self.metrics.write(self.step, m)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.checkpoint()
        self.ckpt.close()
        self.metrics.close()
        self.rewards.close()
        return self.metrics.history


def _merge(batch: RoundBatch, keep: np.ndarray, more: RoundBatch, G: int) -> RoundBatch:
    """Replaces the first dropped groups of `batch` by informative groups of `more` (shapes unchanged). Arrays
    with prompt columns are aligned to the longer left padding first."""
    src = np.nonzero(more.informative())[0]
    slots = np.nonzero(~keep)[0][:len(src)]
    if not len(slots):
        return batch
    Tp = max(batch.out.prompt_tokens.shape[1], more.out.prompt_tokens.shape[1])
    a, b = _pad_round(batch, Tp), _pad_round(more, Tp)
    fields = {f.name: getattr(a.out, f.name).copy() for f in dataclasses.fields(Rollout)}
    per_row = {k: getattr(a, k).copy() for k in ("logp", "ent") + (("ref_logp",) if a.ref_logp is not None else ())}
    per_group = {k: getattr(a, k).copy() for k in ("qmask", "rewards", "accuracy", "adv")}
    arm = {k: v.copy() for k, v in a.arm.items()}
    records, texts = list(a.records), list(a.texts)
    for slot, g in zip(slots, src[:len(slots)]):
        rows, m_rows = slice(slot * G, (slot + 1) * G), slice(g * G, (g + 1) * G)
        for name in fields:
            if name != "prompt_index":
                fields[name][rows] = getattr(b.out, name)[m_rows]
        for k in per_row:
            per_row[k][rows] = getattr(b, k)[m_rows]
        for k in per_group:
            per_group[k][slot] = getattr(b, k)[g]
        for k in arm:
            arm[k][slot] = b.arm[k][g]
        records[slot] = b.records[g]
        texts[rows] = b.texts[m_rows]
    return RoundBatch(records, Rollout(**fields), per_group["qmask"], texts, per_group["rewards"],
                      per_group["accuracy"], per_row["logp"], per_row["ent"], per_row.get("ref_logp"),
                      per_group["adv"], arm)


def _pad_round(rb: RoundBatch, Tp: int) -> RoundBatch:
    """Left-pads every array with prompt columns to Tp prompt slots."""
    pad = Tp - rb.out.prompt_tokens.shape[1]
    if pad == 0:
        return rb
    left = lambda x: None if x is None else np.pad(x, ((0, 0), (pad, 0)))  # noqa: E731
    out = dataclasses.replace(rb.out, prompt_tokens=left(rb.out.prompt_tokens), prompt_mask=left(rb.out.prompt_mask))
    return dataclasses.replace(rb, out=out, qmask=left(rb.qmask), logp=left(rb.logp), ent=left(rb.ent),
                               ref_logp=left(rb.ref_logp))
