"""DeepSeek-V2 / V3 checkpoints: config.json <-> ModelConfig (MLA + MoE) and the tensor map.

On disk every routed expert is its own tensors (`mlp.experts.{e}.gate_proj.weight`, as DeepSeek ships them and
transformers writes them); in memory the experts of a layer are one stacked [E, ...] parameter, so a tensor map
entry may cover one slice of a parameter (`TensorMap.index`). Multi-token-prediction layers
(`model.layers.{L + j}`, `num_nextn_predict_layers`) are not part of the causal LM and are skipped on load.
"""

from __future__ import annotations

from typing import Any, Optional

from arm_jax.config import ConfigError, MLAConfig, ModelConfig, MoEConfig
from arm_jax.models.tensor_map import TensorMap, identity, moe_maps, swiglu_maps, transpose

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


def config_from_hf(raw: dict, source: str, common: dict[str, Any]) -> ModelConfig:
    """`common`: the fields every family shares (vocab, hidden, layers, heads, norms, rope, dtype, special ids)."""
    v3 = raw["model_type"] == "deepseek_v3"
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        if raw.get(key) is None:
            raise ConfigError(f"{source}: missing required key {key!r} (DeepSeek multi-head latent attention)")
    mla = MLAConfig(kv_lora_rank=raw["kv_lora_rank"], qk_nope_head_dim=raw["qk_nope_head_dim"],
                    qk_rope_head_dim=raw["qk_rope_head_dim"], v_head_dim=raw["v_head_dim"],
                    q_lora_rank=raw.get("q_lora_rank"), rope_interleave=bool(raw.get("rope_interleave", True)),
                    attention_bias=bool(raw.get("attention_bias", False)))
    moe: Optional[MoEConfig] = None
    experts = raw.get("n_routed_experts")
    if experts:
        for key in ("num_experts_per_tok", "moe_intermediate_size"):
            if raw.get(key) is None:
                raise ConfigError(f"{source}: n_routed_experts={experts} but {key!r} is missing")
        try:
            moe = MoEConfig(
                num_experts=experts, experts_per_token=raw["num_experts_per_tok"],
                expert_size=raw["moe_intermediate_size"], num_shared_experts=raw.get("n_shared_experts") or 0,
                first_k_dense_replace=raw.get("first_k_dense_replace", 0), moe_layer_freq=raw.get("moe_layer_freq", 1),
                scoring="sigmoid" if v3 else raw.get("scoring_func", "softmax"),
                topk_method="noaux_tc" if v3 else raw.get("topk_method", "greedy"),
                n_group=raw.get("n_group") or 1, topk_group=raw.get("topk_group") or 1,
                norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
                routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from e
    heads = common["num_heads"]
    return ModelConfig(model_type=raw["model_type"], intermediate_size=raw["intermediate_size"],
                       num_kv_heads=heads, head_dim=mla.qk_head_dim, qkv_bias=False, o_bias=False,
                       mlp_bias=bool(raw.get("mlp_bias", False)), qk_norm=False, mla=mla, moe=moe, **common)


def config_to_hf(cfg: ModelConfig, out: dict) -> dict:
    """Adds the MLA/MoE keys to the shared part of config.json (`out`)."""
    m, moe = cfg.mla, cfg.moe
    out.update(num_key_value_heads=cfg.num_heads, head_dim=m.qk_rope_head_dim, q_lora_rank=m.q_lora_rank,
               kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
               qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, attention_bias=m.attention_bias,
               mlp_bias=cfg.mlp_bias)
    if cfg.model_type == "deepseek_v3":
        out["rope_interleave"] = m.rope_interleave
    if moe is not None:
        out.update(n_routed_experts=moe.num_experts, num_experts_per_tok=moe.experts_per_token,
                   moe_intermediate_size=moe.expert_size, n_shared_experts=moe.num_shared_experts,
                   first_k_dense_replace=moe.first_k_dense_replace, moe_layer_freq=moe.moe_layer_freq,
                   scoring_func=moe.scoring, topk_method=moe.topk_method, n_group=moe.n_group,
                   topk_group=moe.topk_group, norm_topk_prob=moe.norm_topk_prob,
                   routed_scaling_factor=moe.routed_scaling_factor)
    return out


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Per-layer attention/MLP maps (the embedding, final norm and head are the shared ones)."""
    m, moe = cfg.mla, cfg.moe
    D, F, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads
    ident = identity

    def heads_out(n_in, width):  # HF [H * width, n_in] <-> ours [n_in, H, width]
        return (lambda a: a.T.reshape(n_in, H, width)), (lambda a: a.reshape(n_in, H * width).T)

    kv_width = m.qk_nope_head_dim + m.v_head_dim
    maps = []
    for i in range(cfg.num_layers):
        p, L = f"model.layers.{i}.", ("layers", i)
        a, A = p + "self_attn.", L + ("attn",)
        maps += [
            TensorMap(p + "input_layernorm.weight", L + ("input_norm", "weight"), (D,), ident, ident),
            TensorMap(p + "post_attention_layernorm.weight", L + ("post_norm", "weight"), (D,), ident, ident),
            TensorMap(a + "kv_a_proj_with_mqa.weight", A + ("kv_a",), (m.kv_lora_rank + m.qk_rope_head_dim, D),
                      transpose, transpose),
            TensorMap(a + "kv_a_layernorm.weight", A + ("kv_a_norm", "weight"), (m.kv_lora_rank,), ident, ident),
            TensorMap(a + "kv_b_proj.weight", A + ("kv_b",), (H * kv_width, m.kv_lora_rank),
                      *heads_out(m.kv_lora_rank, kv_width)),
            TensorMap(a + "o_proj.weight", A + ("o",), (D, H * m.v_head_dim),
                      lambda x: x.T.reshape(H, m.v_head_dim, D), lambda x: x.reshape(H * m.v_head_dim, D).T),
        ]
        if m.q_lora_rank:
            maps += [
                TensorMap(a + "q_a_proj.weight", A + ("q_a",), (m.q_lora_rank, D), transpose, transpose),
                TensorMap(a + "q_a_layernorm.weight", A + ("q_a_norm", "weight"), (m.q_lora_rank,), ident, ident),
                TensorMap(a + "q_b_proj.weight", A + ("q_b",), (H * m.qk_head_dim, m.q_lora_rank),
                          *heads_out(m.q_lora_rank, m.qk_head_dim))]
        else:
            maps.append(TensorMap(a + "q_proj.weight", A + ("q",), (H * m.qk_head_dim, D),
                                  *heads_out(D, m.qk_head_dim)))
        if m.attention_bias:
            if m.q_lora_rank:
                maps.append(TensorMap(a + "q_a_proj.bias", A + ("q_a_bias",), (m.q_lora_rank,), ident, ident))
            maps += [TensorMap(a + "kv_a_proj_with_mqa.bias", A + ("kv_a_bias",),
                               (m.kv_lora_rank + m.qk_rope_head_dim,), ident, ident),
                     TensorMap(a + "o_proj.bias", A + ("o_bias",), (D,), ident, ident)]
        M = L + ("mlp",)
        if moe is not None and moe.is_moe_layer(i):
            maps += moe_maps(p + "mlp.", M, D, moe, "shared_experts.", cfg.mlp_bias)
        else:
            maps += swiglu_maps(p + "mlp.", M, D, F, cfg.mlp_bias)
    return maps


def is_mtp_tensor(name: str, cfg: ModelConfig) -> bool:
    """Tensors of multi-token-prediction layers (index >= num_layers), which the causal LM does not use."""
    if not name.startswith("model.layers."):
        return False
    index = name.split(".")[2]
    return index.isdigit() and int(index) >= cfg.num_layers
