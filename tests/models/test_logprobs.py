"""Chunked log-probs/entropy equal log_softmax-and-gather on full logits, in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arm_jax as aj
from arm_jax.policy import hidden_states, logprobs_fn
from tests import hf_models


def _naive(graphdef, params, tokens, mask, temperature):
    hidden, model = hidden_states(graphdef, params, tokens, mask)
    logits = model.logits(hidden) / temperature  # [B, T, V] float32
    logsm = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    logp = jnp.take_along_axis(logsm, tokens[:, 1:, None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logsm) * logsm, axis=-1)
    valid = (mask[:, 1:] * mask[:, :-1]).astype(bool)
    pad = jnp.zeros((tokens.shape[0], 1))
    return (jnp.concatenate([pad, jnp.where(valid, logp, 0.0)], 1),
            jnp.concatenate([pad, jnp.where(valid, ent, 0.0)], 1))


def _objective(fn):
    def f(params, tokens, mask, w1, w2):
        logp, ent = fn(params, tokens, mask)
        return jnp.sum(logp * w1) + 0.3 * jnp.sum(ent * w2)
    return f


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_equals_naive(tied, mesh1):
    cfg = aj.ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, tie_word_embeddings=tied, model_type="qwen2")
    policy = aj.init_policy(cfg, seed=1, mesh=mesh1)
    tokens, mask = hf_models.padded_batch(cfg.vocab_size, lengths=(11, 6, 11))  # B*(T-1) = 30
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    rng = np.random.RandomState(0)
    w1, w2 = rng.randn(*tokens.shape), rng.randn(*tokens.shape)
    temperature = 0.7
    g = policy.graphdef
    ref_vals = _naive(g, policy.params, tokens, mask, temperature)
    ref_grad = jax.grad(_objective(lambda p, t, m: _naive(g, p, t, m, temperature)))(
        policy.params, tokens, mask, w1, w2)
    for chunk in (1, 7, 16, 30, 1000):  # 7 and 16 do not divide 30
        vals = logprobs_fn(g, policy.params, tokens, mask, temperature, chunk_size=chunk)
        for ours, ref in zip(vals, ref_vals):
            np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-5, rtol=1e-5)
        grad = jax.grad(_objective(lambda p, t, m: logprobs_fn(g, p, t, m, temperature, chunk_size=chunk)))(
            policy.params, tokens, mask, w1, w2)
        for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(grad),
                                     jax.tree_util.tree_leaves_with_path(ref_grad)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4, err_msg=str(path))
    # sanity on the values themselves: log-probs are <= 0, entropies in [0, log V], zeros where masked.
    logp, ent = ref_vals
    assert float(jnp.max(logp)) <= 0 and float(jnp.max(ent)) <= np.log(cfg.vocab_size) + 1e-5
    assert float(jnp.abs(logp[1, :6]).max()) == 0.0 and float(jnp.abs(logp[1, 6]).max()) > 0


def test_public_token_logprobs_matches_transformers(hf_model, mesh1):
    """aj.token_logprobs equals log_softmax of transformers' logits gathered at the next token."""
    folder, ref_model = hf_model("qwen3_odd")
    policy = aj.load_policy(folder, mesh=mesh1)
    tokens, mask = hf_models.padded_batch(policy.config.vocab_size)
    logits = hf_models.reference_logits(ref_model, tokens, mask)[:, :-1] / 1.3
    logsm = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    ref = np.take_along_axis(logsm, tokens[:, 1:, None], -1)[..., 0] * mask[:, 1:] * mask[:, :-1]
    logp, ent = aj.token_logprobs(policy, tokens, mask, temperature=1.3, chunk_size=5)
    np.testing.assert_allclose(np.asarray(logp)[:, 1:], ref, atol=1e-4)
    assert np.all(np.asarray(logp)[:, 0] == 0)
    with pytest.raises(ValueError, match="temperature"):
        aj.token_logprobs(policy, tokens, mask, temperature=0.0)
