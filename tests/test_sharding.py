"""Sharded forward/log-probs equal the single-device results; parameters really are sharded."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import arm_jax as aj
from arm_jax.config import ConfigError
from tests import hf_models

CFG = aj.ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                     num_kv_heads=4, head_dim=8, model_type="qwen2", tie_word_embeddings=False)


def test_rules_are_shape_aware():
    mesh = aj.make_mesh((2, 2, 2))
    rules = aj.DEFAULT_RULES
    assert rules.spec(("batch", "seq", None), (8, 5, 3), mesh) == P(("data", "fsdp"), None, None)
    assert rules.spec(("batch", "seq"), (2, 5), mesh) == P("data", None)  # fsdp dropped: 2 % 4 != 0
    assert rules.spec(("embed", "kv_heads", "head_dim"), (64, 1, 8), mesh) == P("fsdp", None, None)
    assert rules.spec(("vocab", "embed"), (256, 64), mesh) == P("tensor", "fsdp")


def test_make_mesh_resolves_rest_and_rejects_bad_shapes():
    assert dict(aj.make_mesh((2, -1, 1)).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ConfigError, match=r"mesh.shape \(16, 1, 1\) needs 16 devices, but 8"):
        aj.make_mesh((16, 1, 1))
    with pytest.raises(ConfigError, match=r"8 devices are not divisible by 3"):
        aj.make_mesh((3, -1, 1))
    assert aj.make_mesh((1, 2, 1)).devices.size == 2
    with pytest.raises(ConfigError, match="at most one axis may be -1"):
        aj.make_mesh((-1, -1, 1))


@pytest.fixture(scope="module")
def reference(mesh1):
    policy = aj.init_policy(CFG, seed=3, mesh=mesh1)
    tokens, mask = hf_models.padded_batch(CFG.vocab_size, lengths=(12, 7, 12, 3, 9, 12, 12, 5))
    return policy, tokens, mask, np.asarray(aj.forward_logits(policy, tokens, mask)), \
        [np.asarray(a) for a in aj.token_logprobs(policy, tokens, mask, chunk_size=16)]


@pytest.mark.parametrize("shape, sharded_spec", [
    ((2, 2, 2), {"q": P("fsdp", "tensor", None), "k": P("fsdp", "tensor", None), "embed": P("tensor", "fsdp")}),
    ((1, 8, 1), {"q": P("fsdp", None, None), "gate": P("fsdp", None), "embed": P(None, "fsdp")}),
    ((1, 1, 8), {"q": P(None, "tensor", None), "k": P(None, None, None), "gate": P(None, "tensor"),
                 "embed": P("tensor", None)}),
])
def test_sharded_equals_single_device(reference, shape, sharded_spec):
    ref_policy, tokens, mask, ref_logits, ref_lp = reference
    mesh = aj.make_mesh(shape)
    params = jax.device_put(ref_policy.params, aj.policy_param_shardings(ref_policy.params, mesh))
    policy = ref_policy.replace(params=params, mesh=mesh)
    layer = policy.params["layers"][0]
    specs = {"q": layer["attn"]["q"], "k": layer["attn"]["k"], "gate": layer["mlp"]["gate"],
             "embed": policy.params["embed"]}
    for name, spec in sharded_spec.items():
        assert specs[name][...].sharding.spec == spec, name
    q = layer["attn"]["q"][...]
    parts = {(2, 2, 2): 4, (1, 8, 1): 8, (1, 1, 8): 8}[shape]  # 'data' replicates parameters
    assert q.addressable_shards[0].data.size == q.size // parts
    logits = np.asarray(aj.forward_logits(policy, tokens, mask))
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=1e-5)
    logp, ent = aj.token_logprobs(policy, tokens, mask, chunk_size=16)
    np.testing.assert_allclose(np.asarray(logp), ref_lp[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), ref_lp[1], atol=2e-5, rtol=1e-5)


def test_load_straight_into_sharding(hf_model, mesh1):
    """A checkpoint loads directly onto an 8-device mesh with sharded parameters and the reference logits."""
    folder, ref_model = hf_model("qwen2_tied")
    policy = aj.load_policy(folder, mesh=aj.make_mesh((2, 2, 2)))
    emb = policy.params["embed"][...]
    assert emb.sharding.spec == P(None, "fsdp")  # vocab 211 is not divisible by tensor=2 -> replicated there
    assert emb.addressable_shards[0].data.shape == (211, 32)
    tokens, mask = hf_models.padded_batch(policy.config.vocab_size, lengths=(13, 9, 4, 13))
    np.testing.assert_allclose(np.asarray(aj.forward_logits(policy, tokens, mask)) * mask[..., None],
                               hf_models.reference_logits(ref_model, tokens, mask) * mask[..., None], atol=1e-4)
