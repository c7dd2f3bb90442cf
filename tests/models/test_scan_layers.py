"""`scan_layers` (`RLConfig.scan_layers`, `DecoderLM.layer_runs` / `scan_blocks`): each run of identical blocks as
one `lax.scan` over stacked parameters gives the unrolled loop's values and gradients (dense, DeepSeek dense + MoE
runs, packed rows, remat, routing replay, LoRA adapters), and its compiled program does not grow with depth. The
scanned learner update on 8 devices against the unrolled one on 1: tests/models/test_qwen_moe.py."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arm_jax as aj
from arm_jax.config import LoRAConfig
from arm_jax.models import packing
from arm_jax.models.moe import routing_layout
from arm_jax.models.qwen2 import Routing
from arm_jax.policy import logprobs_fn, merge_for_compute, packed_logprobs_fn
from tests import hf_models

LENGTHS = (12, 7, 12, 3, 9, 12, 12, 5)


def _grads_and_logp(policy, tokens, mask, scan, remat, routing=None, pack=False):
    """(logp [B, T], d sum(logp) / d params) of the policy's pass, padded or packed."""
    if pack:
        packed = packing.pack(tokens, mask, 1, None, 1)
        args = (jnp.asarray(packed.tokens), jnp.asarray(packed.segment_ids), jnp.asarray(packed.positions))
        fn = packed_logprobs_fn
    else:
        args, fn = (jnp.asarray(tokens), jnp.asarray(mask)), logprobs_fn

    def loss(params):
        out = fn(policy.graphdef, params, *args, remat=remat, routing=routing, scan_layers=scan)
        return jnp.sum(out[0]), (out[0], out[2] if routing is not None else None)

    with jax.set_mesh(policy.mesh):
        (_, (logp, counts)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(policy.params)
    if pack:
        logp = packing.unpack_host(np.asarray(logp), packed.index)
    return np.asarray(logp), [np.asarray(x) for x in jax.tree.leaves(g)], counts


def _assert_grads_close(g, ref_g):
    """Every gradient leaf equal to float32 summation order: within 1e-4 of the leaf's largest entry."""
    assert len(g) == len(ref_g)
    for a, b in zip(g, ref_g):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max() + 1e-7


def test_layer_runs(hf_model, mesh1):
    runs = {kind: merge_for_compute(*(lambda p: (p.graphdef, p.params))(
        aj.load_policy(hf_model(kind)[0], mesh=mesh1))).layer_runs()
        for kind in ("llama3", "deepseek_v3", "qwen3_moe")}
    assert runs == {"llama3": [(0, 3)],  # every block alike
                    "deepseek_v3": [(0, 1), (1, 3)],  # first_k_dense_replace=1, then two MoE layers
                    "qwen3_moe": [(0, 1), (1, 2), (2, 3)]}  # mlp_only_layers=[1]: MoE, dense, MoE


@pytest.mark.parametrize("kind,pack", [("llama3", False), ("starcoder2_swa", True), ("deepseek_v3", False),
                                       ("deepseek_v2", True)])
def test_scan_equals_unrolled(kind, pack, hf_model, mesh1):
    """Log-probs and every parameter's gradient, with and without remat (float32: equal to summation order)."""
    policy = aj.load_policy(hf_model(kind)[0], mesh=mesh1)
    tokens, mask = hf_models.padded_batch(policy.config.vocab_size, lengths=LENGTHS)
    ref_logp, ref_g, _ = _grads_and_logp(policy, tokens, mask, scan=False, remat=False, pack=pack)
    assert np.std(ref_logp[mask == 1]) > 0.1
    for remat in (False, True):
        logp, g, _ = _grads_and_logp(policy, tokens, mask, scan=True, remat=remat, pack=pack)
        np.testing.assert_allclose(logp, ref_logp, atol=1e-5)
        _assert_grads_close(g, ref_g)


def test_scan_in_bf16_is_as_close_to_float32_as_unrolled(hf_model, mesh1):
    """bf16 compute over float32 masters (DeepSeek-V3 tiny, packed, remat): XLA rounds at other points in a loop body
    than in the unrolled program, so the two bf16 results are not bitwise equal (here median |d logp| ~6e-3); both
    must be equally close to the float32 result (median ~2e-2 away), and so must their gradients."""
    folder = hf_model("deepseek_v3")[0]
    tokens, mask = hf_models.padded_batch(170, lengths=LENGTHS)
    m = mask == 1
    ref_logp, ref_g, _ = _grads_and_logp(aj.load_policy(folder, mesh=mesh1), tokens, mask, False, True, pack=True)
    bf16 = aj.load_policy(folder, mesh=mesh1, dtype="bfloat16")
    err = {}
    for scan in (False, True):
        logp, g, _ = _grads_and_logp(bf16, tokens, mask, scan=scan, remat=True, pack=True)
        d = np.abs(logp - ref_logp)[m]
        grad_rel = max(np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(g, ref_g) if np.linalg.norm(b) > 0)
        err[scan] = (np.median(d), d.max(), grad_rel)
    print(f"bf16 vs float32 (median |d logp|, max, worst gradient leaf rel. error): unrolled {err[False]}, "
          f"scanned {err[True]}")
    assert 0 < err[True][0] < 1.5 * err[False][0] and err[True][1] < 1.5 * err[False][1]
    assert err[True][2] < 1.5 * err[False][2]


def test_scan_replays_each_layers_experts(hf_model, mesh1):
    """Routing replay through a scanned run of MoE layers: each layer reads its own recorded experts (random ones
    here, different per layer, so a swapped or shared layer index changes the values), as the unrolled loop."""
    policy = aj.load_policy(hf_model("deepseek_v3")[0], mesh=mesh1)
    tokens, mask = hf_models.padded_batch(policy.config.vocab_size, lengths=LENGTHS)
    layers_moe, k, _ = routing_layout(policy.config)
    rng = np.random.default_rng(0)
    E = policy.config.moe.num_experts
    ids = np.stack([rng.permutation(E)[:k] for _ in range(tokens.size * layers_moe)]).reshape(
        tokens.shape + (layers_moe, k)).astype(np.int32)
    routing = Routing(jnp.asarray(ids), jnp.asarray(mask.astype(bool)))
    fresh, _, _ = _grads_and_logp(policy, tokens, mask, scan=True, remat=False)
    swapped = Routing(routing.ids[:, :, ::-1], routing.use)
    out = {name: _grads_and_logp(policy, tokens, mask, scan=scan, remat=True, routing=r)
           for name, scan, r in (("unrolled", False, routing), ("scan", True, routing), ("swapped", True, swapped))}
    np.testing.assert_allclose(out["scan"][0], out["unrolled"][0], atol=1e-6)
    _assert_grads_close(out["scan"][1], out["unrolled"][1])
    np.testing.assert_array_equal(out["scan"][2], out["unrolled"][2])  # this forward's own picks vs the record
    assert np.abs(out["scan"][0] - fresh).max() > 1e-2  # the record is used
    assert np.abs(out["swapped"][0] - out["scan"][0]).max() > 1e-2  # layer j reads layer j's record


def test_scan_with_lora_adapters(hf_model, mesh1):
    """LoRA's adapters (nnx.LoRAParam beside each kernel) stack and scan like the kernels: equal log-probs and
    gradients, the adapters' included (B made nonzero so they act)."""
    policy = aj.add_lora(aj.load_policy(hf_model("llama3")[0], mesh=mesh1), LoRAConfig(rank=4, alpha=8.0), seed=1)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(p) else x, policy.params)
    policy = policy.replace(params=params)
    tokens, mask = hf_models.padded_batch(policy.config.vocab_size, lengths=LENGTHS)
    (a_logp, a_g, _), (b_logp, b_g, _) = (_grads_and_logp(policy, tokens, mask, scan=s, remat=True)
                                          for s in (True, False))
    np.testing.assert_allclose(a_logp, b_logp, atol=1e-6)
    _assert_grads_close(a_g, b_g)


