"""The RL loop's periodic held-out evaluation, injected into `RLRun` by the launcher (train/ never imports eval/):
Pass@k (unbiased), mean token entropy at the evaluation temperature and distinct correct answers per prompt, on
the task's held-out split, asked and graded in that split's own format (`Task.eval_encode`, the `rewards` composer
of `Task.eval_rewards`), through the one evaluation pipeline (`arm_jax.eval.sampled`) that `python -m arm_jax.eval`
also runs, with the grader's statuses (`eval/reward/<status>_frac`). A grader that timed out or failed on more
responses than a training step may (RLConfig.max_reward_timeout_frac / max_reward_error_frac) is warned about on
stderr and in `eval/grading_warning`, never a stopped evaluation or run."""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional

import numpy as np

from arm_jax.eval.passk import pass_at_k_curve
from arm_jax.eval.sampled import grading_warning, sample_and_grade
from arm_jax.policy import Policy
from arm_jax.rewards.registry import RewardComposer, grading_metrics
from arm_jax.rewards.tasks import Task
from arm_jax.rollout.sampler import EngineOptions


@dataclasses.dataclass(frozen=True)
class HeldOutEval:
    """n samples per prompt at `temperature` (with top_p / top_k) on the first `prompts` held-out records (None =
    all), up to `max_new_tokens` each, PRNG seed `seed` (its own stream: evaluating never changes training), with
    the run's memory levers: the rollout engine's (`EngineOptions`: engine, slots, rows per pass, parameter
    layout; the refill engine's slots default to the run's rollout rows, P x G) and the log-prob pass's
    (logprob_batch_size, default P x G; pack, pack_length); max_error_frac / max_timeout_frac: the grader's failure
    shares above which the evaluation warns (it is never aborted).
    `HeldOutEval.from_rl_config(cfg)` takes RLConfig's eval_n, eval_temperature, top_p, top_k, eval_prompts,
    max_new_tokens, seed + 7777, those levers (and scan_layers) and max_reward_error_frac /
    max_reward_timeout_frac."""

    n: int
    temperature: float
    max_new_tokens: int
    prompts: Optional[int] = None
    seed: int = 7777
    top_p: float = 1.0
    top_k: int = 0
    engine: EngineOptions = EngineOptions()
    logprob_batch_size: Optional[int] = None
    pack: bool = True
    pack_length: Optional[int] = None
    scan_layers: bool = False
    max_error_frac: float = 0.5
    max_timeout_frac: Optional[float] = 0.5

    @classmethod
    def from_rl_config(cls, cfg) -> "HeldOutEval":
        """The evaluation RLConfig describes (see the class)."""
        rows = cfg.prompts_per_step * cfg.group_size  # the run's own rollout and pass sizes bound the evaluation's
        engine = cfg.engine_options
        if engine.engine == "refill" and engine.slots is None:
            engine = dataclasses.replace(engine, slots=engine.rows_per_pass or rows)
        return cls(n=cfg.eval_n, temperature=cfg.eval_temperature, max_new_tokens=cfg.max_new_tokens,
                   prompts=cfg.eval_prompts, seed=cfg.seed + 7777, top_p=cfg.top_p, top_k=cfg.top_k,
                   engine=engine, logprob_batch_size=cfg.logprob_rows or rows, pack=cfg.pack_sequences,
                   pack_length=cfg.pack_length, scan_layers=cfg.scan_layers,
                   max_error_frac=cfg.max_reward_error_frac, max_timeout_frac=cfg.max_reward_timeout_frac)

    def __call__(self, policy: Policy, task: Task, rewards: RewardComposer, n: Optional[int] = None) -> dict:
        """rewards: the composer of task.eval_rewards (the held-out split's verifier). -> eval/pass@k, eval/entropy,
        eval/distinct_correct, eval/prompts, eval/n, eval/reward/<status>_frac for each grading status, and
        eval/grading_warning (a string) when the grader failed on too many responses."""
        n = n or self.n
        recs = [task.eval[i] for i in range(len(task.eval))][:self.prompts]
        res = sample_and_grade(
            policy, recs, encode=lambda r: task.eval_encode(r)[0], decode=task.decode,
            grade=lambda texts, ex, lengths, max_len: rewards(texts, ex, lengths=lengths, max_len=max_len),
            stop_ids=task.stop_ids, n=n, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, seed=self.seed, engine=self.engine,
            logprob_batch_size=self.logprob_batch_size, pack=self.pack, pack_length=self.pack_length,
            scan_layers=self.scan_layers)
        out = {f"eval/pass@{k}": v for k, v in pass_at_k_curve(res.correct).items()}
        out.update({"eval/entropy": res.mean_token_entropy, "eval/distinct_correct": float(np.mean(res.distinct)),
                    "eval/prompts": len(recs), "eval/n": n})
        out.update({f"eval/{k}": v for k, v in grading_metrics(res.grading).items()})
        warning = grading_warning(res.grading, self.max_error_frac, self.max_timeout_frac)
        if warning:
            print(f"WARNING: held-out evaluation: {warning}", file=sys.stderr, flush=True)
            out["eval/grading_warning"] = warning
        return out
