"""The TPU decode kernel bounded by each row's length (`models.decode_kernel`, Pallas' interpreter here) against the
einsum path: one decode step (rows of every shape of valid run, an empty row, GQA, bf16), sharded over 8 devices,
and whole generations (both engines, greedy and sampled) giving the einsum path's tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arm_jax as aj
from arm_jax.models import abstract_model, layers
from arm_jax.models.decode_kernel import block_size, decode_attention, row_bounds


def _step(dtype=jnp.float32, B=6, H=6, K=2, S=96, Dh=16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, H, 1, Dh)), dtype)
    k = jnp.asarray(rng.normal(size=(B, K, S, Dh)), dtype)
    v = jnp.asarray(rng.normal(size=(B, K, S, Dh)), dtype)
    valid = np.zeros((B, S), bool)
    runs = [(10, 50), (0, 96), (30, 31), (0, 0), (31, 65), (95, 96)]  # one slot, all, none, block edges
    for b, (s, e) in enumerate(runs[:B]):
        valid[b, s:e] = True
    q_slot = np.asarray([max(e - 1, 0) for _, e in runs[:B]])
    return q, k, v, jnp.asarray(valid), jnp.asarray(q_slot)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_decode_kernel_equals_einsum(dtype, tol):
    q, k, v, valid, q_slot = _step(dtype)
    assert block_size(96) == 32
    start, end = row_bounds(valid)
    np.testing.assert_array_equal(start, [10, 0, 30, 0, 31, 95])
    np.testing.assert_array_equal(end, [50, 96, 31, 0, 65, 96])
    mask = layers.AttentionMask.build(q_slot[:, None], valid)
    ref = np.asarray(layers.attention(q, k, v, mask, "xla", scale=0.25), np.float32)
    out = np.asarray(decode_attention(q, k, v, valid, scale=0.25), np.float32)
    has_keys = np.asarray(valid).any(axis=1)
    assert np.abs(out - ref)[has_keys].max() < tol and float(np.abs(ref).max()) > 0.3
    assert (out[~has_keys] == 0).all()  # a row without keys (an idle slot) returns zeros, never NaN
    np.testing.assert_allclose(np.asarray(layers.attention(q, k, v, mask, "pallas_decode", scale=0.25),
                                          np.float32)[has_keys], out[has_keys])


def test_decode_kernel_sharded_equals_unsharded():
    q, k, v, valid, q_slot = _step(B=8 - 2, H=4, K=4)
    pad = lambda x: jnp.concatenate([x, x[:2]], axis=0)  # noqa: E731  8 rows over 8 devices
    q, k, v, valid = pad(q), pad(k), pad(v), pad(valid)
    ref = np.asarray(decode_attention(q, k, v, valid, scale=0.3))
    mesh = aj.make_mesh((1, 4, 2))  # rows over 4 'fsdp' devices, kv heads over 2 'tensor' devices
    with jax.set_mesh(mesh):
        out = np.asarray(jax.jit(lambda *a: decode_attention(*a, scale=0.3))(q, k, v, valid))
    np.testing.assert_allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("engine", ["refill", "lockstep"])
def test_generation_with_the_decode_kernel_equals_einsum(engine, hf_model, mesh1):
    """Greedy and sampled generations (prompts of different lengths, GQA 7/1 heads) with every decode step in the
    kernel give the einsum path's tokens and log-probs."""
    folder, _ = hf_model("qwen2_gqa7")
    base = aj.load_policy(folder, mesh=mesh1)
    cfg = base.config.replace(attention_impl="pallas_decode")
    kernel = base.replace(config=cfg, graphdef=abstract_model(cfg)[0])
    xla_cfg = base.config.replace(attention_impl="xla")
    einsum = base.replace(config=xla_cfg, graphdef=abstract_model(xla_cfg)[0])
    prompts = [[5, 9, 17, 33, 2], [7, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
    assert block_size(16 + 16) and block_size(24)  # the cache (prompt bucket 16 + 16) and the refill windows
    calls = []
    import arm_jax.models.decode_kernel as dk
    real = dk.decode_attention
    dk.decode_attention = lambda *a, **k: calls.append(1) or real(*a, **k)  # counted when traced
    try:
        for temperature in (0.0, 1.0):
            outs = [aj.generate(p, prompts, max_new_tokens=16, temperature=temperature, n=2, seed=3, stop_ids=[],
                                engine=engine, slots=4 if engine == "refill" else None) for p in (kernel, einsum)]
            np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
            np.testing.assert_allclose(outs[0].logp, outs[1].logp, atol=1e-4)
    finally:
        dk.decode_attention = real
    assert calls  # the decode steps went through the kernel


def test_a_step_the_kernel_cannot_take_falls_back_with_a_warning(caplog):
    """A sliding-window model's decode step under 'pallas_decode' takes the einsum path (same values) and says so
    once, naming why."""
    q, k, v, valid, q_slot = _step()
    mask = layers.AttentionMask.build(q_slot[:, None], valid, window=8)
    with caplog.at_level("WARNING"):
        out = layers.attention(q, k, v, mask, "pallas_decode", scale=0.25)
    np.testing.assert_allclose(out, layers.attention(q, k, v, mask, "xla", scale=0.25))
    assert "window=8" in caplog.text and "einsum path" in caplog.text
