"""The RL loop (DESIGN §1-§3, §7): prompts -> rollout of G samples each -> rewards -> logp_old, reference log-probs
and confidences -> advantages -> mu updates -> metrics -> checkpoint -> periodic evaluation.

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
from typing import Optional

import jax
import numpy as np

import arm_jax as aj
from arm_jax import distributed
from arm_jax.algorithms import advantages as adv_lib
from arm_jax.algorithms import losses as L
from arm_jax.data.pipeline import PromptBatches
from arm_jax.data.tasks import Task
from arm_jax.eval.passk import pass_at_k_curve
from arm_jax.policy import Policy
from arm_jax.rewards.registry import RewardComposer
from arm_jax.rollout.sampler import Rollout
from arm_jax.sharding import DEFAULT_RULES
from arm_jax.train.checkpoint import Checkpointer
from arm_jax.train.learner import Learner, OptimConfig
from arm_jax.train.metrics import MetricsWriter


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """The RL run. Defaults are ProGRPO's (ARM + Clip-Higher + token-mean, DESIGN §1).

    steps: RL steps (one rollout batch each). prompts_per_step (P) x group_size (G) responses per step.
    max_new_tokens, temperature, top_p, top_k: rollout sampling (temperature 1, full vocabulary by default).
    advantage: a registered estimator ('arm', 'grpo', 'drgrpo', 'rloo', 'passk', 'unlikeliness');
    advantage_kwargs: its options as ((name, value), ...), e.g. (('alpha', 1.0), ('rho', 0.2)).
    loss, optim: `LossConfig`, `OptimConfig`. num_iterations (mu): passes over each rollout batch;
    num_minibatches: optimizer updates per pass; micro_batch_size: sequences per gradient micro-batch.
    dynamic_sampling: DAPO's filter of groups whose rewards are all equal, refilled from up to
    `max_sampling_rounds` extra prompt batches. mask_truncated: DAPO's overlong filtering (no loss on truncated
    responses). top_entropy_quantile: train only on tokens at/above this entropy quantile (0.8 = top 20 %).
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
    advantage_kwargs: tuple = (("alpha", 1.0), ("rho", 0.2))
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
        if self.loss.agg_mode == "seq-mean-token-sum-norm" and self.loss.max_len is None:
            # Dr.GRPO normalizes token sums by the generation budget
            object.__setattr__(self, "loss", dataclasses.replace(self.loss, max_len=self.max_new_tokens))

    def validate(self, mesh) -> None:
        n = self.prompts_per_step * self.group_size
        if self.advantage not in adv_lib.ADVANTAGES:
            raise ValueError(f"RLConfig.advantage={self.advantage!r}; registered: {sorted(adv_lib.ADVANTAGES)}")
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
    """-> (Ã [P, G], ARM's per-response arrays {c_q [P], c_o [P, G], term [P, G]} or {})."""
    P, G = rewards.shape
    Tp = rollout.prompt_tokens.shape[1]
    kwargs = dict(cfg.advantage_kwargs)
    if cfg.advantage == "arm":
        terms = adv_lib.arm_terms(rewards, logp[:, Tp:], rollout.mask, logp[::G, :Tp], qmask,
                                  accuracy=accuracy, **kwargs)
        return np.asarray(terms["adv"]), {k: np.asarray(terms[k]) for k in ("c_q", "c_o", "term")}
    if cfg.advantage == "unlikeliness":
        kwargs["seq_logp"] = (logp[:, Tp:] * rollout.mask).sum(-1).reshape(P, G)
    return np.asarray(aj.advantages(cfg.advantage, rewards, **kwargs)), {}


