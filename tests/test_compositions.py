"""Every gin composition the README and the gin files' headers document reaches `RLRun` with the values its files
say: the launcher runs `experiment` with the model loader, the task and RLRun replaced by recorders."""

import os
import types

import gin
import numpy as np
import pytest

from arm_jax import launch
from arm_jax.data import builders
from arm_jax.rewards import tasks
from arm_jax.rewards.registry import RewardComposer, RewardSpec

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
G = "gin_configs/"
ALGOS = {  # algorithm file -> (advantage, advantage_kwargs, eps_low, eps_high, agg_mode, dynamic_sampling, mask_trunc)
    "progrpo": ("arm", (("alpha", 1.0), ("rho", 0.2)), 0.2, 0.28, "token-mean", False, False),
    "grpo": ("grpo", (), 0.2, 0.2, "seq-mean-token-mean", False, False),
    "drgrpo": ("drgrpo", (), 0.2, 0.2, "seq-mean-token-sum-norm", False, False),
    "dapo": ("grpo", (), 0.2, 0.28, "token-mean", True, True),
}
TASKS = {"task_gsm8k": ("math:gsm8k", 1024), "task_dapo_math_17k": ("math:dapo_math_17k", 4096),
         "task_code_mbpp": ("code:mbpp", 1024)}
MODELS = {"model_qwen2.5_0.5b": ("/models/Qwen2.5-0.5B-Instruct", (1, -1, 1), False),
          "model_qwen2.5_1.5b": ("/models/Qwen2.5-1.5B-Instruct", (1, -1, 1), True),
          "model_qwen2.5_7b": ("/models/Qwen2.5-7B", (1, -1, 1), True),
          "model_qwen2.5_math_7b": ("/models/Qwen2.5-Math-7B", (1, -1, 1), True),
          "model_deepseek_r1_distill_qwen_1.5b": ("/models/DeepSeek-R1-Distill-Qwen-1.5B", (1, -1, 1), True),
          "model_deepseek_r1_distill_qwen_7b": ("/models/DeepSeek-R1-Distill-Qwen-7B", (1, -1, 1), True),
          "model_deepseek_v2_lite": ("/models/DeepSeek-V2-Lite-Chat", (1, 1, 1, -1), True),
          "model_qwen3_30b_a3b": ("/models/Qwen3-30B-A3B", (1, -1, 1, 8), True)}


class _Reached(Exception):
    pass


class _NoTokenizer:
    """What make_task reads of a tokenizer before the first prompt: its end markers."""
    eos_token_id, unk_token_id = 7, 0

    def convert_tokens_to_ids(self, token):
        return 0


def _resolve(monkeypatch, tmp_path, files, params=(), real_task=False):
    """Runs the launcher on `files` and returns what reached RLRun: {'rl', 'load', 'task', 'mesh', 'ckpt'};
    real_task: the task is `make_task`'s own (on no records), reaching RLRun as 'run_task'."""
    seen = {}

    def load_policy(folder, *, dtype, param_dtype, mesh, **_):
        seen["load"] = dict(folder=folder, dtype=dtype, param_dtype=param_dtype)
        seen["mesh"] = dict(mesh.shape)
        cfg = types.SimpleNamespace(dtype=dtype, param_dtype=param_dtype, eos_token_ids=(7,))
        return types.SimpleNamespace(config=cfg, mesh=mesh, tokenizer=_NoTokenizer() if real_task else None)

    def make_task(name, tokenizer=None, manual_dir=None, stop_ids=(), **kwargs):
        assert tuple(stop_ids) == (7,)  # the checkpoint's eos ids reach the task's stop ids
        seen["task"] = dict(name=name, manual_dir=manual_dir, **kwargs)
        return types.SimpleNamespace(name=name, sft_example=None)

    def rl_run(policy, task, cfg, workdir, ref_policy=None, checkpoint_dir=None, evaluator=None, **_):
        seen.update(rl=cfg, ckpt=checkpoint_dir, ref=ref_policy, run_task=task)
        raise _Reached

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(launch, "load_policy", load_policy)
    if real_task:
        monkeypatch.setattr(builders, "load_split", lambda *a, **k: [])
    else:
        monkeypatch.setattr(tasks, "make_task", make_task)
    monkeypatch.setattr(launch, "RLRun", rl_run)
    monkeypatch.setattr(launch, "write_spec", lambda *a: None)
    monkeypatch.setattr(launch, "cast_policy", lambda policy, dtype: ("ref", dtype))
    monkeypatch.setattr(launch, "_sft", lambda policy, task, workdir, steps, *a: seen.update(sft_steps=steps) or policy)
    monkeypatch.setattr(launch, "_tiny_policy_folder", lambda workdir, seed, **kw: "tiny:" + repr(sorted(kw)))
    gin.clear_config()
    try:
        with pytest.raises(_Reached):
            launch.main([a for f in files for a in ("--gin_file", G + f + ".gin")] +
                        [a for p in params for a in ("--gin_param", p)] + ["--workdir", str(tmp_path)])
    finally:
        gin.clear_config()
    return seen


