"""Structure that keeps the code readable: one registry behaviour for every name table, named scopes in compiled
programs (readable profiles), and a repository that reads nothing outside itself."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arm_jax as aj
from arm_jax.algorithms import advantages, losses
from arm_jax.rewards import registry as rewards
from arm_jax.rollout import steps
from arm_jax.rollout.sampling import SamplingFlags
from arm_jax.train.learner import Learner

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.mark.parametrize("table, register, name", [
    (advantages.ADVANTAGES, advantages.ADVANTAGES.register, "grpo"),
    (losses.POLICY_LOSSES, losses.register, "ppo_clip"),
    (rewards.REWARDS, rewards.register_reward, "math"),
])
def test_registries_refuse_duplicates_and_list_choices(table, register, name):
    before = table[name]
    with pytest.raises(ValueError, match=f"{name!r} is registered twice"):
        register(name)(lambda *a, **k: None)
    assert table[name] is before
    with pytest.raises(KeyError, match=re.escape(str(sorted(table)))):
        table.get_fn("no_such_" + name)


def test_compiled_programs_carry_named_scopes(mesh1):
    cfg = aj.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=8, dtype="bfloat16")
    policy = aj.init_policy(cfg, seed=0, mesh=mesh1)
    learner = Learner(policy)
    tok = jnp.zeros((2, 6), jnp.int32)
    batch = {"tokens": tok, "attention_mask": jnp.ones_like(tok), "loss_mask": jnp.ones((2, 6)),
             "advantages": jnp.ones(2), "logp_old": jnp.zeros((2, 6)), "ref_logp": jnp.zeros((2, 6))}
    with jax.set_mesh(policy.mesh):
        hlo = learner._step.lower(policy.graphdef, learner.optimizer, learner.init_state(), batch, jax.random.key(0),
                                  num_micro_batches=1, **learner._opts).compile().as_text()
    for scope in ("cast_to_compute_dtype", "layer_0", "attention", "gatedmlp", "lm_head_logprobs", "loss_and_grad",
                  "optimizer_update"):
        assert scope in hlo, scope
    keys = jax.vmap(jax.random.key)(jnp.arange(2))
    with jax.set_mesh(policy.mesh):
        prefill = steps.prefill_jit.lower(policy.graphdef, policy.params, tok, jnp.ones_like(tok), max_new_tokens=3)
        cache, logits, _ = jax.eval_shape(lambda p: steps._prefill(policy.graphdef, p, tok, jnp.ones_like(tok),
                                                                   max_new_tokens=3), policy.params)
        sampling = (jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0), jnp.float32(0.0), jnp.asarray([2], jnp.int32))
        decode = steps.decode_jit.lower(policy.graphdef, policy.params, cache, logits, jnp.ones_like(tok), keys,
                                        jnp.full((2,), 3, jnp.int32), *sampling, max_new_tokens=3,
                                        flags=SamplingFlags())
        slots = jax.eval_shape(lambda p: steps._empty_slots(policy.graphdef, p, slots=2, length=9), policy.params)
        chunk = steps.decode_chunk_jit.lower(policy.graphdef, policy.params, slots, jnp.int32(0), *sampling,
                                             prompt_slots=6, chunk=4, flags=SamplingFlags())
        hlo = prefill.compile().as_text() + decode.compile().as_text() + chunk.compile().as_text()
    for scope in ("prefill", "decode_step", "lm_head"):
        assert scope in hlo, scope


SIBLING = r"""["'/]\.\./""" + "shared" + r"""|"shared", "data"|\.\.[/\\]\.\.[/\\]""" + "shared"


def test_nothing_reads_outside_the_repository():
    """Tests, package, experiments and gin files never point at a sibling folder (the 'shared' folder beside the
    repository that design notes live in)."""
    offenders = []
    for folder in ("arm_jax", "tests", "experiments", "gin_configs", ".ci"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if (f.endswith((".py", ".gin", ".ipynb")) or f == "run") and f != "test_structure.py":
                    text = open(os.path.join(dirpath, f), errors="ignore").read()
                    if re.search(SIBLING, text):
                        offenders.append(os.path.relpath(os.path.join(dirpath, f), ROOT))
    assert not offenders, offenders
    assert os.path.isfile(os.path.join(ROOT, "tests", "fixtures", "data", "math500_test.jsonl"))
    assert np.sum([1 for _ in open(os.path.join(ROOT, "tests", "fixtures", "data", "gsm8k_test.jsonl"))]) == 1319


# the flow of the folders: a module may import only modules of its own or a lower rank
RANKS = {"config": 0, "registry": 0, "buckets": 0, "sharding": 1, "distributed": 2, "models": 3, "policy": 4, "data": 5,
         "rollout": 6, "rewards": 7, "algorithms": 8, "train": 9, "eval": 10, "export": 11, "launch": 11,
         "plan": 12}


def _import_graph():
    import ast
    mods = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, "arm_jax")):
        for f in files:
            if f.endswith(".py"):
                name = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                mods[name.removesuffix(".__init__")] = os.path.join(dirpath, f)
    edges = {m: set() for m in mods}
    for m, path in mods.items():
        for node in ast.walk(ast.parse(open(path).read())):  # module-level and function-level imports alike
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
                targets = subs or [node.module]
            edges[m].update(t for t in targets if t in mods and t != m)
    return edges


def test_import_graph_has_no_cycle_and_follows_the_flow():
    edges = _import_graph()
    state: dict = {}

    def visit(m, stack):
        state[m] = "open"
        for n in edges[m]:
            if state.get(n) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(stack + [m, n])}")
            if n not in state:
                visit(n, stack + [m])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    upward = [(m, n) for m in edges if m != "arm_jax" for n in edges[m]
              if n == "arm_jax" or RANKS[n.split(".")[1]] > RANKS[m.split(".")[1]]]
    assert not upward, upward  # e.g. data -> rewards, train -> eval, or a library module using the facade


def test_every_module_imports_on_its_own():
    import subprocess
    import sys
    mods = sorted(_import_graph())
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n"
            "    for k in [k for k in sys.modules if k == 'arm_jax' or k.startswith('arm_jax.')]:\n"
            "        if k != 'arm_jax.data.builders':  # tfds registers its builders once per process\n"
            "            del sys.modules[k]\n"
            "    importlib.import_module(m)\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_every_configurable_option_is_documented():
    """Each gin-configurable field has its entry (TRL's grpo_config.py style): RLConfig, LossConfig and OptimConfig
    entries read 'name (default): meaning'; the estimators' options and `experiment` name every field."""
    import dataclasses
    import inspect

    from arm_jax import launch
    from arm_jax.algorithms.advantages import ARMConfig, GRPOConfig, PassKConfig, UnlikelinessConfig
    from arm_jax.algorithms.losses import LossConfig
    from arm_jax.train.learner import OptimConfig
    from arm_jax.train.rl_config import RLConfig
    missing = []
    for cls in (RLConfig, LossConfig, OptimConfig, ARMConfig, GRPOConfig, PassKConfig, UnlikelinessConfig):
        for f in dataclasses.fields(cls):
            pattern = rf"\b{f.name} \(" if cls in (RLConfig, LossConfig, OptimConfig) else rf"\b{f.name}\b"
            if not re.search(pattern, cls.__doc__ or ""):
                missing.append(f"{cls.__name__}.{f.name}")
    fn = inspect.unwrap(launch.experiment)
    missing += [f"experiment.{p}" for p in inspect.signature(fn).parameters if not re.search(rf"\b{p}\b", fn.__doc__)]
    assert not missing, missing
