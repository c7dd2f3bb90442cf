"""`python -m arm_jax.plan --gin_file=gin_configs/tpu_pod.gin [--gin_param=...] --topology=v5p-32|v5e-16|v6e-8|local`

Reads the experiment's gin files (the same the launcher runs), the model's config.json (from `experiment.model_dir`,
or `--model_config`, or the bundled copy of a released model's config.json named like the folder: no weights are
read), compiles every jitted stage of one RL step for the topology, prints the table and writes it as JSON
(`--out`). Exits 1, naming the stage, the bytes and the levers, when a stage does not fit.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import gin

from arm_jax.config import ModelConfig
from arm_jax.models import hf

BUNDLED = os.path.join(os.path.dirname(__file__), "model_configs")


def bundled_names() -> list[str]:
    return sorted(os.listdir(BUNDLED))


def model_config(model_dir: Optional[str], override: Optional[str], dtype: str, param_dtype: str) -> ModelConfig:
    """The ModelConfig from config.json alone: `override` (a folder, a config.json, or a bundled name), else
    model_dir's config.json, else the bundled config named like model_dir's last component."""
    for candidate in (override, model_dir):
        if not candidate:
            continue
        path = candidate[:-len("config.json")] if candidate.endswith("config.json") else candidate
        if os.path.isfile(os.path.join(path or ".", "config.json")):
            return hf.read_config(path or ".", dtype=dtype, param_dtype=param_dtype)
        name = os.path.basename(os.path.normpath(candidate)).lower()
        for bundled in bundled_names():
            if bundled.lower() == name:
                return hf.read_config(os.path.join(BUNDLED, bundled), dtype=dtype, param_dtype=param_dtype)
    raise SystemExit(f"no config.json for model_dir={model_dir!r} (--model_config={override!r}); give a folder "
                     f"with config.json or one of the bundled configs: {', '.join(bundled_names())}")


def main(argv=None) -> int:
    from arm_jax import launch
    from arm_jax.plan import PlanDoesNotFit, make_target, plan_step
    from arm_jax.plan.report import table, write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gin_file", action="append", default=[], help="gin file(s), as for arm_jax.launch")
    ap.add_argument("--gin_param", action="append", default=[], help="gin binding(s)")
    ap.add_argument("--topology", required=True, help="v5p-32, v5e-16, v6e-8, an XLA name (v5p:2x2x4), or local")
    ap.add_argument("--model_config", default=None, help="config.json / folder / bundled name (default: "
                                                         "experiment.model_dir)")
    ap.add_argument("--prompt_tokens", type=int, default=None, help="prompt slots (default RLConfig."
                                                                    "max_prompt_tokens)")
    ap.add_argument("--mean_response_tokens", type=float, default=None,
                    help="mean answer length the decode schedule and the packed passes are counted at (answers "
                         "lognormal, sigma 0.75, clipped to the budget: arm_jax/plan/lengths.py); default "
                         "RLConfig.max_new_tokens, every answer at the budget")
    ap.add_argument("--mean_prompt_tokens", type=float, default=None,
                    help="mean real prompt length (packed passes); default the prompt slots")
    ap.add_argument("--out", default=None, help="JSON output (default plan_<topology>.json)")
    args = ap.parse_args(argv)
    for f in args.gin_file:
        if not os.path.isfile(f):
            raise SystemExit(f"gin file {f!r} does not exist")
    launch.parse_gin(args.gin_file, args.gin_param)
    bindings = gin.get_bindings("experiment")
    cfg = model_config(bindings.get("model_dir"), args.model_config, bindings.get("dtype", "float32"),
                       bindings.get("param_dtype", "float32"))
    if bindings.get("lora"):  # LoRA RL (experiment.lora, gin_configs/lora.gin): adapters on a frozen base
        from arm_jax.config import LoRAConfig
        cfg = cfg.replace(lora=LoRAConfig(**dict(bindings["lora"])))
    rl = launch.rl_config()
    target = make_target(args.topology)
    plan = plan_step(cfg, rl, tuple(bindings.get("mesh_shape", (1, -1, 1))), target, args.prompt_tokens,
                     args.mean_response_tokens, args.mean_prompt_tokens)
    print(table(plan))
    out = args.out or f"plan_{args.topology.replace(':', '_')}.json"
    write_json(plan, out)
    print(f"wrote {out}")
    try:
        plan.check()
    except PlanDoesNotFit as e:
        print(f"\ndoes not fit:\n{e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
