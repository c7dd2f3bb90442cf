"""A rehearsal of the paper's run (`gin_configs/paper_setup.gin`: DAPO-Math-17k for training, MATH-500 held out)
on CPU: a tiny Qwen2 model with the real Qwen2.5 tokenizer and chat template, DAPO-Math-17k in its released layout
(real MATH problems, every prompt repeated) and the MATH-500 fixture, 2 RL steps. Asserted: the training prompts are
DAPO's and c(q) covers the problem alone; the held-out prompts carry the boxed instruction and are graded by the
boxed rule while training answers are graded by DAPO's; the in-loop evaluation and `python -m arm_jax.eval` on the
exported final model give the same numbers; the trained policy leaves the run as an HF folder."""

import json
import os
import shutil

import gin
import numpy as np
import pytest

from arm_jax import launch
from arm_jax.data.templates import DAPO_PREFIX, DAPO_SUFFIX, MATH_INSTRUCTION
from arm_jax.data.tokenizers import qwen2_tokenizer
from arm_jax.eval import __main__ as eval_cli
from arm_jax.rewards.registry import RewardComposer
from arm_jax.rewards.tasks import make_task
from tests.dapo_data import MATH500, math500_records, write_dapo_parquet

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PROBLEMS = 16
RUN = ["RLConfig.steps=2", "RLConfig.prompts_per_step=8", "RLConfig.group_size=2", "RLConfig.max_new_tokens=8",
       "RLConfig.num_minibatches=2", "RLConfig.micro_batch_size=8", "RLConfig.eval_every=2",
       "RLConfig.eval_prompts=4", "RLConfig.eval_n=2", "RLConfig.checkpoint_every=1", "RLConfig.samples_every=1",
       "experiment.mesh_shape=(1, -1, 1)",
       "DAPO_OVERLONG_BUFFER=4"]  # the recipe's overlong penalty (4096 of 8192 tokens), scaled to the 8-token budget


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    import transformers
    root = tmp_path_factory.mktemp("paper")
    os.environ["ARM_JAX_DATA_DIR"] = str(root / "tfds")  # built datasets of this test only
    tok = qwen2_tokenizer(str(root / "tokenizer"))
    model_dir = root / "tiny_qwen2.5"
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                   max_position_embeddings=4096, bos_token_id=151643, eos_token_id=151643)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    json.dump({"eos_token_id": [151645, 151643]}, open(model_dir / "generation_config.json", "w"))
    data_dir = root / "dapo"
    data_dir.mkdir()
    problems = math500_records(PROBLEMS)
    write_dapo_parquet(data_dir / "dapo-math-17k.parquet", problems, repeats=4)
    shutil.copy(MATH500, data_dir / "math500_test.jsonl")
    workdir = root / "run"
    gin.clear_config()
    try:
        launch.main(["--gin_file", os.path.join(ROOT, "gin_configs", "paper_setup.gin"), "--workdir", str(workdir),
                     "--gin_param", f"MODEL_DIR='{model_dir}'", "--gin_param", f"DATA_DIR='{data_dir}'",
                     *[a for p in RUN for a in ("--gin_param", p)]])
    finally:
        gin.clear_config()
    task = make_task("math:dapo_math_17k", tokenizer=tok, manual_dir=str(data_dir), eval_dataset="math500",
                     stop_ids=(151645, 151643))
    yield dict(workdir=workdir, data_dir=data_dir, tok=tok, task=task, problems=problems)
    os.environ.pop("ARM_JAX_DATA_DIR", None)


def _user_turn(text: str) -> str:
    return text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


def test_training_prompts_are_dapo_and_cq_covers_the_problem(rehearsal):
    tok, task, problems = rehearsal["tok"], rehearsal["task"], rehearsal["problems"]
    assert len(task.train) == PROBLEMS  # 4 copies of each prompt in the file, one each after deduplication
    by_problem = {r["problem"]: r for r in problems}
    for i in range(len(task.train)):
        rec = task.train[i]
        ids, qmask = task.encode(rec)
        text = tok.decode(ids)
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
        assert _user_turn(text) == DAPO_PREFIX + rec["question"] + DAPO_SUFFIX  # the release's user message
        span = [t for t, m in zip(ids, qmask) if m]
        assert tok.decode(span).strip() == rec["question"].strip()  # c(q): the problem, not DAPO's boilerplate
        assert len(span) < len(ids) - 60  # DAPO's instruction (~60 tokens) is outside the span
        assert rec["answer"] == by_problem[rec["question"]]["answer"]


def test_heldout_prompts_carry_the_boxed_instruction(rehearsal):
    tok, task = rehearsal["tok"], rehearsal["task"]
    math500 = {r["problem"]: r["answer"] for r in map(json.loads, open(MATH500))}
    assert len(task.eval) == 500
    for i in range(4):  # the prompts the loop evaluates
        rec = task.eval[i]
        ids, qmask = task.eval_encode(rec)
        assert math500[rec["question"]] == rec["answer"]
        assert _user_turn(tok.decode(ids)) == rec["question"] + "\n" + MATH_INSTRUCTION
        assert tok.decode([t for t, m in zip(ids, qmask) if m]).strip() == rec["question"].strip()
    assert {151643, 151645} <= set(task.stop_ids)


def test_each_split_is_graded_by_its_own_rule(rehearsal):
    task = rehearsal["task"]
    ex = [{"answer": "42"}] * 4
    answers = ["so it is 42.\nAnswer: 42", "The answer is \\boxed{42}.", "Answer: 41\nCheck: 42 is wrong",
               "we get 42"]
    train, heldout = RewardComposer(task.rewards), RewardComposer(task.eval_rewards)
    try:
        assert train(answers, ex, lengths=np.ones(4), max_len=8)["accuracy"].tolist() == [1, 0, 0, 0]
        assert heldout(answers, ex, lengths=np.ones(4), max_len=8)["accuracy"].tolist() == [0, 1, 0, 0]
    finally:
        train.close()
        heldout.close()


def test_run_outputs_and_cli_evaluation_agree(rehearsal, tmp_path):
    workdir = rehearsal["workdir"]
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("reward/error_frac", "reward/timeout_frac", "reward/no_answer_frac", "c_q_mean", "lr"):
        assert key in rows[1], key
    assert rows[1]["reward/error_frac"] == 0.0 and rows[1]["reward/no_answer_frac"] > 0.5  # a random model
    # warm-up counts RL steps: 10 of them, 2 updates each -> lr after step 1 is 1e-6 * (1 .. 2) / 20
    assert rows[1]["lr"] == pytest.approx(1e-6 * 0.5 / 20, rel=1e-3)
    samples = [json.loads(line) for line in open(workdir / "samples.jsonl")]
    assert samples and all(s["prompt"] in {p["problem"] for p in rehearsal["problems"]} for s in samples)
    final = workdir / "final_model"
    assert json.load(open(final / "generation_config.json"))["eos_token_id"] == [151645, 151643]
    res = eval_cli.main(["--checkpoint", str(final), "--benchmark", "math500", "--data_dir",
                         str(rehearsal["data_dir"]), "--limit", "4", "--n", "2", "--temperature", "0.6",
                         "--top_p", "1.0", "--max_new_tokens", "8", "--seed", "7777", "--out", str(tmp_path)])
    cli, loop = res["results"][0], rows[-1]
    assert cli["problems"] == loop["eval/prompts"] == 4
    assert cli["pass_at_k"][1] == loop["eval/pass@1"] and cli["pass_at_k"][2] == loop["eval/pass@2"]
    assert cli["entropy"] == pytest.approx(loop["eval/entropy"], rel=1e-4)  # the same prompts and samples
