"""The RL loop end to end through the gin launcher: outputs, exact resume after SIGKILL, mesh-changing restore,
and clear errors for bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import pytest

import arm_jax as aj
from arm_jax import launch
from arm_jax.train.checkpoint import CheckpointMismatch, Checkpointer, leaf_paths
from arm_jax.train.learner import Learner, OptimConfig

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
QUICK = os.path.join(ROOT, "gin_configs", "quickstart.gin")
SMALL = ["experiment.sft_steps=150", "experiment.sft_batch_size=32", "experiment.sft_lr=1e-2", "RLConfig.steps=4",
         "RLConfig.prompts_per_step=8", "RLConfig.group_size=4", "RLConfig.eval_every=2",
         "RLConfig.eval_prompts=16", "RLConfig.eval_n=4", "RLConfig.checkpoint_every=1",
         "RLConfig.samples_every=2", "OptimConfig.lr=1e-3",
         "experiment.task_kwargs=(('format_weight', 0.1),)",
         "experiment.tiny_model=(('hidden', 32), ('layers', 2), ('heads', 2), ('mlp', 64), ('act', 'relu'), "
         "('arch', 'starcoder2'))"]  # the quick-start's family


def _launch(workdir, extra=()):
    gin.clear_config()
    try:
        launch.main(["--gin_file", QUICK, "--workdir", str(workdir)] +
                    [a for p in SMALL + list(extra) for a in ("--gin_param", p)])
    finally:
        gin.clear_config()


def _final_params(workdir):
    ck = Checkpointer(os.path.join(workdir, "checkpoints"))
    step = ck.latest_step()
    arrays = ck.arrays(step)
    ck.close()
    return step, [arrays[k] for k in sorted(arrays)]


def _history(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s"))} for r in rows]


def test_short_run_end_to_end(tmp_path):
    _launch(tmp_path)
    hist = _history(tmp_path)
    assert [h["step"] for h in hist] == [0, 1, 2, 3, 4]
    train = [h for h in hist if h["step"] > 0]
    for key in ("reward_mean", "accuracy", "entropy", "c_q_mean", "c_o_mean", "arm_term_mean", "clip_frac_high",
                "ratio_max", "grad_norm", "lr", "frac_correct_negative_adv", "response_len_mean"):
        assert all(key in h for h in train), key
    assert "eval/pass@1" in hist[0] and "eval/pass@4" in hist[-1]
    assert len({h["reward_mean"] for h in train}) > 1  # rewards are not constant
    assert os.path.isfile(tmp_path / "config.gin") and os.path.isdir(tmp_path / "tb")
    assert os.path.isfile(tmp_path / "samples.jsonl")
    sft = aj.load_policy(str(tmp_path / "sft_model"), mesh=aj.make_mesh((1, 1, 1)))
    step, final = _final_params(tmp_path)
    assert step == 4
    before = {"params/" + "/".join(p): np.asarray(x) for p, x in leaf_paths(sft.params)}
    after = Checkpointer(str(tmp_path / "checkpoints")).arrays(step)
    assert set(before) < set(after) and any(np.abs(before[k] - after[k]).max() > 0 for k in before)
    _check_export(tmp_path, after)


def _check_export(workdir, trained: dict):
    """`python -m arm_jax.export` writes the checkpoint's parameters exactly (float32) as an HF folder that
    transformers loads, and its greedy tokens equal ours; the launcher's final_model holds the same weights."""
    import torch
    from transformers import AutoModelForCausalLM
    from arm_jax import export
    out = workdir / "exported"
    export.main(["--workdir", str(workdir), "--out", str(out), "--dtype", "float32"])
    mine = aj.load_policy(str(out), mesh=aj.make_mesh((1, 1, 1)))
    for path, x in leaf_paths(mine.params):
        np.testing.assert_array_equal(np.asarray(x), trained["params/" + "/".join(path)])
    final = aj.load_policy(str(workdir / "final_model"), mesh=aj.make_mesh((1, 1, 1)))
    for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(mine.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    prompts = [mine.tokenizer(q)["input_ids"] for q in ("3,8,5|19|", "2,6,4|14|", "9,1,7|56|")]
    ours = aj.generate(mine, prompts, max_new_tokens=10, temperature=0.0, stop_ids=[])
    ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    for p, toks in zip(prompts, ours.tokens):
        with torch.no_grad():
            g = ref.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        assert g[0, len(p):].tolist() == toks.tolist()


def _subprocess_env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(ROOT, ".jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = ROOT
    return env


def _cmd(workdir, steps):
    args = [sys.executable, "-m", "arm_jax.launch", "--gin_file", QUICK, "--workdir", str(workdir)]
    for p in SMALL + [f"RLConfig.steps={steps}", "RLConfig.eval_every=0"]:
        args += ["--gin_param", p]
    return args


def test_exact_resume_after_sigkill(tmp_path):
    """A run killed with SIGKILL at a random moment and relaunched equals an uninterrupted run, bit for bit."""
    steps = 24  # long enough that the kill below always lands mid-run
    env = _subprocess_env()
    subprocess.run(_cmd(tmp_path / "straight", steps), env=env, check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed, steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "checkpoints" / "2").exists():
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.0, 0.3))  # somewhere between steps, inside a step or a save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = Checkpointer(str(killed / "checkpoints")).latest_step()
    assert done is not None and done < steps, done
    subprocess.run(_cmd(killed, steps), env=env, check=True, capture_output=True, timeout=300)
    s1, p1 = _final_params(tmp_path / "straight")
    s2, p2 = _final_params(killed)
    assert s1 == s2 == steps
    for a, b in zip(p1, p2):
        np.testing.assert_array_equal(a, b)
    assert _history(tmp_path / "straight") == _history(killed)


