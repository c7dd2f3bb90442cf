"""TPU flash attention (Pallas splash, run here in Pallas' interpreter) against the einsum path: values and
gradients of attention, whole-model logits of both families against transformers, on one device and sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arm_jax as aj
from arm_jax.models import abstract_model, layers
from tests import hf_models


def _qkv(B=2, H=4, K=2, T=100, Dh=16, Dv=16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, H, T, Dh)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, K, T, Dh)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, K, T, Dv)), jnp.float32)
    valid = np.ones((B, T), bool)
    valid[0, :17] = False  # a left-padded prompt
    valid[1, 71:] = False  # right padding after a response
    return q, k, v, jnp.asarray(valid)


@pytest.mark.parametrize("window", [None, 9])
def test_splash_equals_einsum_values_and_gradients(window):
    """T = 100 (padded to the kernel's 128 inside), GQA 4/2 heads, left and right padding, a sliding window."""
    q, k, v, valid = _qkv()
    mask = layers.AttentionMask.build(jnp.arange(q.shape[2]), valid, window, self_attention=True)
    real = valid[:, None, :, None]

    def loss(impl, q, k, v):
        out = layers.attention(q, k, v, mask, impl, scale=0.3)
        return jnp.sum(jnp.where(real, out, 0.0) ** 2), out

    (l_ref, ref), g_ref = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)("xla", q, k, v)
    (l_sp, out), g_sp = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True),
                                static_argnums=0)("splash", q, k, v)
    diff = float(jnp.max(jnp.abs(jnp.where(real, out - ref, 0.0))))
    print(f"window={window}: max |splash - einsum| = {diff:.1e}")
    assert diff < 2e-5 and float(jnp.std(ref)) > 0.1
    for a, b in zip(g_sp, g_ref):
        assert float(jnp.max(jnp.abs(a - b))) < 1e-4 * max(1.0, float(jnp.max(jnp.abs(b))))
    # a decode step (queries over a cache) is never a self-attention: splash falls back to the einsum path
    step = layers.AttentionMask.build(jnp.asarray([99]), valid, window)
    np.testing.assert_allclose(layers.attention(q[:, :, -1:], k, v, step, "splash"),
                               layers.attention(q[:, :, -1:], k, v, step, "xla"), atol=1e-6)


