"""ZeRO sharding that holds: masters and every optimizer-state leaf are sharded exactly like their parameter, when
the state is created, after an update and after a checkpoint restore (8 CPU devices)."""

import math

import jax
import optax
import numpy as np
import pytest
from flax import nnx

import arm_jax as aj
from arm_jax.models import layers
from arm_jax.train.checkpoint import Checkpointer
from arm_jax.train.learner import Learner, OptimConfig

CFG = aj.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, model_type="qwen2", dtype="bfloat16")


def _expected_fractions(policy, mesh):
    """Per parameter (leaf order): 1 / (product of the mesh axes the rules give its logical axes), from the rules
    object alone, not from the arrays."""
    sizes = dict(mesh.shape)
    out = []
    for v in jax.tree.leaves(policy.params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        spec = aj.DEFAULT_RULES.spec(layers.logical_axes_of(v), v.get_value().shape, mesh)
        axes = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
        out.append(1.0 / math.prod(sizes[a] for a in axes))
    return out


def _fraction(x):
    return x.addressable_shards[0].data.size / x.size


def _check(state, policy, mesh):
    expected = _expected_fractions(policy, mesh)
    masters = jax.tree.leaves(state.params)
    assert [_fraction(x) for x in masters] == pytest.approx(expected)
    assert all(x.dtype == np.float32 for x in masters)
    opt = state.opt_state
    for name in ("mu", "nu"):
        tree = jax.tree.leaves(optax.tree_utils.tree_get(opt, name))
        assert [_fraction(x) for x in tree] == pytest.approx(expected), name
        for x, p in zip(tree, masters):
            assert x.sharding.is_equivalent_to(p.sharding, x.ndim), name
    assert sum(x.ndim > 0 for x in jax.tree.leaves(opt)) == 2 * len(masters)  # mu, nu: nothing else is that big
    total = sum(x.size for x in jax.tree.leaves(opt) if x.ndim)
    per_device = sum(x.addressable_shards[0].data.size for x in jax.tree.leaves(opt) if x.ndim)
    return per_device / total


@pytest.mark.parametrize("shape, bulk", [((1, 8, 1), 1 / 8), ((2, 2, 2), 1 / 4)])
def test_optimizer_state_is_sharded_like_the_parameters(tmp_path, shape, bulk):
    mesh = aj.make_mesh(shape)
    policy = aj.init_policy(CFG, seed=0, mesh=mesh)
    learner = Learner(policy, optim_cfg=OptimConfig(lr=1e-3))
    state = learner.init_state()
    share = _check(state, policy, mesh)
    # (1, 8, 1): every parameter's embed dim (32) divides by 8 -> exactly 1/8 of the optimizer state per device;
    # (2, 2, 2): 'data' replicates, fsdp x tensor = 4 where heads/mlp/vocab divide by the tensor axis.
    assert share == pytest.approx(bulk, rel=0.15), share
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 64, (8, 12)).astype(np.int32)
    batch = {"tokens": tokens, "attention_mask": np.ones_like(tokens), "loss_mask": np.ones(tokens.shape, np.float32),
             "advantages": rng.randn(8).astype(np.float32), "logp_old": np.full(tokens.shape, -4.0, np.float32)}
    state, _ = learner.step(state, batch, jax.random.key(0))
    _check(state, policy, mesh)
    ck = Checkpointer(str(tmp_path), async_save=False)
    ck.save(1, state, {"step": 1})
    ck.wait()
    restored, _ = ck.restore(1, learner.init_state())
    _check(restored, policy, mesh)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ck.close()


def test_init_state_copies_the_parameters(mesh1):
    """The masters are new buffers: donating the state to the step leaves the policy's arrays usable."""
    policy = aj.init_policy(CFG.replace(dtype="float32"), seed=0, mesh=mesh1)
    learner = Learner(policy)
    state = learner.init_state()
    before = [np.asarray(x) for x in jax.tree.leaves(policy.params)]
    tokens = np.zeros((2, 4), np.int32)
    learner.step(state, {"tokens": tokens, "attention_mask": np.ones_like(tokens),
                         "loss_mask": np.ones((2, 4), np.float32), "advantages": np.ones(2, np.float32),
                         "logp_old": np.zeros((2, 4), np.float32)}, jax.random.key(0))
    for a, b in zip(before, jax.tree.leaves(policy.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
