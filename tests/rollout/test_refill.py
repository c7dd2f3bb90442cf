"""The slot-refilling engine returns the lockstep engine's samples whatever the slotting, with per-row budgets,
prefills each prompt once, and wastes fewer decode slots on long-tailed lengths (counted, not timed)."""

import numpy as np
import pytest

import arm_jax as aj

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24], [40], [3, 1, 4, 1, 5, 9]]
BUDGETS = [12, 3, 9, 14, 6]  # ragged budgets: rows that never stop end truncated at different steps


def _assert_same(ref, out, what=""):
    np.testing.assert_array_equal(out.tokens, ref.tokens, err_msg=what)
    np.testing.assert_array_equal(out.mask, ref.mask, err_msg=what)
    np.testing.assert_array_equal(out.truncated, ref.truncated, err_msg=what)
    np.testing.assert_array_equal(out.lengths, ref.lengths, err_msg=what)
    # log-probs: same values up to XLA CPU's batch-size-dependent matmul blocking (lockstep itself differs by
    # ~2e-6 between 2 and 10 rows per pass)
    np.testing.assert_allclose(out.logp, ref.logp, atol=1e-5, err_msg=what)
    np.testing.assert_allclose(out.logp_sampling, ref.logp_sampling, atol=1e-5, err_msg=what)


def _stop_ids(policy, **controls):
    """Two tokens free-running rows emit early, so some rows stop inside a chunk and others do not."""
    free = aj.generate(policy, PROMPTS, max_new_tokens=6, n=2, stop_ids=[], engine="lockstep", **controls)
    return sorted({int(free.tokens[0, 2]), int(free.tokens[5, 4])})


LAYOUTS = ((10, 32), (4, 3), (2, 1))  # (slots, chunk_steps): every row at once; refills + compaction; one prompt


@pytest.mark.parametrize("kind,layouts", [("qwen2_gqa7", LAYOUTS), ("starcoder2_swa", LAYOUTS[1:2]),
                                          ("deepseek_v2", LAYOUTS[1:2])])
def test_refill_returns_the_lockstep_samples(kind, layouts, hf_model, mesh1):
    policy = aj.load_policy(hf_model(kind)[0], mesh=mesh1)
    for controls in (dict(temperature=0.0), dict(temperature=0.9, top_p=0.8, seed=3)):
        kw = dict(max_new_tokens=BUDGETS, n=2, stop_ids=_stop_ids(policy, **controls), **controls)
        ref = aj.generate(policy, PROMPTS, engine="lockstep", **kw)
        assert ref.truncated.any() and not ref.truncated.all()  # both endings are exercised
        assert ref.tokens.shape[1] == max(BUDGETS)
        for slots, chunk in layouts:
            out = aj.generate(policy, PROMPTS, engine="refill", slots=slots, chunk_steps=chunk, **kw)
            _assert_same(ref, out, f"{kind} {controls} slots={slots} chunk={chunk}")
            if slots < 10:
                assert out.stats.prefill_calls > 1 and out.stats.chunks > 2


def test_refill_on_8_devices_equals_one_device(hf_model, mesh1):
    folder, _ = hf_model("qwen2_tied")
    kw = dict(max_new_tokens=BUDGETS, n=2, stop_ids=[], seed=5, temperature=1.0)
    ref = aj.generate(aj.load_policy(folder, mesh=mesh1), PROMPTS, engine="lockstep", **kw)
    for shape, slots in (((2, 2, 2), 4), ((1, 8, 1), 8), ((1, 8, 1), 10)):  # 10 slots: not split over 8 devices
        policy = aj.load_policy(folder, mesh=aj.make_mesh(shape))
        out = aj.generate(policy, PROMPTS, engine="refill", slots=slots, chunk_steps=4, **kw)
        _assert_same(ref, out, f"{shape} slots={slots}")


def test_budgets_and_logp_equal_the_learner(hf_model, mesh1):
    policy = aj.load_policy(hf_model("qwen3_odd")[0], mesh=mesh1)
    out = aj.generate(policy, PROMPTS, max_new_tokens=BUDGETS, n=3, seed=1, temperature=0.8, stop_ids=[],
                      slots=6, chunk_steps=4)
    np.testing.assert_array_equal(out.lengths, np.repeat(BUDGETS, 3))  # no stop id: every row runs its budget
    assert out.truncated.all() and out.tokens.shape == (15, 14)
    tokens, attn, _ = out.sequences()
    logp, _ = aj.token_logprobs(policy, tokens, attn)
    Tp = out.prompt_tokens.shape[1]
    np.testing.assert_allclose(np.asarray(logp)[:, Tp:] * out.mask, out.logp, atol=1e-5)
    with pytest.raises(ValueError, match="one positive integer per prompt"):
        aj.generate(policy, PROMPTS, max_new_tokens=[4, 4])
    with pytest.raises(ValueError, match="one positive integer per prompt"):
        aj.generate(policy, PROMPTS, max_new_tokens=[4, 0, 4, 4, 4])
    with pytest.raises(ValueError, match="hold the n=3 samples"):
        aj.generate(policy, PROMPTS, max_new_tokens=4, n=3, slots=2)
    with pytest.raises(ValueError, match="engine must be one of"):
        aj.generate(policy, PROMPTS, max_new_tokens=4, engine="vllm")


