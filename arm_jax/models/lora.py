"""LoRA on a policy: adapters added to a loaded base, split from it (the trainable part) and merged into it (for
an HF folder). The forward applies them unmerged (`layers.lora_term`): the frozen base stays exact in its dtype and
the adapters' small term is not rounded into bf16 weights.

Why not qwix (tunix's LoRA) or `nnx.LoRALinear`: the model files' projections are einsums over kernels of 2 or 3
axes with logical sharding names (q [D, H, Dh], o [H, Dh, D]); adapters as `nnx.LoRAParam`s beside each kernel,
sharded by the kernel's own in / out axes, keep every projection one readable line and need neither qwix's
interception of dot_generals nor a Linear-module rewrite. `nnx.LoRAParam` is Flax's own type, so
`nnx.split_state(params, nnx.LoRAParam, ...)` separates the trainable adapters from the base.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from arm_jax.config import LoRAConfig
from arm_jax.models import abstract_model, build_model, param_shardings

TRAINABLE = nnx.LoRAParam


def split(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(adapters, base): the LoRA parameters and everything else."""
    return nnx.split_state(params, TRAINABLE, ...)


def merge(base: nnx.State, adapters: nnx.State) -> nnx.State:
    """The whole parameter state from its two parts (`split`'s inverse)."""
    return nnx.merge_state(base, adapters)


def add_lora(policy, lora: LoRAConfig, seed: int = 0):
    """`policy` with adapters on `lora.targets` (its config's `lora` set): the base parameters are the policy's own
    arrays (not copied), the new A [in, r] / B [r, out] pairs are created sharded like their kernels (B = 0, so the
    outputs are the base's exactly until B is trained)."""
    if policy.config.lora is not None:
        raise ValueError(f"the policy already has LoRA adapters ({policy.config.lora})")
    cfg = policy.config.replace(lora=lora)
    graphdef, abstract = abstract_model(cfg)
    adapters_abstract, _ = split(abstract)
    shardings = param_shardings(adapters_abstract, policy.mesh, policy.rules)

    def create():
        with nnx.use_eager_sharding(False):
            return split(nnx.split(build_model(cfg, nnx.Rngs(seed)))[1])[0]

    # the whole model is traced, but only the adapters are outputs: XLA computes nothing else
    adapters = jax.jit(create, out_shardings=shardings)()
    return policy.replace(config=cfg, graphdef=graphdef, params=merge(policy.params, adapters))


def merged_policy(policy):
    """The policy with its adapters folded into the kernels, W + scale * A B (computed in float32, stored in W's
    dtype) and no LoRA: what an HF folder holds. Without adapters: the policy itself."""
    lora = policy.config.lora
    if lora is None:
        return policy
    adapters, base = split(policy.params)
    flat_a = dict(nnx.to_flat_state(adapters))

    def fold(path, x):
        parent, name = path[:-1], path[-1]
        a = flat_a.get(parent + (f"{name}_lora_a",))
        if a is None:
            return x
        b = flat_a[parent + (f"{name}_lora_b",)]
        a, b = a.get_value(), b.get_value()
        delta = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
        return (x.astype(jnp.float32) + lora.scale * delta).astype(x.dtype)

    flat = [(path, v.replace(fold(path, v.get_value()))) for path, v in nnx.to_flat_state(base)]
    cfg = policy.config.replace(lora=None)
    graphdef, _ = abstract_model(cfg)
    return policy.replace(config=cfg, graphdef=graphdef, params=nnx.from_flat_state(flat))


def peft_tensors(policy) -> tuple[dict, list[str]]:
    """The adapters in PEFT's layout: ({'base_model.model.<HF module>.lora_A.weight': [r, in], '...lora_B.weight':
    [out, r]} as float32 numpy, the HF module names targeted). The module of each kernel is its HF tensor's
    (`hf.tensor_maps`); in / out are the kernel's input and output axes flattened as HF's [out, in] weight
    flattens them (q [D, H, Dh] -> q_proj [H*Dh, D]; o [H, Dh, D] -> o_proj [D, H*Dh])."""
    import numpy as np

    from arm_jax.models import hf
    by_path = {tuple(str(p) for p in m.path): m for m in hf.tensor_maps(policy.config.replace(lora=None))}
    flat = {tuple(str(p) for p in path): v.get_value() for path, v in nnx.to_flat_state(split(policy.params)[0])}
    out, modules = {}, set()
    for path, a in sorted(flat.items()):
        if not path[-1].endswith("_lora_a"):
            continue
        kernel = path[:-1] + (path[-1][:-len("_lora_a")],)
        b = flat[path[:-1] + (kernel[-1] + "_lora_b",)]
        m = by_path.get(kernel)
        if m is None or not m.hf_name.endswith(".weight"):
            raise ValueError(f"no HF module for the LoRA kernel {'/'.join(kernel)}")
        module = m.hf_name[:-len(".weight")]
        a, b = np.asarray(jax.device_get(a), np.float32), np.asarray(jax.device_get(b), np.float32)
        r = a.shape[-1]
        out[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
        out[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
        modules.add(module.rsplit(".", 1)[-1])
    return out, sorted(modules)


def save_peft(policy, out_dir: str, base_model: str = "") -> None:
    """Writes the adapters as a PEFT folder (adapter_config.json + adapter_model.safetensors, float32) that
    `peft.PeftModel.from_pretrained(base, out_dir)` loads onto the base model. base_model: recorded as
    `base_model_name_or_path`. Process 0 writes; every process must call it."""
    import json
    import os

    from safetensors.numpy import save_file
    lora = policy.config.lora
    if lora is None:
        raise ValueError("the policy has no LoRA adapters to export (ModelConfig.lora is None)")
    tensors, modules = peft_tensors(policy)
    if jax.process_index() != 0:
        return
    os.makedirs(out_dir, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
              "lora_dropout": 0.0, "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
              "base_model_name_or_path": base_model}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})


__all__ = ["TRAINABLE", "add_lora", "merge", "merged_policy", "peft_tensors", "save_peft", "split"]
