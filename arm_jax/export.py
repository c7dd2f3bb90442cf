"""`python -m arm_jax.export --workdir=W [--step=N] [--checkpoint_dir=D] --out=DIR [--dtype=bfloat16] [--peft]`

Writes a run's checkpoint (the newest, or step N) as a Hugging Face folder (config.json, safetensors,
generation_config.json when the starting checkpoint had one, tokenizer) that transformers'
`AutoModelForCausalLM.from_pretrained` and `python -m arm_jax.eval` load. The launcher records what this needs in
`<workdir>/policy_spec/` when a run starts (the model's config.json and tokenizer, no weights; `write_spec`) and
writes `<workdir>/final_model` the same way when it ends (`save_final`). Only the parameters are read from the
checkpoint (not the optimizer state), onto this host's devices, whatever mesh saved them. A LoRA run's checkpoints
hold the adapters only: the base is read from the folder `policy_spec/lora.json` names, and the folder holds the
merged weights, or with `--peft` the adapters alone as a PEFT folder (adapter_config.json +
adapter_model.safetensors) for `peft.PeftModel.from_pretrained(base, out)`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Optional

import jax

from arm_jax import distributed
from arm_jax.config import LoRAConfig
from arm_jax.models import abstract_model, hf, lora, param_shardings
from arm_jax.policy import Policy, load_policy, read_tokenizer, save_policy
from arm_jax.sharding import make_mesh
from arm_jax.train.checkpoint import Checkpointer

SPEC = "policy_spec"
_EXTRA_FILES = ("generation_config.json",)


def write_spec(policy: Policy, workdir: str, source_dir: Optional[str]) -> str:
    """<workdir>/policy_spec: the policy's config.json (as `save_policy` writes it), its tokenizer and the source
    folder's generation_config.json; no weights. Process 0 writes it."""
    folder = os.path.join(workdir, SPEC)
    if jax.process_index() == 0:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(hf.config_to_hf(policy.config), f, indent=2)
        if policy.tokenizer is not None:
            policy.tokenizer.save_pretrained(folder)
        for name in _EXTRA_FILES:
            if source_dir and os.path.isfile(os.path.join(source_dir, name)):
                shutil.copy(os.path.join(source_dir, name), os.path.join(folder, name))
    distributed.barrier("policy_spec")
    return folder


def write_lora_spec(policy: Policy, workdir: str, base_dir: str) -> None:
    """<workdir>/policy_spec/lora.json: a LoRA run's adapter options and the folder its frozen base came from
    (what `export` needs besides the adapters in the checkpoint). Process 0 writes it."""
    lora_cfg = policy.config.lora
    if jax.process_index() == 0:
        with open(os.path.join(workdir, SPEC, "lora.json"), "w") as f:
            json.dump({"rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "targets": list(lora_cfg.targets),
                       "base_model": os.path.abspath(base_dir)}, f, indent=2)
    distributed.barrier("lora_spec")


def _write_folder(policy: Policy, spec_dir: str, out: str, dtype: Optional[str]) -> None:
    tmp = out.rstrip("/") + ".tmp"
    if jax.process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier("export_tmp")
    save_policy(policy, tmp, dtype=dtype)
    if jax.process_index() == 0:
        for name in _EXTRA_FILES:
            if os.path.isfile(os.path.join(spec_dir, name)):
                shutil.copy(os.path.join(spec_dir, name), os.path.join(tmp, name))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    distributed.barrier("export_done")
    if jax.process_index() != 0:
        shutil.rmtree(tmp, ignore_errors=True)  # the empty folder a worker without a shared filesystem made


def save_final(policy: Policy, workdir: str, dtype: Optional[str] = None) -> str:
    """<workdir>/final_model: the trained policy as an HF folder (compute dtype unless `dtype`)."""
    out = os.path.join(workdir, "final_model")
    _write_folder(policy, os.path.join(workdir, SPEC), out, dtype)
    return out


def export(workdir: str, out: str, step: Optional[int] = None, checkpoint_dir: Optional[str] = None,
           dtype: Optional[str] = "bfloat16", mesh=None, peft: bool = False) -> int:
    """Writes checkpoint `step` (default the newest) of the run in `workdir` as an HF folder `out`; returns the
    step. dtype: of the written tensors (None: the run's compute dtype; 'float32': the masters exactly). peft: a
    LoRA run's adapters as a PEFT folder instead (float32)."""
    spec = os.path.join(workdir, SPEC)
    if not os.path.isfile(os.path.join(spec, "config.json")):
        raise FileNotFoundError(f"{spec}/config.json not found: {workdir!r} is not an arm_jax run folder (the "
                                f"launcher writes {SPEC}/ when a run starts)")
    ckpt = Checkpointer(checkpoint_dir or os.path.join(workdir, "checkpoints"))
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"no checkpoint of step {step} in {ckpt.directory} (steps: {steps})")
    mesh = mesh if mesh is not None else make_mesh()
    lora_spec = os.path.join(spec, "lora.json")
    if os.path.isfile(lora_spec):  # the frozen base from its folder, the adapters from the checkpoint
        with open(lora_spec) as f:
            options = json.load(f)
        base_dir = options.pop("base_model")
        policy = lora.add_lora(load_policy(base_dir, mesh=mesh), LoRAConfig(**{**options, "targets": tuple(
            options["targets"])}))
        adapters, base = lora.split(policy.params)
        like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), adapters)
        policy = policy.replace(params=lora.merge(base, ckpt.restore_params(step, like)))
        ckpt.close()
        if peft:
            lora.save_peft(policy, out, base_model=base_dir)
            return step
    else:
        if peft:
            raise ValueError(f"--peft: {workdir!r} is not a LoRA run ({lora_spec} not found)")
        config = hf.read_config(spec, param_dtype="float32")
        graphdef, abstract = abstract_model(config)
        shardings = jax.tree.leaves(param_shardings(abstract, mesh))  # one per parameter, in the same order
        like = jax.tree.unflatten(jax.tree.structure(abstract), [
            jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s) for a, s in zip(jax.tree.leaves(abstract),
                                                                                shardings)])
        params = ckpt.restore_params(step, like)
        ckpt.close()
        policy = Policy(config, graphdef, params, read_tokenizer(spec), mesh)
    _write_folder(policy, spec, out, dtype)
    return step


def main(argv=None) -> None:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="the run's --workdir")
    ap.add_argument("--out", required=True, help="the HF folder to write")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    ap.add_argument("--checkpoint_dir", default=None, help="default <workdir>/checkpoints (a bucket on pods)")
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32 (the masters)")
    ap.add_argument("--peft", action="store_true", help="a LoRA run: write the adapters as a PEFT folder")
    args = ap.parse_args(argv)
    step = export(args.workdir, args.out, args.step, args.checkpoint_dir, args.dtype, peft=args.peft)
    print(f"wrote step {step} of {args.workdir} to {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
