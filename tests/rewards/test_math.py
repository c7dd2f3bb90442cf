"""Math extraction and grading: the real MATH-500 references, a table of hard cases, and a grader timeout."""

import json
import os
import random
import time

import pytest

import arm_jax as aj
from arm_jax.rewards.math import MathGrader, extract_answer, extract_boxed

DATA = os.path.join(os.path.dirname(__file__), "..", "fixtures", "data")


@pytest.fixture(scope="module")
def grader():
    g = MathGrader(num_workers=2, timeout_s=4.0)
    yield g
    g.close()


# (completion, gold, expected reward)
CASES = [
    # fractions, decimals, percent
    (r"so \boxed{\frac{1}{2}}", "0.5", 1), (r"\boxed{\dfrac{3}{4}}", r"\frac{3}{4}", 1),
    (r"\boxed{0.5}", r"\frac12", 1),
    (r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", 1), (r"\boxed{0.33}", r"\frac{1}{3}", 0), (r"\boxed{50\%}", "50", 1),
    (r"\boxed{3/4}", r"\frac{3}{4}", 1), (r"\boxed{1.25}", r"\frac{5}{4}", 1), (r"\boxed{27}", "27.0", 1),
    (r"\boxed{1,000}", "1000", 1), (r"\boxed{-3}", "3", 0), (r"\boxed{7}", "8", 0),
    # sets, tuples, intervals
    (r"\boxed{\{1,2,3\}}", r"\{3,2,1\}", 1), (r"\boxed{(1,2]}", "(1,2]", 1), (r"\boxed{[1,2)}", "(1,2]", 0),
    (r"\boxed{(-\infty, 3)}", r"(-\infty,3)", 1), (r"\boxed{(3, 4)}", "(3,4)", 1), (r"\boxed{(4, 3)}", "(3,4)", 0),
    # LaTeX forms and algebra
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}", 1), (r"\boxed{x^2+2x+1}", "(x+1)^2", 1),
    (r"\boxed{\pi/2}", r"\frac{\pi}{2}", 1),
    (r"\boxed{2\pi}", r"\pi", 0), (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", 1),
    (r"\boxed{\text{(C)}}", r"\text{(C)}", 1), (r"\boxed{10}", r"\text{ten}", 0),
    # units and decorations
    (r"\boxed{10\text{ cm}}", "10", 1), (r"\boxed{90^\circ}", "90", 1), (r"\boxed{\$18}", "18", 1),
    (r"\boxed{18 \text{ dollars}}", "18", 1),
    # nested braces, multiple boxes (the last one counts), fbox
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1), (r"first \boxed{5} then \boxed{6}", "6", 1),
    (r"first \boxed{5} then \boxed{6}", "5", 0), (r"\fbox{12}", "12", 1), (r"\boxed {4}", "4", 1),
    (r"\boxed{{12}}", "12", 1),
    # no box, empty box, unbalanced, GSM8K marker ignored in boxed mode
    ("the answer is 12", "12", 0), (r"\boxed{}", "12", 0), (r"\boxed{12", "12", 0), ("#### 12", "12", 0),
    (r"so \boxed{12} and finally \boxed{12+", "12", 0),  # an earlier box is not the truncated last one
    # adversarially long
    (r"\boxed{" + "1+" * 2000 + "1}", "2001", 0), ("x" * 100_000 + r"\boxed{3}", "3", 1),
    (r"\boxed{" + "{" * 200 + "1" + "}" * 200 + "}", "1", 1), (r"\boxed{" + "{" * 600 + "1" + "}" * 600 + "}", "1", 1),
]


def test_case_table(grader):
    results = grader.grade([c for c, _, _ in CASES], [g for _, g, _ in CASES])
    wrong = [(c[:60], g, e, r) for (c, g, e), r in zip(CASES, results) if r.reward != e]
    assert not wrong, wrong
    assert len(CASES) >= 40
    statuses = {r.status for r in results}
    assert "no_answer" in statuses and "ok" in statuses
    too_long = results[[c for c, _, _ in CASES].index(r"\boxed{" + "1+" * 2000 + "1}")]
    assert too_long.status == "malformed" and too_long.reward == 0.0  # the model's fault, not the grader's