def _dots(policy, scan: bool) -> int:
    """Dot ops in the optimized HLO of the log-prob pass's gradient."""
    tokens, mask = hf_models.padded_batch(policy.config.vocab_size, lengths=LENGTHS)

    def loss(params):
        return jnp.sum(logprobs_fn(policy.graphdef, params, tokens, mask, remat=True, scan_layers=scan)[0])

    with jax.set_mesh(policy.mesh):
        hlo = jax.jit(jax.grad(loss)).lower(policy.params).compile().as_text()
    return len(re.findall(r"= \S+ dot\(", hlo))


def test_scanned_program_does_not_grow_with_depth(mesh1):
    """The compiled backward holds one block body: 2 and 8 layers give the same number of dot ops when scanned;
    unrolled, 8 layers need more than 3x the dots of 2."""
    from arm_jax.data import countdown
    counts = {}
    for layers in (2, 8):
        cfg = countdown.tiny_model_config(hidden=32, layers=layers, heads=2, mlp=64, arch="qwen2", act="silu")
        policy = aj.init_policy(cfg, seed=0, mesh=mesh1)
        counts[layers] = (_dots(policy, True), _dots(policy, False))
    print(f"dot ops (scanned, unrolled): 2 layers {counts[2]}, 8 layers {counts[8]}")
    assert counts[2][0] == counts[8][0]
    assert counts[8][1] > 3 * counts[2][1] - 10


def test_rl_steps_with_scan_layers_equal_unrolled(mesh1, tmp_path):
    """Two RL steps of a tiny 3-layer MoE policy (one scanned run of 3 MoE blocks) with routing replay, packing and
    a held-out evaluation: RLConfig.scan_layers reaches the learner, the log-prob passes and the evaluation, and the
    metrics equal the unrolled run's."""
    from arm_jax.config import MoEConfig
    from arm_jax.data import countdown
    from tests.rl_helpers import countdown_run, small_rl_config, steady
    cfg = countdown.tiny_model_config(hidden=32, layers=3, heads=2, mlp=64, arch="qwen2", act="silu")
    cfg = cfg.replace(model_type="qwen2_moe", moe=MoEConfig(num_experts=4, experts_per_token=2, expert_size=16,
                                                            norm_topk_prob=True))
    history = {}
    for scan in (False, True):
        policy = aj.init_policy(cfg, seed=0, mesh=mesh1, init_std=0.06)
        rl = small_rl_config(steps=2, routing_replay=True, pack_sequences=True, scan_layers=scan, eval_every=2,
                             eval_prompts=4, eval_n=2, checkpoint_every=100, advantage="grpo")
        run = countdown_run(policy, tmp_path / str(scan), rl)
        assert run.learner._opts["scan_layers"] is scan
        history[scan] = [steady(m) for m in run.run()]
    assert len(history[True]) == len(history[False]) >= 2
    for a, b in zip(history[True], history[False]):
        assert a.keys() == b.keys()
        for k in a:
            assert np.isclose(a[k], b[k], rtol=1e-4, atol=1e-6), (k, a[k], b[k])
    assert any("eval/pass@1" in m for m in history[True])
