"""Multi-process JAX on one machine: 2 processes x 4 CPU devices (gloo collectives) run the quick-start launcher
and end where 1 process x 8 devices ends: same parameters, same metric history.

Tolerance, not bit equality: gloo's cross-process all-reduce sums gradients in another order than the in-process
one (parameters after 10 SFT steps differ by ~1e-6), and over many steps such differences can flip a sampled token
and then grow, so the run is kept short."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest


from arm_jax.train.checkpoint import Checkpointer
from tests.train.test_loop import QUICK, ROOT, SMALL, _history

STEPS = ["RLConfig.steps=3", "RLConfig.eval_every=3", "RLConfig.checkpoint_every=3", "experiment.sft_steps=10",
         "experiment.mesh_shape=(1, -1, 1)"]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(ROOT, ".jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = ROOT
    return env


def _cmd(workdir, *extra, gin=()):
    args = [sys.executable, "-m", "arm_jax.launch", "--gin_file", QUICK, "--workdir", str(workdir), *extra]
    for p in SMALL + STEPS + list(gin):
        args += ["--gin_param", p]
    return args


def _final_params(workdir):
    """The last checkpoint's arrays, restored onto this process's first device whatever topology saved them."""
    ck = Checkpointer(os.path.join(workdir, "checkpoints"))
    step = ck.latest_step()
    arrays = ck.arrays(step)
    ck.close()
    return step, [arrays[k] for k in sorted(arrays)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# disaggregated: 4 learner + 4 rollout devices (2 + 2 per process), one-step-off with TIS
SPLIT = ("RLConfig.rollout_devices=4", "RLConfig.max_staleness=1", "RLConfig.rollout_correction='tis'")


@pytest.mark.parametrize("gin", [(), SPLIT], ids=["colocated", "disaggregated"])
def test_two_processes_equal_one(tmp_path, gin):
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run(_cmd(single, gin=gin), env=_env(8), check=True, capture_output=True, timeout=400)
    port = _free_port()
    procs = [subprocess.Popen(_cmd(multi, "--coordinator_address", f"localhost:{port}", "--num_processes", "2",
                                   "--process_id", str(i), gin=gin),
                              env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    s1, p1 = _final_params(single)
    s2, p2 = _final_params(multi)
    assert s1 == s2 == 3
    for a, b in zip(p1, p2):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
    assert max(float(np.max(np.abs(a))) for a in p1) > 0
    h1, h2 = _history(single), _history(multi)
    assert [h["step"] for h in h1] == [h["step"] for h in h2] == [0, 1, 2, 3]
    for a, b in zip(h1, h2):
        assert a.keys() == b.keys()
        for k in a:
            if k == "pack_fill":  # packing's efficiency: each process packs its own rows into bucketed row counts
                continue
            np.testing.assert_allclose(a[k], b[k], atol=1e-4, rtol=1e-3, err_msg=f"step {a['step']} {k}")
    assert h2[-1]["eval/prompts"] == 16


GENERATE_WORKER = """
import sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import numpy as np
import arm_jax as aj
from tests.train.test_multiprocess import GEN_CFG, GEN_BUDGETS, GEN_PROMPTS
me = jax.process_index()
policy = aj.init_policy(GEN_CFG, seed=0, mesh=aj.make_mesh((1, -1, 1)))
mine = slice(4 * me, 4 * me + 4)
outs = {}
for engine in ("refill", "lockstep"):
    out = aj.generate(policy, GEN_PROMPTS[mine], max_new_tokens=GEN_BUDGETS[mine], n=2, seed=4, stop_ids=[7, 9],
                      engine=engine, slots=8, chunk_steps=3)
    outs.update({f"{engine}_tokens": out.tokens, f"{engine}_logp": out.logp, f"{engine}_truncated": out.truncated})
np.savez(sys.argv[3], **outs)
"""
GEN_PROMPTS = [[5, 6, 7, 8], [12, 13, 14], [20, 21, 22, 23, 24], [40], [3, 1, 4, 1, 5, 9], [2, 7], [8], [1, 2]]
GEN_BUDGETS = [11, 3, 7, 13, 5, 9, 4, 6]  # process 0 has more work than process 1: the chunk decisions must agree


def _gen_cfg():
    import arm_jax as aj
    return aj.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8, eos_token_ids=(2,))


GEN_CFG = _gen_cfg()


def test_two_processes_generate_the_one_process_samples(tmp_path, mesh1):
    """Each of 2 processes (4 devices each) generates its 4 prompts with both engines over 8 global slots; the
    rows they return are the single-process lockstep rows of those prompts."""
    import arm_jax as aj
    port = _free_port()
    files = [tmp_path / f"p{i}.npz" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", GENERATE_WORKER, f"localhost:{port}", str(i), str(files[i])],
                              env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    policy = aj.init_policy(GEN_CFG, seed=0, mesh=mesh1)
    ref = aj.generate(policy, GEN_PROMPTS, max_new_tokens=GEN_BUDGETS, n=2, seed=4, stop_ids=[7, 9],
                      engine="lockstep")
    got = [np.load(f) for f in files]
    assert ref.truncated.any() and not ref.truncated.all()
    for engine in ("refill", "lockstep"):
        tokens = np.concatenate([g[f"{engine}_tokens"] for g in got])
        np.testing.assert_array_equal(tokens, ref.tokens[:, :tokens.shape[1]], err_msg=engine)
        np.testing.assert_array_equal(np.concatenate([g[f"{engine}_truncated"] for g in got]), ref.truncated)
        np.testing.assert_allclose(np.concatenate([g[f"{engine}_logp"] for g in got]), ref.logp, atol=1e-5)
