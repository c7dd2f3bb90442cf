"""Plain dataclass configs with validation.

Library code takes these (or plain arguments); gin binds them only in `arm_jax.launch` and `gin_configs/`.
Every field documents its meaning and default.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SUPPORTED_ACTIVATIONS = ("silu", "relu", "gelu", "gelu_pytorch_tanh")  # HF ACT2FN names


class ConfigError(ValueError):
    """A configuration value is missing, malformed or unsupported; the message names the key."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding (RoPE).

    theta: base of the inverse frequencies, `inv_freq[i] = theta ** (-2i / head_dim)` (HF `rope_theta`).
    rope_type: 'default' (Su et al. 2021), 'linear' (positions / factor), 'llama3' (Llama 3.1 frequency-band
        scaling: low frequencies divided by `factor`, high ones kept, a smooth ramp between) or 'yarn' (Peng et al.
        2023, as DeepSeek-V2/V3 and long-context Qwen2.5 configure it: frequencies interpolated by `factor` outside
        the [beta_slow, beta_fast] rotation band, cos/sin scaled by an attention factor).
    factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: the scaling parameters
        (HF `rope_scaling` / `rope_parameters`), unused for 'default'.
    beta_fast (32), beta_slow (1), mscale, mscale_all_dim, attention_factor (None = from factor and the mscales),
        truncate (True): YaRN's parameters, with HF's defaults. DeepSeek additionally multiplies the softmax scale
        by `yarn_mscale(factor, mscale_all_dim) ** 2` (`arm_jax.models.layers.mla_softmax_scale`).
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: Optional[float] = None
    truncate: bool = True

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_type={self.rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if self.theta <= 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.theta}")


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434). Per token the KV cache holds only the
    normalized latent c_kv [kv_lora_rank] and the shared rotary key k_rope [qk_rope_head_dim].

    q_lora_rank: rank of the query down-projection (with its RMSNorm); None projects queries directly (V2-Lite).
    kv_lora_rank: rank of the joint key/value latent. qk_nope_head_dim / qk_rope_head_dim: per-head query/key dims
    without / with RoPE (the key's rope part is shared by all heads). v_head_dim: per-head value dim.
    rope_interleave: RoPE rotates adjacent pairs (x0, x1), (x2, x3), ... (DeepSeek's layout; HF
    `rope_interleave`, True for V2 and by default for V3) instead of the halves (x_i, x_{i+d/2}).
    attention_bias: q_a / kv_a / o projections carry biases (HF `attention_bias`).
    """

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: Optional[int] = None
    rope_interleave: bool = True
    attention_bias: bool = False

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: qk_nope_head_dim + qk_rope_head_dim."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture of experts with routed and shared experts (DeepSeekMoE, arXiv:2401.06066; V3, arXiv:2412.19437).

    num_experts (HF `n_routed_experts`), experts_per_token (top-k), expert_size (`moe_intermediate_size`),
    num_shared_experts (always-on experts, fused into one SwiGLU of width expert_size * num_shared_experts).
    first_k_dense_replace / moe_layer_freq (DeepSeek), mlp_only_layers / decoder_sparse_step (Qwen MoE): layer i is
        MoE iff i >= first_k_dense_replace, i % moe_layer_freq == 0, i not in mlp_only_layers and
        (i + 1) % decoder_sparse_step == 0; the others are dense SwiGLU of `intermediate_size`.
    shared_expert_size: the shared SwiGLU's width (Qwen2-MoE `shared_expert_intermediate_size`; default
        expert_size * num_shared_experts, DeepSeek's); shared_expert_gate: scale the shared output by
        sigmoid(x . w_gate) (Qwen2-MoE's `shared_expert_gate`).
    scoring: 'softmax' (V2) or 'sigmoid' (V3) router scores, computed in float32.
    topk_method: 'greedy' (top-k of the scores), 'group_limited_greedy' (V2: keep the topk_group groups with the
        highest max score) or 'noaux_tc' (V3: choose with scores + e_score_correction_bias, groups ranked by the sum
        of their two best, weights are the uncorrected scores).
    n_group, topk_group: expert groups for the group-limited methods.
    norm_topk_prob: renormalize the k weights to sum to 1; routed_scaling_factor: then multiply them by this.
    impl: 'ragged' (tokens sorted by expert, a grouped matmul per expert, dropless, k/E of the dense FLOPs) or
        'dense' (every expert on every token, weighted by the sparse combine matrix: E/k times the FLOPs, debugging).
    dispatch: 'auto' (expert-parallel under a mesh, else 'global'), 'expert_parallel' (a shard_map in which each
        device routes its own tokens and sends each (token, expert) pair to its expert's devices with an
        all-to-all over the 'expert' mesh axis; MaxText / tunix) or 'global' (the global pair list sorted and
        scattered by GSPMD, which replicates the routed activations: the layer before expert parallelism).
    kernel: the grouped matmul: 'auto' (Pallas megablox `gmm` when compiling for TPU, `jax.lax.ragged_dot`
        elsewhere), 'gmm' or 'ragged_dot'. exchange: the all-to-all: 'auto' (`jax.lax.ragged_all_to_all` on TPU
        and GPU, 'dense' elsewhere), 'ragged' or 'dense' (padded blocks through `all_to_all`, the same results).
        `arm_jax.models.moe` describes all three.
    capacity_factor: None (default): dropless, each device's receive buffer holds the worst case (ep x its
        pairs); c: a buffer of c x its pairs (memory and all-to-all bounded), each receiver taking its sources'
        blocks in order and dropping a block's later pairs where it overflows (they add nothing to their token;
        `moe/dropped_frac` logs the share, from the log-prob pass). Only the expert-parallel exchange drops.
    """

    num_experts: int
    experts_per_token: int
    expert_size: int
    num_shared_experts: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    scoring: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    mlp_only_layers: tuple[int, ...] = ()
    decoder_sparse_step: int = 1
    shared_expert_size: Optional[int] = None
    shared_expert_gate: bool = False
    impl: str = "ragged"
    dispatch: str = "auto"
    kernel: str = "auto"
    exchange: str = "auto"
    capacity_factor: Optional[float] = None

    def __post_init__(self):
        if self.scoring not in ("softmax", "sigmoid"):
            raise ConfigError(f"MoEConfig.scoring (HF scoring_func) must be 'softmax' or 'sigmoid', got "
                              f"{self.scoring!r}")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ConfigError(f"MoEConfig.topk_method={self.topk_method!r} is not supported (greedy, "
                              f"group_limited_greedy, noaux_tc)")
        for key, allowed in (("impl", ("ragged", "dense")), ("dispatch", ("auto", "expert_parallel", "global")),
                             ("kernel", ("auto", "ragged_dot", "gmm")), ("exchange", ("auto", "ragged", "dense"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"MoEConfig.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"MoEConfig.capacity_factor must be None (dropless) or > 0, got {self.capacity_factor}")
        if self.num_experts % self.n_group or not 0 < self.topk_group <= self.n_group:
            raise ConfigError(f"MoEConfig: n_group={self.n_group} must divide n_routed_experts={self.num_experts} "
                              f"and 0 < topk_group={self.topk_group} <= n_group")
        if not 0 < self.experts_per_token <= self.num_experts:
            raise ConfigError(f"MoEConfig: num_experts_per_tok={self.experts_per_token} must be in "
                              f"[1, n_routed_experts={self.num_experts}]")

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i is a mixture of experts (HF's DeepSeek and Qwen MoE rules; see the class doc)."""
        return (i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def shared_width(self) -> int:
        """The shared SwiGLU's width (0: no shared expert)."""
        if self.shared_expert_size is not None:
            return self.shared_expert_size
        return self.expert_size * self.num_shared_experts


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021, "LoRA") on a frozen base: each targeted kernel W computes
    x W + (alpha / rank) (x A) B, A [in, rank] (PEFT's init, uniform(+-1/sqrt(in))), B [rank, out] (zeros, so a
    new adapter leaves the base's outputs exactly). Each entry: name (default): meaning.

    rank (64): r, the adapters' inner width.
    alpha (128.0): the scale numerator (PEFT's lora_alpha); the term is scaled by alpha / rank.
    targets (all seven): which projections carry adapters, of 'q', 'k', 'v', 'o' (attention), 'gate', 'up',
        'down' (MLP; StarCoder2's plain MLP has 'up' = c_fc and 'down' = c_proj). DeepSeek's latent attention and
        routed experts are refused by name.
    """

    rank: int = 64
    alpha: float = 128.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRAConfig.rank must be a positive integer, got {self.rank!r}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise ConfigError(f"LoRAConfig.targets={self.targets!r}: each one of {LORA_TARGETS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A dense decoder-only transformer (Qwen2 / Qwen2.5 / Qwen3 / Llama / StarCoder2 architecture).

    model_type: the HF `model_type` the config came from ('qwen2', 'qwen3', 'llama', 'starcoder2'); informational
        and used to write config.json back.
    vocab_size, hidden_size (D), intermediate_size (F), num_layers (L), num_heads (H), num_kv_heads (K),
    head_dim (Dh; HF default hidden_size // num_heads): the shapes.
    qkv_bias: q/k/v projections carry a bias (Qwen2/2.5: True; Qwen3/Llama: `attention_bias`, usually False).
    o_bias: the output projection carries a bias (Llama `attention_bias`); mlp_bias likewise for the MLP.
    qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3).
    tie_word_embeddings: the LM head is the transposed token embedding.
    rms_norm_eps: epsilon of every norm (HF `rms_norm_eps`; StarCoder2's `norm_epsilon`).
    norm_type: 'rms' (RMSNorm: Qwen, Llama, DeepSeek) or 'layer' (LayerNorm with bias: StarCoder2).
    mlp_type: 'gated', `down(act(x @ gate) * (x @ up))` (Qwen, Llama, DeepSeek), or 'plain',
        `down(act(x @ up))` (StarCoder2's c_fc / c_proj).
    hidden_act: the MLP activation (HF `hidden_act`): for the gated MLP 'silu' = SwiGLU, every released
        Qwen/DeepSeek checkpoint, 'relu' = ReGLU, 'gelu' (erf) and 'gelu_pytorch_tanh' = GeGLU; StarCoder2's plain
        MLP uses 'gelu_pytorch_tanh'.
    sliding_window: attention reads only the last `sliding_window` positions (StarCoder2's `sliding_window`;
        None = full causal attention).
    rope: RoPE parameters.
    max_position_embeddings: the context length the checkpoint was trained for (prompts longer are an error).
    dtype: the compute dtype ('float32' or 'bfloat16'): activations, the KV cache, and the copy of the
        parameters every forward reads (each jitted stage casts `param_dtype` parameters to it once at its entry:
        `arm_jax.models.compute_params`). Softmax, norms' statistics, log-probs and losses are always float32.
    param_dtype: the storage dtype of the parameters (the float32 master weights the optimizer updates; default
        'float32', as Flax's `param_dtype`, MaxText's `weight_dtype` and verl's FSDP mixed precision). 'bfloat16'
        halves parameter memory for inference-only use; training bf16 parameters directly loses lr-1e-6 updates
        (they are below half a bf16 ulp for |w| > ~2.6e-4). MoE routers stay float32 whatever the two dtypes.
    attention_impl: 'xla' (einsum attention with an explicit float32 softmax; runs everywhere; materializes
        [B, H, T, S] scores), 'cudnn' (`jax.nn.dot_product_attention(implementation='cudnn')`, the fast path on
        NVIDIA GPUs) or 'splash' (Pallas splash attention, TPU flash attention for the learner, the log-prob passes
        and the prefill, `arm_jax.models.flash`; elsewhere it runs in Pallas' interpreter, for parity tests) or
        'pallas_decode' (decode steps through the Pallas kernel bounded by each row's length,
        `arm_jax.models.decode_kernel`; self-attention as 'splash'). 'auto' picks splash and the decode kernel when
        compiling for TPUs, 'cudnn' (bf16 / fp16 prefill) for GPUs and 'xla' elsewhere, in one place
        (`arm_jax.models.layers.resolve_attention_impl`).
    bos_token_id, eos_token_ids, pad_token_id: special ids from the checkpoint (informational; samplers take stop
        ids explicitly).
    mla, moe: DeepSeek-V2/V3's latent attention (`arm_jax.models.deepseek`) and the mixture of experts of
        DeepSeek, Qwen2-MoE and Qwen3-MoE (`arm_jax.models.moe`); None for dense models. With `mla`,
        num_kv_heads == num_heads and head_dim == mla.qk_head_dim.
    lora: low-rank adapters on the targeted projections (`LoRAConfig`, `arm_jax.models.lora`); None = none.
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
    norm_type: str = "rms"
    mlp_type: str = "gated"
    hidden_act: str = "silu"
    sliding_window: Optional[int] = None
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    max_position_embeddings: int = 32768
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "auto"
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: Optional[int] = None
    mla: Optional[MLAConfig] = None
    moe: Optional[MoEConfig] = None
    lora: Optional[LoRAConfig] = None

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
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_ACTIVATIONS)}")
        if self.norm_type not in ("rms", "layer"):
            raise ConfigError(f"ModelConfig.norm_type must be 'rms' or 'layer', got {self.norm_type!r}")
        if self.mlp_type not in ("gated", "plain"):
            raise ConfigError(f"ModelConfig.mlp_type must be 'gated' or 'plain', got {self.mlp_type!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ConfigError(f"ModelConfig.sliding_window must be None or a positive integer, got "
                              f"{self.sliding_window!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ConfigError(f"ModelConfig.{name} must be 'float32' or 'bfloat16', got {getattr(self, name)!r}")
        if self.attention_impl not in ("auto", "xla", "cudnn", "splash", "pallas_decode"):
            raise ConfigError(f"ModelConfig.attention_impl must be 'auto', 'xla', 'cudnn', 'splash' or "
                              f"'pallas_decode', got {self.attention_impl!r}")
        if self.lora is not None:
            attention = sorted(set(self.lora.targets) & {"q", "k", "v", "o"})
            if self.mla is not None and attention:
                raise ConfigError(f"LoRAConfig.targets {attention}: DeepSeek's latent attention (q_a/q_b/kv_a/kv_b "
                                  f"projections) has no LoRA adapters here; target the MLP only")
            if self.moe is not None and set(self.lora.targets) & {"gate", "up", "down"}:
                raise ConfigError(f"LoRAConfig.targets {self.lora.targets}: adapters on a mixture of experts' "
                                  f"routed experts are not supported; target attention ('q', 'k', 'v', 'o') only")

    @property
    def family(self) -> str:
        """The one place that decides the model family: 'deepseek' (MLA + MoE, `arm_jax.models.deepseek`) when
        `mla` is set, else 'dense' (`arm_jax.models.qwen2`)."""
        return "deepseek" if self.mla is not None else "dense"

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh: axes ('data', 'fsdp', 'tensor'), plus 'expert' for mixture-of-experts models.

    shape: devices per axis; exactly one entry may be -1 meaning "the rest of the devices". Default (1, -1, 1):
        all devices on 'fsdp' (ZeRO-3 style parameter sharding + data parallelism over the batch). A 4-entry shape
        adds the 'expert' axis: routed experts are sharded over it (expert parallelism) and the batch too.
    axis_names: the mesh axis names (logical-axis rules in `arm_jax.sharding` refer to them); default the first
        len(shape) of ('data', 'fsdp', 'tensor', 'expert').
    """

    shape: tuple[int, ...] = (1, -1, 1)
    axis_names: Optional[tuple[str, ...]] = None

    def __post_init__(self):
        if self.axis_names is None:
            if len(self.shape) not in (3, 4):
                raise ConfigError(f"mesh.shape {self.shape} must have 3 entries (data, fsdp, tensor) or 4 "
                                  f"(data, fsdp, tensor, expert)")
            object.__setattr__(self, "axis_names", ("data", "fsdp", "tensor", "expert")[:len(self.shape)])
        if len(self.shape) != len(self.axis_names):
            raise ConfigError(f"mesh.shape {self.shape} must have one entry per axis {self.axis_names}")
        if sum(1 for s in self.shape if s == -1) > 1:
            raise ConfigError(f"mesh.shape {self.shape}: at most one axis may be -1")
        if any(s == 0 or s < -1 for s in self.shape):
            raise ConfigError(f"mesh.shape {self.shape}: entries must be positive or -1")
