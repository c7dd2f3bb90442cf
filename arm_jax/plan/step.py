"""One RL step planned for a target: every stage compiled, the whole-step bound, and the fit verdict."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax

from arm_jax.config import ModelConfig
from arm_jax.models import lora, num_params
from arm_jax.plan import flops as F
from arm_jax.plan.chips import GiB, Target, split_target
from arm_jax.plan.stages import (LEVERS, StagePlan, abstract_params, eval_stages, learner_stage, logprob_stages,
                                 rollout_stages, step_shape, tree_shard_bytes)
from arm_jax.policy import Policy
from arm_jax.rollout import placement
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
    rollout_mesh_shape: Optional[tuple] = None  # disaggregated (RLConfig.rollout_devices): the rollout's mesh
    max_staleness: int = 0

    def chips_of(self, stage: StagePlan) -> int:
        """The chips a stage's program runs on (its side of a disaggregated slice, else all)."""
        return stage.chips or self.target.num_chips

    def side_bounds_s(self) -> Optional[dict]:
        """Per RL step: 'rollout_s' (rollout/* stages), 'learner_s' (log-prob passes and updates), 'transfer_s'
        (the weights to the rollout mesh; 0 colocated), each the sum of runs x bound; None without a bound."""
        if self.target.chip is None or not self.fits:
            return None
        sides = {"rollout_s": 0.0, "learner_s": 0.0, "transfer_s": 0.0}
        for s in self.stages:
            if not s.runs or s.name.startswith("eval/"):
                continue
            side = {"rollout": "rollout_s", "transfer": "transfer_s"}.get(s.name.split("/")[0], "learner_s")
            sides[side] += s.runs * s.bound_s(self.target.chip, self.chips_of(s))["bound_s"]
        return sides

    def bytes_per_param(self) -> dict:
        """Persistent bytes per parameter: the train state's shards (float32 masters + Adam, counted from the
        shardings: 12 expected) and the learner program's arguments as the compiler accounts them (the same state
        plus one update's batch), both summed over the chips."""
        n = max(self.num_params, 1.0)
        chips = self.chips_of(next(s for s in self.stages if s.name == "learner/update"))  # the state's chips
        return {"state_bytes_per_param": self.state_bytes * chips / n,
                "learner_argument_bytes_per_param": self.learner_argument_bytes * chips / n}

    def serial_bound_s(self) -> Optional[float]:
        """The step's stages one after another: sum over stages of runs x max(compute, HBM, ICI) bound (None when
        a stage does not fit: its program does not exist)."""
        sides = self.side_bounds_s()
        return None if sides is None else sum(sides.values())

    def step_bound_s(self) -> Optional[float]:
        """Lower bound on one RL step's time: the serial sum, except on a disaggregated slice with max_staleness
        >= 1, where the rollout and the learner run at once: max(rollout, learner) + the weight transfer."""
        sides = self.side_bounds_s()
        if sides is None:
            return None
        if self.rollout_mesh_shape is not None and self.max_staleness:
            return max(sides["rollout_s"], sides["learner_s"]) + sides["transfer_s"]
        return sum(sides.values())

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
            d.update(footprint_bytes=s.footprint, fits=s.fits, **s.bound_s(chip, self.chips_of(s)))
            stages.append(d)
        return {
            "target": self.target.label, "chips": self.target.num_chips,
            "chip": None if chip is None else dataclasses.asdict(chip), "mesh_shape": list(self.mesh_shape),
            "state_bytes_per_chip": self.state_bytes, "model_flops_per_step": self.model_flops,
            "step_bound_s": self.step_bound_s(), "mfu_bound": self.mfu_bound(), "fits": self.fits,
            "serial_bound_s": self.serial_bound_s(), "side_bounds_s": self.side_bounds_s(),
            "rollout_mesh_shape": None if self.rollout_mesh_shape is None else list(self.rollout_mesh_shape),
            "max_staleness": self.max_staleness,
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
    r_mesh = None
    if rl.rollout_devices is None:
        mesh = make_mesh(tuple(mesh_shape), devices=list(target.devices))
    else:  # disaggregated: each side's mesh over its own devices (`chips.split_target`)
        learner_devices, rollout_devices = split_target(target, rl.rollout_devices)
        mesh = make_mesh(tuple(mesh_shape), devices=learner_devices)
        r_shape = rl.rollout_mesh_shape or placement.default_rollout_shape(mesh.axis_names)
        r_mesh = make_mesh(tuple(r_shape), devices=rollout_devices)
    rl.validate(mesh, r_mesh)
    shape = step_shape(rl, prompt_tokens, mean_response_tokens, mean_prompt_tokens)
    graphdef, params = abstract_params(cfg, mesh)
    optimizer = make_optimizer(rl.optim)
    trained = params if cfg.lora is None else lora.split(params)[0]  # LoRA: the adapters only
    state_sh = train_state_shardings(trained, optimizer, mesh)
    opt_abstract = jax.eval_shape(optimizer.init, trained)
    opt_bytes = tree_shard_bytes(jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                              opt_abstract, state_sh.opt_state))
    state_bytes = tree_shard_bytes(trained) + opt_bytes
    ref_bytes = 0.0
    if cfg.lora is not None:  # the frozen base in the compute dtype (also the KL reference: no second copy)
        ref_bytes = tree_shard_bytes(lora.split(abstract_params(cfg.replace(param_dtype=cfg.dtype), mesh)[1])[1])
    elif rl.loss.kl_coef:
        ref_bytes = tree_shard_bytes(abstract_params(cfg.replace(param_dtype=cfg.dtype), mesh)[1])
    resident = state_bytes + ref_bytes
    compute_cfg = cfg.replace(param_dtype=cfg.dtype)  # the sampler's copy holds the compute dtype only
    side_cfg = cfg if cfg.lora is None else compute_cfg  # LoRA's passes read the bf16 base (+ its adapters)
    if r_mesh is None:
        # colocated one-step-off: the sampler's compute-dtype copy of step t's weights lives through update t
        copy = tree_shard_bytes(abstract_params(compute_cfg, mesh)[1]) if rl.max_staleness else 0.0
        stages = rollout_stages(side_cfg, rl, shape, mesh, resident + copy)
    else:  # the rollout mesh holds one compute-dtype copy, replaced after each update
        copy = 0.0
        r_weights = tree_shard_bytes(abstract_params(compute_cfg, r_mesh)[1])
        stages = rollout_stages(compute_cfg, rl, shape, r_mesh, r_weights)
        transfer = StagePlan("transfer/weights", 1, chips=r_mesh.size, min_bytes=r_weights,
                             collective_bytes={"weights": r_weights},
                             note=f"each rollout chip receives its {r_weights / GiB:.2f} GiB of compute-dtype "
                                  f"weights from learner chips (modelled at ICI bandwidth, not compiled)")
        stages = [dataclasses.replace(s, chips=r_mesh.size) for s in stages] + [transfer]
    learner_side = logprob_stages(side_cfg, rl, shape, mesh, resident + copy)
    policy = Policy(cfg, graphdef, params, mesh=mesh)
    learner = learner_stage(policy, rl, shape, 0.0 if cfg.lora is not None else ref_bytes)  # LoRA: an argument
    learner.resident_bytes += copy
    learner_side.append(learner)
    if rl.eval_every:  # the evaluation must fit too (not part of the step's time)
        learner_side += eval_stages(side_cfg, rl, shape, mesh, resident)
    stages += [dataclasses.replace(s, chips=mesh.size if r_mesh is not None else None) for s in learner_side]
    hbm = target.chip.hbm_bytes if target.chip is not None else None
    for s in stages:
        s.hbm_bytes = hbm
    model_flops = sum(s.runs * s.flops_per_call for s in stages if not s.name.startswith(("learner", "eval/")))
    model_flops += rl.num_iterations * F.model_flops(cfg, shape.rows, round(shape.mean_tokens))
    learner = next(s for s in stages if s.name == "learner/update")
    return StepPlan(target, cfg, tuple(mesh.devices.shape), stages, state_bytes, model_flops,
                    num_params=float(num_params(cfg)), learner_argument_bytes=learner.argument_bytes,
                    mean_response=shape.mean_response,
                    rollout_mesh_shape=None if r_mesh is None else tuple(r_mesh.devices.shape),
                    max_staleness=rl.max_staleness)


__all__ = ["PlanDoesNotFit", "StagePlan", "StepPlan", "plan_step"]
