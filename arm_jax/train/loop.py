"""The RL loop (docs/method.md §1-§3, §7): prompts -> rollout of G samples each -> rewards -> logp_old, reference
log-probs and confidences -> advantages -> mu updates -> metrics -> checkpoint -> periodic evaluation.

Everything random is derived from (seed, step), the data iterator's state and the train state are checkpointed
together, and the metric history rides in the checkpoint, so a run killed at any moment and relaunched with the same
command ends with the same parameters and the same metrics as an uninterrupted one. The run's options are
`RLConfig` (`train/rl_config.py`); one rollout batch and dynamic sampling are `train/rollout_batch.py`.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from typing import Callable, Optional

import jax
import numpy as np

from arm_jax import distributed
from arm_jax.algorithms import advantages as adv_lib
from arm_jax.algorithms import losses as L
from arm_jax.algorithms import rollout_correction as RC
from arm_jax.data.pipeline import PromptBatches, filter_long_prompts, prompt_lengths
from arm_jax.models import compute_copy, compute_params
from arm_jax.models import lora as lora_lib
from arm_jax.models.moe import routing_layout
from arm_jax.policy import Policy, token_logprobs
from arm_jax.rewards.registry import GRADING_STATUSES, RewardComposer, check_overlong_buffer, grading_metrics
from arm_jax.rewards.tasks import Task
from arm_jax.rollout import placement
from arm_jax.rollout.sampler import generate
from arm_jax.train import pending as pending_lib
from arm_jax.train.checkpoint import Checkpointer
from arm_jax.train.learner import Learner, TrainBatch
from arm_jax.train.metrics import MetricsWriter, reduce_updates
from arm_jax.train.rl_config import RLConfig
from arm_jax.train.rollout_batch import RolloutBatch, Sampled, compute_advantages, merge_groups

__all__ = ["RLConfig", "RLRun"]


_cast_compute = jax.jit(compute_params, static_argnums=1)  # the masters themselves when already in it


def _arm_stats(arrays: dict, adv, accuracy) -> dict:
    """ARM diagnostics (docs/method.md §1) from the whole batch's arrays."""
    if not arrays:
        return {}
    correct = accuracy > 0
    return {"c_q_mean": float(np.mean(arrays["c_q"])), "c_o_mean": float(np.mean(arrays["c_o"])),
            "arm_term_mean": float(np.mean(arrays["term"])),
            "c_o_correct_group_std": _group_std(arrays["c_o"], correct),
            "frac_correct_negative_adv": float(np.mean(adv[correct] < 0)) if correct.any() else 0.0}


def _same_verifiers(specs, other) -> bool:
    """Both reward lists hold the same verifier terms (`RewardSpec.accuracy`), at least one."""
    verifiers = [s for s in specs if s.accuracy]
    return bool(verifiers) and verifiers == [s for s in other if s.accuracy]


def check_grading(grading: dict, cfg: RLConfig, step: int) -> None:
    """Stops the run when the grader, not the model, failed on too many of the step's responses: status 'error'
    over RLConfig.max_reward_error_frac, 'timeout' over RLConfig.max_reward_timeout_frac. The model's own
    failures ('no_answer', 'malformed') are graded answers (reward 0) and never stop it."""
    if grading["reward/error_frac"] > cfg.max_reward_error_frac:
        raise RuntimeError(f"step {step + 1}: {grading['reward/error_frac']:.0%} of the responses could not be "
                           f"graded (status 'error'), more than RLConfig.max_reward_error_frac="
                           f"{cfg.max_reward_error_frac}: the reward is broken, not the model")
    limit = cfg.max_reward_timeout_frac
    if limit is not None and grading["reward/timeout_frac"] > limit:
        raise RuntimeError(f"step {step + 1}: the grader timed out on {grading['reward/timeout_frac']:.0%} of the "
                           f"responses (status 'timeout'), more than RLConfig.max_reward_timeout_frac={limit}: "
                           f"the reward is not being computed (give the grader more time or workers, or set the "
                           f"option to 1.0 to go on)")


def check_reward_budget(task: Task, cfg: RLConfig) -> None:
    """The task's overlong term fits the run's response budget: its buffer (task option overlong_buffer) shorter
    than RLConfig.max_new_tokens; checked when the run is built, not at the first reward after model load and
    rollout."""
    for spec in list(task.rewards) + list(task.eval_rewards or ()):
        if spec.name == "overlong":
            check_overlong_buffer(dict(spec.kwargs).get("cache_len", 4096), cfg.max_new_tokens, f"task {task.name!r}: ")


