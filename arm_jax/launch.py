"""`python -m arm_jax.launch --gin_file=gin_configs/X.gin [--gin_param=...] --workdir=DIR`

Parses gin (a binding that names nothing is an error naming the binding), prints the resolved configuration and
saves it in the workdir, initializes multi-process JAX when asked, and runs `experiment`: load (or, for the
embedded quick-start, write and load) a Hugging Face checkpoint, optionally warm-start it with SFT, then RL with
automatic resume from the newest checkpoint in the workdir. gin binds only here and in gin_configs/.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
from typing import Optional

import gin
import jax
import numpy as np

from arm_jax import distributed
from arm_jax.algorithms.losses import LossConfig
from arm_jax.train.learner import OptimConfig
from arm_jax.eval.heldout import HeldOutEval
from arm_jax.export import save_final, write_lora_spec, write_spec
from arm_jax.policy import cast_policy, init_policy, load_policy, save_policy
from arm_jax.config import LoRAConfig
from arm_jax.models.lora import add_lora
from arm_jax.rollout import placement
from arm_jax.sharding import make_mesh
from arm_jax.train.loop import RLConfig, RLRun

# The configurables gin files bind. Nothing keeps an import-time default object: `rl_config()` builds all three
# at call time, so a file that binds `LossConfig.*` or `OptimConfig.*` takes effect whatever includes it.
_RLConfig = gin.external_configurable(RLConfig, module="arm_jax")
_LossConfig = gin.external_configurable(LossConfig, module="arm_jax")
_OptimConfig = gin.external_configurable(OptimConfig, module="arm_jax")


def rl_config() -> RLConfig:
    """The RLConfig of the parsed gin files: `RLConfig.*` bindings, with `loss` and `optim` built from the
    `LossConfig.*` / `OptimConfig.*` bindings (an explicit `RLConfig.loss = @LossConfig()` means the same)."""
    return _RLConfig(loss=_LossConfig(), optim=_OptimConfig())


def _tiny_policy_folder(workdir: str, seed: int, hidden: int, layers: int, heads: int, mlp: int,
                        init_std: float = 0.02, tie: bool = True, act: str = "silu", arch: str = "qwen2") -> str:
    """The quick-start's starting point: a random tiny model (`countdown.tiny_model_config`: Qwen2 or StarCoder2
    architecture) + the countdown tokenizer, written as a Hugging Face folder so the real loading path runs."""
    from arm_jax.data import countdown
    folder = os.path.join(workdir, "init_model")
    if jax.process_index() == 0 and not os.path.isfile(os.path.join(folder, "config.json")):
        cfg = countdown.tiny_model_config(hidden=hidden, layers=layers, heads=heads, mlp=mlp, tie=tie, act=act,
                                          arch=arch)
        policy = init_policy(cfg, seed=seed, mesh=make_mesh((1, 1, 1), devices=jax.local_devices()[:1]),
                                init_std=init_std)
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_policy(policy, tmp)
        countdown.save_tokenizer(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    distributed.barrier("init_model")  # the other processes read what process 0 wrote (a shared filesystem)
    return folder


def _sft(policy, task, workdir: str, steps: int, batch_size: int, lr: float, warmup: int, seed: int):
    """Supervised warm start on the task's reference solutions (loss on prompt and response tokens), saved as an
    HF folder in workdir/sft_model so a relaunch reuses it."""
    from arm_jax.train.sft import pack, run_sft
    folder = os.path.join(workdir, "sft_model")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return load_policy(folder, dtype=policy.config.dtype, param_dtype=policy.config.param_dtype,
                              mesh=policy.mesh)
    if task.sft_example is None:
        raise ValueError(f"task {task.name!r} has no reference solutions for sft_steps > 0")
    rng = random.Random(seed)
    records = list(task.train)
    p_len = max(len(task.encode(r)[0]) for r in records)
    examples = [[task.sft_example(r, rng) for r in records] for _ in range(2)]  # lengths for packing
    r_len = max(len(resp) for ex in examples for _, resp in ex)

    def batches():
        while True:
            chosen = [records[rng.randrange(len(records))] for _ in range(batch_size)]
            pairs = [task.sft_example(r, rng) for r in chosen]
            b = pack([p for p, _ in pairs], [r for _, r in pairs], p_len, r_len)
            b["loss_mask"] = b["attention_mask"]  # prompt and response (QUICKSTART-FACTS: c(q) needs the prompt)
            yield {k: v[distributed.local_slice(batch_size)] for k, v in b.items()}  # this process's rows

    # constant after warm-up: a cosine decay gave a worse starting point for RL on the quick-start (Pass@1 0.24 vs 0.28)
    optim = OptimConfig(lr=lr, warmup_steps=warmup, weight_decay=0.0, max_grad_norm=1.0, total_steps=steps)
    policy = run_sft(policy, batches(), steps, optim, log=lambda i, loss: print(f"sft step {i}: nll {loss:.4f}",
                                                                                  flush=True))
    tmp = folder + ".tmp"
    save_policy(policy, tmp, dtype=policy.config.param_dtype)  # the masters, so a relaunch resumes exactly
    if jax.process_index() == 0:
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    distributed.barrier("sft_model")
    return policy


@gin.configurable(denylist=["workdir", "rl"])
def experiment(workdir: str, task: str = "countdown", model_dir: Optional[str] = None, dtype: str = "float32",
               param_dtype: str = "float32", mesh_shape: tuple = (1, -1, 1), manual_dir: Optional[str] = None,
               task_kwargs: tuple = (), tiny_model: tuple = (("hidden", 64), ("layers", 2), ("heads", 4), ("mlp", 256)),
               sft_steps: int = 0, sft_batch_size: int = 128, sft_lr: float = 2e-3, sft_warmup: int = 50,
               rl: Optional[RLConfig] = None, seed: int = 0, checkpoint_dir: Optional[str] = None,
               wandb_project: Optional[str] = None, lora: tuple = ()) -> list[dict]:
    """Runs one experiment in `workdir`.

    task: 'countdown' | 'math:<dataset>' | 'code:<dataset>' (`arm_jax.rewards.tasks`); manual_dir: the folder holding
    the dataset files; task_kwargs: extra task options. model_dir: a Hugging Face checkpoint folder; None writes the
    quick-start's tiny model (`tiny_model`: hidden, layers, heads, mlp, and optionally init_std (0.02),
    tie (True), act ('silu'), arch ('qwen2' | 'starcoder2')) into workdir/init_model. dtype: the compute dtype
    (forward, backward, rollout, KV cache: 'bfloat16' on accelerators); param_dtype: the master weights and the
    optimizer's dtype (default 'float32': 12 bytes per parameter with Adam, sharded over the mesh).
    mesh_shape: the ('data', 'fsdp', 'tensor'[, 'expert']) mesh (-1 = the rest); with RLConfig.rollout_devices
    the learner's mesh over the devices the rollout leaves (`rollout.placement`). sft_steps (0 = none),
    sft_batch_size (128), sft_lr (2e-3), sft_warmup (50): the optional supervised warm start. rl: the RLConfig
    (default: `rl_config()`, built from the gin bindings at call time). seed: model init and SFT sampling.
    checkpoint_dir: where checkpoints go (default workdir/checkpoints; on a TPU pod a bucket path such as
    'gs://bucket/run', shared by every worker); a relaunch resumes from its newest checkpoint. The run writes
    workdir/policy_spec (config + tokenizer, for `python -m arm_jax.export`) at its start and the trained policy
    as an HF folder, workdir/final_model (compute dtype), at its end. wandb_project: also log every metric, the
    resolved gin configuration, sample tables and the evaluations' Pass@k plots to this W&B project (worker 0;
    `WANDB_MODE=offline` works without a network; a relaunch continues the same W&B run). lora: LoRA RL
    (`LoRAConfig` fields, e.g. (('rank', 64), ('alpha', 128.0)); () = full fine-tuning): adapters are added after
    the optional SFT, the base is frozen in the compute dtype and only the adapters and their Adam state are trained
    and checkpointed (a relaunch loads the base from the model folder again); `gin_configs/lora.gin`.
    """
    rl = rl if rl is not None else rl_config()
    os.makedirs(workdir, exist_ok=True)
    # disaggregated (RLConfig.rollout_devices): the learner's mesh over the devices the rollout leaves it
    mesh = make_mesh(tuple(mesh_shape), devices=None if rl.rollout_devices is None else
                     placement.split_devices(rl.rollout_devices)[0])
    folder = model_dir or _tiny_policy_folder(workdir, seed, **dict(tiny_model))
    policy = load_policy(folder, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
    write_spec(policy, workdir, folder)  # what `python -m arm_jax.export` needs besides the checkpoint
    from arm_jax.rewards.tasks import make_task
    the_task = make_task(task, tokenizer=policy.tokenizer, manual_dir=manual_dir,
                         stop_ids=policy.config.eos_token_ids, **dict(task_kwargs))
    if sft_steps:
        policy = _sft(policy, the_task, workdir, sft_steps, sft_batch_size, sft_lr, sft_warmup, seed)
    if lora:  # adapters on the (SFT-ed) base; the KL reference is then the base itself, inside the run
        policy = add_lora(policy, LoRAConfig(**dict(lora)), seed=seed)
        write_lora_spec(policy, workdir, os.path.join(workdir, "sft_model") if sft_steps else folder)
    # the KL reference is a frozen copy in the compute dtype (2 bytes per parameter in bf16), built only when used
    ref = cast_policy(policy, policy.config.dtype) if rl.loss.kl_coef and not lora else None
    evaluator = HeldOutEval.from_rl_config(rl) if rl.eval_every else None
    # own_policy_params: the loaded arrays are freed, the train state's masters are the only copy
    run = RLRun(policy, the_task, rl, workdir, ref_policy=ref, checkpoint_dir=checkpoint_dir, evaluator=evaluator,
                own_policy_params=True, wandb_project=wandb_project, run_config=gin.config_str())
    history = run.run()
    final = save_final(run.current_policy(), workdir)
    if jax.process_index() == 0:
        print(f"trained policy written to {final} (HF folder; python -m arm_jax.export writes any checkpoint)")
    _summary(history)
    return history


def _summary(history: list[dict]) -> None:
    evals = [h for h in history if "eval/pass@1" in h]
    if len(evals) >= 1:
        first, last = evals[0], evals[-1]
        keys = [k for k in first if k.startswith("eval/pass@")] + ["eval/entropy", "eval/distinct_correct"]
        print("\nheld-out evaluation (step {} -> step {}):".format(first["step"], last["step"]))
        for k in keys:
            print(f"  {k:24s} {first[k]:.3f} -> {last[k]:.3f}")


def parse_gin(files: list[str], params: list[str]) -> None:
    """Parses gin files and bindings; a binding that names nothing is a SystemExit naming it."""
    try:
        gin.parse_config_files_and_bindings(files, params, finalize_config=False)
    except (ValueError, KeyError, gin.config.ParseError if hasattr(gin.config, "ParseError") else ValueError) as e:
        raise SystemExit(f"gin configuration error: {e}") from e


def main(argv=None) -> None:
    """The command line: parse gin, initialize multi-process JAX when asked, save the resolved config, run
    `experiment`."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gin_file", action="append", default=[], help="gin file(s), applied in order")
    ap.add_argument("--gin_param", action="append", default=[], help="gin binding(s), e.g. RLConfig.steps=10")
    ap.add_argument("--workdir", required=True, help="outputs, checkpoints; a relaunch resumes from here")
    ap.add_argument("--coordinator_address", default=None, help="multi-process: host:port of process 0")
    ap.add_argument("--num_processes", type=int, default=None)
    ap.add_argument("--process_id", type=int, default=None)
    ap.add_argument("--wandb_project", default=None, help="also log to this W&B project (= experiment.wandb_project; "
                                                          "pip install -e '.[wandb]')")
    ap.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() with auto-detection "
                                                                  "(TPU pods, SLURM)")
    args = ap.parse_args(argv)
    for f in args.gin_file:
        if not os.path.isfile(f):
            raise SystemExit(f"gin file {f!r} does not exist")
    if args.distributed or (args.num_processes or 1) > 1:
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    parse_gin(args.gin_file, args.gin_param + ([f"experiment.wandb_project={args.wandb_project!r}"]
                                               if args.wandb_project else []))
    resolved = gin.config_str()
    print("resolved configuration:\n" + resolved, flush=True)
    os.makedirs(args.workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(args.workdir, "config.gin"), "w") as f:
            f.write(resolved)
    np.set_printoptions(precision=4)
    experiment(workdir=args.workdir)


if __name__ == "__main__":
    main(sys.argv[1:])