def test_each_prompt_is_prefilled_once_and_the_tail_is_not_waited_for(hf_model, mesh1):
    policy = aj.load_policy(hf_model("qwen2_gqa7")[0], mesh=mesh1)
    budgets = [4, 4, 4, 4, 4, 4, 4, 40]  # one long answer among short ones
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    kw = dict(max_new_tokens=budgets, n=4, seed=2, stop_ids=[])
    lock = aj.generate(policy, prompts, engine="lockstep", **kw)
    out = aj.generate(policy, prompts, engine="refill", slots=8, chunk_steps=8, **kw)
    _assert_same(lock, out)
    Tp = lock.prompt_tokens.shape[1]
    assert lock.stats.prefill_tokens == 32 * Tp  # every row
    assert out.stats.prefill_tokens <= 2 * 8 * Tp  # every prompt once, padded to a power of two per call
    assert out.stats.generated_tokens == lock.stats.generated_tokens == 4 * (7 * 4 + 40)
    assert lock.stats.useful_fraction == pytest.approx(4 * (7 * 4 + 40) / (32 * 40))
    assert out.stats.useful_fraction > 0.6 > 2 * lock.stats.useful_fraction
    whole = aj.generate(policy, prompts, engine="refill", **kw)  # slots = every row: one prefill of each prompt
    assert whole.stats.prefill_tokens == 8 * Tp and whole.stats.prefill_calls == 1
    _assert_same(lock, whole)


@pytest.mark.parametrize("kind", ["qwen2_gqa7", "deepseek_v2"])
def test_live_window_decode_returns_the_full_cache_samples(kind, hf_model, mesh1):
    """Decode chunks that read only the live window of the cache (a bucket above the furthest slot) return the
    samples of chunks that read all Tp + N slots; several window sizes are used along the way."""
    from arm_jax.rollout import steps
    policy = aj.load_policy(hf_model(kind)[0], mesh=mesh1)
    kw = dict(max_new_tokens=[40, 3, 25, 40, 9], n=2, stop_ids=[], seed=1, temperature=1.0, engine="refill",
              slots=4, chunk_steps=4)
    full = aj.generate(policy, PROMPTS, live_window=False, **kw)
    before = steps.decode_chunk_jit._cache_size()
    live = aj.generate(policy, PROMPTS, **kw)
    assert steps.decode_chunk_jit._cache_size() - before >= 3  # windows 24, 32, 48 (of 16 + 40 = 56 slots)
    _assert_same(full, live, kind)


def test_pipelined_chunks_give_the_blocking_loops_samples_and_schedule(hf_model, mesh1, monkeypatch):
    """Where the next chunk does not depend on the last one's results (no prompt waits; nothing to compact, or more
    than half the slots live), it is dispatched before they are read: same tokens, same counts (chunks, decode
    steps, slot-steps, prefills) as the loop that waits for every chunk, with refills and compaction on the way."""
    from arm_jax.rollout import refill, steps
    policy = aj.load_policy(hf_model("qwen2_gqa7")[0], mesh=mesh1)
    events = []
    dispatch, fetch = steps.decode_chunk_jit, refill._fetch
    monkeypatch.setattr(steps, "decode_chunk_jit", lambda *a, **k: events.append("d") or dispatch(*a, **k))
    monkeypatch.setattr(refill, "_fetch", lambda outs: events.append("f") or fetch(outs))
    kw = dict(max_new_tokens=[30, 3, 17, 30, 9], n=2, stop_ids=[], seed=4, temperature=1.0, chunk_steps=4)
    for slots in (10, 4):  # every row at once (compaction only); refills first
        events.clear()
        blocking = aj.generate(policy, PROMPTS, slots=slots, pipeline=False, **kw)
        assert "dd" not in "".join(events)
        events.clear()
        piped = aj.generate(policy, PROMPTS, slots=slots, **kw)
        assert "dd" in "".join(events)  # a chunk was dispatched before the last one's results were read
        _assert_same(blocking, piped, f"slots={slots}")
        for field in ("chunks", "decode_steps", "slot_steps", "prefill_calls", "prefill_tokens", "generated_tokens"):
            assert getattr(piped.stats, field) == getattr(blocking.stats, field), (slots, field)
