"""`python -m arm_jax.plan`: compile every jitted stage of one RL step ahead of time for a TPU topology (or this
machine's devices) and report, per chip, the compiler's memory account, FLOPs, bytes, collective traffic and
roofline bounds, from the model's config.json alone (no weights read).

Flow: `chips` (published chip figures, slice names -> XLA topologies) -> `stages` (abstract parameters,
optimizer state, caches and batches with the run's shardings; the trainer's own jitted functions compiled) ->
`step` (the whole step, the fit verdict) -> `report` (table, JSON). `hlo` reads collective bytes from the
optimized HLO; `flops` counts model FLOPs. Figures from the compiler are estimates of memory and lower bounds on
time, not measured speed.
"""

from arm_jax.plan.chips import CHIPS, Chip, Target, make_target, topology_name
from arm_jax.plan.step import PlanDoesNotFit, StepPlan, plan_step

__all__ = ["CHIPS", "Chip", "PlanDoesNotFit", "StepPlan", "Target", "make_target", "plan_step", "topology_name"]