def _arm_stats(arrays: dict, adv, accuracy) -> dict:
    """ARM diagnostics (DESIGN §1) from the whole batch's arrays."""
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
                 log_to_console: bool = True, checkpoint_dir: Optional[str] = None):
        """checkpoint_dir: where orbax checkpoints go (default workdir/checkpoints; a gs:// bucket path on pods)."""
        cfg.validate(policy.mesh)
        self.policy, self.task, self.cfg, self.workdir = policy, task, cfg, workdir
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
        out = aj.generate(self.current_policy(), prompts, max_new_tokens=cfg.max_new_tokens,
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
        G = cfg.group_size
        return out, qmask, texts, r["total"].reshape(-1, G), r["accuracy"].reshape(-1, G)

    def _collect(self, step: int):
        """One rollout batch (with DAPO dynamic sampling refills when enabled)."""
        records = next(self.data)
        out, qmask, texts, rewards, acc = self._rollout(records, step)
        stats = {"groups_refilled": 0}
        if self.cfg.dynamic_sampling:
            keep = np.std(rewards, axis=1) > 0
            rounds = 0
            while not distributed.allgather(keep).all() and rounds < self.cfg.max_sampling_rounds:
                rounds += 1
                more_rec = next(self.data)
                m_out, m_q, m_t, m_r, m_a = self._rollout(more_rec, step, rounds)
                records, out, qmask, texts, rewards, acc = _merge(records, out, qmask, texts, rewards, acc, keep,
                                                                  more_rec, m_out, m_q, m_t, m_r, m_a,
                                                                  self.cfg.group_size)
                keep = np.std(rewards, axis=1) > 0
            stats = {"groups_refilled": int(rounds), "frac_groups_kept": float(distributed.allgather(keep).mean())}
        return records, out, qmask, texts, rewards, acc, stats

    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        self._stage = {"rollout": 0.0, "rewards": 0.0}
        t = {"start": time.time()}
        records, out, qmask, texts, rewards, acc, ds_stats = self._collect(step)
        t["rollout+rewards"] = time.time()
        tokens, attn, loss_mask = out.sequences()
        policy = self.current_policy()
        logp, ent = (distributed.to_local(x) for x in aj.token_logprobs(policy, tokens, attn,
                                                                        temperature=cfg.temperature))
        ref_logp = None
        if self.ref is not None:
            ref_logp = distributed.to_local(aj.token_logprobs(self.ref, tokens, attn, temperature=cfg.temperature)[0])
        t["logprobs"] = time.time()
        adv, arm_arrays = _advantages(cfg, rewards, acc, logp, out, qmask)
        Tp = out.prompt_tokens.shape[1]
        loss_mask = loss_mask.astype(np.float32)
        if cfg.mask_truncated:
            loss_mask = np.asarray(L.truncation_mask(loss_mask, out.truncated))
        if cfg.top_entropy_quantile is not None:
            loss_mask = np.asarray(L.top_entropy_mask(ent, loss_mask, cfg.top_entropy_quantile))
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
        for k in ("loss", "pg_loss", "kl", "clip_frac_low", "clip_frac_high", "ratio_min", "ratio_mean",
                  "ratio_max", "grad_norm", "lr"):
            m[k] = float(np.mean([float(u[k]) for u in updates])) if k not in ("ratio_min", "ratio_max") else \
                (min if k == "ratio_min" else max)(float(u[k]) for u in updates)
        m["skipped_updates"] = int(sum(int(u["skipped"]) for u in updates))
        m["time/rollout_s"], m["time/rewards_s"] = self._stage["rollout"], self._stage["rewards"]
        m["time/logprobs_s"] = t["logprobs"] - t["rollout+rewards"]
        m["time/update_s"] = t["update"] - t["logprobs"]
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
        """Held-out Pass@k (unbiased), mean token entropy and distinct correct answers per prompt.

        Prompts go in chunks of a fixed size (the last one padded with repeats whose results are dropped, so one
        compiled shape serves all); with several processes each reads its block of every chunk."""
        cfg = self.cfg
        n = n or cfg.eval_n
        recs = [self.task.eval[i] for i in range(len(self.task.eval))][:cfg.eval_prompts]
        policy = self.current_policy()
        procs = distributed.process_count()
        chunk = min(max(1, 256 // n), len(recs))
        chunk = -(-chunk // procs) * procs  # a multiple of the process count
        correct, ent_sum, tok_sum, distinct = [], 0.0, 0.0, []
        for s in range(0, len(recs), chunk):
            real = min(chunk, len(recs) - s)
            part = [recs[s + (i if i < real else 0)] for i in range(chunk)][distributed.local_slice(chunk)]
            out = aj.generate(policy, [self.task.encode(r)[0] for r in part], max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.eval_temperature, n=n, seed=cfg.seed + 7777, stop_ids=self.task.stop_ids)
            texts = [self.task.decode(t[:k]) for t, k in zip(out.tokens, out.lengths)]
            r = self.rewards(texts, [part[i] for i in out.prompt_index], lengths=out.lengths,
                             max_len=cfg.max_new_tokens)["accuracy"].reshape(-1, n) > 0
            tokens, attn, _ = out.sequences()
            ent = distributed.to_local(aj.token_logprobs(policy, tokens, attn)[1])
            Tp = out.prompt_tokens.shape[1]
            resp_ent = (ent[:, Tp:] * out.mask).sum(axis=1).reshape(-1, n).sum(axis=1)
            n_distinct = [len({" ".join(texts[p * n + j].split()) for j in range(n) if r[p, j]})
                          for p in range(len(part))]
            g = {k: distributed.allgather(v)[:real] for k, v in dict(
                correct=r, ent=resp_ent, tok=out.lengths.reshape(-1, n).sum(axis=1),
                distinct=np.asarray(n_distinct)).items()}
            correct.append(g["correct"])
            ent_sum += float(g["ent"].sum())
            tok_sum += float(g["tok"].sum())
            distinct.extend(g["distinct"].tolist())
        curve = pass_at_k_curve(np.concatenate(correct))
        res = {f"eval/pass@{k}": v for k, v in curve.items()}
        res.update({"eval/entropy": ent_sum / max(tok_sum, 1), "eval/distinct_correct": float(np.mean(distinct)),
                    "eval/prompts": len(recs), "eval/n": n})
        return res

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
                t0 = time.time()
                self.checkpoint()
                self.last_checkpoint_s = time.time() - t0
        self.ckpt.close()
        self.metrics.close()
        self.rewards.close()
        return self.metrics.history


def _merge(records, out, qmask, texts, rewards, acc, keep, m_rec, m_out, m_q, m_t, m_r, m_a, G):
    """Replaces the first dropped groups of a batch by informative groups of an extra rollout (shapes unchanged).
    Prompt tensors of both rollouts are aligned to the longer left padding."""
    m_keep = np.nonzero(np.std(m_r, axis=1) > 0)[0]
    slots = np.nonzero(~keep)[0][:len(m_keep)]
    if not len(slots):
        return records, out, qmask, texts, rewards, acc
    Tp = max(out.prompt_tokens.shape[1], m_out.prompt_tokens.shape[1])
    out, m_out = _pad_prompts(out, Tp), _pad_prompts(m_out, Tp)
    qmask, m_q = (np.pad(q, ((0, 0), (Tp - q.shape[1], 0))) for q in (qmask, m_q))
    records, texts = list(records), list(texts)
    fields = {f.name: getattr(out, f.name).copy() for f in dataclasses.fields(Rollout)}
    for slot, src in zip(slots, m_keep[:len(slots)]):
        rows, m_rows = slice(slot * G, (slot + 1) * G), slice(src * G, (src + 1) * G)
        for name in fields:
            if name != "prompt_index":
                fields[name][rows] = getattr(m_out, name)[m_rows]
        records[slot] = m_rec[src]
        qmask[slot], rewards[slot], acc[slot] = m_q[src], m_r[src], m_a[src]
        texts[rows] = m_t[m_rows]
    return records, Rollout(**fields), qmask, texts, rewards, acc


def _pad_prompts(out: Rollout, Tp: int) -> Rollout:
    pad = Tp - out.prompt_tokens.shape[1]
    if pad == 0:
        return out
    return dataclasses.replace(out, prompt_tokens=np.pad(out.prompt_tokens, ((0, 0), (pad, 0))),
                               prompt_mask=np.pad(out.prompt_mask, ((0, 0), (pad, 0))))