def test_extraction_rules():
    assert extract_boxed(r"a \boxed{x^{2}} b \boxed{\frac{1}{2}} c") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{1} \boxed{2") is None  # truncated inside the last box: no answer
    assert extract_boxed(r"\boxed{{{5}}}") == "5" and extract_boxed(r"\boxed{{a}+{b}}") == "{a}+{b}"
    assert extract_answer("so #### 1,234", mode="gsm8k") == "1234"
    assert extract_answer("the result is 41 and then 42.", fallback="last_number") == "42"
    assert extract_answer("no answer") is None


def test_math500_references(grader):
    """Every MATH-500 reference solution earns its own answer and (almost never) a shuffled other answer."""
    recs = [json.loads(line) for line in open(os.path.join(DATA, "math500_test.jsonl"))]
    own = grader.grade([r["solution"] for r in recs], [r["answer"] for r in recs])
    own_rate = sum(r.reward for r in own) / len(recs)
    golds = [r["answer"] for r in recs]
    shuffled = golds[:]
    random.Random(0).shuffle(shuffled)
    other = grader.grade([r["solution"] for r in recs], shuffled)
    false_accepts = [(a, b) for a, b, r in zip(shuffled, golds, other) if r.reward and a != b]
    other_rate = sum(r.reward for r in other) / len(recs)
    print(f"MATH-500: own answer pass rate {own_rate:.3f}, shuffled answer pass rate {other_rate:.3f}")
    assert own_rate == 1.0
    assert not false_accepts  # accepted only where the shuffled answer is literally the same
    assert other_rate < 0.03


def test_timeout_is_bounded(grader):
    t = time.monotonic()
    res = grader.grade([r"\boxed{2^{2^{2^{2^{2^{2^{2^{30}}}}}}}}", r"\boxed{4}"], ["1", "4"])
    elapsed = time.monotonic() - t
    assert res[0].status == "timeout" and res[0].reward == 0  # nothing else went to the workers: not 'malformed'
    assert res[1].reward == 1.0
    assert elapsed < 2 * (4.0 + 6.0)  # tried twice: two time bounds plus two worker restarts
    # the pool still works after recycling a worker
    assert grader.grade([r"\boxed{\frac{1}{2}}"], ["0.5"])[0].reward == 1.0


def test_public_math_reward():
    assert aj.math_reward([r"\boxed{2}", "none", r"\boxed{\frac{6}{3}}"], ["2", "2", "2"]) == [1.0, 0.0, 1.0]


def test_format_and_composed_rewards():
    from arm_jax.rewards.format import format_reward
    from arm_jax.rewards.registry import RewardComposer, RewardSpec
    assert format_reward("<think>a</think> so \\boxed{3}") == 1.0
    assert format_reward("\\boxed{3}") == 0.0
    assert format_reward("<think>x</think>\n<answer>4</answer>", "think_answer") == 1.0
    comp = RewardComposer([RewardSpec("math", 1.0, accuracy=True), RewardSpec("format", 0.1),
                           RewardSpec("overlong", 1.0, kwargs=(("cache_len", 4),))])
    try:
        out = comp(["<think>t</think>\\boxed{2}", "\\boxed{3}", "<think>t</think>\\boxed{5}"],
                   [{"answer": "2"}, {"answer": "3"}, {"answer": "4"}], lengths=[5, 14, 16], max_len=16)
    finally:
        comp.close()
    assert out["accuracy"].tolist() == [1.0, 1.0, 0.0]
    assert out["overlong"].tolist() == [0.0, -0.5, -1.0]
    assert out["total"].tolist() == pytest.approx([1.1, 0.5, -0.9])


def test_a_restarted_worker_is_ready_before_its_deadline_starts():
    """Kill the only worker mid-batch (a hung item): the replacement imports math-verify (seconds, longer than the
    1 s item bound) before it takes the next items, which are then graded correctly instead of timing out."""
    g = MathGrader(num_workers=1, timeout_s=1.0)
    try:
        hang = r"\boxed{2^{2^{2^{2^{2^{2^{2^{30}}}}}}}}"
        res = g.grade([hang, r"\boxed{\frac{1}{2}}", r"\boxed{\frac{2}{4}}", r"\boxed{0.50}"],
                      ["1", "0.5", "0.5", "1/2"])
        assert res[0].status == "malformed"  # timed out twice beside graded items (test below)
        assert [r.reward for r in res[1:]] == [1.0, 1.0, 1.0], [(r.status, r.detail) for r in res]
        g._pool._workers[0].proc.kill()  # a worker that dies between batches is replaced the same way
        g._pool._workers[0].proc.join(5)
        assert [r.reward for r in g.grade([r"\boxed{\frac{3}{6}}"], ["0.5"])] == [1.0]
    finally:
        g.close()


def test_an_over_long_answer_is_malformed_in_every_format(grader):
    """An extracted answer over MAX_ANSWER_CHARS is the model's fault ('malformed', reward 0), never 'error' (a
    grader failure, which can stop the run). The DAPO formats read at most 300 characters."""
    from arm_jax.rewards.math import MAX_ANSWER_CHARS
    long = "9" * (MAX_ANSWER_CHARS + 1)
    for fmt, text in (("boxed", r"\boxed{" + long + "}"), ("auto", "#### " + long)):  # DAPO: 300 characters
        g = grader if fmt == "boxed" else MathGrader(num_workers=1, answer_format=fmt)
        try:
            [r] = g.grade([text], ["9"])
        finally:
            if g is not grader:
                g.close()
        assert (r.status, r.reward) == ("malformed", 0.0), (fmt, r)
        assert r.detail == f"answer longer than {MAX_ANSWER_CHARS}"


def test_math_term_scores_plus_minus_one_and_accuracy_stays_the_verdict():
    """correct / incorrect set the term's values (DAPO's reference scores +1 / -1); the accuracy that ARM's gate and
    Pass@k read stays the verifier's 0 / 1, and the composer's total carries the values."""
    from arm_jax.data.templates import DAPO
    from arm_jax.rewards.registry import RewardComposer
    from arm_jax.rewards.tasks import split_rewards
    specs = split_rewards(DAPO, reward_workers=1, values=(1.0, -1.0))
    assert dict(specs[0].kwargs) == dict(answer_format="dapo", workers=1, correct=1.0, incorrect=-1.0)
    assert dict(split_rewards(DAPO)[0].kwargs) == dict(answer_format="dapo", workers=2)  # 1 / 0 by default
    comp = RewardComposer(specs).start()
    try:
        out = comp(["Answer: 34", "Answer: 34.0", "no answer line", "\\boxed{34}"], [{"answer": "34"}] * 4,
                   lengths=[1] * 4, max_len=8)
    finally:
        comp.close()
    assert out["math"].tolist() == [1.0, -1.0, -1.0, -1.0] and out["total"].tolist() == [1.0, -1.0, -1.0, -1.0]
    assert out["accuracy"].tolist() == [1.0, 0.0, 0.0, 0.0]


MODEL_MADE_TIMEOUTS = [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{100000000!}", r"\boxed{" + "(" * 300 + "1" + ")" * 300 + "}"]


def test_answers_that_time_out_twice_beside_graded_ones_are_the_models_fault():
    """A model's own answer that math-verify cannot decide in time (a power tower, a huge factorial, 300 nested
    parentheses) is retried once on a fresh worker; timing out again while the workers graded the other answers of
    the call, it is 'malformed' (the model's, reward 0), not 'timeout' (the grader's, which can stop the run)."""
    g = MathGrader(num_workers=2, timeout_s=1.0)
    try:
        texts = MODEL_MADE_TIMEOUTS + [r"\boxed{\frac{1}{2}}", r"\boxed{0.50}", r"\boxed{\frac{2}{6}}"]
        res = g.grade(texts, ["1", "2", "1", "0.5", "1/2", "0.5"])
        assert [(r.status, r.reward) for r in res] == [("malformed", 0.0)] * 3 + [("ok", 1.0), ("ok", 1.0),
                                                                                   ("ok", 0.0)], res
        assert "timed out twice" in res[0].detail
        # alone in its call, nothing shows the workers healthy: the grader's timeout
        [alone] = g.grade(MODEL_MADE_TIMEOUTS[:1], ["1"])
        assert (alone.status, alone.reward) == ("timeout", 0.0)
        assert g.grade([r"\boxed{\frac{3}{6}}"], ["0.5"])[0].reward == 1.0  # the pool still works
    finally:
        g.close()
