"""The sampler against transformers' greedy generate, the exact sampling distribution, and the learner's log-probs."""

import jax
import numpy as np
import pytest
import torch
from scipy import stats

import arm_jax as aj
from arm_jax.rollout.sampler import left_pad
from arm_jax.rollout.sampling import filtered_logits, flags_for

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24], [40]]


def _hf_greedy(model, prompts, max_new_tokens, eos):
    tokens, mask = left_pad(prompts)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0)
    return out[:, tokens.shape[1]:].numpy()


@pytest.mark.parametrize("kind", ["qwen2_gqa7", "qwen3_odd", "starcoder2_swa"])
def test_greedy_matches_transformers_generate(kind, hf_model, mesh1):
    folder, ref_model = hf_model(kind)
    policy = aj.load_policy(folder, mesh=mesh1)
    free = _hf_greedy(ref_model, PROMPTS, 12, eos=None)
    eos = int(free[0, 3])  # a token row 0 emits at step 4, so EOS stopping is exercised
    ref = _hf_greedy(ref_model, PROMPTS, 12, eos=eos)
    out = aj.generate(policy, PROMPTS, max_new_tokens=12, temperature=0.0, stop_ids=[eos])
    assert out.lengths[0] <= 4 and not out.truncated[0]
    for r in range(len(PROMPTS)):
        n = out.lengths[r]
        np.testing.assert_array_equal(out.tokens[r, :n], ref[r, :n], err_msg=f"row {r}")
        assert (out.tokens[r, n - 1] == eos) != out.truncated[r]
        assert np.all(out.mask[r, :n] == 1) and np.all(out.mask[r, n:] == 0) and np.all(out.tokens[r, n:] == 0)
        if n < ref.shape[1]:  # transformers pads finished rows
            assert np.all(ref[r, n:] == 0)


def test_logp_equals_learner_logprobs(hf_model, mesh1):
    policy = aj.load_policy(hf_model("qwen3_odd")[0], mesh=mesh1)
    out = aj.generate(policy, PROMPTS, max_new_tokens=10, temperature=0.8, top_p=0.9, n=3, seed=1, stop_ids=[2, 7])
    tokens, attn, loss_mask = out.sequences()
    logp, _ = aj.token_logprobs(policy, tokens, attn)
    Tp = out.prompt_tokens.shape[1]
    np.testing.assert_allclose(np.asarray(logp)[:, Tp:] * out.mask, out.logp, atol=1e-5)
    assert np.all(out.logp[out.mask == 1] < 0)
    # the sampling distribution is sharper than temperature 1 and truncated: its log-probs are higher
    assert np.mean(out.logp_sampling[out.mask == 1]) > np.mean(out.logp[out.mask == 1])


def test_reproducible_and_rows_differ(hf_model, mesh1):
    policy = aj.load_policy(hf_model("qwen2_gqa7")[0], mesh=mesh1)
    a = aj.generate(policy, PROMPTS[:2], max_new_tokens=8, n=4, seed=3, stop_ids=[])
    b = aj.generate(policy, PROMPTS[:2], max_new_tokens=8, n=4, seed=3, stop_ids=[])
    c = aj.generate(policy, PROMPTS[:2], max_new_tokens=8, n=4, seed=4, stop_ids=[])
    d = aj.generate(policy, PROMPTS[:2], max_new_tokens=8, n=4, seed=3, step=1, stop_ids=[])
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens) and not np.array_equal(a.tokens, d.tokens)
    assert len({tuple(r) for r in a.tokens[:4]}) == 4  # the n samples of one prompt differ
    np.testing.assert_array_equal(a.prompt_index, [0, 0, 0, 0, 1, 1, 1, 1])


def test_sharded_generation_equals_single_device(hf_model, mesh1):
    folder, _ = hf_model("qwen2_tied")
    single = aj.load_policy(folder, mesh=mesh1)
    ref_greedy = aj.generate(single, PROMPTS, max_new_tokens=8, temperature=0.0, n=2, stop_ids=[])
    ref_sampled = aj.generate(single, PROMPTS, max_new_tokens=8, n=2, seed=5, stop_ids=[])
    for shape in ((2, 2, 2), (1, 1, 8)):
        policy = aj.load_policy(folder, mesh=aj.make_mesh(shape))
        greedy = aj.generate(policy, PROMPTS, max_new_tokens=8, temperature=0.0, n=2, stop_ids=[])
        np.testing.assert_array_equal(greedy.tokens, ref_greedy.tokens)
        sampled = aj.generate(policy, PROMPTS, max_new_tokens=8, n=2, seed=5, stop_ids=[])
        np.testing.assert_array_equal(sampled.tokens, ref_sampled.tokens)  # keys depend on (seed, step, row) only
        np.testing.assert_allclose(sampled.logp, ref_sampled.logp, atol=1e-5)


def _expected_probs(logits, temperature, top_k, top_p, min_p):
    x = np.asarray(filtered_logits(logits[None], temperature, top_k, top_p, min_p,
                                   flags_for(top_k, top_p, min_p)))[0]
    p = np.exp(x - x.max())
    return p / p.sum()


