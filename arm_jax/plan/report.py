"""The plan as a table (Markdown, for the terminal and README) and as JSON."""

from __future__ import annotations

import json
import re

from arm_jax.plan.chips import GiB
from arm_jax.plan.step import StepPlan



def _gib(x: float) -> str:
    return f"{x / GiB:.2f}" if x >= 0.01 * GiB or x == 0 else f"{x / GiB:.1e}"


def _num(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else (f"{x:.3g}" if x else "0")


def table(plan: StepPlan) -> str:
    """A Markdown table: per stage and per chip, memory (compiler), FLOPs, bytes, collectives, bounds."""
    chip, chips = plan.target.chip, plan.target.num_chips
    head = ["stage", "runs/step", "args GiB", "temp GiB", "resident GiB", "total GiB", "fits",
            "model TFLOP/call", "XLA TFLOP/call (loops once)", "min HBM GB/call", "ICI GB/call", "bound s/call",
            "bound s/step", "note"]
    rows = []
    for s in plan.stages:
        b = s.bound_s(chip, plan.chips_of(s))
        fits = "no" if not s.fits else ("yes" if s.hbm_bytes is not None else "-")
        rows.append([s.name, str(s.runs), _gib(s.argument_bytes), _gib(s.temp_bytes), _gib(s.resident_bytes),
                     _gib(s.footprint), fits if not s.error else "no (compile)", _num(s.flops_per_call / 1e12),
                     _num(s.xla_flops * chips / 1e12), _num(s.min_bytes / 1e9),
                     _num(sum(s.collective_bytes.values()) / 1e9),
                     f"{b['bound_s']:.3f}" if b else "-", f"{b['bound_s'] * s.runs:.2f}" if b else "-", s.note])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    hbm = f"{chip.hbm_bytes / GiB:.1f} GiB HBM per chip" if chip else "no chip figures (local)"
    per_param = plan.bytes_per_param()
    summary = (f"\n{plan.target.label}, mesh {tuple(plan.mesh_shape)}, {hbm}; params + optimizer state "
               f"{_gib(plan.state_bytes)} GiB per chip ({per_param['state_bytes_per_param']:.2f} bytes per "
               f"parameter; the learner's arguments, compiler: {per_param['learner_argument_bytes_per_param']:.2f}); "
               f"answers of mean {plan.mean_response:.0f} tokens.")
    t = plan.step_bound_s()
    if not plan.fits:
        summary += " Does not fit: no step-time estimate."
    elif t:
        summary += (f" Step time >= {t:.1f} s (roofline bound, not a measurement); MFU <= "
                    f"{100 * plan.mfu_bound():.1f} %.")
        if plan.rollout_mesh_shape is not None:
            summary += " " + _sides(plan.to_json())
    return "\n".join(out) + summary


def _sides(data: dict) -> str:
    """The disaggregated step: each side's bound, the transfer, and the step against the serial sum."""
    s = data["side_bounds_s"]
    r_chips = 1
    for n in data["rollout_mesh_shape"]:
        r_chips *= n
    how = ("max(rollout, learner) + transfer: one-step-off, both sides at once" if data["max_staleness"] else
           "rollout + learner + transfer: max_staleness 0, the sides take turns")
    return (f"Disaggregated: rollout {r_chips} chips, mesh {tuple(data['rollout_mesh_shape'])}, "
            f"{s['rollout_s']:.1f} s; learner {data['chips'] - r_chips} chips, mesh {tuple(data['mesh_shape'])}, "
            f"{s['learner_s']:.1f} s; weight transfer {s['transfer_s']:.2f} s; step >= {data['step_bound_s']:.1f} s "
            f"= {how} (serial sum {data['serial_bound_s']:.1f} s).")


def write_json(plan: StepPlan, path: str) -> None:
    with open(path, "w") as f:
        json.dump(plan.to_json(), f, indent=1, default=str)


def compact_table(data: dict) -> str:
    """README's short form of a plan's JSON: per stage, runs, per-chip memory against HBM, model FLOPs, minimum
    HBM traffic, collective bytes and the step-time bound."""
    hbm = (data["chip"] or {}).get("hbm_bytes")
    head = ["stage", "runs/step", "GiB/chip (compiler + resident)", "fits", "model TFLOP/call", "min HBM GB/call",
            "ICI GB/call", "bound s/step"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in data["stages"]:
        need = re.search(r"temporaries \(([\d.]+G)\)", s["error"] or "")
        mem = (f"temporaries alone {need.group(1)}" if need else "compile error" if s["error"] else
               f"{s['footprint_bytes'] / GiB:.1f}") + (f" / {hbm / GiB:.1f}" if hbm else "")
        bound = f"{s['bound_s'] * s['runs']:.1f}" if "bound_s" in s else "-"
        out.append(f"| {s['name']} | {s['runs']} | {mem} | {'yes' if s['fits'] else 'no'} | "
                   f"{_num(s['flops_per_call'] / 1e12)} | {_num(s['min_bytes'] / 1e9)} | "
                   f"{_num(sum(s['collective_bytes'].values()) / 1e9)} | {bound} |")
    step = data.get("step_bound_s")
    tail = (f"step >= {step:.0f} s, MFU <= {100 * data['mfu_bound']:.0f} % (roofline bounds)" if step else
            ("does not fit" if not data["fits"] else ""))
    if step and data.get("rollout_mesh_shape"):
        tail += ". " + _sides(data)
    return "\n".join(out) + (f"\n\n{data['target']}, mesh {tuple(data['mesh_shape'])}: {tail}" if tail else "")
