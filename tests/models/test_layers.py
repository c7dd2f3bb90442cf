"""Attention implementations agree (with and without a sliding window); LayerNorm; the tokenizer folder is picked up
by load_policy."""

import jax.numpy as jnp
import numpy as np
import pytest

import arm_jax as aj
from arm_jax.models import layers


def test_fused_attention_path_matches_einsum():
    """The `jax.nn.dot_product_attention` branch (cuDNN on GPUs) gets the same mask/GQA wiring as the einsum one;
    on CPU it is checked through its XLA implementation."""
    rng = np.random.RandomState(0)
    B, T, S, H, K, Dh = 2, 5, 7, 6, 2, 8
    q = jnp.asarray(rng.randn(B, H, T, Dh), jnp.float32)
    k = jnp.asarray(rng.randn(B, K, S, Dh), jnp.float32)
    v = jnp.asarray(rng.randn(B, K, S, Dh), jnp.float32)
    kv_valid = jnp.asarray([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]], bool)
    mask = layers.attention_mask(jnp.arange(2, 2 + T), kv_valid)
    ours = layers.attention(q, k, v, mask, "xla")
    fused = layers.attention(q, k, v, mask, "jax")
    np.testing.assert_allclose(np.asarray(ours), np.asarray(fused), atol=1e-5)
    # Reference: per-head softmax over allowed keys, written out directly.
    qh = np.asarray(q)
    kh = np.repeat(np.asarray(k), H // K, axis=1)
    vh = np.repeat(np.asarray(v), H // K, axis=1)
    s = np.einsum("bhtd,bhsd->bhts", qh, kh) / np.sqrt(Dh)
    s = np.where(np.asarray(mask)[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(ours), np.einsum("bhts,bhsd->bhtd", p, vh), atol=1e-5)


@pytest.mark.parametrize("window", [None, 9])
def test_fused_self_attention_takes_causal_and_lengths_not_a_dense_mask(window, monkeypatch):
    """An unpacked self-attention reaches `jax.nn.dot_product_attention` (cuDNN on GPUs, its XLA implementation
    here) as causal + sequence lengths over each row's real tokens gathered to the front, never as a mask: values
    and gradients equal the einsum path's for left-padded, right-padded, unpadded and (no window) gappy rows."""
    import jax
    calls = []
    fused = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, **k: calls.append(k) or fused(*a, **k))
    rng = np.random.default_rng(1)
    B, H, K, T, Dh = 4, 4, 2, 40, 16
    q, k, v = (jnp.asarray(rng.normal(size=(B, n, T, Dh)), jnp.float32) for n in (H, K, K))
    valid = np.ones((B, T), bool)
    valid[0, :13] = False  # a left-padded prompt
    valid[1, :5], valid[1, 31:] = False, False  # prompt + response: padding on both sides
    if window is None:
        valid[3, 20:24] = False  # a gap (no layout arm_jax builds has one; exact without a window)
    mask = layers.AttentionMask.build(jnp.arange(T), jnp.asarray(valid), window, self_attention=True)
    real = jnp.asarray(valid)[:, None, :, None]

    def loss(impl, q, k, v):
        out = layers.attention(q, k, v, mask, impl, scale=0.3)
        return jnp.sum(jnp.where(real, out, 0.0) ** 2), out

    grad = lambda impl: jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(impl, q, k, v)  # noqa: E731
    (_, ref), g_ref = grad("xla")
    (_, out), g_out = grad("jax")
    assert calls and all(c.get("mask") is None and c["is_causal"] and c.get("bias") is None for c in calls)
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=2e-6)
    assert float(jnp.max(jnp.abs(jnp.where(real, 0.0, out)))) == 0.0  # padding queries: zeros, no NaN
    for a, b in zip(g_out, g_ref):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, atol=2e-5)
    half = layers.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask, "jax", scale=0.3)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.where(real, half.astype(jnp.float32), 0), np.where(real, ref, 0), atol=0.05)


