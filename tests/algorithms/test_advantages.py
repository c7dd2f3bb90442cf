"""Advantage estimators against docs/method.md §1's worked example and hand-computed values."""

import itertools

import numpy as np
import pytest

import arm_jax as aj
from arm_jax.algorithms import advantages as adv_lib
from arm_jax.algorithms.confidence import answer_confidence, prompt_confidence


def _pad(rows, T=4):
    logp = np.zeros((len(rows), T), np.float32)
    mask = np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):
        logp[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return logp, mask


# docs/method.md §1 worked example: G = 4, alpha = 1, rho = 0.5, ddof 1, delta = 1e-6.
RESP_LOGP, RESP_MASK = _pad([[-0.1, -0.1, -0.1, -0.1], [-0.1, -2.0, -0.1, -1.0], [-0.5, -0.5], [-3.0]])
PROMPT_LOGP, PROMPT_MASK = _pad([[-1.0, -1.0, -1.0]])
R = np.array([[1.0, 1.0, 0.0, 0.0]])
A = np.array([0.866024, 0.866024, -0.866024, -0.866024])
C_O = np.array([0.904837, 0.223130, 0.606531, 0.049787])
C_Q = 0.367879


def _arm(rewards=R, **kw):
    kw.setdefault("alpha", 1.0)
    kw.setdefault("rho", 0.5)
    return np.asarray(aj.arm_advantages(rewards, RESP_LOGP, RESP_MASK, PROMPT_LOGP, PROMPT_MASK, **kw))[0]


def test_worked_example():
    np.testing.assert_allclose(_arm(), [0.329066, 1.010773, -1.104675, -0.547932], atol=1e-5)
    np.testing.assert_allclose(_arm(np.zeros((1, 4))), [0, 0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(np.asarray(answer_confidence(RESP_LOGP, RESP_MASK, 0.5)), C_O, atol=1e-6)
    np.testing.assert_allclose(np.asarray(prompt_confidence(PROMPT_LOGP, PROMPT_MASK)), [C_Q], atol=1e-6)
    # the registry gives the same numbers
    via_registry = aj.advantages("arm", R, resp_logp=RESP_LOGP, resp_mask=RESP_MASK, prompt_logp=PROMPT_LOGP,
                                 prompt_mask=PROMPT_MASK, alpha=1.0, rho=0.5)
    np.testing.assert_allclose(np.asarray(via_registry)[0], _arm(), atol=1e-6)


def test_each_flag_changes_what_it_says():
    # correct_only: the wrong answers keep A
    np.testing.assert_allclose(_arm(correct_only=True), [0.329066, 1.010773, -0.866024, -0.866024], atol=1e-5)
    # alpha scales the term
    np.testing.assert_allclose(_arm(alpha=0.5), A + 0.5 * (C_Q - C_O), atol=1e-5)
    # Dr.GRPO base
    np.testing.assert_allclose(_arm(scale_by_std=False), [0.5, 0.5, -0.5, -0.5] + (C_Q - C_O), atol=1e-5)
    # all-correct group: A = 0 but the term applies unless skip_all_correct
    ones = np.ones((1, 4))
    np.testing.assert_allclose(_arm(ones), C_Q - C_O, atol=1e-5)
    np.testing.assert_allclose(_arm(ones, skip_all_correct=True), [0, 0, 0, 0], atol=1e-7)
    # skip_all_correct leaves mixed groups alone
    np.testing.assert_allclose(_arm(skip_all_correct=True), _arm(), atol=1e-7)
    # the gate reads the accuracy signal, not the shaped reward
    shaped = np.array([[0.3, -0.1, -0.1, -0.1]])
    base = (shaped - shaped.mean()) / (shaped.std(ddof=1) + 1e-6)
    np.testing.assert_allclose(_arm(shaped, accuracy=np.zeros((1, 4))), base[0], atol=1e-5)
    np.testing.assert_allclose(_arm(shaped, accuracy=np.array([[1, 0, 0, 0]])), base[0] + C_Q - C_O, atol=1e-5)
    # rho = 1: plain length-normalized likelihood
    c1 = np.exp([-0.1, -0.8, -0.5, -3.0])
    np.testing.assert_allclose(_arm(rho=1.0), A + C_Q - c1, atol=1e-5)
    # group-mean anchor
    np.testing.assert_allclose(_arm(anchor="group_mean"), A + C_O.mean() - C_O, atol=1e-5)


def test_prompt_confidence_modes_and_ties():
    logp, mask = _pad([[-1.0, -2.0, -0.5]])
    np.testing.assert_allclose(np.asarray(prompt_confidence(logp, mask, "low_frac", 0.5)), [np.exp(-1.5)], atol=1e-6)
    np.testing.assert_allclose(np.asarray(prompt_confidence(logp, mask, "mean")), [np.exp(-3.5 / 3)], atol=1e-6)
    # k = max(1, ceil(rho n)) with float-exact boundaries: rho=0.2, n=15 -> k=3 (not 4)
    row = np.full((1, 15), -1.0, np.float32)
    row[0, :3] = -4.0
    np.testing.assert_allclose(np.asarray(answer_confidence(row, np.ones_like(row), 0.2)), [np.exp(-4.0)], atol=1e-6)
    # masked-out tokens never count, however low
    row = np.array([[-0.2, -9.0, -0.4]], np.float32)
    np.testing.assert_allclose(np.asarray(answer_confidence(row, np.array([[1, 0, 1]]), 0.5)), [np.exp(-0.4)],
                               atol=1e-6)


def test_multiplicative_ablation():
    # correct: log c = [-0.1, -1.5] -> z = [1, -1] -> w = 2 softmax([-1, 1])
    w = 2 * np.exp([-1.0, 1.0]) / np.exp([-1.0, 1.0]).sum()
    np.testing.assert_allclose(_arm(mode="multiplicative"), [A[0] * w[0], A[1] * w[1], A[2], A[3]], atol=1e-5)
    np.testing.assert_allclose(w, [0.238406, 1.761594], atol=1e-6)


@pytest.mark.parametrize("name, rewards, kwargs, expected", [
    ("grpo", [1, 0, 0, 0], {}, [1.5, -0.5, -0.5, -0.5]),
    ("grpo", [1, 0, 0, 0], {"std_ddof": 0}, [1.7320508, -0.5773503, -0.5773503, -0.5773503]),
    ("grpo", [1, 1, 1, 1], {}, [0, 0, 0, 0]),
    ("grpo", [0.5, 0.2, 0.2, 0.1], {}, [1.4433757, -0.2886751, -0.2886751, -0.8660254]),  # std = 0.173205
    ("drgrpo", [1, 0, 0, 0], {}, [0.75, -0.25, -0.25, -0.25]),
    ("rloo", [1, 0, 0, 0], {}, [1.0, -1 / 3, -1 / 3, -1 / 3]),
    ("rloo", [1, 1, 0, 1], {}, [1 / 3, 1 / 3, -1.0, 1 / 3]),
    ("passk", [1, 0, 0, 0], {"k": 2}, [1.0, -1 / 3, -1 / 3, -1 / 3]),
    ("passk", [0, 0, 0, 0], {"k": 2}, [0, 0, 0, 0]),
    ("passk", [1, 1, 1, 1], {"k": 2}, [0, 0, 0, 0]),
    ("unlikeliness", [1, 1, 0, 1], {"mean_logp": np.array([[-1.0, -5.0, -2.0, -3.0]])},
     None),  # correct ranked least likely first: 1 (rank 0), 3 (1), 0 (2) -> [0.875, 1, 0, 0.9375], then GRPO
])
def test_estimators_by_hand(name, rewards, kwargs, expected):
    if expected is None:
        shaped = np.array([0.875, 1.0, 0.0, 0.9375])
        expected = (shaped - shaped.mean()) / (shaped.std(ddof=1) + 1e-6)
    out = np.asarray(aj.advantages(name, np.array([rewards], np.float32), **kwargs))[0]
    np.testing.assert_allclose(out, expected, atol=1e-5)


def _passk_brute(rewards, k):
    """Mean over the k-subsets containing i of (max reward of the subset - mean) / population std."""
    N = len(rewards)
    subsets = list(itertools.combinations(range(N), k))
    vals = np.array([max(rewards[j] for j in s) for s in subsets], np.float64)
    mean, std = vals.mean(), vals.std()
    if std == 0:
        return np.zeros(N)
    return np.array([np.mean([(vals[j] - mean) / std for j, s in enumerate(subsets) if i in s]) for i in range(N)])


@pytest.mark.parametrize("N", [2, 4, 5, 8])
def test_passk_equals_brute_force_over_subsets(N):
    rng = np.random.RandomState(N)
    for _ in range(6):
        r = (rng.rand(N) < rng.rand()).astype(np.float32)
        for k in range(1, N + 1):
            ours = np.asarray(aj.advantages("passk", r[None], k=k))[0]
            np.testing.assert_allclose(ours, _passk_brute(r, k), atol=2e-5, err_msg=f"r={r}, k={k}")


def test_group_layout_is_checked():
    flat = np.arange(8, dtype=np.float32)
    np.testing.assert_array_equal(adv_lib.group_rewards(flat, 4, prompt_ids=[7] * 4 + [9] * 4), flat.reshape(2, 4))
    with pytest.raises(ValueError, match=r"group 1 \(rows 4..7\) mixes prompt ids \[7, 9\]"):
        adv_lib.group_rewards(flat, 4, prompt_ids=[7, 7, 7, 7, 9, 9, 7, 9])
    with pytest.raises(ValueError, match="cannot be split into groups of G=3"):
        adv_lib.group_rewards(flat, 3)
    with pytest.raises(ValueError, match=r"resp_logp has 3 rows, expected P\*G"):
        aj.arm_advantages(R, RESP_LOGP[:3], RESP_MASK[:3], PROMPT_LOGP, PROMPT_MASK)
    with pytest.raises(KeyError, match="unknown advantage estimator 'grpoo'"):
        aj.advantages("grpoo", R)


def test_passk_and_unlikeliness_read_the_accuracy_signal():
    """A shaped total (format bonus 0.1 on a wrong answer) must not count as correct."""
    shaped = np.array([[1.1, 0.1, 0.0, 0.0]], np.float32)
    acc = np.array([[1.0, 0.0, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(np.asarray(aj.advantages("passk", shaped, k=2, accuracy=acc))[0],
                               [1.0, -1 / 3, -1 / 3, -1 / 3], atol=1e-5)
    lp = np.array([[-1.0, -5.0, -2.0, -3.0]], np.float32)
    out = np.asarray(aj.advantages("unlikeliness", shaped, mean_logp=lp, accuracy=acc))[0]
    expected = shaped[0].copy()  # one correct sample: rank 0, unpenalized; the wrong ones keep their reward
    np.testing.assert_allclose(out, (expected - expected.mean()) / (expected.std(ddof=1) + 1e-6), atol=1e-5)


def test_unknown_options_are_errors_naming_them():
    """Options are typed dataclasses: a typo is an error when the config is built, not silently ignored."""
    from arm_jax.train.loop import RLConfig
    with pytest.raises(ValueError, match=r"'arm' has no option 'alpah'.*ARMConfig.*'alpha'"):
        adv_lib.make_options("arm", (("alpah", 1.0),))
    with pytest.raises(ValueError, match=r"RLConfig.advantage='arm'.*no option 'alpah'"):
        RLConfig(advantage_kwargs=(("alpah", 1.0),))
    with pytest.raises(ValueError, match=r"'grpo' has no option 'k'"):
        aj.advantages("grpo", R, k=2)
    with pytest.raises(ValueError, match="anchor must be 'prompt' or 'group_mean'"):
        RLConfig(advantage_kwargs=(("anchor", "mean"),))
    with pytest.raises(ValueError, match="RLConfig.advantage='grpoo'.*unknown advantage estimator"):
        RLConfig(advantage="grpoo", advantage_kwargs=())
    assert RLConfig().advantage_options == adv_lib.ARMConfig(alpha=1.0, rho=0.2)
    assert RLConfig(advantage="passk", advantage_kwargs=(("k", 2),)).advantage_options == adv_lib.PassKConfig(k=2)