def _check_algo(rl, algo, max_new_tokens):
    adv, kwargs, lo, hi, agg, ds, mt = ALGOS[algo]
    assert (rl.advantage, rl.advantage_kwargs) == (adv, kwargs)
    assert (rl.loss.policy_loss, rl.loss.eps_low, rl.loss.eps_high, rl.loss.agg_mode) == ("ppo_clip", lo, hi, agg)
    assert (rl.dynamic_sampling, rl.mask_truncated, rl.loss.kl_coef) == (ds, mt, 0.0)
    assert rl.max_new_tokens == max_new_tokens
    if agg == "seq-mean-token-sum-norm":
        assert rl.loss.max_len == max_new_tokens  # Dr.GRPO's constant is the generation budget


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_model_task_algorithm(monkeypatch, tmp_path, algo, task):
    seen = _resolve(monkeypatch, tmp_path, ["model_qwen2.5_7b", task, algo])
    _check_algo(seen["rl"], algo, TASKS[task][1])
    assert seen["task"]["name"] == TASKS[task][0]
    assert seen["load"] == dict(folder="/models/Qwen2.5-7B", dtype="bfloat16", param_dtype="float32")
    assert seen["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert seen["rl"].optim.lr == 1e-6 and seen["rl"].remat is True and seen["ref"] is None


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_model_file(monkeypatch, tmp_path, model):
    seen = _resolve(monkeypatch, tmp_path, [model, "task_gsm8k", "grpo"], ["LossConfig.kl_coef=0.04"])
    folder, mesh, remat = MODELS[model]
    assert seen["load"] == dict(folder=folder, dtype="bfloat16", param_dtype="float32")
    rest = 8 // int(np.prod([s for s in mesh if s != -1]))  # -1: the rest of the 8 devices
    assert list(seen["mesh"].values()) == [rest if s == -1 else s for s in mesh]
    assert seen["rl"].remat is remat and seen["rl"].advantage == "grpo"
    assert seen["rl"].routing_replay is (len(mesh) == 4)  # the MoE model files replay the sampler's routing
    assert seen["rl"].scan_layers is (len(mesh) == 4)  # and scan their layers
    assert seen["rl"].loss.kl_coef == 0.04 and seen["ref"] == ("ref", "bfloat16")  # a bf16 frozen reference


def test_paper_setup(monkeypatch, tmp_path):
    seen = _resolve(monkeypatch, tmp_path, ["paper_setup"],
                    ["MODEL_DIR='/m/qwen7b'", "DATA_DIR='/d/dapo'"])
    rl = seen["rl"]
    _check_algo(rl, "progrpo", 8192)
    assert (rl.steps, rl.prompts_per_step, rl.group_size, rl.num_minibatches, rl.micro_batch_size) == \
        (500, 128, 8, 4, 8)
    assert (rl.optim.lr, rl.optim.weight_decay, rl.optim.warmup_steps, rl.optim.max_grad_norm) == \
        (1e-6, 0.1, 10, 1.0)
    assert (rl.eval_n, rl.eval_temperature, rl.eval_prompts, rl.max_prompt_tokens) == (32, 0.6, 500, 2048)
    assert seen["load"] == dict(folder="/m/qwen7b", dtype="bfloat16", param_dtype="float32")
    assert seen["task"] == dict(name="math:dapo_math_17k", manual_dir="/d/dapo", eval_dataset="math500",
                                answer_format="dapo", reward_values=(1.0, -1.0),  # the reference's rule and +1/-1
                                overlong_buffer=4096)  # and its overlong shaping (FlowRL's verl recipe: 4096 of 8192)
    assert seen["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and seen["ckpt"] is None


def test_tpu_pod(monkeypatch, tmp_path):
    seen = _resolve(monkeypatch, tmp_path, ["tpu_pod"], ["CKPT_DIR='gs://b/run'"])
    rl = seen["rl"]
    _check_algo(rl, "progrpo", 8192)
    assert (rl.micro_batch_size, rl.remat, rl.optim.lr, rl.prompts_per_step) == (32, True, 1e-6, 128)
    assert (rl.rollout_rows_per_pass, rl.rollout_param_layout, rl.logprob_rows) == TPU_POD_ROLLOUT
    assert seen["ckpt"] == "gs://b/run"
    assert seen["load"]["dtype"] == "bfloat16" and seen["load"]["param_dtype"] == "float32"


TPU_POD_ROLLOUT = (None, "train", 32)  # rows per rollout pass, sampler layout, log-prob rows (tpu_pod.gin)


@pytest.mark.parametrize("name,folder,mesh,levers", [
    ("tpu_v5e_qwen2.5_1.5b", "/models/Qwen2.5-1.5B-Instruct", [1, 4, 2], (8, 128, 32)),
    ("tpu_deepseek_v2_lite", "/models/DeepSeek-V2-Lite-Chat", [1, 2, 1, 4], (32, None, 32)),
    ("tpu_qwen3_30b_a3b", "/models/Qwen3-30B-A3B", [1, 1, 1, 8], (16, None, 16)),
])
def test_tpu_slice_files(monkeypatch, tmp_path, name, folder, mesh, levers):
    """The slice files README's plan table names keep the paper's RL shapes and set the memory levers."""
    seen = _resolve(monkeypatch, tmp_path, [name], ["CKPT_DIR='gs://b/run'"])
    rl = seen["rl"]
    _check_algo(rl, "progrpo", 8192)
    assert (rl.prompts_per_step, rl.group_size, rl.max_prompt_tokens) == (128, 8, 2048)
    assert (rl.micro_batch_size, rl.rollout_rows_per_pass, rl.logprob_rows) == levers
    assert seen["load"]["folder"] == folder and list(seen["mesh"].values()) == mesh


def test_paper_setup_under_grpo(monkeypatch, tmp_path):
    """An algorithm file given after a setup file replaces the setup's algorithm and keeps the rest."""
    rl = _resolve(monkeypatch, tmp_path, ["paper_setup", "grpo"])["rl"]
    _check_algo(rl, "grpo", 8192)
    assert rl.optim.lr == 1e-6 and rl.prompts_per_step == 128


def test_quickstart(monkeypatch, tmp_path):
    seen = _resolve(monkeypatch, tmp_path, ["quickstart"])
    rl = seen["rl"]
    assert (rl.advantage, rl.advantage_kwargs) == ("arm", (("alpha", 1.0), ("rho", 0.2)))
    assert (rl.loss.eps_low, rl.loss.eps_high, rl.loss.agg_mode) == (0.2, 0.28, "token-mean")
    assert (rl.optim.lr, rl.optim.weight_decay, rl.steps, rl.prompts_per_step, rl.max_new_tokens) == \
        (1e-4, 0.0, 300, 32, 26)
    assert seen["load"]["dtype"] == "float32" and seen["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert seen["task"]["name"] == "countdown" and seen["sft_steps"] == 1000


def test_quickstart_under_grpo(monkeypatch, tmp_path):
    """The README's side-by-side command: grpo.gin after quickstart.gin swaps the algorithm, keeps the recipe."""
    seen = _resolve(monkeypatch, tmp_path, ["quickstart", "grpo"])
    rl = seen["rl"]
    assert (rl.advantage, rl.advantage_kwargs) == ("grpo", ())
    assert (rl.loss.eps_low, rl.loss.eps_high, rl.loss.agg_mode) == (0.2, 0.2, "seq-mean-token-mean")
    assert (rl.optim.lr, rl.steps, rl.prompts_per_step, rl.group_size, rl.max_new_tokens) == (1e-4, 300, 32, 8, 26)
    assert seen["task"]["name"] == "countdown" and seen["sft_steps"] == 1000


def test_quickstart_one_step_off(monkeypatch, tmp_path):
    """README's one-step-off command: one_step_off.gin after the quick-start sets staleness and TIS, keeps the rest."""
    rl = _resolve(monkeypatch, tmp_path, ["quickstart", "one_step_off"])["rl"]
    assert (rl.max_staleness, rl.rollout_correction, rl.rollout_correction_threshold) == (1, "tis", 2.0)
    assert (rl.advantage, rl.steps, rl.prompts_per_step, rl.rollout_devices) == ("arm", 300, 32, None)


def test_tpu_pod_disaggregated(monkeypatch, tmp_path):
    """Half the devices learn (the launcher's mesh: 4 of the 8 test devices), half sample, one-step-off."""
    seen = _resolve(monkeypatch, tmp_path, ["tpu_pod_disaggregated"], ["CKPT_DIR='gs://b/run'"])
    rl = seen["rl"]
    _check_algo(rl, "progrpo", 8192)
    assert (rl.rollout_devices, rl.max_staleness, rl.rollout_correction) == (0.5, 1, "tis")
    assert seen["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert (rl.micro_batch_size, rl.prompts_per_step) == (32, 128)


def test_lora_composes_onto_a_model_file(monkeypatch, tmp_path):
    """lora.gin after a setup: the launcher adds rank-64 adapters on all seven projections; no second reference."""
    seen = {}
    monkeypatch.setattr(launch, "add_lora", lambda policy, cfg, seed: seen.update(lora=cfg) or policy)
    monkeypatch.setattr(launch, "write_lora_spec", lambda *a: None)
    out = _resolve(monkeypatch, tmp_path, ["model_qwen2.5_7b", "task_gsm8k", "grpo", "lora"],
                   ["LossConfig.kl_coef=0.04"])
    assert (seen["lora"].rank, seen["lora"].alpha, seen["lora"].targets) == \
        (64, 128.0, ("q", "k", "v", "o", "gate", "up", "down"))
    assert out["ref"] is None and out["rl"].loss.kl_coef == 0.04  # the run's own base is the KL reference


def test_tpu_v5e_lora_file(monkeypatch, tmp_path):
    """The v5e LoRA slice file: the paper's RL shapes, rank-64 adapters, the memory levers and lr 1e-5."""
    seen = {}
    monkeypatch.setattr(launch, "add_lora", lambda policy, cfg, seed: seen.update(lora=cfg) or policy)
    monkeypatch.setattr(launch, "write_lora_spec", lambda *a: None)
    out = _resolve(monkeypatch, tmp_path, ["tpu_v5e_qwen2.5_7b_lora"], ["CKPT_DIR='gs://b/run'"])
    rl = out["rl"]
    _check_algo(rl, "progrpo", 8192)
    assert (rl.prompts_per_step, rl.group_size, rl.optim.lr) == (128, 8, 1e-5)
    assert (rl.micro_batch_size, rl.rollout_rows_per_pass, rl.logprob_rows) == (8, 64, 32)
    assert seen["lora"].rank == 64 and list(out["mesh"].values()) == [1, 4, 2]


SHAPED = {  # setup files -> (task name, the task options the file sets, the format pattern its prompts ask for,
    # the overlong weight by default: DAPO's 1.0 on +1/-1 at the verifier's scale)
    ("quickstart",): ("countdown", (), "boxed", 0.5),
    ("model_qwen2.5_7b", "task_gsm8k", "dapo"): ("math:gsm8k", (), "boxed", 0.5),
    ("model_qwen2.5_7b", "task_dapo_math_17k", "dapo"): (
        "math:dapo_math_17k", (("eval_dataset", "math500"), ("answer_format", "dapo"), ("reward_values", (1.0, -1.0))),
        "answer_line", 1.0),
    ("model_qwen2.5_7b", "task_code_mbpp", "grpo"): ("code:mbpp", (("eval_dataset", "humaneval"),), "code_block", 0.5),
}
IN_FORMAT = {"boxed": "so it is \\boxed{3}.", "answer_line": "3 + 0 = 3.\nanswer: 3",
             "code_block": "Here:\n```python\ndef f():\n    return 3\n```"}


@pytest.mark.parametrize("files", sorted(SHAPED))
def test_shaping_options_reach_the_runs_rewards(monkeypatch, tmp_path, files):
    """DAPO's overlong penalty and the format term, bound from gin for any task, are terms of the rewards RLRun
    composes (the training split's; the held-out split keeps its verifier alone), and the overlong term scores
    against the run's response budget, RLConfig.max_new_tokens."""
    name, options, pattern, weight = SHAPED[files]
    shaping = (("overlong_buffer", 16), ("format_weight", 0.1))
    seen = _resolve(monkeypatch, tmp_path, list(files), [f"experiment.task_kwargs={options + shaping!r}"],
                    real_task=True)
    task, budget = seen["run_task"], seen["rl"].max_new_tokens
    assert task.name == name and all(s.accuracy for s in task.eval_rewards)
    shaped = [s for s in task.rewards if not s.accuracy]
    assert shaped == [RewardSpec("overlong", weight, kwargs=(("cache_len", 16),)),
                      RewardSpec("format", 0.1, kwargs=(("pattern", pattern),))]
    laid_out = IN_FORMAT[pattern]
    out = RewardComposer(shaped)([laid_out, "x", laid_out], [{}] * 3, lengths=[budget - 16, budget - 8, budget],
                                 max_len=budget)
    np.testing.assert_allclose(out["overlong"], [0.0, -0.5, -1.0])
    np.testing.assert_allclose(out["format"], [1.0, 0.0, 1.0])
    np.testing.assert_allclose(out["total"], weight * out["overlong"] + 0.1 * out["format"], rtol=1e-6)


def test_a_stated_overlong_weight_is_used_as_given(monkeypatch, tmp_path):
    seen = _resolve(monkeypatch, tmp_path, ["quickstart"],
                    ["experiment.task_kwargs=(('overlong_buffer', 8), ('overlong_weight', 0.25))"], real_task=True)
    assert [s for s in seen["run_task"].rewards if not s.accuracy] == [
        RewardSpec("overlong", 0.25, kwargs=(("cache_len", 8),))]


def test_unknown_task_option_is_named(monkeypatch, tmp_path):
    with pytest.raises(TypeError, match=r"task 'math:gsm8k' got unknown option\(s\) \['overlong_len'\].*"
                                        r"experiment.task_kwargs.*'overlong_buffer'"):
        _resolve(monkeypatch, tmp_path, ["model_qwen2.5_7b", "task_gsm8k", "grpo"],
                 ["experiment.task_kwargs=(('overlong_len', 16),)"], real_task=True)


@pytest.mark.parametrize("option, value", [("overlong_buffer", True), ("overlong_buffer", -4),
                                           ("overlong_weight", -0.5), ("overlong_weight", "0.5"),
                                           ("format_weight", "0.1"), ("format_weight", -0.1),
                                           ("format_weight", True), ("format_weight", float("nan"))])
def test_bad_shaping_options_are_named(option, value):
    """True is not a 1-token buffer, nor a string or a negative number a weight: each is an error naming the option."""
    with pytest.raises(ValueError, match=f"task option {option} must be a number"):
        tasks.make_task("countdown", **{option: value})


def test_an_overlong_buffer_past_the_budget_stops_the_run_as_it_is_built(monkeypatch, tmp_path):
    """A buffer as long as RLConfig.max_new_tokens (quickstart: 26) is an error naming both options when RLRun is
    built, before a model is read or a rollout runs (here: no policy at all), not at the first reward."""
    from arm_jax.train.loop import RLRun
    seen = _resolve(monkeypatch, tmp_path, ["quickstart"], ["experiment.task_kwargs=(('overlong_buffer', 26),)"],
                    real_task=True)
    with pytest.raises(ValueError, match=r"task option overlong_buffer=26\) must be shorter than the response "
                                         r"budget \(RLConfig.max_new_tokens=26\)"):
        RLRun(None, seen["run_task"], seen["rl"], str(tmp_path))


def test_dapo_overlong_buffer_macro_keeps_the_task_options(monkeypatch, tmp_path):
    """DAPO_OVERLONG_BUFFER switches DAPO's overlong penalty on for DAPO-Math-17k without rebinding the task options
    (one gin tuple): the rule and the +1 / -1 values stay, the penalty weighs 1.0 (DAPO's factor on +1 / -1); off
    (0) by default in the task file."""
    seen = _resolve(monkeypatch, tmp_path, ["model_qwen2.5_7b", "task_dapo_math_17k", "dapo"],
                    ["DAPO_OVERLONG_BUFFER=1024"], real_task=True)
    [verifier] = [s for s in seen["run_task"].rewards if s.accuracy]
    assert dict(verifier.kwargs) == dict(answer_format="dapo", workers=2, correct=1.0, incorrect=-1.0)
    assert [s for s in seen["run_task"].rewards if not s.accuracy] == [
        RewardSpec("overlong", 1.0, kwargs=(("cache_len", 1024),))]
    off = _resolve(monkeypatch, tmp_path, ["model_qwen2.5_7b", "task_dapo_math_17k", "dapo"], real_task=True)
    assert [s.name for s in off["run_task"].rewards] == ["math"]
