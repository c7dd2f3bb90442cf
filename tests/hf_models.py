"""Tiny random transformers models (float32, eager attention) used as references.

Every parameter is randomized (biases and norm weights too, which HF initializes to constants), so a transposed,
swapped or skipped tensor cannot go unnoticed.
"""

import numpy as np
import torch

# name -> (config class name, kwargs). Covers GQA ratios 1, 2 and 7, tied/untied, odd hidden size, non-default
# rope_theta, llama3 and YaRN rope scaling, attention and MLP biases, gate activations silu/relu/gelu/gelu-tanh,
# StarCoder2's LayerNorm + plain MLP + sliding window.
KINDS = {
    "qwen2_tied": ("Qwen2Config", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, vocab_size=211,
                                       tie_word_embeddings=True, rope_theta=1_000_000.0)),
    "qwen2_gqa7": ("Qwen2Config", dict(hidden_size=56, intermediate_size=80, num_hidden_layers=2,
                                       num_attention_heads=7, num_key_value_heads=1, vocab_size=150,
                                       tie_word_embeddings=False, rope_theta=5000.0)),
    "qwen3_odd": ("Qwen3Config", dict(hidden_size=75, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=180,
                                      tie_word_embeddings=False, rope_theta=1_000_000.0, hidden_act="gelu")),
    "llama3": ("LlamaConfig", dict(hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=190,
                                   rope_theta=500_000.0, max_position_embeddings=131072,
                                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                     high_freq_factor=4.0, original_max_position_embeddings=64))),
    "qwen2_yarn": ("Qwen2Config", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, vocab_size=100,
                                       max_position_embeddings=64, rope_theta=10000.0, hidden_act="relu",
                                       rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                         original_max_position_embeddings=16))),
    "llama_bias": ("LlamaConfig", dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=6, num_key_value_heads=3, head_dim=8, vocab_size=120,
                                       attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                                       hidden_act="gelu_pytorch_tanh")),
    # StarCoder2: LayerNorm (with bias), plain c_fc/c_proj MLP, biases everywhere; a sliding window shorter than
    # the test sequences so the window mask is exercised; ReLU as in the quick-start.
    "starcoder2_swa": ("Starcoder2Config", dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=130,
                                                sliding_window=5, hidden_act="relu", norm_epsilon=1e-5)),
}

_MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12)
# DeepSeek MLA + MoE: V2-Lite style (no q low rank, softmax group-limited routing, interleaved RoPE) and V3 style
# (q low rank, sigmoid + correction bias, group top-2 sums, norm_topk_prob, YaRN with mscale), and V3 with
# rotate-half RoPE, every layer MoE and greedy-equivalent groups.
DEEPSEEK_KINDS = {
    "deepseek_v2": ("DeepseekV2Config", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=160, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1,
        q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
        **_MLA)),
    "deepseek_v3": ("DeepseekV3Config", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=170, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        max_position_embeddings=64, rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                       original_max_position_embeddings=16, beta_fast=32,
                                                       beta_slow=1, mscale=0.707, mscale_all_dim=1.0),
        **_MLA)),
    "deepseek_v3_halves": ("DeepseekV3Config", dict(
        hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=150, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
        q_lora_rank=16, n_group=1, topk_group=1, norm_topk_prob=False, rope_interleave=False,
        routed_scaling_factor=1.0, tie_word_embeddings=False, **_MLA)),
}


# Qwen MoE: Qwen3-MoE (q/k norms, softmax top-k renormalized, a dense layer by mlp_only_layers) and Qwen2-MoE
# (q/k/v bias, a sigmoid-gated shared expert, every other layer sparse by decoder_sparse_step, no renormalization).
QWEN_MOE_KINDS = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=150, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[1], rope_theta=10000.0)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(
        hidden_size=48, intermediate_size=80, moe_intermediate_size=24, shared_expert_intermediate_size=40,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=150, num_experts=8,
        num_experts_per_tok=3, norm_topk_prob=False, decoder_sparse_step=2, rope_theta=10000.0)),
}


def build(kind: str, seed: int = 0):
    import transformers
    cls_name, kwargs = {**KINDS, **DEEPSEEK_KINDS, **QWEN_MOE_KINDS}[kind]
    cfg = getattr(transformers, cls_name)(**kwargs, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                                          dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * (0.2 if p.ndim > 1 else 0.1)
            p.copy_(1.0 + noise if "norm" in name else noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # V3's routing bias (a buffer, zero at init)
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return model.eval()


def reference_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers logits with position ids consistent with left padding."""
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


def padded_batch(vocab: int, lengths=(13, 9, 4, 13), seed: int = 0):
    """Left-padded tokens/mask [B, T] with rows of the given lengths."""
    rng = np.random.RandomState(seed)
    T = max(lengths)
    tokens = rng.randint(3, vocab, size=(len(lengths), T)).astype(np.int32)
    mask = np.zeros_like(tokens)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
        tokens[b, :T - n] = 0
    return tokens, mask


def logits_diff(policy, model, lengths=(13, 9, 4, 13)):
    """(max |arm_jax logits - transformers'| over real tokens, transformers' logits, mask) on a left-padded
    batch of rows of `lengths`."""
    import arm_jax as aj
    tokens, mask = padded_batch(policy.config.vocab_size, lengths)
    ref = reference_logits(model, tokens, mask)
    ours = np.asarray(aj.forward_logits(policy, tokens, mask))
    return float(np.max(np.abs(ours - ref) * mask[..., None])), ref, mask
