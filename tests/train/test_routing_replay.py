"""MoE routing replay: the rollout records the experts behind every response token (both engines, the same
arrays); with near-tie router logits and the learner's weights a step away from the sampler's, the learner's
log-probs equal the sampler's with replay and differ without (where the mismatch metric counts the flipped
tokens); packed and padded passes and the learner's update agree with replay on."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arm_jax as aj
from arm_jax.models.moe import routing_layout
from tests.rollout.test_refill import PROMPTS

BUDGETS = [9, 4, 12, 7, 10]


def _near_tie(policy, eps: float, seed: int = 0):
    """The policy with every MoE router's expert 1 column = expert 0's + eps * noise: the two score about equally
    for every token, so the sign of eps decides which of them a token whose second choice is that pair takes."""
    rng = np.random.default_rng(seed)

    def tie(path, x):
        if "router" not in jax.tree_util.keystr(path):
            return x
        w = np.asarray(x).copy()
        w[:, 1] = w[:, 0] + eps * rng.normal(size=w.shape[0])
        return jax.device_put(jnp.asarray(w, x.dtype), x.sharding)

    params = jax.tree_util.tree_map_with_path(tie, policy.params)
    return policy.replace(params=params)


@pytest.fixture(scope="module")
def moe_policy(hf_model, mesh1):
    return aj.load_policy(hf_model("qwen3_moe")[0], mesh=mesh1)


def test_both_engines_record_the_same_experts(moe_policy):
    kw = dict(max_new_tokens=BUDGETS, n=2, seed=3, temperature=1.0, stop_ids=[])
    lock = aj.generate(moe_policy, PROMPTS, engine="lockstep", **kw)
    refill = aj.generate(moe_policy, PROMPTS, engine="refill", slots=4, chunk_steps=3, **kw)
    layers_moe, k, dtype = routing_layout(moe_policy.config)
    assert lock.routing.shape == (10, 12, layers_moe, k) and lock.routing.dtype == dtype == np.uint8
    np.testing.assert_array_equal(refill.tokens, lock.tokens)
    m = lock.mask.astype(bool)
    np.testing.assert_array_equal(refill.routing[m], lock.routing[m])
    assert (refill.routing[~m] == 0).all()
    assert len(np.unique(lock.routing[m])) == moe_policy.config.moe.num_experts  # every expert used somewhere
    # the recorded experts are those the learner's own forward picks at the same weights
    tokens, attn, _ = lock.sequences()
    ids, use = lock.replay_routing()
    assert use.sum() == m.sum() + lock.prompt_mask.sum() - len(m)  # prompt + response, Tp - 1 counted once
    _, _, counts = aj.token_logprobs(moe_policy, tokens, attn, routing=(ids, use), replay=False)
    assert counts[1] == use.sum() and counts[0] == 0
    np.testing.assert_array_equal(refill.prompt_routing[lock.prompt_mask.astype(bool)],
                                  lock.prompt_routing[lock.prompt_mask.astype(bool)])


@pytest.mark.parametrize("pack", [False, True])
def test_replay_gives_the_samplers_log_probs_under_near_ties(moe_policy, pack):
    sampler = _near_tie(moe_policy, 1e-4)
    learner = _near_tie(moe_policy, -1e-4)  # "one step later": every near tie resolved the other way
    out = aj.generate(sampler, PROMPTS, max_new_tokens=BUDGETS, n=2, seed=1, temperature=1.0, stop_ids=[])
    tokens, attn, _ = out.sequences()
    m = out.mask.astype(bool)
    Tp = out.prompt_tokens.shape[1]
    routing = out.replay_routing()
    diffs, flipped = {}, {}
    for replay in (True, False):
        logp, _, counts = aj.token_logprobs(learner, tokens, attn, routing=routing, replay=replay, pack=pack)
        diffs[replay] = float(np.abs(np.asarray(logp)[:, Tp:][m] - out.logp[m]).max())
        flipped[replay] = counts[0] / counts[1]
    print(f"pack={pack}: max |learner - sampler logp| replay {diffs[True]:.1e}, none {diffs[False]:.1e}; "
          f"tokens routed differently {flipped[False]:.1%}")
    assert flipped[True] > 0.05 and flipped[False] > 0.05  # what the learner's router would pick, either way
    assert diffs[True] < 2e-3 and diffs[False] > 0.1  # replay: only the recomputed gate weights move


def test_learner_update_with_replay_packed_equals_padded(moe_policy):
    """One update with routing replay: packed == padded (loss, grad norm), and the router gets gradients."""
    from arm_jax.algorithms.losses import LossConfig
    from arm_jax.train.learner import Learner, OptimConfig, TrainBatch
    out = aj.generate(moe_policy, PROMPTS, max_new_tokens=BUDGETS, n=2, seed=2, temperature=1.0, stop_ids=[])
    tokens, attn, loss_mask = out.sequences()
    logp, _ = aj.token_logprobs(moe_policy, tokens, attn)
    ids, use = out.replay_routing()
    batch = TrainBatch(tokens=tokens, attention_mask=attn, loss_mask=loss_mask.astype(np.float32),
                       advantages=np.linspace(-1, 1, len(tokens)).astype(np.float32),
                       logp_old=np.asarray(logp), routing_ids=ids, routing_use=use)
    metrics = {}
    for pack in (False, True):
        learner = Learner(moe_policy, LossConfig(), OptimConfig(lr=1e-3), micro_batch_size=5, pack=pack)
        state, metrics[pack] = learner.step(learner.init_state(), dataclasses.replace(batch), jax.random.key(0))
    for key in ("loss", "grad_norm", "entropy"):
        assert abs(float(metrics[True][key]) - float(metrics[False][key])) < 2e-5, key
    assert float(metrics[True]["grad_norm"]) > 0


def test_rl_steps_with_replay_log_the_mismatch(mesh1, tmp_path):
    """Two RL steps of a tiny Qwen2-MoE-shaped policy with routing replay, dynamic sampling (merged rounds carry
    their recordings) and packing: the loop runs, logs moe/routing_mismatch, and the learner's batch carries the
    sampler's experts."""
    from arm_jax.config import MoEConfig
    from arm_jax.data import countdown
    from arm_jax.rewards.tasks import make_task
    from arm_jax.train.learner import OptimConfig
    from arm_jax.train.loop import RLConfig, RLRun
    cfg = countdown.tiny_model_config(hidden=32, layers=2, heads=2, mlp=64, arch="qwen2", act="silu")
    cfg = cfg.replace(model_type="qwen2_moe", moe=MoEConfig(num_experts=4, experts_per_token=2, expert_size=16,
                                                            norm_topk_prob=True))
    policy = aj.init_policy(cfg, seed=0, mesh=mesh1, init_std=0.06)
    rl = RLConfig(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=12, eval_every=0, checkpoint_every=100,
                  samples_every=0, optim=OptimConfig(lr=1e-3), routing_replay=True, dynamic_sampling=True,
                  max_sampling_rounds=2, advantage="grpo")
    run = RLRun(policy, make_task("countdown", format_weight=0.1), rl, str(tmp_path), log_to_console=False)
    seen = []
    update = run.learner.update
    run.learner.update = lambda state, batch, rng, **kw: seen.append(batch) or update(state, batch, rng, **kw)
    metrics = [run.train_step() for _ in range(2)]
    dense = aj.init_policy(countdown.tiny_model_config(hidden=32, layers=1, heads=2, mlp=64), seed=0, mesh=mesh1)
    with pytest.raises(ValueError, match="routing_replay=True, but qwen2 has no mixture-of-experts"):
        RLRun(dense, make_task("countdown"), rl, str(tmp_path / "dense"), log_to_console=False)
    assert all(0.0 <= m["moe/routing_mismatch"] < 0.5 and m["moe/dropped_frac"] == 0.0 for m in metrics)
    batch = seen[0]
    assert batch.routing_ids is not None and batch.routing_use.shape == batch.tokens.shape
    # every trained token's logits (computed one position before it) come from the sampler's experts
    assert batch.routing_use[:, :-1][batch.loss_mask[:, 1:] > 0].all()