def test_interrupted_save_leaves_previous_checkpoint(tmp_path):
    """orbax writes into a temporary folder and renames it: a save killed midway leaves only that folder, which
    restore ignores; the run resumes from the previous checkpoint."""
    _launch(tmp_path, ["RLConfig.steps=2", "RLConfig.eval_every=0"])
    partial = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234"
    partial.mkdir()
    (partial / "garbage").write_text("half-written")
    assert Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 2
    _launch(tmp_path, ["RLConfig.steps=3", "RLConfig.eval_every=0"])
    assert [h["step"] for h in _history(tmp_path)] == [1, 2, 3]


def test_restore_onto_a_different_mesh(tmp_path):
    cfg = aj.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=8)
    src = aj.init_policy(cfg, seed=1, mesh=aj.make_mesh((1, 8, 1)))
    state = Learner(src).init_state()
    ck = Checkpointer(str(tmp_path), async_save=False)
    ck.save(7, state, {"step": 7})
    ck.wait()
    dst = aj.init_policy(cfg, seed=2, mesh=aj.make_mesh((2, 2, 2)))
    like = Learner(dst).init_state()
    restored, meta = ck.restore(7, like)
    assert meta["step"] == 7
    for a, b, c in zip(jax.tree.leaves(state), jax.tree.leaves(restored), jax.tree.leaves(like)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding == c.sharding
    q = restored.params["layers"][0]["attn"]["q"][...]
    assert q.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2} and not q.sharding.is_fully_replicated
    ck.close()


def test_restore_checks_keys_not_leaf_positions(tmp_path, mesh1):
    """Checkpoints are keyed by parameter path and optimizer field: another model or optimizer is an error naming
    the first differing key (before, equally shaped leaves were restored into each other by position)."""
    cfg = aj.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8)
    state = Learner(aj.init_policy(cfg, seed=1, mesh=mesh1)).init_state()
    ck = Checkpointer(str(tmp_path), async_save=False)
    ck.save(3, state, {"step": 3})
    ck.wait()
    assert "opt_state/1/0/mu/layers/1/mlp/up/value" in ck.arrays(3)  # adam's mu, by field name
    one_layer = Learner(aj.init_policy(cfg.replace(num_layers=1), seed=1, mesh=mesh1)).init_state()
    with pytest.raises(CheckpointMismatch, match="holds 'opt_state/.*layers/1/.*', which the run's state does not"):
        ck.restore(3, one_layer)
    no_clip = Learner(aj.init_policy(cfg, seed=1, mesh=mesh1), optim_cfg=OptimConfig(max_grad_norm=None))
    with pytest.raises(CheckpointMismatch, match="has no 'opt_state/"):
        ck.restore(3, no_clip.init_state())
    wider = Learner(aj.init_policy(cfg.replace(intermediate_size=96), seed=1, mesh=mesh1)).init_state()
    with pytest.raises(CheckpointMismatch, match=r"down/value' is float32\[64, 32\] there, float32\[96, 32\]"):
        ck.restore(3, wider)
    params = ck.restore_params(3, state.params)  # the parameters alone (export)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ck.close()