def _np_filter(logits, temperature, top_k, top_p, min_p):
    """An independent NumPy statement of the truncation rules."""
    x = logits / temperature
    if top_k:
        x = np.where(x >= np.sort(x)[::-1][top_k - 1], x, -np.inf)
    if top_p < 1:
        p = np.exp(x - x.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        keep = np.zeros_like(p, bool)
        keep[order[before < top_p]] = True
        x = np.where(keep, x, -np.inf)
    if min_p:
        p = np.exp(x - x.max())
        p /= p.sum()
        x = np.where(p >= min_p * p.max(), x, -np.inf)
    p = np.exp(x - x.max())
    return p / p.sum()


@pytest.mark.parametrize("controls", [
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=0.7, top_k=12, top_p=1.0, min_p=0.0),
    dict(temperature=1.3, top_k=0, top_p=0.6, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2),
    dict(temperature=0.9, top_k=20, top_p=0.8, min_p=0.05),
], ids=["plain", "top_k", "top_p", "min_p", "all"])
def test_sampling_distribution(controls, hf_model, mesh1):
    """Empirical next-token frequencies over 4096 samples vs softmax(logits / T) after truncation.

    Chi-square goodness of fit at significance 1e-3 (false-failure rate 0.1 % per case for a correct sampler;
    the seeds are fixed, so the outcome is deterministic), and no sample outside the truncated support.
    """
    policy = aj.load_policy(hf_model("qwen2_tied")[0], mesh=mesh1)
    prompt = [5, 9, 17, 33]
    logits = np.asarray(aj.forward_logits(policy, [prompt]))[0, -1]
    expected = _np_filter(logits.astype(np.float64), **controls)
    np.testing.assert_allclose(_expected_probs(logits, **controls), expected, atol=1e-6)
    out = aj.generate(policy, [prompt], max_new_tokens=1, n=4096, seed=11, stop_ids=[], **controls)
    counts = np.bincount(out.tokens[:, 0], minlength=logits.shape[0])
    support = expected > 0
    assert counts[~support].sum() == 0
    if controls["top_k"]:
        assert support.sum() <= controls["top_k"]
    # pool rare categories (expected count < 5) so the chi-square approximation holds
    exp_counts = expected[support] * counts.sum()
    obs = counts[support]
    rare = exp_counts < 5
    exp_pooled = np.append(exp_counts[~rare], exp_counts[rare].sum())
    obs_pooled = np.append(obs[~rare], obs[rare].sum())
    if exp_pooled[-1] == 0:
        exp_pooled, obs_pooled = exp_pooled[:-1], obs_pooled[:-1]
    exp_pooled = exp_pooled * obs_pooled.sum() / exp_pooled.sum()  # float64 renormalization
    p_value = stats.chisquare(obs_pooled, exp_pooled).pvalue
    assert p_value > 1e-3, p_value
    # the recorded sampling log-prob is log of the truncated probability
    np.testing.assert_allclose(out.logp_sampling[:64, 0], np.log(expected[out.tokens[:64, 0]]), atol=1e-4)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(prompts=[[1, 2], []]), r"prompts\[1\] is empty"),
    (dict(prompts=[]), "non-empty list"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=131072), "exceeds the model's context"),
    (dict(prompts=[[1, 500]]), r"prompts\[0\] has token ids outside"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
])
def test_bad_arguments(kwargs, pattern, hf_model, mesh1):
    policy = aj.load_policy(hf_model("qwen2_tied")[0], mesh=mesh1)
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        aj.generate(policy, args.pop("prompts"), **args)


def test_sampler_reads_the_learners_parameters(mesh1):
    """No copy between learner and sampler: generating from the learner state's params sees the update."""
    from arm_jax.train.learner import Learner, OptimConfig
    cfg = aj.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=16)
    policy = aj.init_policy(cfg, mesh=mesh1)
    learner = Learner(policy, optim_cfg=OptimConfig(lr=0.5, max_grad_norm=None))
    state = learner.init_state()
    before = aj.generate(policy, [[1, 2, 3]], max_new_tokens=6, temperature=0.0, stop_ids=[])
    out = aj.generate(policy, [[1, 2, 3]], max_new_tokens=6, n=4, seed=0, stop_ids=[])
    tokens, attn, loss_mask = out.sequences()
    batch = {"tokens": tokens, "attention_mask": attn, "loss_mask": loss_mask.astype(np.float32),
             "advantages": np.array([1.0, -1.0, 1.0, -1.0], np.float32),
             "logp_old": np.pad(out.logp, ((0, 0), (tokens.shape[1] - 6, 0)))}
    state, _ = learner.step(state, batch, jax.random.key(0))
    after = aj.generate(policy.replace(params=state.params), [[1, 2, 3]], max_new_tokens=6, temperature=0.0,
                        stop_ids=[])
    assert not np.array_equal(before.tokens, after.tokens)