@pytest.mark.parametrize("window", [None, 9])
def test_splash_with_segment_ids_equals_block_diagonal_einsum(window):
    """Packed rows (`models.packing`): 2-3 sequences per row, padding at the end; splash with the segment ids equals
    the einsum path's block-diagonal causal mask, values and gradients."""
    q, k, v, _ = _qkv()
    seg = np.zeros((2, 100), np.int32)
    seg[0, :40], seg[0, 40:41], seg[0, 41:90] = 1, 2, 3  # a one-token sequence between two others
    seg[1, :64], seg[1, 64:100] = 1, 2
    seg = jnp.asarray(seg)
    mask = layers.AttentionMask.build(jnp.arange(100), seg > 0, window, self_attention=True, segment_ids=seg)
    assert not bool(mask.dense[0, 45, 39]) and bool(mask.dense[0, 45, 41])  # block-diagonal
    real = (seg > 0)[:, None, :, None]

    def loss(impl, q, k, v):
        out = layers.attention(q, k, v, mask, impl, scale=0.3)
        return jnp.sum(jnp.where(real, out, 0.0) ** 2), out

    (_, ref), g_ref = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)("xla", q, k, v)
    (_, out), g_sp = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True), static_argnums=0)(
        "splash", q, k, v)
    assert float(jnp.max(jnp.abs(jnp.where(real, out - ref, 0.0)))) < 2e-5
    for a, b in zip(g_sp, g_ref):
        assert float(jnp.max(jnp.abs(a - b))) < 1e-4 * max(1.0, float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("kind,mesh_shape,impl", [
    ("qwen2_gqa7", (1, 1, 1), "splash"), ("qwen3_odd", (2, 2, 2), "splash"), ("starcoder2_swa", (1, 8, 1), "splash"),
    ("deepseek_v2", (1, 8, 1), "splash"), ("starcoder2_swa", (1, 1, 1), "cudnn"), ("deepseek_v2", (1, 1, 1), "cudnn")])
def test_model_logits_with_splash_match_transformers(kind, mesh_shape, impl, hf_model, monkeypatch):
    """Splash in every layer, sharded over the batch (and heads) by shard_map: logits equal transformers'. The
    cuDNN path likewise (causal + lengths over each row's real tokens, no mask), its kernel swapped here for
    `jax.nn.dot_product_attention`'s XLA implementation."""
    calls = []
    if impl == "cudnn":
        fused = jax.nn.dot_product_attention
        monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: calls.append(k) or fused(
            *a, **{**k, "implementation": "xla"}))
    folder, ref_model = hf_model(kind)
    mesh = aj.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    policy = aj.load_policy(folder, mesh=mesh)
    cfg = policy.config.replace(attention_impl=impl)
    policy = policy.replace(config=cfg, graphdef=abstract_model(cfg)[0])
    tokens, mask = hf_models.padded_batch(cfg.vocab_size, lengths=(13, 9, 4, 13, 7, 13, 2, 11))
    ref = hf_models.reference_logits(ref_model, tokens, mask)
    ours = np.asarray(aj.forward_logits(policy, tokens, mask))
    diff = float(np.max(np.abs(ours - ref) * mask[..., None]))
    print(f"{kind} on {mesh_shape}: max |logits - transformers| with {impl} = {diff:.1e}")
    assert diff < 1e-4 and np.std(ref[mask == 1]) > 0.5
    assert (impl == "cudnn") == bool(calls) and all(c.get("mask") is None and c["is_causal"] for c in calls)


def test_rollout_passes_and_replicated_layout_give_the_same_samples(hf_model):
    """Rows in passes of 4 and a replicated sampler copy change neither tokens nor log-probs (the keys are fixed by
    the row index), on an 8-device ZeRO mesh."""
    folder, _ = hf_model("qwen2_gqa7")
    policy = aj.load_policy(folder, mesh=aj.make_mesh((1, 8, 1)))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24], [40]]
    kw = dict(max_new_tokens=9, temperature=1.0, n=4, seed=3, stop_ids=[])
    ref = aj.generate(policy, prompts, **kw)
    for opts in (dict(rows_per_pass=8), dict(param_layout="replicated"), dict(rows_per_pass=4,
                                                                            param_layout="replicated")):
        out = aj.generate(policy, prompts, **kw, **opts)
        np.testing.assert_array_equal(out.tokens, ref.tokens, err_msg=str(opts))
        np.testing.assert_allclose(out.logp, ref.logp, atol=1e-5, err_msg=str(opts))
    assert len(set(ref.tokens.ravel().tolist())) > 10
    with pytest.raises(ValueError, match="rows_per_pass=5 must divide the 16 rollout rows"):
        aj.generate(policy, prompts, **kw, rows_per_pass=5, engine="lockstep")


def test_mla_prefill_attends_over_the_prompt_only(hf_model, mesh1):
    """DeepSeek's prefill (expanded per head over the prompt) and decode (absorbed over the latent cache) agree with
    the no-cache forward: greedy continuations equal the argmax of full-sequence logits."""
    folder, _ = hf_model("deepseek_v2")
    policy = aj.load_policy(folder, mesh=mesh1)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    out = aj.generate(policy, prompts, max_new_tokens=6, temperature=0.0, stop_ids=[])
    tokens, attn, _ = out.sequences()
    logits = np.asarray(aj.forward_logits(policy, tokens, attn))
    Tp = out.prompt_tokens.shape[1]
    np.testing.assert_array_equal(out.tokens[:, 1:], np.argmax(logits[:, Tp:-1], axis=-1))
