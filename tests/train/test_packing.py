"""Packed learner and log-prob passes (`models.packing`): several sequences per row, attention within each, outputs
gathered back to the padded layout. Packed equals padded: the log-probs and entropies (against transformers too),
one learner update (loss, gradient norm, updated parameters) on 1 and 8 devices for every aggregation mode with KL
and entropy terms, and a whole RL step's ARM confidences and metrics."""

import dataclasses

import jax
import numpy as np
import pytest

import arm_jax as aj
from arm_jax.models import packing
from arm_jax.policy import token_logprobs
from arm_jax.train.learner import Learner, LossConfig, OptimConfig
from tests import hf_models


def _longtail_rows(n=16, prompt=12, budget=40, vocab=64, seed=0):
    """Left-padded prompts of varied length + lognormal answers (a few at the budget), the learner's layout."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, vocab, size=(n, prompt + budget)).astype(np.int32)
    mask = np.zeros_like(tokens)
    loss_mask = np.zeros(tokens.shape, np.float32)
    for i in range(n):
        p = rng.randint(2, prompt + 1)
        r = budget if i % 7 == 3 else int(np.clip(rng.lognormal(2.0, 0.8), 1, budget))
        mask[i, prompt - p:prompt + r] = 1
        loss_mask[i, prompt:prompt + r] = 1
    return tokens * mask, mask, loss_mask


def test_pack_layout_round_trips_and_fills_rows():
    tokens, mask, _ = _longtail_rows()
    p = packing.pack(tokens, mask, num_micro_batches=2, row_len=None, row_multiple=1)
    M, R, C = 2, p.rows_per_micro_batch, tokens.shape[1]
    assert p.tokens.shape == (M * R, C) and p.index.shape == tokens.shape
    assert R < 8  # 8 sequences per micro-batch in fewer rows than 8
    for m in range(M):  # each sequence's tokens sit contiguous in its own micro-batch's rows, positions 0..n-1
        rows = p.tokens[m::M]
        np.testing.assert_array_equal(packing.unpack_host(rows, p.index[m::M]), tokens[m::M] * mask[m::M])
        pos = packing.unpack_host(p.positions[m::M], p.index[m::M])
        np.testing.assert_array_equal(pos[mask[m::M] > 0], np.concatenate(
            [np.arange(n) for n in mask[m::M].sum(1)]))
        seg = p.segment_ids[m::M]
        assert (seg > 0).sum() == mask[m::M].sum()
    assert abs(p.valid_fraction - mask.sum() / p.segment_ids.size) < 1e-9
    with pytest.raises(ValueError, match="does not fit a packed row of RLConfig.pack_length=16"):
        packing.pack(tokens, mask, 1, row_len=16)


@pytest.mark.parametrize("kind", ["qwen2_gqa7", "starcoder2_swa", "deepseek_v2"])
def test_packed_logprobs_equal_padded_and_transformers(kind, hf_model):
    """GQA with q/k/v biases, a sliding window (4 slots, shorter than the sequences) and MLA: the packed pass gives
    the padded pass's log-probs and entropies, and transformers' log-probs per sequence."""
    folder, ref_model = hf_model(kind)
    policy = aj.load_policy(folder, mesh=aj.make_mesh((1, 8, 1)))
    tokens, mask = hf_models.padded_batch(policy.config.vocab_size, lengths=(13, 9, 4, 13, 7, 13, 2, 11))
    padded = [np.asarray(x) for x in token_logprobs(policy, tokens, mask)]
    packed = [np.asarray(x) for x in token_logprobs(policy, tokens, mask, pack=True)]
    ref = np.asarray(jax.nn.log_softmax(hf_models.reference_logits(ref_model, tokens, mask)))
    ref_logp = np.zeros_like(padded[0])
    ref_logp[:, 1:] = np.take_along_axis(ref[:, :-1], tokens[:, 1:, None], -1)[..., 0] * (mask[:, 1:] * mask[:, :-1])
    for a, b in zip(packed, padded):
        assert float(np.abs(a - b).max()) < 2e-5 and float(np.abs(b).max()) > 1.0
    diff = float(np.abs(packed[0] - ref_logp).max())
    print(f"{kind}: max |packed logp - transformers| = {diff:.1e}")
    assert diff < 1e-4


def _batch(seed=0, n=16):
    tokens, mask, loss_mask = _longtail_rows(n=n, seed=seed)
    rng = np.random.RandomState(seed + 1)
    return dict(tokens=tokens, attention_mask=mask, loss_mask=loss_mask,
                advantages=rng.randn(n).astype(np.float32),
                logp_old=(rng.randn(*tokens.shape) * 0.1 - 4).astype(np.float32) * loss_mask,
                ref_logp=(rng.randn(*tokens.shape) * 0.1 - 4).astype(np.float32) * loss_mask)


LOSSES = [LossConfig(agg_mode="token-mean", kl_coef=0.1, entropy_coef=0.01),
          LossConfig(agg_mode="seq-mean-token-mean", kl_coef=0.1, kl_estimator="k2", entropy_coef=0.01),
          LossConfig(agg_mode="seq-mean-token-sum-norm", max_len=40, kl_coef=0.05, entropy_coef=0.01),
          LossConfig(policy_loss="gspo", agg_mode="seq-mean-token-mean", eps_low=3e-4, eps_high=4e-4),
          LossConfig(policy_loss="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-10.0, clip_cov_ub=10.0)]


@pytest.mark.parametrize("devices", [1, 8])
def test_packed_update_equals_padded(devices):
    """One update per loss configuration, 2 micro-batches of 8 long-tailed sequences: packed == padded."""
    cfg = aj.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8)
    mesh = aj.make_mesh((1, devices, 1), devices=jax.devices()[:devices])
    policy = aj.init_policy(cfg, seed=0, mesh=mesh)
    batch = _batch()
    for loss_cfg in LOSSES:
        results = []
        for pack in (False, True):
            learner = Learner(policy, loss_cfg, OptimConfig(lr=1e-3), micro_batch_size=8, pack=pack)
            state, m = learner.step(learner.init_state(), batch, jax.random.key(3))
            results.append(([np.asarray(x) for x in jax.tree.leaves(state.params)], m))
        (p_pad, m_pad), (p_pack, m_pack) = results
        name = f"{loss_cfg.policy_loss}/{loss_cfg.agg_mode}"
        for key in ("loss", "pg_loss", "kl", "entropy", "grad_norm", "ratio_mean", "clip_frac_low"):
            a, b = float(m_pad[key]), float(m_pack[key])
            assert abs(a - b) <= 2e-5 * max(1.0, abs(a)), (name, key, a, b)
        assert float(m_pad["loss"]) != 0.0 and float(m_pad["grad_norm"]) > 0
        moved = max(float(np.abs(a - b).max()) for a, b in zip(p_pad, jax.tree.leaves(policy.params)))
        diff = max(float(np.abs(a - b).max()) for a, b in zip(p_pad, p_pack))
        assert diff < 2e-5 * max(1.0, moved) and moved > 1e-4, (name, diff, moved)
        assert 0 < m_pack["pack_fill"] <= 1


def test_packed_rl_step_equals_padded(tmp_path):
    """A whole RL step (ARM, KL, 2 micro-batches) with pack_sequences on and off: the same rollout, confidences,
    entropy, losses and parameters."""
    from arm_jax.data import countdown
    from arm_jax.rewards.registry import REWARDS, RewardSpec, register_reward
    from arm_jax.rewards.tasks import make_task
    from arm_jax.train.loop import RLConfig, RLRun
    if "test_length_parity" not in REWARDS:  # mixed groups under a random policy: non-zero advantages
        register_reward("test_length_parity")(lambda completions, examples, context: [
            float(len(c) % 2 == 0) for c in completions])
    cfg = countdown.tiny_model_config(hidden=32, layers=2, heads=2, mlp=64, arch="starcoder2", act="relu")
    outs = []
    for pack in (False, True):
        policy = aj.init_policy(cfg, seed=0, mesh=aj.make_mesh((1, 2, 1), devices=jax.devices()[:2]))
        rl = RLConfig(steps=1, prompts_per_step=4, group_size=4, max_new_tokens=24, eval_every=0,
                      checkpoint_every=1000, samples_every=0, micro_batch_size=8, pack_sequences=pack,
                      loss=dataclasses.replace(LossConfig(), kl_coef=0.05), optim=OptimConfig(lr=1e-3))
        task = make_task("countdown")
        task.rewards = [RewardSpec("test_length_parity", accuracy=True)]
        run = RLRun(policy, task, rl, str(tmp_path / str(pack)), log_to_console=False, ref_policy=policy)
        m = run.train_step()
        run.rewards.close()
        outs.append((m, [np.asarray(x) for x in jax.tree.leaves(run.state.params)]))
    (m0, p0), (m1, p1) = outs
    assert m0["response_len_max"] > m0["response_len_mean"] + 2  # answers of varied length
    assert m0["adv_std"] > 0.1 and m0["grad_norm"] > 1e-3
    for key in ("c_q_mean", "c_o_mean", "arm_term_mean", "entropy", "adv_std", "loss", "kl", "grad_norm"):
        assert abs(m0[key] - m1[key]) <= 1e-5 * max(1.0, abs(m0[key])), (key, m0[key], m1[key])
    # Adam's first update is about lr * sign(g): compare the update vectors (elements with |g| ~ eps may differ)
    start = [np.asarray(x) for x in jax.tree.leaves(aj.init_policy(cfg, seed=0).params)]
    step0 = np.concatenate([(a - s).ravel() for a, s in zip(p0, start)])
    step1 = np.concatenate([(b - s).ravel() for b, s in zip(p1, start)])
    assert np.linalg.norm(step0 - step1) < 1e-3 * np.linalg.norm(step0)
