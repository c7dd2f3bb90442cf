"""Qwen3-MoE and Qwen2-MoE checkpoints through the shared MoE block: config.json fields, logits and greedy tokens
against transformers' PyTorch models, the HF round trip (one tensor per expert on disk), and the expert-parallel
layer on 8 devices (expert axes 2 and 4) equal to one device."""

import json
import os

import jax
import numpy as np
import pytest
import torch

import arm_jax as aj
from tests import hf_models
from tests.rollout.test_sampler import PROMPTS, _hf_greedy

KINDS = sorted(hf_models.QWEN_MOE_KINDS)


def _max_diff(a, b, mask):
    return float(np.max(np.abs(a - b) * mask[..., None]))


def test_config_fields(hf_model, mesh1):
    q3 = aj.load_policy(hf_model("qwen3_moe")[0], mesh=mesh1).config
    assert (q3.model_type, q3.qk_norm, q3.qkv_bias) == ("qwen3_moe", True, False)
    assert (q3.moe.num_experts, q3.moe.experts_per_token, q3.moe.expert_size, q3.moe.norm_topk_prob) == (8, 2, 24, True)
    assert [q3.moe.is_moe_layer(i) for i in range(3)] == [True, False, True]  # mlp_only_layers=[1]
    assert q3.moe.shared_width == 0 and not q3.moe.shared_expert_gate
    q2 = aj.load_policy(hf_model("qwen2_moe")[0], mesh=mesh1).config
    assert (q2.qkv_bias, q2.o_bias, q2.moe.norm_topk_prob, q2.moe.shared_width, q2.moe.shared_expert_gate) == (
        True, False, False, 40, True)
    assert [q2.moe.is_moe_layer(i) for i in range(3)] == [False, True, False]  # decoder_sparse_step=2


@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_greedy_match_transformers(kind, hf_model, mesh1):
    folder, ref_model = hf_model(kind)
    policy = aj.load_policy(folder, mesh=mesh1)
    diff, ref, mask = hf_models.logits_diff(policy, ref_model)
    print(f"{kind}: max |logits - transformers| = {diff:.2e}")
    assert diff < 1e-4 and np.std(ref[mask == 1]) > 0.5
    greedy = _hf_greedy(ref_model, PROMPTS, 10, eos=None)
    out = aj.generate(policy, PROMPTS, max_new_tokens=10, temperature=0.0, stop_ids=[])
    np.testing.assert_array_equal(out.tokens, greedy)
    assert len(set(greedy.ravel().tolist())) > 4


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_through_transformers(kind, hf_model, mesh1, tmp_path):
    from transformers import AutoModelForCausalLM
    folder, ref_model = hf_model(kind)
    policy = aj.load_policy(folder, mesh=mesh1)
    aj.save_policy(policy, str(tmp_path), max_shard_bytes=60_000)
    names = json.load(open(tmp_path / "model.safetensors.index.json"))["weight_map"]
    layer = 0 if kind == "qwen3_moe" else 1
    assert f"model.layers.{layer}.mlp.experts.7.down_proj.weight" in names
    if kind == "qwen2_moe":
        assert "model.layers.1.mlp.shared_expert_gate.weight" in names and "model.layers.0.mlp.up_proj.weight" in names
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32)
    tokens, mask = hf_models.padded_batch(policy.config.vocab_size)
    before = hf_models.reference_logits(ref_model, tokens, mask)
    assert _max_diff(hf_models.reference_logits(reloaded.eval(), tokens, mask), before, mask) < 1e-6
    assert aj.load_policy(str(tmp_path), mesh=mesh1).config == policy.config
    assert os.path.isfile(tmp_path / "config.json")


@pytest.mark.parametrize("kind,shape", [("qwen3_moe", (1, 2, 1, 4)), ("qwen2_moe", (2, 1, 2, 2))])
def test_expert_parallel_equals_one_device(kind, shape, hf_model, mesh1):
    """Logits and the learner's log-probs and their gradient on 8 devices equal one device's."""
    from arm_jax.policy import logprobs_fn
    folder, _ = hf_model(kind)
    single = aj.load_policy(folder, mesh=mesh1)
    policy = aj.load_policy(folder, mesh=aj.make_mesh(shape))
    tokens, mask = hf_models.padded_batch(single.config.vocab_size, lengths=(12, 7, 12, 3, 9, 12, 12, 5))
    np.testing.assert_allclose(np.asarray(aj.forward_logits(policy, tokens, mask)),
                               np.asarray(aj.forward_logits(single, tokens, mask)), atol=1e-4)

    def grad_norm(p):
        with jax.set_mesh(p.mesh):
            g = jax.grad(lambda params: jax.numpy.sum(logprobs_fn(p.graphdef, params, tokens, mask)[0] * mask))(
                p.params)
            return float(jax.numpy.sqrt(sum(jax.numpy.sum(x.astype(np.float32) ** 2) for x in jax.tree.leaves(g))))

    a, b = grad_norm(policy), grad_norm(single)
    assert abs(a - b) < 1e-4 * b and b > 0


@pytest.mark.parametrize("kind,layer,scan", [("qwen3_moe", 0, False), ("deepseek_v3", 2, True)])
def test_learner_update_on_8_devices_equals_one_device(kind, layer, scan, hf_model, mesh1):
    """A whole learner update (remat, 2 micro-batches in a scan, packed, AdamW) through the expert-parallel layer
    on (1, 2, 1, 4) equals one device's: loss, grad norm and layer `layer`'s updated router and experts. With `scan`
    the 8-device update runs its blocks scanned (`RLConfig.scan_layers`; DeepSeek: a run of 2 MoE layers) and the
    one-device update unrolled."""
    from arm_jax.algorithms.losses import LossConfig
    from arm_jax.train.learner import Learner, OptimConfig
    folder, _ = hf_model(kind)
    results = []
    for mesh, scan_layers in ((mesh1, False), (aj.make_mesh((1, 2, 1, 4)), scan)):
        policy = aj.load_policy(folder, mesh=mesh)
        tokens, mask = hf_models.padded_batch(policy.config.vocab_size, lengths=(12, 7, 12, 3, 9, 12, 12, 5))
        loss_mask = mask.copy()
        loss_mask[:, :6] = 0
        learner = Learner(policy, LossConfig(), OptimConfig(lr=1e-3), micro_batch_size=4, remat=True, pack=True,
                          scan_layers=scan_layers)
        logp, _ = aj.token_logprobs(policy, tokens, mask, scan_layers=scan_layers)
        batch = dict(tokens=tokens, attention_mask=mask, loss_mask=loss_mask.astype(np.float32),
                     advantages=np.linspace(-1, 1, 8).astype(np.float32), logp_old=np.asarray(logp))
        state, m = learner.step(learner.init_state(), batch, jax.random.key(0))
        mlp = state.params["layers"][layer]["mlp"]
        results.append((float(m["loss"]), float(m["grad_norm"]), np.asarray(mlp["router"][...]),
                        np.asarray(mlp["down"][...])))
    (l1, g1, r1, d1), (l8, g8, r8, d8) = results
    assert abs(l1 - l8) < 1e-6 and abs(g1 - g8) < 1e-5 * g1 and g1 > 0
    # AdamW moves every weight by ~lr = 1e-3 whatever its gradient's size: agree to 1 % of a step
    np.testing.assert_allclose(r8, r1, atol=1e-5)
    np.testing.assert_allclose(d8, d1, atol=1e-5)
