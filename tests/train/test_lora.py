"""LoRA RL (`config.LoRAConfig`, `models.lora`): a new adapter leaves the base's outputs, only the adapters are
trained and optimized (the base frozen in the compute dtype), the unmerged forward equals the merged kernels, 8
devices equal 1, a LoRA RL run resumes exactly, and the KL reference is the base without adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import arm_jax as aj
from arm_jax.config import ConfigError, LoRAConfig
from arm_jax.data import countdown
from arm_jax.models import lora
from arm_jax.train.learner import Learner, LossConfig, OptimConfig, micro_batch_loss
from tests.rl_helpers import countdown_run, small_rl_config, steady

LORA = LoRAConfig(rank=4, alpha=8.0)


def _tiny(arch="qwen2"):
    return countdown.tiny_model_config(hidden=32, layers=2, heads=2, mlp=64, arch=arch, act="relu")


def _policy(mesh, arch="qwen2", seed=0):
    return lora.add_lora(aj.init_policy(_tiny(arch), seed=seed, mesh=mesh, init_std=0.06), LORA, seed=1)


def _batch(n=8, T=12, seed=0):
    rng = np.random.default_rng(seed)
    tok = rng.integers(3, 20, (n, T)).astype(np.int32)
    attn = np.ones((n, T), np.int32)
    attn[: n // 2, :3] = 0  # left padding on half the rows
    loss = np.zeros((n, T), np.float32)
    loss[:, 6:] = 1.0
    return {"tokens": tok, "attention_mask": attn, "loss_mask": loss,
            "advantages": rng.normal(size=n).astype(np.float32), "logp_old": np.full((n, T), -2.5, np.float32)}


@pytest.mark.parametrize("arch", ["qwen2", "starcoder2"])
def test_new_adapters_leave_the_base_outputs(mesh1, arch):
    base = aj.init_policy(_tiny(arch), seed=0, mesh=mesh1, init_std=0.06)
    with_lora = lora.add_lora(base, LORA, seed=1)
    names = sorted("/".join(map(str, k)) for k, _ in nnx.to_flat_state(lora.split(with_lora.params)[0]))
    per_layer = 2 * (7 if arch == "qwen2" else 6)  # A and B of q k v o + gate up down (plain MLP: up down)
    assert len(names) == 2 * per_layer and "layers/0/attn/o_lora_b" in names
    b = _batch()
    a1 = aj.forward_logits(base, b["tokens"], b["attention_mask"])
    a2 = aj.forward_logits(with_lora, b["tokens"], b["attention_mask"])
    np.testing.assert_allclose(np.asarray(a1), np.asarray(a2), atol=1e-6, rtol=0)  # B = 0: XLA's fusion rounds
    prompts = [[5, 6, 7], [8, 9]]
    g1 = aj.generate(base, prompts, max_new_tokens=6, temperature=0.0, stop_ids=[])
    g2 = aj.generate(with_lora, prompts, max_new_tokens=6, temperature=0.0, stop_ids=[])
    np.testing.assert_array_equal(g1.tokens, g2.tokens)


def test_unmerged_forward_equals_the_merged_kernels(mesh1):
    p = _policy(mesh1)
    adapters, base = lora.split(p.params)
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), adapters)
    p = p.replace(params=lora.merge(base, adapters))
    b = _batch()
    unmerged = aj.forward_logits(p, b["tokens"], b["attention_mask"])
    merged = aj.forward_logits(lora.merged_policy(p), b["tokens"], b["attention_mask"])
    assert float(jnp.abs(unmerged - aj.forward_logits(p.replace(params=lora.merge(base, jax.tree.map(
        jnp.zeros_like, adapters))), b["tokens"], b["attention_mask"])).max()) > 1e-2  # the adapters matter
    np.testing.assert_allclose(np.asarray(unmerged), np.asarray(merged), atol=2e-6)


def test_only_the_adapters_are_trained(mesh1):
    p = _policy(mesh1)
    learner = Learner(p, LossConfig(), OptimConfig(lr=1e-2, max_grad_norm=None))
    state = learner.init_state()
    flat = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state.params)}  # the state is donated
    assert flat and all(k[-1].endswith(("_lora_a", "_lora_b")) for k in flat)  # the state: adapters only
    assert all(v.dtype == np.float32 for v in flat.values())
    frozen_before = [np.asarray(x) for x in jax.tree.leaves(learner.frozen)]
    b = _batch()
    # the learner's adapter gradient (unmerged forward) against the gradient through the folded kernels
    adapters0 = jax.tree.map(lambda x: x, state.params)

    def folded_loss(ad):
        full = lora.merged_policy(p.replace(params=lora.merge(learner.frozen, ad))).params
        from arm_jax.train.learner import TrainBatch
        bb = TrainBatch.of({**{k: jnp.asarray(v) for k, v in b.items()}, "ref_logp": jnp.zeros((8, 12))})
        denom = jnp.sum(bb.loss_mask)
        graphdef = lora.merged_policy(p).graphdef
        return micro_batch_loss(graphdef, full, bb, denom, LossConfig(), None, 1.0, 512, False)[0]

    want = optax_norm(jax.grad(folded_loss)(adapters0))
    state, metrics = learner.step(state, b, jax.random.key(0))
    assert float(metrics["grad_norm"]) == pytest.approx(float(want), rel=1e-4)
    for before, after in zip(frozen_before, jax.tree.leaves(learner.frozen)):
        np.testing.assert_array_equal(before, np.asarray(after))  # the base never moves
    moved = {k[-1][-1]: float(np.abs(np.asarray(v.get_value()) - flat[k]).max())
             for k, v in nnx.to_flat_state(state.params)}
    assert moved["b"] > 0 and moved["a"] > 0


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_eight_devices_equal_one(mesh1):
    one = _policy(mesh1)
    eight = _policy(aj.make_mesh((1, 4, 2)))
    b = _batch(n=8)
    out = []
    for p in (one, eight):
        learner = Learner(p, LossConfig(), OptimConfig(lr=1e-2), micro_batch_size=4)
        state, m = learner.step(learner.init_state(), b, jax.random.key(0))
        out.append(([np.asarray(x) for x in jax.tree.leaves(state.params)], float(m["loss"])))
    assert out[0][1] == pytest.approx(out[1][1], rel=1e-5)
    for a, c in zip(out[0][0], out[1][0]):
        np.testing.assert_allclose(a, c, atol=1e-6, rtol=1e-5)


def _cfg(**kw):
    return small_rl_config(lr=1e-2, **kw)


_run = countdown_run


def test_lora_rl_resumes_exactly_and_its_reference_is_the_base(mesh1, tmp_path):
    cfg = _cfg(loss=LossConfig(kl_coef=0.05))
    straight = _run(_policy(mesh1), tmp_path / "a", cfg)
    hist = straight.run()
    assert all(h["kl"] > 0 for h in hist[1:]) and hist[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    first = _run(_policy(mesh1), tmp_path / "b", cfg)
    first.metrics.write(1, first.train_step())
    first.checkpoint()
    first.ckpt.wait()
    resumed = _run(_policy(mesh1), tmp_path / "b", cfg)
    assert resumed.step == 1
    hist2 = resumed.run()
    for a, b in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [steady(h) for h in hist] == [steady(h) for h in hist2]
    # the reference is the base: its log-probs equal the adapter-free model's
    base = aj.init_policy(_tiny(), seed=0, mesh=mesh1, init_std=0.06)
    b = _batch()
    ref = aj.token_logprobs(straight.ref, b["tokens"], b["attention_mask"])[0]
    want = aj.token_logprobs(base, b["tokens"], b["attention_mask"])[0]
    np.testing.assert_allclose(np.asarray(ref), np.asarray(want), atol=1e-5)
    arrays = straight.ckpt.arrays(straight.ckpt.latest_step())
    assert all("lora" in k or not k.startswith("params/") for k in arrays)  # checkpoints hold adapters only


def test_unsupported_targets_are_refused_by_name():
    with pytest.raises(ConfigError, match="targets"):
        LoRAConfig(targets=("q", "qkv"))
    from arm_jax.config import MLAConfig, MoEConfig
    mla = aj.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=2, head_dim=16, mla=MLAConfig(kv_lora_rank=8, qk_nope_head_dim=8,
                                                                      qk_rope_head_dim=8, v_head_dim=8))
    with pytest.raises(ConfigError, match="latent attention"):
        mla.replace(lora=LoRAConfig())
    moe = _tiny().replace(moe=MoEConfig(num_experts=4, experts_per_token=2, expert_size=16))
    with pytest.raises(ConfigError, match="routed experts"):
        moe.replace(lora=LoRAConfig())
    assert moe.replace(lora=LoRAConfig(targets=("q", "v"))).lora.targets == ("q", "v")


@pytest.mark.parametrize("kind", ["qwen2_gqa7", "starcoder2_swa"])
def test_peft_loads_the_exported_adapters_and_gives_our_logits(hf_model, mesh1, tmp_path, kind):
    """Adapters (B trained away from 0) exported with `save_peft`: transformers + peft's PyTorch model on the same
    base gives our unmerged logits; the merged HF folder gives them too."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from tests import hf_models
    folder, _ = hf_model(kind)
    base = aj.load_policy(folder, mesh=mesh1)
    p = lora.add_lora(base, LoRAConfig(rank=3, alpha=6.0), seed=2)
    adapters, frozen = lora.split(p.params)
    adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(5), x.shape), adapters)
    p = p.replace(params=lora.merge(frozen, adapters))
    lora.save_peft(p, str(tmp_path / "adapter"), base_model=folder)
    torch_base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(torch_base, str(tmp_path / "adapter")).eval()
    tokens, mask = hf_models.padded_batch(p.config.vocab_size)
    want = hf_models.reference_logits(peft_model, tokens, mask)
    ours = np.asarray(aj.forward_logits(p, tokens, mask))
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - want[valid]).max() < 1e-4
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    assert np.abs(want[valid] - hf_models.reference_logits(plain, tokens, mask)[valid]).max() > 1e-2  # peft wraps
    # torch_base in place, so the adapter-free reference is a fresh load
    aj.save_policy(p, str(tmp_path / "merged"), dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    assert np.abs(hf_models.reference_logits(merged, tokens, mask)[valid] - want[valid]).max() < 1e-4


def test_launcher_lora_run_exports_merged_and_peft(tmp_path):
    """The quick-start launcher with adapters: checkpoints hold adapters only; `arm_jax.export` writes the merged
    HF folder (= final_model) and, with --peft, an adapter folder peft loads onto the SFT base with the same
    logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from arm_jax import export
    from arm_jax.train.checkpoint import Checkpointer
    from tests import hf_models
    from tests.train.test_loop import _launch
    _launch(tmp_path, ["RLConfig.steps=2", "RLConfig.eval_every=0", "OptimConfig.lr=1e-2",
                       "experiment.lora=(('rank', 4), ('alpha', 8.0))"])
    ck = Checkpointer(str(tmp_path / "checkpoints"))
    keys = [k for k in ck.arrays(ck.latest_step()) if k.startswith("params/")]
    ck.close()
    assert keys and all("_lora_" in k for k in keys)
    export.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "merged"), "--dtype", "float32"])
    export.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "peft"), "--peft"])
    load = lambda d: AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()  # noqa: E731
    merged, final = load(tmp_path / "merged"), load(tmp_path / "final_model")
    with_adapter = PeftModel.from_pretrained(load(tmp_path / "sft_model"), str(tmp_path / "peft")).eval()
    tokens, mask = hf_models.padded_batch(merged.config.vocab_size, lengths=(9, 5, 9))
    want = hf_models.reference_logits(merged, tokens, mask)[mask.astype(bool)]
    for other in (final, with_adapter):
        assert np.abs(hf_models.reference_logits(other, tokens, mask)[mask.astype(bool)] - want).max() < 1e-4
    base = hf_models.reference_logits(load(tmp_path / "sft_model"), tokens, mask)[mask.astype(bool)]
    assert np.abs(base - want).max() > 1e-3  # the adapters were trained


def test_merged_sampler_reads_the_folded_adapters(mesh1, tmp_path):
    """lora_sampler='merged': the rollout samples from W + scale A B folded in (float32 here: the same samples as
    the unmerged sampler up to rounding, so the same first step's rewards)."""
    hists = {}
    for mode in ("unmerged", "merged"):
        p = _policy(mesh1)
        adapters, base = lora.split(p.params)
        adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), adapters)
        run = _run(p.replace(params=lora.merge(base, adapters)), tmp_path / mode, _cfg(steps=1, lora_sampler=mode))
        hists[mode] = run.train_step()
    assert hists["merged"]["reward_mean"] == hists["unmerged"]["reward_mean"]
    assert hists["merged"]["mismatch/abs_logp_diff_max"] < 1e-4
    with pytest.raises(ValueError, match="lora_sampler"):
        _run(_policy(mesh1), tmp_path / "bad", _cfg(lora_sampler="fused"))
