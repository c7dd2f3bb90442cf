"""One RL step planned for a target: every stage compiled, the whole-step bound, and the fit verdict."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax

from arm_jax.config import ModelConfig
from arm_jax.models import num_params
from arm_jax.plan import flops as F
from arm_jax.plan.chips import GiB, Target
from arm_jax.plan.stages import (LEVERS, StagePlan, abstract_params, eval_stages, learner_stage, logprob_stages,
                                 rollout_stages, step_shape, tree_shard_bytes)
from arm_jax.policy import Policy
from arm_jax.sharding import make_mesh
from arm_jax.train.learner import make_optimizer, train_state_shardings
from arm_jax.train.rl_config import RLConfig



class PlanDoesNotFit(RuntimeError):
    """A stage of the planned step exceeds the chip's memory (or failed to compile); the message names the stage,
    the bytes and the levers."""


@dataclasses.dataclass
class StepPlan:
    """target: what was compiled for; stages: in step order; state_bytes: per-chip params + optimizer state;
    model_flops: useful FLOPs of the step (no recomputation), all chips."""

    target: Target
    model: ModelConfig
    mesh_shape: tuple
    stages: list
    state_bytes: float
    model_flops: float
    num_params: float = 0.0
    learner_argument_bytes: float = 0.0
    mean_response: float = 0.0

    def bytes_per_param(self) -> dict:
        """Persistent bytes per parameter: the train state's shards (float32 masters + Adam, counted from the
        shardings: 12 expected) and the learner program's arguments as the compiler accounts them (the same state
        plus one update's batch), both summed over the chips."""
        n = max(self.num_params, 1.0)
        chips = self.target.num_chips
        return {"state_bytes_per_param": self.state_bytes * chips / n,
                "learner_argument_bytes_per_param": self.learner_argument_bytes * chips / n}

    def step_bound_s(self) -> Optional[float]:
        """Lower bound on one RL step's time: sum over stages of runs x max(compute, HBM, ICI) bound (None when a
        stage does not fit: its program does not exist)."""
        if self.target.chip is None or not self.fits:
            return None
        return sum(s.runs * s.bound_s(self.target.chip, self.target.num_chips)["bound_s"] for s in self.stages
                   if s.runs and not s.name.startswith("eval/"))

    def mfu_bound(self) -> Optional[float]:
        """Upper bound on MFU: model FLOPs / (chips x peak x step bound)."""
        t = self.step_bound_s()
        if not t:
            return None
        return self.model_flops / (self.target.num_chips * self.target.chip.peak_flops * t)

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    def check(self) -> None:
        """Raises PlanDoesNotFit naming every stage that does not fit."""
        bad = [s for s in self.stages if not s.fits]
        if not bad:
            return
        lines = []
        for s in bad:
            what = s.error or (f"needs {s.footprint / GiB:.1f} GiB per chip (arguments {s.argument_bytes / GiB:.1f}, "
                               f"temporaries {s.temp_bytes / GiB:.1f}, resident {s.resident_bytes / GiB:.1f}) of "
                               f"{s.hbm_bytes / GiB:.1f} GiB HBM")
            lines.append(f"stage {s.name} on {self.target.label}: {what}; levers: {LEVERS[s.name.split('/')[0]]}")
        raise PlanDoesNotFit("\n".join(lines))

    def to_json(self) -> dict:
        chip = self.target.chip
        stages = []
        for s in self.stages:
            d = dataclasses.asdict(s)
            d.update(footprint_bytes=s.footprint, fits=s.fits, **s.bound_s(chip, self.target.num_chips))
            stages.append(d)
        return {
            "target": self.target.label, "chips": self.target.num_chips,
            "chip": None if chip is None else dataclasses.asdict(chip), "mesh_shape": list(self.mesh_shape),
            "state_bytes_per_chip": self.state_bytes, "model_flops_per_step": self.model_flops,
            "step_bound_s": self.step_bound_s(), "mfu_bound": self.mfu_bound(), "fits": self.fits,
            "mean_response_tokens": self.mean_response, **self.bytes_per_param(),
            "stages": stages,
            "conventions": "bytes per chip; XLA's memory analysis is the compiler's own account; xla_flops / "
                           "xla_bytes count loop bodies once (XLA's cost analysis); flops_per_call (model FLOPs) "
                           "and min_bytes (minimum HBM traffic) are counted from the architecture "
                           "(arm_jax.plan.flops); collective bytes are read from the optimized HLO, loops scaled; "
                           "*_s are roofline lower bounds from the chip's published peaks, not measurements",
        }


def plan_step(cfg: ModelConfig, rl: RLConfig, mesh_shape: tuple, target: Target,
              prompt_tokens: Optional[int] = None, mean_response_tokens: Optional[float] = None,
              mean_prompt_tokens: Optional[float] = None) -> StepPlan:
    """Compiles every jitted stage of one RL step of `rl` for `cfg` on `mesh_shape` over the target's devices.
    mean_response_tokens / mean_prompt_tokens: the lengths the decode schedule and the packed passes are counted
    at (default: every answer at the budget, every prompt at its bound)."""
    mesh = make_mesh(tuple(mesh_shape), devices=list(target.devices))
    rl.validate(mesh)
    shape = step_shape(rl, prompt_tokens, mean_response_tokens, mean_prompt_tokens)
    graphdef, params = abstract_params(cfg, mesh)
    optimizer = make_optimizer(rl.optim)
    state_sh = train_state_shardings(params, optimizer, mesh)
    opt_abstract = jax.eval_shape(optimizer.init, params)
    opt_bytes = tree_shard_bytes(jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                              opt_abstract, state_sh.opt_state))
    state_bytes = tree_shard_bytes(params) + opt_bytes
    ref_bytes = 0.0
    if rl.loss.kl_coef:
        ref_bytes = tree_shard_bytes(abstract_params(cfg.replace(param_dtype=cfg.dtype), mesh)[1])
    resident = state_bytes + ref_bytes
    stages = rollout_stages(cfg, rl, shape, mesh, resident)
    stages += logprob_stages(cfg, rl, shape, mesh, resident)
    policy = Policy(cfg, graphdef, params, mesh=mesh)
    stages.append(learner_stage(policy, rl, shape, ref_bytes))
    if rl.eval_every:  # the evaluation must fit too (not part of the step's time)
        stages += eval_stages(cfg, rl, shape, mesh, resident)
    hbm = target.chip.hbm_bytes if target.chip is not None else None
    for s in stages:
        s.hbm_bytes = hbm
    model_flops = sum(s.runs * s.flops_per_call for s in stages if not s.name.startswith(("learner", "eval/")))
    model_flops += rl.num_iterations * F.model_flops(cfg, shape.rows, round(shape.mean_tokens))
    learner = next(s for s in stages if s.name == "learner/update")
    return StepPlan(target, cfg, tuple(mesh.devices.shape), stages, state_bytes, model_flops,
                    num_params=float(num_params(cfg)), learner_argument_bytes=learner.argument_bytes,
                    mean_response=shape.mean_response)


__all__ = ["PlanDoesNotFit", "StagePlan", "StepPlan", "plan_step"]