def test_bad_input_messages(tmp_path):
    with pytest.raises(SystemExit, match="RLConfig.stepz"):
        _launch(tmp_path / "a", ["RLConfig.stepz=3"])
    with pytest.raises(FileNotFoundError, match="/no/such/model"):
        _launch(tmp_path / "b", ["experiment.model_dir='/no/such/model'"])
    with pytest.raises(ValueError, match=r"not divisible by RLConfig.micro_batch_size=5"):
        _launch(tmp_path / "c", ["RLConfig.micro_batch_size=5", "experiment.sft_steps=0"])
    with pytest.raises(ValueError, match=r"batch axes \(data x fsdp x expert = 8 devices\) do not divide "
                                         r"the micro-batch of 4 sequences"):
        _launch(tmp_path / "d", ["experiment.mesh_shape=(1, 8, 1)", "RLConfig.micro_batch_size=4",
                                 "experiment.sft_steps=0"])
    from arm_jax.data.records import DataError
    from arm_jax.rewards.tasks import make_task
    from arm_jax.data.tokenizers import qwen2_tokenizer
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"gsm8k split 'train': none of \[gsm8k_train.jsonl.*\] found in .*empty"):
        make_task("math:gsm8k", tokenizer=qwen2_tokenizer(), manual_dir=str(tmp_path / "empty"),
                  data_dir=str(tmp_path / "tfds"))
    with pytest.raises(SystemExit, match="gin file 'nope.gin' does not exist"):
        launch.main(["--gin_file", "nope.gin", "--workdir", str(tmp_path / "e")])


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "gin_configs")) if f.endswith(".gin")))
def test_every_gin_config_parses(name):
    """Each shipped gin file binds only real, documented options (a typo would be an error here)."""
    gin.clear_config()
    gin.add_config_file_search_path(ROOT)
    try:
        gin.parse_config_files_and_bindings([os.path.join(ROOT, "gin_configs", name)], [])
        if name == "paper_setup.gin":
            rl = gin.query_parameter("RLConfig.group_size"), gin.query_parameter("OptimConfig.lr")
            assert rl == (8, 1e-6) and gin.query_parameter("RLConfig.max_new_tokens") == 8192
    finally:
        gin.clear_config()


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "gin_configs")) if f.endswith(".gin")))
def test_every_gin_file_parses(name, monkeypatch):
    """Every shipped gin file (includes resolved from the repo root) binds only existing options."""
    monkeypatch.chdir(ROOT)
    gin.clear_config()
    try:
        launch.parse_gin([os.path.join("gin_configs", name)], [])
    finally:
        gin.clear_config()


def test_a_relaunch_logs_each_step_once(tmp_path, monkeypatch):
    """A run killed after logging step 2's samples but before checkpointing it relaunches from step 1: samples.jsonl
    keeps steps <= 1 (step 2 is replayed and logged again, once) and TensorBoard hides the events after step 1;
    a relaunch with no checkpoint starts the logs afresh."""
    import tensorboardX
    from arm_jax.train.metrics import MetricsWriter
    purges = []
    real = tensorboardX.SummaryWriter
    monkeypatch.setattr(tensorboardX, "SummaryWriter",
                        lambda *a, **k: purges.append(k.get("purge_step")) or real(*a, **k))
    first = MetricsWriter(str(tmp_path), 3, stream=open(os.devnull, "w"))
    for step in (1, 2):
        first.write(step, {"loss": float(step)})
        first.samples(step, [{"completion": f"s{step}a"}, {"completion": f"s{step}b"}])
    first.close()
    again = MetricsWriter(str(tmp_path), 3, history=[{"step": 1, "loss": 1.0}], stream=open(os.devnull, "w"))
    again.samples(2, [{"completion": "s2a"}, {"completion": "s2b"}])
    again.close()
    steps = [json.loads(line)["step"] for line in open(tmp_path / "samples.jsonl")]
    assert steps == [1, 1, 2, 2] and purges == [1, 2]
    MetricsWriter(str(tmp_path), 3, stream=open(os.devnull, "w")).close()  # no checkpoint: nothing kept
    assert open(tmp_path / "samples.jsonl").read() == ""
