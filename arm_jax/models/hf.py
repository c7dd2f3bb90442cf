"""Hugging Face checkpoints: config.json -> ModelConfig, safetensors <-> params (streaming, sharded), export.

Loading never holds the model on the host: each tensor is memory-mapped and every device receives only its own
shard (`jax.make_array_from_callback`), already transposed to arm_jax's layout and cast to the requested dtype.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx

from arm_jax.config import ConfigError, ModelConfig, MoEConfig, RopeConfig
from arm_jax.models import abstract_model, hf_deepseek, param_shardings, st_format
from arm_jax.models.qwen2 import jnp_dtype
from arm_jax.models.tensor_map import TensorMap, identity, moe_maps, plain_mlp_maps, swiglu_maps, transpose
from arm_jax.sharding import DEFAULT_RULES, LogicalRules

QWEN_MOE_TYPES = ("qwen2_moe", "qwen3_moe")
SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "starcoder2") + QWEN_MOE_TYPES + hf_deepseek.MODEL_TYPES
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
                 "starcoder2": "Starcoder2ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", **hf_deepseek.ARCHITECTURES}
# Tensors some exporters add that carry no parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint folder does not match its config: the message names the tensor, the file and both shapes."""


# --------------------------------------------------------------------------------------------- config.json


def read_config(hf_dir: str, dtype: Optional[str] = None, param_dtype: str = "float32") -> ModelConfig:
    """config.json of an HF folder -> ModelConfig (dtype = compute dtype, default the file's; param_dtype = masters)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{hf_dir}: no config.json (expected a Hugging Face model folder)")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from e
    cfg = config_from_hf(raw, source=path, dtype=dtype).replace(param_dtype=param_dtype)
    return cfg.replace(eos_token_ids=_eos_ids(cfg.eos_token_ids, os.path.join(hf_dir, "generation_config.json")))


def _eos_ids(from_config: tuple, gen_path: str) -> tuple:
    """config.json's eos ids then generation_config.json's (Llama-3 Instruct ends turns with <|eot_id|>, listed
    only there; transformers' `generate` stops on that list), without repeats."""
    ids = list(from_config)
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            try:
                eos = json.load(f).get("eos_token_id")
            except json.JSONDecodeError as e:
                raise ConfigError(f"{gen_path}: invalid JSON ({e})") from e
        ids += eos if isinstance(eos, list) else ([] if eos is None else [eos])
    return tuple(dict.fromkeys(int(i) for i in ids))


def _rope_from_hf(raw: dict, source: str) -> RopeConfig:
    """Accepts the v5 spelling (`rope_parameters: {rope_theta, rope_type, ...}`) and the v4 one (top-level
    `rope_theta` + `rope_scaling: {type|rope_type, ...}` or null)."""
    params = raw.get("rope_parameters")
    if params is None:
        params = dict(raw.get("rope_scaling") or {})
        if "rope_theta" in raw:
            params.setdefault("rope_theta", raw["rope_theta"])
    params = dict(params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(f"{source}: partial_rotary_factor != 1 is not supported")
    kwargs: dict[str, Any] = {"theta": float(params.get("rope_theta", 10000.0)), "rope_type": rope_type}
    if rope_type in ("llama3", "yarn"):  # transformers' rule: a top-level value first, else max_position_embeddings
        if raw.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
        elif params.get("original_max_position_embeddings") is None and "max_position_embeddings" in raw:
            params["original_max_position_embeddings"] = raw["max_position_embeddings"]
    if rope_type == "yarn" and params.get("factor") is None and "original_max_position_embeddings" in params:
        params["factor"] = raw["max_position_embeddings"] / params["original_max_position_embeddings"]  # HF's rule
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "beta_fast",
                "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"):
        if key in params and params[key] is not None:
            kind = float if key == "attention_factor" else type(getattr(RopeConfig, key))
            kwargs[key] = kind(params[key])
    try:
        return RopeConfig(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: rope_parameters/rope_scaling: {e}") from e


def _qwen_moe_from_hf(raw: dict, source: str) -> MoEConfig:
    """Qwen2-MoE / Qwen3-MoE routing: softmax over all experts, top-k (renormalized with norm_topk_prob), MoE on
    the layers decoder_sparse_step / mlp_only_layers pick; Qwen2-MoE's gated shared expert."""
    experts = raw.get("num_experts", raw.get("num_local_experts"))  # v4 / v5 spellings
    for key, value in (("num_experts", experts), ("num_experts_per_tok", raw.get("num_experts_per_tok")),
                       ("moe_intermediate_size", raw.get("moe_intermediate_size"))):
        if not value:
            raise ConfigError(f"{source}: model_type={raw['model_type']!r} needs {key!r}")
    shared = raw.get("shared_expert_intermediate_size") if raw["model_type"] == "qwen2_moe" else None
    return MoEConfig(num_experts=experts, experts_per_token=raw["num_experts_per_tok"],
                     expert_size=raw["moe_intermediate_size"], norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
                     decoder_sparse_step=int(raw.get("decoder_sparse_step", 1)),
                     mlp_only_layers=tuple(raw.get("mlp_only_layers") or ()), shared_expert_size=shared or None,
                     shared_expert_gate=bool(shared))


def config_from_hf(raw: dict, source: str = "config.json", dtype: Optional[str] = None) -> ModelConfig:
    """Parses a transformers v4 or v5 config.json dict; unsupported architectures or options are errors."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type={model_type!r} (architectures={raw.get('architectures')}) is not supported by "
            f"the dense decoder family; supported model_type values: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if raw.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true is not supported (sliding-window attention would "
                          f"silently change the model); set it to false only if the checkpoint was trained so")
    bad_layers = [t for t in raw.get("layer_types") or [] if t != "full_attention"]
    if bad_layers:
        raise ConfigError(f"{source}: layer_types contains {sorted(set(bad_layers))}; only 'full_attention' is "
                          f"supported")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in raw:
            raise ConfigError(f"{source}: missing required key {key!r}")
    heads = raw["num_attention_heads"]
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    starcoder2 = model_type == "starcoder2"  # LayerNorm, plain MLP, `use_bias` everywhere, sliding window
    attention_bias = bool(raw.get("use_bias", True) if starcoder2 else raw.get("attention_bias", False))
    try:
        common = dict(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", starcoder2)),
            rms_norm_eps=float(raw.get("norm_epsilon", 1e-5) if starcoder2 else raw.get("rms_norm_eps", 1e-6)),
            hidden_act=raw.get("hidden_act", "gelu_pytorch_tanh" if starcoder2 else "silu"),
            rope=_rope_from_hf(raw, source),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            dtype=dtype or _dtype_name(raw.get("dtype", raw.get("torch_dtype"))),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=raw.get("pad_token_id"),
        )
        if model_type in hf_deepseek.MODEL_TYPES:
            return hf_deepseek.config_from_hf(raw, source, common)
        return ModelConfig(
            model_type=model_type,
            intermediate_size=raw["intermediate_size"],
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            qkv_bias=(True if model_type == "qwen2" else bool(raw.get("qkv_bias", True)) if model_type == "qwen2_moe"
                      else attention_bias),
            o_bias=False if model_type in ("qwen2", "qwen2_moe") else attention_bias,
            mlp_bias=attention_bias if starcoder2 else bool(raw.get("mlp_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            moe=_qwen_moe_from_hf(raw, source) if model_type in QWEN_MOE_TYPES else None,
            norm_type="layer" if starcoder2 else "rms",
            mlp_type="plain" if starcoder2 else "gated",
            sliding_window=raw.get("sliding_window") if starcoder2 else None,
            **common,
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e


def _dtype_name(hf_dtype: Optional[str]) -> str:
    return "bfloat16" if hf_dtype in ("bfloat16", "float16") else "float32"


def config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig -> a transformers-v5 config.json dict (rope_parameters, dtype)."""
    rope: dict[str, Any] = {"rope_theta": cfg.rope.theta, "rope_type": cfg.rope.rope_type}
    if cfg.rope.rope_type != "default":
        rope["factor"] = cfg.rope.factor
    if cfg.rope.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope.low_freq_factor, high_freq_factor=cfg.rope.high_freq_factor,
                    original_max_position_embeddings=cfg.rope.original_max_position_embeddings)
    if cfg.rope.rope_type == "yarn":
        rope.update(original_max_position_embeddings=cfg.rope.original_max_position_embeddings,
                    beta_fast=cfg.rope.beta_fast, beta_slow=cfg.rope.beta_slow, mscale=cfg.rope.mscale,
                    mscale_all_dim=cfg.rope.mscale_all_dim, truncate=cfg.rope.truncate)
        if cfg.rope.attention_factor is not None:
            rope["attention_factor"] = cfg.rope.attention_factor
    out = {
        "architectures": [ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "dtype": cfg.dtype, "bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
        "eos_token_id": (list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1
                         else (cfg.eos_token_ids[0] if cfg.eos_token_ids else None)),
    }
    if cfg.family == "deepseek":
        return hf_deepseek.config_to_hf(cfg, out)
    if cfg.model_type == "starcoder2":
        out["norm_epsilon"] = out.pop("rms_norm_eps")
        out.update(use_bias=cfg.qkv_bias, sliding_window=cfg.sliding_window)
        return out
    if cfg.model_type == "qwen2_moe":
        out["qkv_bias"] = cfg.qkv_bias
    elif cfg.model_type != "qwen2":
        out["attention_bias"] = cfg.qkv_bias
    if cfg.model_type == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    if cfg.model_type in ("qwen2", "qwen3") + QWEN_MOE_TYPES:
        out["use_sliding_window"] = False
    if cfg.model_type in QWEN_MOE_TYPES:
        moe = cfg.moe
        out.update(num_experts=moe.num_experts, num_experts_per_tok=moe.experts_per_token,
                   moe_intermediate_size=moe.expert_size, norm_topk_prob=moe.norm_topk_prob,
                   decoder_sparse_step=moe.decoder_sparse_step, mlp_only_layers=list(moe.mlp_only_layers))
        if cfg.model_type == "qwen2_moe":
            out["shared_expert_intermediate_size"] = moe.shared_width
    return out


# ------------------------------------------------------------------------------------------ tensor mapping


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Every HF tensor of the architecture and how it maps to arm_jax's parameter (name, path, shape, layout)."""
    D, F, H, K, Dh, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.vocab_size)
    ident = identity

    def proj_in(n):  # [n*Dh, D] <-> [D, n, Dh]
        return (lambda a: a.T.reshape(D, n, Dh)), (lambda a: a.reshape(D, n * Dh).T)

    def bias_in(n):  # [n*Dh] <-> [n, Dh]
        return (lambda a: a.reshape(n, Dh)), (lambda a: a.reshape(n * Dh))

    def norm_maps(hf_prefix, path):  # weight (+ LayerNorm's bias)
        names = ("weight",) if cfg.norm_type == "rms" else ("weight", "bias")
        return [TensorMap(f"{hf_prefix}.{n}", path + (n,), (D,), ident, ident) for n in names]

    maps = [TensorMap("model.embed_tokens.weight", ("embed",), (V, D), ident, ident)]
    maps += norm_maps("model.norm", ("final_norm",))
    if not cfg.tie_word_embeddings:
        maps.append(TensorMap("lm_head.weight", ("lm_head",), (V, D), transpose, transpose))
    if cfg.family == "deepseek":
        return maps + hf_deepseek.tensor_maps(cfg)
    for i in range(cfg.num_layers):
        p, L = f"model.layers.{i}.", ("layers", i)
        maps += norm_maps(p + "input_layernorm", L + ("input_norm",))
        maps += norm_maps(p + "post_attention_layernorm", L + ("post_norm",))
        maps += [
            TensorMap(p + "self_attn.q_proj.weight", L + ("attn", "q"), (H * Dh, D), *proj_in(H)),
            TensorMap(p + "self_attn.k_proj.weight", L + ("attn", "k"), (K * Dh, D), *proj_in(K)),
            TensorMap(p + "self_attn.v_proj.weight", L + ("attn", "v"), (K * Dh, D), *proj_in(K)),
            TensorMap(p + "self_attn.o_proj.weight", L + ("attn", "o"), (D, H * Dh),
                      lambda a: a.T.reshape(H, Dh, D), lambda a: a.reshape(H * Dh, D).T),
        ]
        if cfg.moe is not None and cfg.moe.is_moe_layer(i):
            maps += moe_maps(p + "mlp.", L + ("mlp",), D, cfg.moe, "shared_expert.", cfg.mlp_bias)
        else:
            maps += (swiglu_maps if cfg.mlp_type == "gated" else plain_mlp_maps)(p + "mlp.", L + ("mlp",), D, F,
                                                                                   cfg.mlp_bias)
        if cfg.qkv_bias:
            maps += [TensorMap(p + "self_attn.q_proj.bias", L + ("attn", "q_bias"), (H * Dh,), *bias_in(H)),
                     TensorMap(p + "self_attn.k_proj.bias", L + ("attn", "k_bias"), (K * Dh,), *bias_in(K)),
                     TensorMap(p + "self_attn.v_proj.bias", L + ("attn", "v_bias"), (K * Dh,), *bias_in(K))]
        if cfg.o_bias:
            maps.append(TensorMap(p + "self_attn.o_proj.bias", L + ("attn", "o_bias"), (D,), ident, ident))
        if cfg.qk_norm:
            maps += [TensorMap(p + "self_attn.q_norm.weight", L + ("attn", "q_norm", "weight"), (Dh,), ident, ident),
                     TensorMap(p + "self_attn.k_norm.weight", L + ("attn", "k_norm", "weight"), (Dh,), ident, ident)]
    return maps


# ------------------------------------------------------------------------------------------------ abstract


# ----------------------------------------------------------------------------------------------- load/save


def _open_checkpoint(hf_dir: str) -> dict[str, st_format.SafetensorsFile]:
    """{tensor name: file} from model.safetensors.index.json, model.safetensors or every *.safetensors."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        files = {fn: None for fn in weight_map.values()}
        for fn in files:
            if not os.path.isfile(os.path.join(hf_dir, fn)):
                raise CheckpointError(f"{index} lists {fn!r}, which is not in {hf_dir}")
            files[fn] = st_format.SafetensorsFile(os.path.join(hf_dir, fn))
        out = {}
        for name, fn in weight_map.items():
            if name not in files[fn].keys():
                raise CheckpointError(f"{index} maps tensor {name!r} to {fn}, which does not contain it")
            out[name] = files[fn]
        return out
    names = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
    if not names:
        other = [n for n in os.listdir(hf_dir) if n.endswith((".bin", ".pt", ".pth", ".msgpack", ".h5"))]
        raise CheckpointError(f"{hf_dir}: no *.safetensors files" + (
            f" (found {other}: convert them to safetensors first)" if other else ""))
    return dict(st_format.iter_names(st_format.SafetensorsFile(os.path.join(hf_dir, n)) for n in names))


def load_params(hf_dir: str, cfg: ModelConfig, mesh, rules: LogicalRules = DEFAULT_RULES,
                ) -> tuple[nnx.GraphDef, nnx.State]:
    """Streams the checkpoint into a sharded `nnx.State` of `cfg.param_dtype` arrays (the model's float32-only
    parameters, e.g. MoE routers, stay float32), host peak one device shard."""
    graphdef, abstract = abstract_model(cfg)
    shardings = param_shardings(abstract, mesh, rules)
    files = _open_checkpoint(hf_dir)
    maps = {m.hf_name: m for m in tensor_maps(cfg)}
    present = {n for n in files if not n.endswith(IGNORED_SUFFIXES)}
    if cfg.family == "deepseek":
        present = {n for n in present if not hf_deepseek.is_mtp_tensor(n, cfg)}
    if cfg.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints also store the head; HF ignores it too
    missing = sorted(set(maps) - present)
    if missing:
        raise CheckpointError(f"{hf_dir}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                              f"({len(missing)} in all) required by config.json "
                              f"(model_type={cfg.model_type}, {cfg.num_layers} layers)")
    unexpected = sorted(present - set(maps))
    if unexpected:
        raise CheckpointError(f"{hf_dir}: unexpected tensor {unexpected[0]!r} in "
                              f"{os.path.basename(files[unexpected[0]].path)} ({len(unexpected)} in all, e.g. "
                              f"{unexpected[:5]}); it does not belong to a {cfg.model_type} model with this config")
    flat_shardings = dict(nnx.to_flat_state(shardings))
    flat_abstract = dict(nnx.to_flat_state(abstract))
    for name, m in maps.items():
        f = files[name]
        if f.shape(name) != m.hf_shape:
            raise CheckpointError(f"tensor {name!r} in {f.path} has shape {f.shape(name)}, but config.json implies "
                                  f"{m.hf_shape}")
    by_path: dict[tuple, list[TensorMap]] = {}
    for m in maps.values():
        by_path.setdefault(m.path, []).append(m)
    values = {}
    for path, group in by_path.items():
        like = flat_abstract[path].get_value()
        view = _param_view(group, files, like.shape)
        values[path] = jax.make_array_from_callback(
            view.shape, flat_shardings[path], lambda idx, view=view, dt=np.dtype(like.dtype): np.asarray(view[idx],
                                                                                                      dtype=dt))
    flat = [(path, var.replace(values[path])) for path, var in nnx.to_flat_state(abstract)]
    return graphdef, nnx.from_flat_state(flat)


class _Stacked:
    """A lazily read stacked parameter: slices [i] come from separate tensors (e.g. one per expert)."""

    def __init__(self, group: list[TensorMap], files, shape):
        self.maps = sorted(group, key=lambda m: m.index)
        self.files, self.shape = files, tuple(shape)

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        rows = range(self.shape[0])[idx[0]] if idx else range(self.shape[0])
        return np.stack([np.asarray(self.maps[r].to_ours(self.files[self.maps[r].hf_name].array(
            self.maps[r].hf_name))[idx[1:]]) for r in rows])


def _param_view(group: list[TensorMap], files, shape):
    """An array-like of the parameter's full shape whose slices read only what they need from the files."""
    if len(group) == 1 and group[0].index is None:
        m = group[0]
        return m.to_ours(files[m.hf_name].array(m.hf_name))
    if sorted(m.index for m in group) != list(range(shape[0])):
        raise CheckpointError(f"parameter {'/'.join(map(str, group[0].path))}: expected one tensor per slice "
                              f"0..{shape[0] - 1}, got {sorted(m.hf_name for m in group)[:4]} ...")
    return _Stacked(group, files, shape)


def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_params(params: nnx.State, cfg: ModelConfig, out_dir: str,
                max_shard_bytes: int = 5 * 1024 ** 3, dtype: Optional[str] = None) -> None:
    """Writes config.json + model.safetensors (or shards + model.safetensors.index.json) in the HF layout.

    dtype: the dtype of the written tensors and of config.json's `dtype` (default the compute dtype `cfg.dtype`, as
    HF checkpoints are; 'float32' exports float32 master weights exactly).

    Tensors are gathered one at a time. In multi-process runs every process must call this; process 0 writes.
    """
    os.makedirs(out_dir, exist_ok=True)
    flat = {path: v.get_value() for path, v in nnx.to_flat_state(params)}
    maps = tensor_maps(cfg)
    out_dt = np.dtype(jnp_dtype(dtype or cfg.dtype))
    specs = {m.hf_name: (m.hf_shape, out_dt) for m in maps}
    by_name = {m.hf_name: m for m in maps}
    write = jax.process_index() == 0
    gathered: dict = {}  # the stacked parameters of the current layer (experts' gate/up/down), gathered once

    def produce(name):
        m = by_name[name]
        if m.index is None:
            return m.to_hf(_to_host(flat[m.path])).astype(out_dt)
        if m.path not in gathered:
            if len(gathered) >= 4:
                gathered.clear()
            gathered[m.path] = _to_host(flat[m.path])
        return m.to_hf(gathered[m.path][m.index]).astype(out_dt)

    groups = st_format.plan_shards(specs, max_shard_bytes)
    if len(groups) == 1:
        names = {"model.safetensors": groups[0]}
    else:
        names = {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups)}
    for fn, group in names.items():
        if write:
            st_format.write_file(os.path.join(out_dir, fn), {n: specs[n] for n in group}, produce)
        else:  # take part in the gathers
            for n in group:
                produce(n)
    if write:
        if len(groups) > 1:
            total = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in specs.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: fn for fn, g in names.items() for n in g}}
            with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config_to_hf(cfg.replace(dtype=dtype or cfg.dtype)), f, indent=2)
