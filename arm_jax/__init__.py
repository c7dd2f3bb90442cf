"""arm_jax: JAX-native RLVR for LLMs; ProGRPO = GRPO + the Advantage Re-weighting Mechanism (ARM).

Public API (docs/method.md §9): `import arm_jax as aj`.
"""

from arm_jax.algorithms.advantages import advantages, arm_advantages
from arm_jax.config import ConfigError, LoRAConfig, MeshConfig, ModelConfig, RopeConfig
from arm_jax.eval.passk import pass_at_k
from arm_jax.models.hf import CheckpointError
from arm_jax.models.lora import add_lora, merged_policy, save_peft
from arm_jax.policy import (Policy, forward_logits, init_policy, load_policy, policy_param_shardings, save_policy,
                            token_logprobs)
from arm_jax.rewards.code import CodeResult, run_code
from arm_jax.rewards.math import math_reward
from arm_jax.rollout.sampler import Rollout, generate
from arm_jax.sharding import DEFAULT_RULES, LogicalRules, make_mesh

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "CodeResult", "ConfigError", "DEFAULT_RULES", "LoRAConfig", "LogicalRules", "MeshConfig",
    "ModelConfig", "Policy", "RopeConfig", "Rollout", "add_lora", "advantages", "arm_advantages", "forward_logits",
    "generate", "init_policy", "load_policy", "make_mesh", "math_reward", "merged_policy", "pass_at_k",
    "policy_param_shardings", "run_code", "save_peft", "save_policy", "token_logprobs",
]
