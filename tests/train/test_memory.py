"""Memory as documented: a run holds 12 bytes per parameter (float32 masters + Adam's two moments), not the loaded
parameters beside them, and a resume restores into the abstract state instead of a fresh one."""

import gc

import jax
import pytest

import arm_jax as aj
from arm_jax.models import num_params
from arm_jax.rewards.tasks import make_task
from arm_jax.train import learner as learner_lib
from arm_jax.train.learner import OptimConfig
from arm_jax.train.loop import RLConfig, RLRun

CFG = aj.ModelConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, max_position_embeddings=128)


def _live_bytes() -> int:
    gc.collect()
    return sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())


def _run(tmp_path, own: bool) -> tuple[RLRun, int]:
    base = _live_bytes()
    policy = aj.init_policy(CFG, seed=0, mesh=aj.make_mesh((1, 1, 1)))
    cfg = RLConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4, eval_every=0, samples_every=0,
                   optim=OptimConfig(lr=1e-3))
    run = RLRun(policy, make_task("countdown"), cfg, str(tmp_path), log_to_console=False, own_policy_params=own)
    del policy
    return run, _live_bytes() - base


@pytest.mark.parametrize("own, expected", [(True, 12), (False, 16)])
def test_bytes_per_parameter(tmp_path, own, expected):
    run, held = _run(tmp_path, own)
    assert held / num_params(CFG) == pytest.approx(expected, abs=0.05)  # + a few scalars (step counters)
    run.train_step()  # the run works on its masters alone
    run.checkpoint()
    run.ckpt.wait()
    run.rewards.close()


def test_resume_restores_into_the_abstract_state(tmp_path, monkeypatch):
    run, _ = _run(tmp_path, True)
    run.train_step()
    run.checkpoint()
    run.ckpt.close()
    trained = [jax.device_get(x) for x in jax.tree.leaves(run.state.params)]
    monkeypatch.setattr(learner_lib.Learner, "init_state", lambda *a, **k: pytest.fail("a fresh state was built"))
    again, held = _run(tmp_path, True)
    assert again.step == 1 and held / num_params(CFG) == pytest.approx(12, abs=0.05)
    for a, b in zip(trained, jax.tree.leaves(again.state.params)):
        assert (a == jax.device_get(b)).all()
