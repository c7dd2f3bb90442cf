"""RLConfig: every option of an RL run, validated when it is built (docs/method.md §1-§2)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from arm_jax import distributed
from arm_jax.algorithms import advantages as adv_lib
from arm_jax.algorithms import losses as L
from arm_jax.sharding import DEFAULT_RULES
from arm_jax.train.learner import OptimConfig


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
