"""Fixed shapes: prompts are padded to bucket lengths and the learner's sequences trimmed to the longest answer's
bucket, so RL steps whose prompt and answer lengths vary compile nothing after the first step of a bucket."""

import jax
import numpy as np
import pytest

import arm_jax as aj
from arm_jax.data import countdown
from arm_jax.rewards.registry import RewardSpec
from arm_jax.rewards.tasks import Task
from arm_jax.rollout import sampler
from arm_jax.rollout.sampler import bucket_length
from arm_jax.train.learner import OptimConfig
from arm_jax.train.loop import RLConfig, RLRun


def test_bucket_lengths():
    assert [bucket_length(n) for n in (1, 16, 17, 24, 25, 33, 48, 49, 97, 1025, 2048)] == \
        [16, 16, 24, 24, 32, 48, 48, 64, 128, 1536, 2048]
    assert all(bucket_length(n) - n <= bucket_length(n) / 3 for n in range(16, 5000))  # padding <= 1/3 of a row


def _task():
    """Prompts of 34 or 47 tokens (countdown digits): a batch's longest prompt is either; answers of varied
    length (a random policy under a 12-token budget)."""
    rng = np.random.RandomState(0)
    records = [{"question": "".join(rng.choice(list("0123456789"), size=n)), "answer": ""}
               for n in rng.choice([33, 46], size=64)]
    encode = lambda r: (countdown.prompt_ids(r["question"]), [0] + [1] * len(r["question"]))  # noqa: E731
    return Task("lengths", records, records[:4], encode, countdown.decode,
                [RewardSpec("format", accuracy=True, kwargs=(("pattern", "boxed"),))], [countdown.EOS_ID])


def _compiles_per_step(tmp_path, steps: int) -> tuple[list[int], list[int]]:
    cfg = countdown.tiny_model_config(hidden=32, layers=1, heads=2, mlp=64, arch="starcoder2", act="relu")
    policy = aj.init_policy(cfg.replace(max_position_embeddings=128), seed=0, mesh=aj.make_mesh((1, 1, 1)))
    rl = RLConfig(steps=steps, prompts_per_step=2, group_size=2, max_new_tokens=12, eval_every=0,
                  checkpoint_every=1000, samples_every=0, optim=OptimConfig(lr=1e-3))
    run = RLRun(policy, _task(), rl, str(tmp_path), log_to_console=False)
    lowered, widths = [], []
    listener = lambda name, *_, **__: lowered.append(name)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    counts = []
    try:
        for _ in range(steps):
            before = len([e for e in lowered if e.endswith("jaxpr_to_mlir_module_duration")])
            m = run.train_step()
            counts.append(len([e for e in lowered if e.endswith("jaxpr_to_mlir_module_duration")]) - before)
            widths.append(int(m["response_len_max"]))
    finally:
        jax._src.monitoring.unregister_event_duration_listener(listener)
        run.rewards.close()
    return counts, widths


def test_steps_with_varied_lengths_compile_once(tmp_path):
    counts, _ = _compiles_per_step(tmp_path, 6)
    assert counts[0] > 0 and counts[1:] == [0] * 5, counts


def test_without_buckets_the_same_steps_recompile(tmp_path, monkeypatch):
    """The test above can fail: with the old padding (the longest prompt rounded up to 8) the same steps compile
    again whenever a batch's longest prompt changes (40 vs 48 columns)."""
    generate = sampler.generate
    monkeypatch.setattr("arm_jax.train.loop.generate",
                        lambda *a, **k: generate(*a, **{**k, "prompt_buckets": False}))
    counts, _ = _compiles_per_step(tmp_path, 6)
    assert any(c > 0 for c in counts[1:]), counts


@pytest.mark.parametrize("n_prompt, lengths", [(10, [3, 12]), (47, [1, 12]), (47, [12, 12])])
def test_trimmed_rollout_keeps_every_valid_column(n_prompt, lengths):
    R = len(lengths)
    mask = np.zeros((R, 12), np.int32)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    out = aj.Rollout(tokens=mask * 5, mask=mask, logp=-mask.astype(np.float32), logp_sampling=-mask * 1.0,
                     lengths=mask.sum(1), truncated=np.zeros(R, bool),
                     prompt_tokens=np.ones((R, bucket_length(n_prompt)), np.int32),
                     prompt_mask=np.ones((R, bucket_length(n_prompt)), np.int32), prompt_index=np.arange(R))
    cut = out.trimmed()
    Tp, width = out.prompt_tokens.shape[1], cut.tokens.shape[1]
    assert width >= max(lengths) and (Tp + width == bucket_length(Tp + max(lengths)) or width == 12)
    np.testing.assert_array_equal(cut.mask, mask[:, :width])
    assert cut.mask.sum() == mask.sum()
