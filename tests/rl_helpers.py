"""Small RL runs shared by the loop-level tests: a few steps of mini-Countdown on a tiny policy."""

from arm_jax.eval.heldout import HeldOutEval
from arm_jax.rewards.tasks import make_task
from arm_jax.train.learner import OptimConfig
from arm_jax.train.loop import RLConfig, RLRun


def small_rl_config(lr: float = 3e-3, **overrides) -> RLConfig:
    """3 steps of 4 prompts x 4 samples, 12 new tokens, a checkpoint every step, no evaluation or samples."""
    return RLConfig(**{**dict(steps=3, prompts_per_step=4, group_size=4, max_new_tokens=12, eval_every=0,
                              checkpoint_every=1, samples_every=0, optim=OptimConfig(lr=lr)), **overrides})


def countdown_run(policy, workdir, cfg: RLConfig) -> RLRun:
    """An RLRun of `cfg` on mini-Countdown (shaped rewards) in `workdir`, quiet."""
    return RLRun(policy, make_task("countdown", format_weight=0.1), cfg, str(workdir), log_to_console=False,
                 evaluator=HeldOutEval.from_rl_config(cfg))


def steady(metrics: dict) -> dict:
    """The metrics that must repeat exactly: all but wall-clock times and throughputs."""
    return {k: v for k, v in metrics.items() if not k.startswith(("time/", "tokens_per_s"))}