def _group_std(values, mask) -> float:
    stds = [np.std(v[m]) for v, m in zip(values, mask) if m.sum() > 1]
    return float(np.mean(stds)) if stds else 0.0


class RLRun:
    """One training run in `workdir`: builds the learner, restores the newest checkpoint, and steps."""

    def __init__(self, policy: Policy, task: Task, cfg: RLConfig, workdir: str, ref_policy: Optional[Policy] = None,
                 log_to_console: bool = True, checkpoint_dir: Optional[str] = None,
                 evaluator: Optional[Callable] = None, own_policy_params: bool = False,
                 wandb_project: Optional[str] = None, run_config: str = ""):
        """checkpoint_dir: where orbax checkpoints go (default workdir/checkpoints; a gs:// bucket path on pods).
        evaluator(policy, task, rewards, n) -> metrics: the periodic held-out evaluation (required when
        cfg.eval_every > 0; `arm_jax.eval.heldout.HeldOutEval.from_rl_config(cfg)`). own_policy_params: the
        run takes over `policy`'s parameter arrays and frees them once its train state holds the masters (the
        launcher does: 12 bytes per parameter persist, not 16; the caller must not use `policy.params` after).
        wandb_project: also log to this W&B project (process 0; `train.wandb_log`), with `run_config` (the
        resolved gin configuration) as the run's config."""
        check_reward_budget(task, cfg)
        if cfg.eval_every and evaluator is None:
            raise ValueError(f"RLConfig.eval_every={cfg.eval_every} needs an evaluator: pass "
                             f"evaluator=arm_jax.eval.heldout.HeldOutEval.from_rl_config(cfg) or set eval_every=0")
        self.evaluator = evaluator
        self.rollout_mesh = (None if cfg.rollout_devices is None else
                             placement.rollout_mesh(policy.mesh, cfg.rollout_devices, cfg.rollout_mesh_shape))
        cfg.validate(policy.mesh, self.rollout_mesh)
        self._rollout_weights = (None, None)  # disaggregated: (RL step, its weights on the rollout mesh)
        self._rollout_shardings = None
        self.policy, self.task, self.cfg, self.workdir = policy, task, cfg, workdir
        lora_run = policy.config.lora is not None
        if cfg.loss.kl_coef and ref_policy is None and not lora_run:
            raise ValueError(f"LossConfig.kl_coef={cfg.loss.kl_coef} > 0 needs a reference policy: pass "
                             f"RLRun(..., ref_policy=...) (the launcher passes a frozen copy of the start)")
        if cfg.routing_replay and routing_layout(policy.config) is None:
            raise ValueError(f"RLConfig.routing_replay=True, but {policy.config.model_type} has no mixture-of-experts "
                             f"layers to replay: set it to False (it is on in the MoE model gin files only)")
        self.learner = Learner(policy, cfg.loss, cfg.optim, micro_batch_size=cfg.micro_batch_size, remat=cfg.remat,
                               temperature=cfg.temperature, updates_per_step=cfg.num_iterations * cfg.num_minibatches,
                               pack=cfg.pack_sequences, pack_length=cfg.pack_length, scan_layers=cfg.scan_layers)
        self.ref = ref_policy if cfg.loss.kl_coef else None
        if lora_run and cfg.loss.kl_coef:  # LoRA: the base without adapters, its frozen arrays shared (no 2nd model)
            if ref_policy is not None:
                raise ValueError("a LoRA run's KL reference is its own base without adapters: pass no ref_policy")
            self.ref = policy.replace(params=self.learner.base_params())
        self.rewards = RewardComposer(task.rewards).start()  # a grader that cannot start fails here, before step 1
        # the held-out split's verifier; the training composer where it is the same (the shaping terms it adds do
        # not change the accuracy Pass@k reads), so no second grader pool starts
        self.eval_rewards = (RewardComposer(task.eval_rewards).start() if cfg.eval_every and
                             not _same_verifiers(task.eval_rewards, task.rewards) else self.rewards)
        train = task.train
        self.prompts_dropped = 0
        ckpt_dir = checkpoint_dir or f"{workdir}/checkpoints"
        if cfg.max_prompt_tokens is not None:  # each prompt tokenized once, split over processes, cached on restart
            lengths = prompt_lengths(train, lambda r: task.encode(r)[0], f"{ckpt_dir}/prompt_lengths.json")
            train, dropped = filter_long_prompts(train, lengths, cfg.max_prompt_tokens)
            self.prompts_dropped = len(dropped)
            if log_to_console and jax.process_index() == 0:
                print(f"dropped {len(dropped)} of {len(task.train)} training prompts longer than "
                      f"RLConfig.max_prompt_tokens={cfg.max_prompt_tokens}", flush=True)
        self.data = PromptBatches(train, cfg.prompts_per_step, seed=cfg.data_seed)
        self.ckpt = Checkpointer(ckpt_dir, max_to_keep=cfg.keep_checkpoints)
        self.step = 0
        self.pending: collections.deque[Sampled] = collections.deque()  # one-step-off: sampled, not yet learned
        self.skipped_in_a_row = 0  # consecutive non-finite updates (RLConfig.max_skipped_updates)
        history: list[dict] = []
        latest = self.ckpt.latest_step()
        # a resume restores into the abstract state (never a fresh state beside the restored one)
        self.state = self.learner.init_state() if latest is None else self.learner.abstract_state()
        if own_policy_params:  # the masters now live in the train state (or the checkpoint): free the loaded copy
            jax.block_until_ready(self.state)  # the copy into the masters has read them (dispatch is asynchronous)
            for x in jax.tree.leaves(policy.params):
                x.delete()
        if latest is not None:
            self.state, meta = self.ckpt.restore(latest, self.state)
            self.step = int(meta["step"])
            self.data.set_state(meta["data_state"])
            history = meta["history"]
            self.skipped_in_a_row = int(meta.get("skipped_in_a_row", 0))
            if meta.get("pending"):  # one-step-off: the batches sampled before the kill, their records drawn again
                for item in pending_lib.load(self.ckpt.directory, self.step, int(meta["pending"])):
                    self.data.set_state(item["data_state_parsed"])
                    self.pending.append(Sampled.from_arrays(item, next(self.data), task.decode))
                self.data.set_state(meta["data_state"])
        wandb, self.wandb_run_id = None, (meta.get("wandb_run_id") if latest is not None else None)
        if wandb_project and jax.process_index() == 0:
            from arm_jax.train.wandb_log import WandbLogger
            wandb = WandbLogger(wandb_project, workdir, run_config, run_id=self.wandb_run_id)
            self.wandb_run_id = wandb.run_id  # kept with every checkpoint: a relaunch anywhere continues the run
        self.metrics = MetricsWriter(workdir, cfg.steps, history, enabled=jax.process_index() == 0,
                                     stream=sys.stdout if log_to_console else open(os.devnull, "w"), wandb=wandb)

    # ------------------------------------------------------------------------------------------ stages

    def current_policy(self) -> Policy:
        """The policy with the learner's current master parameters (LoRA: the frozen base and the adapters)."""
        return self.policy.replace(params=self.learner.full_params(self.state.params))

    def _sampler_params(self):
        """The current weights as the sampler reads them, new buffers the update cannot donate. Colocated: a
        compute-dtype copy sharded like the masters (ZeRO: 2 bytes per parameter over the mesh in bf16).
        Disaggregated: the compute-dtype weights moved to the rollout mesh in its layout (once per RL step)."""
        if self.rollout_mesh is None:
            with jax.set_mesh(self.policy.mesh):
                return compute_copy(self.current_policy().params, self.policy.config)
        if self._rollout_weights[0] != self.step:
            self._rollout_weights = (None, None)  # the previous step's copy goes before the new one arrives
            with jax.set_mesh(self.policy.mesh):
                weights = _cast_compute(self.current_policy().params, self.policy.config)
            if self._rollout_shardings is None:
                self._rollout_shardings = placement.rollout_shardings(weights, self.policy.config,
                                                                      self.rollout_mesh, self.policy.rules)
            self._rollout_weights = (self.step, placement.transfer(weights, self._rollout_shardings))
        return self._rollout_weights[1]

    def _sample(self, step: int, round_: int = 0, params=None) -> Sampled:
        """Draws one prompt batch, samples G responses each with `params` (default: the learner's current ones)
        and grades them. `step` numbers the batch (its random streams), not the weights."""
        cfg = self.cfg
        data_state = self.data.get_state()
        records = next(self.data)
        encoded = [self.task.encode(r) for r in records]
        t0 = time.time()
        if params is None and self.rollout_mesh is not None:
            params = self._sampler_params()
        policy = (self.current_policy() if params is None else
                  self.policy.replace(params=params, mesh=self.policy.mesh if self.rollout_mesh is None
                                      else self.rollout_mesh))
        if cfg.lora_sampler == "merged" and policy.config.lora is not None:  # adapters folded in for the rollout
            policy = lora_lib.merged_policy(policy)
        out = generate(policy, [ids for ids, _ in encoded], max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, n=cfg.group_size,
                       seed=cfg.seed, step=step * (cfg.max_sampling_rounds + 1) + round_, stop_ids=self.task.stop_ids,
                       **cfg.engine_options.kwargs())
        out = out.trimmed()  # response columns to the longest answer's bucket: passes pay for tokens generated
        t1 = time.time()
        Tp = out.prompt_tokens.shape[1]
        qmask = np.zeros((len(records), Tp), np.float32)  # the question tokens c(q) averages
        for b, (ids, q) in enumerate(encoded):
            qmask[b, Tp - len(ids):] = q
        texts = [self.task.decode(t[:n]) for t, n in zip(out.tokens, out.lengths)]
        r = self.rewards(texts, [records[i] for i in out.prompt_index], lengths=out.lengths,
                         max_len=cfg.max_new_tokens)
        counters = {"rollout_s": t1 - t0, "rewards_s": time.time() - t1, "slot_steps": int(out.stats.slot_steps),
                    "generated": int(out.stats.generated_tokens)}
        return Sampled(list(records), out, qmask, texts, r, self.step, data_state, counters)

    def _score(self, s: Sampled) -> RolloutBatch:
        """The learner's passes over a graded round: logp_old / entropy with the current weights (the proximal
        policy), reference log-probs, advantages."""
        cfg, out, r = self.cfg, s.out, s.r
        G = cfg.group_size  # rows must be p * G + g: a group that mixes prompts is an error, not a silent reshape
        rewards = adv_lib.group_rewards(r["total"], G, prompt_ids=out.prompt_index)
        acc = adv_lib.group_rewards(r["accuracy"], G)
        t2 = time.time()
        tokens, attn, _ = out.sequences()
        policy = self.current_policy()
        passes = dict(temperature=cfg.temperature, batch_size=cfg.logprob_rows, pack=cfg.pack_sequences,
                      pack_length=cfg.pack_length, scan_layers=cfg.scan_layers)
        routing = out.replay_routing()  # MoE models: the sampler's experts (replayed with routing_replay)
        if routing is None:
            logp, ent = (distributed.to_local(x) for x in token_logprobs(policy, tokens, attn, **passes))
        else:
            logp, ent, mismatch = token_logprobs(policy, tokens, attn, routing=routing, replay=cfg.routing_replay,
                                                 **passes)
            logp, ent = distributed.to_local(logp), distributed.to_local(ent)
            self._stage["routing"] = self._stage["routing"] + mismatch
        ref_logp = None
        if self.ref is not None:  # the reference model routes afresh: it is not the sampler
            ref_logp = distributed.to_local(token_logprobs(self.ref, tokens, attn, **passes)[0])
        self._stage["rollout"] += s.counters["rollout_s"]
        self._stage["slot_steps"] += s.counters["slot_steps"]
        self._stage["generated"] += s.counters["generated"]
        self._stage["rewards"] += s.counters["rewards_s"]
        self._stage["grading"] = self._stage["grading"] + r["grading"]
        self._stage["logprobs"] += time.time() - t2
        self._stage["staleness"] = max(self._stage["staleness"], self.step - s.step)
        adv, arm = compute_advantages(cfg, rewards, acc, logp, out, s.qmask)
        return RolloutBatch(s.records, out, s.qmask, s.texts, rewards, acc, np.asarray(logp, np.float32),
                            np.asarray(ent, np.float32), ref_logp, adv, arm)

    def _round(self, step: int, round_: int = 0) -> RolloutBatch:
        """One prompt batch sampled with the current weights, graded and scored."""
        return self._score(self._sample(step, round_))

    def _collect(self, step: int, first: Optional[Sampled] = None) -> tuple[RolloutBatch, dict]:
        """One rollout batch (`first`, sampled earlier under one-step-off RL, or sampled now), with DAPO dynamic
        sampling when enabled: groups whose advantages are all zero are replaced by informative groups of up to
        `max_sampling_rounds` extra prompt batches (sampled now, with the current weights)."""
        batch = self._round(step) if first is None else self._score(first)
        stats = {}
        if self.cfg.dynamic_sampling:
            keep = batch.informative()
            rounds = 0
            while not distributed.allgather(keep).all() and rounds < self.cfg.max_sampling_rounds:
                rounds += 1
                batch = merge_groups(batch, keep, self._round(step, rounds), self.cfg.group_size)
                keep = batch.informative()
            everywhere = distributed.allgather(keep)
            stats = {"groups_refilled": int(rounds), "frac_groups_kept": float(everywhere.mean()),
                     "uninformative_groups": int((~everywhere).sum())}  # still all-zero after the last round
        return batch, stats

    def reset_stage_counters(self) -> None:
        """Zeroes the step's per-stage seconds and the rollout's work counters (summed over sampling rounds)."""
        self._stage = {"rollout": 0.0, "rewards": 0.0, "logprobs": 0.0, "slot_steps": 0, "generated": 0,
                       "grading": np.zeros(len(GRADING_STATUSES) + 1, np.int64), "routing": np.zeros(4),
                       "staleness": 0}

    def train_step(self) -> dict:
        """One RL step: collect a batch (rollout, rewards, logp_old, advantages; dynamic sampling), build the
        learner's masks (DAPO overlong filtering, top-entropy tokens over the global batch), run mu x
        num_minibatches updates, and return the step's metrics."""
        cfg, step = self.cfg, self.step
        self.reset_stage_counters()
        t = {"start": time.time()}
        if cfg.max_staleness:  # one-step-off: batches step .. step + k - 1 were sampled earlier (at the start: now)
            while len(self.pending) < min(cfg.max_staleness, cfg.steps - step):
                self.pending.append(self._sample(step + len(self.pending)))
            rb, ds_stats = self._collect(step, first=self.pending.popleft())
        else:
            rb, ds_stats = self._collect(step)
        grading = grading_metrics(distributed.allgather(self._stage["grading"][None]).sum(axis=0))
        check_grading(grading, cfg, step)
        records, out, texts, rewards, acc, adv = rb.records, rb.out, rb.texts, rb.rewards, rb.accuracy, rb.adv
        logp, ent, ref_logp, arm_arrays = rb.logp, rb.ent, rb.ref_logp, rb.arm
        tokens, attn, resp_mask = out.sequences()
        t["collected"] = time.time()
        Tp = out.prompt_tokens.shape[1]
        loss_mask = resp_mask.astype(np.float32)
        if cfg.mask_truncated:
            loss_mask = np.asarray(L.truncation_mask(loss_mask, out.truncated))
        if cfg.top_entropy_quantile is not None:  # one threshold over every process's tokens
            thr = L.top_entropy_threshold(distributed.allgather(ent), distributed.allgather(loss_mask),
                                          cfg.top_entropy_quantile)
            loss_mask = np.asarray(L.top_entropy_mask(ent, loss_mask, cfg.top_entropy_quantile, threshold=thr))
        # the sampler's log-probs in the learner's layout, against logp_old (the proximal policy): the gap
        logp_mu = np.concatenate([np.zeros_like(logp[:, :Tp]), out.logp_sampling], axis=1)
        gap = RC.mismatch_metrics(distributed.allgather(logp), distributed.allgather(logp_mu),
                                  distributed.allgather(resp_mask))
        is_weights = None
        if cfg.rollout_correction != "none":
            is_weights, loss_mask, counts = RC.correction_weights(logp, logp_mu, loss_mask, cfg.rollout_correction,
                                                                  cfg.rollout_correction_threshold)
            is_weights, loss_mask = np.asarray(is_weights), np.asarray(loss_mask)
            keys = sorted(counts)  # sums over every process's rows, then the fractions
            summed = distributed.allgather(np.asarray([[float(counts[k]) for k in keys]])).sum(0)
            gap.update(RC.correction_metrics(dict(zip(keys, summed))))
        replay = out.replay_routing() if cfg.routing_replay else None
        batch = TrainBatch(tokens=tokens, attention_mask=attn, loss_mask=loss_mask,
                           advantages=adv.reshape(-1).astype(np.float32), logp_old=logp.astype(np.float32),
                           ref_logp=None if ref_logp is None else ref_logp.astype(np.float32),
                           is_weights=is_weights,
                           routing_ids=None if replay is None else replay[0],
                           routing_use=None if replay is None else replay[1])
        rng = jax.random.fold_in(jax.random.key(cfg.seed + 1), step)
        sampler = self._sampler_params() if cfg.max_staleness else None  # this step's weights, kept from donation
        self.state, updates = self.learner.update(self.state, batch, rng, num_iterations=cfg.num_iterations,
                                                  num_minibatches=cfg.num_minibatches)
        if cfg.max_staleness and step + cfg.max_staleness < cfg.steps:  # sampled while the update runs
            t["next"] = time.time()
            self.pending.append(self._sample(step + cfg.max_staleness, params=sampler))
            t["next"] = time.time() - t["next"]
            del sampler
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
        learner = reduce_updates(updates)  # the one reduction table (train/metrics.py), as the learner's scan
        for k in ("entropy", "tokens"):  # the step's entropy and lengths are the rollout's
            learner.pop(k)
        m["skipped_updates"] = learner.pop("skipped")
        for u in updates:
            self.skipped_in_a_row = self.skipped_in_a_row + 1 if int(u["skipped"]) else 0
            if self.skipped_in_a_row >= cfg.max_skipped_updates:
                raise RuntimeError(f"step {step + 1}: {self.skipped_in_a_row} optimizer updates in a row were skipped "
                                   f"for a non-finite loss or gradient (RLConfig.max_skipped_updates="
                                   f"{cfg.max_skipped_updates}); the parameters have stopped changing")
        m.update(learner)
        m.update(grading)
        m.update(gap)  # sampler vs learner (mismatch/*), and the correction's clipped / masked shares
        if cfg.max_staleness:
            m["async/staleness"] = self._stage["staleness"]  # steps between the sampling weights and these
            m["time/next_batch_s"] = t.get("next", 0.0)  # sampling + grading batch step + k, inside time/update_s
        m.update(self.rewards.info)  # e.g. sandbox/isolated for code rewards
        m["time/rollout_s"], m["time/rewards_s"] = self._stage["rollout"], self._stage["rewards"]
        m["time/logprobs_s"] = self._stage["logprobs"]
        m["time/update_s"] = t["update"] - t["collected"]
        n_dev = self.policy.mesh.devices.size
        n_tok = distributed.global_sum(int(attn.sum()))  # valid tokens (prompt + response), not padding
        m["tokens_per_s_per_device/rollout"] = resp_tokens / max(m["time/rollout_s"], 1e-9) / n_dev
        # valid generated tokens / decode slot-steps computed (1 = no slot idle; lockstep: mean / longest length)
        m["rollout/useful_token_fraction"] = self._stage["generated"] / max(self._stage["slot_steps"], 1)
        if self._stage["routing"][1]:  # MoE: recorded tokens whose experts the learner picks differently
            m["moe/routing_mismatch"] = float(self._stage["routing"][0] / self._stage["routing"][1])
            # expert pairs the capacity factor dropped in the log-prob pass (0 when dropless)
            m["moe/dropped_frac"] = float(self._stage["routing"][2] / max(self._stage["routing"][3], 1.0))
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
        return self.evaluator(self.current_policy(), self.task, self.eval_rewards, n)

    def checkpoint(self) -> None:
        """Saves the train state, the data iterator's state and the metric history (asynchronously, atomically);
        under one-step-off RL the graded batches waiting for their update first (`pending.save`)."""
        meta = {"step": self.step, "data_state": self.data.get_state(), "history": self.metrics.history,
                "wandb_run_id": self.wandb_run_id,
                "config": repr(self.cfg), "skipped_in_a_row": self.skipped_in_a_row, "pending": len(self.pending)}
        if self.pending:
            pending_lib.save(self.ckpt.directory, self.step, list(self.pending))
        self.ckpt.save(self.step, self.state, json.loads(json.dumps(meta, default=str)))
        pending_lib.prune(self.ckpt.directory, keep=set(self.ckpt.all_steps()) | {self.step})

    def run(self) -> list[dict]:
        """Evaluates, then steps to cfg.steps with periodic evaluation and checkpoints; returns the metric history."""
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
        self.eval_rewards.close()
        return self.metrics.history