def test_tokenizer_folder_is_loaded(hf_model, mesh1, tmp_path):
    import shutil
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    folder = tmp_path / "ckpt"
    shutil.copytree(hf_model("qwen2_tied")[0], folder)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>").save_pretrained(folder)
    policy = aj.load_policy(str(folder), mesh=mesh1)
    # (transformers 5 picks the tokenizer class from config.json's model_type, so only the vocabulary is checked
    # on this toy WordLevel tokenizer; the real Qwen/DeepSeek tokenizers are tested with the data pipeline.)
    assert policy.tokenizer.convert_tokens_to_ids(["hello", "world"]) == [3, 4]
    aj.save_policy(policy, str(tmp_path / "out"))
    again = aj.load_policy(str(tmp_path / "out"), mesh=mesh1)
    assert again.tokenizer.eos_token == "</s>" and again.tokenizer.convert_tokens_to_ids("world") == 4


def test_every_supported_activation_is_implemented():
    """ModelConfig accepts exactly the activations the gated MLP implements (config.py cannot import layers)."""
    from arm_jax.config import SUPPORTED_ACTIVATIONS
    assert set(layers.ACTIVATIONS) == set(SUPPORTED_ACTIVATIONS)
    x = jnp.array([-1.0, 0.5])
    np.testing.assert_allclose(layers.ACTIVATIONS["relu"](x), [0.0, 0.5])
    np.testing.assert_allclose(layers.ACTIVATIONS["gelu"](x), [-0.158655, 0.345731], atol=1e-6)


def test_sliding_window_mask():
    """Query slot q reads slot s iff s <= q, q - s < window and s is valid (HF's sliding-window rule)."""
    kv_valid = jnp.asarray([[0, 1, 1, 1, 1, 1]], bool)
    mask = np.asarray(layers.attention_mask(jnp.arange(6), kv_valid, window=3))[0]
    expected = np.array([[(s <= q) and (q - s < 3) and s >= 1 for s in range(6)] for q in range(6)])
    np.testing.assert_array_equal(mask, expected)
    full = np.asarray(layers.attention_mask(jnp.arange(6), kv_valid))[0]
    assert full[5, 1] and not mask[5, 1]


def test_layer_norm_matches_formula():
    from flax import nnx
    rng = np.random.RandomState(0)
    with nnx.use_eager_sharding(False):
        ln = layers.LayerNorm(8, 1e-5, jnp.float32, None)
        w, b = rng.randn(8).astype(np.float32), rng.randn(8).astype(np.float32)
        ln.weight[...], ln.bias[...] = jnp.asarray(w), jnp.asarray(b)
        x = rng.randn(3, 8).astype(np.float32) * 4 + 2
        ours = np.asarray(ln(jnp.asarray(x)))
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("platform, dtype, self_attention, packed, expected", [
    ("gpu", "bfloat16", True, False, "cudnn"), ("gpu", "float16", True, False, "cudnn"),  # a prefill
    ("gpu", "bfloat16", True, True, "xla"),    # packed rows: no segment ids in JAX's cuDNN API, never a dense bias
    ("gpu", "float32", True, False, "xla"),    # JAX's cuDNN attention rejects float32 (aj.load_policy's default)
    ("gpu", "bfloat16", False, False, "xla"),  # a decode step: one query over the cache
    ("tpu", "bfloat16", True, False, "splash"), ("tpu", "bfloat16", True, True, "splash"),  # segment ids
    ("tpu", "float32", True, False, "splash"), ("tpu", "bfloat16", False, False, "pallas_decode"),  # row-bounded
    ("cpu", "bfloat16", True, False, "xla"), ("cpu", "float32", True, True, "xla"),
    ("cpu", "float32", False, False, "xla"),
])
def test_auto_attention_by_platform_dtype_and_phase(monkeypatch, platform, dtype, self_attention, packed, expected):
    monkeypatch.setattr(layers, "target_platform", lambda: platform)
    assert layers.resolve_attention_impl("auto", jnp.dtype(dtype), self_attention, packed) == expected
    assert layers.resolve_attention_impl("xla", jnp.dtype(dtype), self_attention, packed) == "xla"  # explicit wins
    T = 4
    seg = jnp.asarray([[1, 1, 2, 0]]) if packed else None
    mask = layers.AttentionMask.build(jnp.arange(T) if self_attention else jnp.asarray([T - 1]),
                                      jnp.ones((1, T), bool), self_attention=self_attention, segment_ids=seg)
    assert mask.impl("auto", jnp.dtype(dtype)) == expected  # what the model files call
