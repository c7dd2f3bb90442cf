"""The disaggregated layout (`rollout.placement`, `RLConfig.rollout_devices`) on 8 CPU devices: the device split,
the weight transfer between meshes (exact, device to device, in the rollout mesh's own layout), and RL runs whose
rollout has its own mesh: 4 + 4 equals the colocated run on 4 devices bit for bit, 2 + 6 learns the same to float
tolerance, with and without one-step-off."""

import dataclasses

import jax
import numpy as np
import pytest

import arm_jax as aj
from arm_jax.config import ConfigError
from arm_jax.data import countdown
from arm_jax.rollout import placement
from arm_jax.sharding import make_mesh
from tests.rl_helpers import countdown_run, small_rl_config, steady

TINY = countdown.tiny_model_config(hidden=32, layers=1, heads=2, mlp=64, arch="starcoder2", act="relu")


def test_split_gives_each_side_its_devices():
    devs = jax.devices()
    learner, rollout = placement.split_devices(4)
    assert learner == devs[:4] and rollout == devs[4:]
    learner, rollout = placement.split_devices(0.25)
    assert learner == devs[:6] and rollout == devs[6:]
    for bad, match in ((8, "at least 1"), (0, "at least 1"), (1.5, "fraction")):
        with pytest.raises(ConfigError, match=match):
            placement.split_devices(bad)
    with pytest.raises(ConfigError, match="make_mesh"):  # a learner mesh over the wrong devices
        placement.rollout_mesh(make_mesh((1, 8, 1)), 4)


@pytest.mark.parametrize("n_rollout, learner_shape, rollout_shape", [
    (4, (1, 4, 1), (1, 4, 1)), (4, (1, 2, 2), (1, 1, 4)), (6, (1, 2, 1), (2, 3, 1)), (2, (2, 3, 1), (1, 2, 1))])
def test_transfer_is_exact_and_never_touches_the_host(n_rollout, learner_shape, rollout_shape):
    learner_devs, _ = placement.split_devices(n_rollout)
    cfg = dataclasses.replace(TINY, hidden_size=48, intermediate_size=96, num_heads=4, num_kv_heads=4, head_dim=12)
    policy = aj.init_policy(cfg, seed=3, mesh=make_mesh(learner_shape, devices=learner_devs))
    mesh = placement.rollout_mesh(policy.mesh, n_rollout, rollout_shape)
    shardings = placement.rollout_shardings(policy.params, cfg, mesh)
    jax.block_until_ready(policy.params)
    with jax.transfer_guard_device_to_host("disallow"), jax.transfer_guard_host_to_device("disallow"):
        moved = placement.transfer(policy.params, shardings)
        jax.block_until_ready(moved)
    sharded = 0
    for (path, a), b, s in zip(jax.tree_util.tree_flatten_with_path(policy.params)[0], jax.tree.leaves(moved),
                               jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))):
        assert b.sharding == s, jax.tree_util.keystr(path)
        assert set(b.sharding.device_set) == set(mesh.devices.flat)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        sharded += not s.is_fully_replicated
    assert sharded > 0  # the rollout layout is really sharded, not a replicated copy


def _cfg(**overrides):
    return small_rl_config(**{"checkpoint_every": 100, **overrides})


def _train(tmp_path, name, mesh, cfg):
    policy = aj.init_policy(TINY, seed=0, mesh=mesh, init_std=0.06)
    run = countdown_run(policy, tmp_path / name, cfg)
    hist = [run.train_step() for _ in range(cfg.steps)]
    return run, hist, [np.asarray(x) for x in jax.tree.leaves(run.state.params)]


_steady = steady


def test_four_plus_four_equals_colocated_on_four(tmp_path):
    """One-step-off (the sides at once; max_staleness 0 takes the same path with the sides in turn)."""
    staleness = 1
    colocated = _train(tmp_path, "colocated", make_mesh((1, 4, 1)), _cfg(max_staleness=staleness))
    learner_devs, rollout_devs = placement.split_devices(4)
    split = _train(tmp_path, "split", make_mesh((1, 4, 1), devices=learner_devs),
                   _cfg(max_staleness=staleness, rollout_devices=4))
    assert split[0].rollout_mesh is not None and set(split[0].rollout_mesh.devices.flat) == set(rollout_devs)
    assert [_steady(h) for h in colocated[1]] == [_steady(h) for h in split[1]]
    for a, b in zip(colocated[2], split[2]):
        np.testing.assert_array_equal(a, b)


def test_two_plus_six_learns_as_colocated(tmp_path):
    colocated = _train(tmp_path, "colocated", make_mesh((6, 1, 1)), _cfg(prompts_per_step=6, max_staleness=1))
    learner_devs, _ = placement.split_devices(2)
    split = _train(tmp_path, "split", make_mesh((6, 1, 1), devices=learner_devs),
                   _cfg(prompts_per_step=6, max_staleness=1, rollout_devices=2))
    assert split[0].rollout_mesh.devices.shape == (1, 2, 1)
    for a, b in zip(colocated[1], split[1]):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
    for a, b in zip(colocated[2], split[2]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_rollout_options_are_checked_against_the_rollout_mesh(tmp_path):
    learner_devs, _ = placement.split_devices(4)
    with pytest.raises(ValueError, match="rollout_rows_per_pass=2 does not divide over the rollout mesh"):
        _train(tmp_path, "bad", make_mesh((1, 4, 1), devices=learner_devs),
               _cfg(rollout_devices=4, rollout_rows_per_pass=2))
    with pytest.raises(ConfigError, match="rollout_mesh_shape"):
        _train(tmp_path, "bad", make_mesh((1, 4, 1), devices=learner_devs),
               _cfg(rollout_devices=4, rollout_mesh_shape=(1, 4)))
