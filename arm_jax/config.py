"""Plain dataclass configs with validation.

Library code takes these (or plain arguments); gin binds them only in `arm_jax.launch` and `gin_configs/`.
Every field documents its meaning and default.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu",)


class ConfigError(ValueError):
    """A configuration value is missing, malformed or unsupported; the message names the key."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding (RoPE).

    theta: base of the inverse frequencies, `inv_freq[i] = theta ** (-2i / head_dim)` (HF `rope_theta`).
    rope_type: 'default' (Su et al. 2021), 'linear' (positions / factor) or 'llama3' (Llama 3.1 frequency-band
        scaling: low frequencies divided by `factor`, high ones kept, a smooth ramp between).
    factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: the scaling parameters
        (HF `rope_scaling` / `rope_parameters`), unused for 'default'.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_type={self.rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if self.theta <= 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.theta}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A dense decoder-only transformer (Qwen2 / Qwen2.5 / Qwen3 / Llama architecture).

    model_type: the HF `model_type` the config came from ('qwen2', 'qwen3', 'llama'); informational and used to
        write config.json back.
    vocab_size, hidden_size (D), intermediate_size (F), num_layers (L), num_heads (H), num_kv_heads (K),
    head_dim (Dh; HF default hidden_size // num_heads): the shapes.
    qkv_bias: q/k/v projections carry a bias (Qwen2/2.5: True; Qwen3/Llama: `attention_bias`, usually False).
    o_bias: the output projection carries a bias (Llama `attention_bias`); mlp_bias likewise for the MLP.
    qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3).
    tie_word_embeddings: the LM head is the transposed token embedding.
    rms_norm_eps: epsilon of every RMSNorm.
    rope: RoPE parameters.
    max_position_embeddings: the context length the checkpoint was trained for (prompts longer are an error).
    dtype: parameter and activation dtype ('float32' or 'bfloat16'); softmax, norms' statistics, log-probs and
        losses are always float32.
    attention_impl: 'xla' (einsum attention with an explicit float32 softmax; runs everywhere) or 'cudnn'
        (`jax.nn.dot_product_attention(implementation='cudnn')`, the fast path on NVIDIA GPUs). 'auto' picks
        'cudnn' on a GPU backend and 'xla' elsewhere, in one place (`arm_jax.models.layers.resolve_attention_impl`).
    bos_token_id, eos_token_ids, pad_token_id: special ids from the checkpoint (informational; samplers take stop
        ids explicitly).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_type: str = "qwen2"
    qkv_bias: bool = True
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    max_position_embeddings: int = 32768
    dtype: str = "float32"
    attention_impl: str = "auto"
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"ModelConfig.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.attention_impl not in ("auto", "xla", "cudnn"):
            raise ConfigError(f"ModelConfig.attention_impl must be 'auto', 'xla' or 'cudnn', got "
                              f"{self.attention_impl!r}")

    @property
    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        D, F, H, K, Dh, V = (self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads,
                             self.head_dim, self.vocab_size)
        attn = D * (H + 2 * K) * Dh + H * Dh * D
        if self.qkv_bias:
            attn += (H + 2 * K) * Dh
        if self.o_bias:
            attn += D
        if self.qk_norm:
            attn += 2 * Dh
        mlp = 3 * D * F + (2 * F + D if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * D
        head = 0 if self.tie_word_embeddings else D * V
        return V * D + self.num_layers * per_layer + D + head

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh: axes ('data', 'fsdp', 'tensor').

    shape: devices per axis; exactly one entry may be -1 meaning "the rest of the devices". Default (1, -1, 1):
        all devices on 'fsdp' (ZeRO-3 style parameter sharding + data parallelism over the batch).
    axis_names: the mesh axis names (logical-axis rules in `arm_jax.sharding` refer to them).
    """

    shape: tuple[int, ...] = (1, -1, 1)
    axis_names: tuple[str, ...] = ("data", "fsdp", "tensor")

    def __post_init__(self):
        if len(self.shape) != len(self.axis_names):
            raise ConfigError(f"mesh.shape {self.shape} must have one entry per axis {self.axis_names}")
        if sum(1 for s in self.shape if s == -1) > 1:
            raise ConfigError(f"mesh.shape {self.shape}: at most one axis may be -1")
        if any(s == 0 or s < -1 for s in self.shape):
            raise ConfigError(f"mesh.shape {self.shape}: entries must be positive or -1")
