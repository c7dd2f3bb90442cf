"""`arm_jax.plan`: per-device bytes against shards computed by hand, model FLOPs against XLA's count on a TPU
topology, the collective parser on a known program, slice names, the named out-of-memory error, the command."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from arm_jax.config import ModelConfig
from arm_jax.plan import PlanDoesNotFit, make_target, plan_step, topology_name
from arm_jax.plan import flops as F
from arm_jax.plan import hlo
from arm_jax.plan.__main__ import main as plan_main
from arm_jax.train.rl_config import RLConfig

# programs compiled for abstract TPU devices are written to the persistent cache but cannot be loaded back
pytestmark = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")

TINY = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, dtype="bfloat16", eos_token_ids=(2,))
RL = RLConfig(prompts_per_step=4, group_size=4, max_new_tokens=24, max_prompt_tokens=16, micro_batch_size=8)


def _has_libtpu() -> bool:
    try:
        import libtpu  # noqa: F401
        return True
    except ImportError:
        return False


needs_libtpu = pytest.mark.skipif(not _has_libtpu(), reason="libtpu (pip install -e '.[tpu]') not installed")


def _sharded_bytes(cfg: ModelConfig, devices: int, itemsize: int) -> float:
    """Bytes per device of one params-shaped tree by hand: a tensor with an 'embed' dimension (every kernel and
    the embedding; all dims here divide 8) is split over the fsdp devices, norms and biases are replicated."""
    D, F_, H, K, Dh, V, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                             cfg.vocab_size, cfg.num_layers)
    sharded = V * D * 2 + L * (D * H * Dh * 2 + D * K * Dh * 2 + 3 * D * F_)  # embed, lm_head, q/o, k/v, mlp
    replicated = L * ((H + 2 * K) * Dh + 2 * D) + D  # q/k/v biases, two norms per layer, final norm
    return (sharded / devices + replicated) * itemsize


def test_local_plan_bytes_equal_the_shards_by_hand():
    """ZeRO-3 over 8 devices: the learner program's arguments are exactly 1/8 of the float32 masters and of Adam's
    mu and nu (plus replicated norms/biases), the batch's row shards and the scalars; a replicated optimizer state
    would add 7/8 of 8 bytes per parameter."""
    plan = plan_step(TINY, dataclasses.replace(RL, rollout_engine="lockstep", pack_sequences=False), (1, 8, 1),
                     make_target("local"))
    stages = {s.name: s for s in plan.stages}
    assert set(stages) == {"rollout/prefill", "rollout/decode", "logprobs/policy", "learner/update", "eval/prefill",
                           "eval/decode"}
    assert all(s.error is None for s in plan.stages)
    masters = _sharded_bytes(TINY, 8, 4)
    rows, L = 16, 16 + 24
    # tokens, mask, loss_mask, logp_old [N, L] + advantages [N]; ref_logp and the PRNG key are unused without a
    # KL term and a sampled loss, and jit drops unused arguments
    batch = (4 * rows * L + rows) * 4 / 8
    scalars = 4 + 4 + 4 + 4  # Adam's and the schedule's counts, the state's step and skipped counters
    expected = 3 * masters + batch + scalars
    learner = stages["learner/update"]
    assert learner.argument_bytes == pytest.approx(expected, abs=0), (learner.argument_bytes, expected)
    assert plan.state_bytes == pytest.approx(3 * masters + 8, abs=0)
    full = _sharded_bytes(TINY, 1, 4)
    assert learner.argument_bytes < 3 * full / 4  # far below a replicated optimizer state (3 x full)
    prefill = stages["rollout/prefill"]  # masters + prompts [16, 16] x 2 int32 arrays, row-sharded
    assert prefill.argument_bytes == pytest.approx(masters + 2 * 16 * 16 * 4 / 8, abs=16)
    assert prefill.resident_bytes == pytest.approx(2 * masters, abs=16)  # Adam's moments stay on the chip
    assert stages["logprobs/policy"].runs == 2 and stages["learner/update"].runs == 1
    rep = plan_step(TINY, dataclasses.replace(RL, rollout_param_layout="replicated", rollout_engine="lockstep"),
                    (1, 8, 1), make_target("local"))
    rep_stages = {s.name: s for s in rep.stages}
    bf16_full = _sharded_bytes(TINY, 1, 2)
    assert rep_stages["rollout/prefill"].argument_bytes == pytest.approx(bf16_full + 2 * 16 * 16 * 4 / 8, abs=16)


def test_refill_plan_compiles_its_stages_and_prefills_each_prompt_once():
    """The refill engine's programs: 8 slots (2 prompts of G=4 per prefill), an insert per prefill and decode
    chunks; its prefill computes 1/G of lockstep's tokens and its slots' cache is the only cache."""
    rl = dataclasses.replace(RL, rollout_slots=8, rollout_chunk_steps=8)
    refill = {s.name: s for s in plan_step(TINY, rl, (1, 8, 1), make_target("local")).stages}
    lock = {s.name: s for s in plan_step(TINY, dataclasses.replace(rl, rollout_engine="lockstep",
                                                                   rollout_rows_per_pass=8), (1, 8, 1),
                                         make_target("local")).stages}
    assert [n for n in refill if n.startswith("rollout")] == ["rollout/prefill", "rollout/insert", "rollout/decode"]
    assert all(s.error is None for s in refill.values())
    assert refill["rollout/prefill"].runs == refill["rollout/insert"].runs == 2  # 4 prompts, 2 per prefill
    assert refill["rollout/decode"].runs == 2 * 3  # every answer at the budget: 2 waves of 8 slots x 24 steps
    total = lambda st, name: st[name].runs * st[name].flops_per_call  # noqa: E731
    assert total(refill, "rollout/prefill") == pytest.approx(total(lock, "rollout/prefill") / 4)
    # the same slot-steps; refill's chunks attend over their live window (bucket(16 + progress + 8) <= 40 slots),
    # lockstep's steps over all 40: 2 waves x (8 x 24 x bucket windows) vs 2 passes x 8 x 24 x 40 key slots
    attention = lambda slots: F.attention_flops(TINY, slots, 1)  # noqa: E731
    matmuls = 2 * F.active_matmul_params(TINY) * 2 * 8 * 24
    windows = 8 * 8 * (24 + 32 + 40)  # chunks starting at progress 0, 8, 16
    assert total(refill, "rollout/decode") == pytest.approx(2 * (matmuls / 2 + attention(windows)))
    assert total(lock, "rollout/decode") == pytest.approx(matmuls + attention(2 * 8 * 24 * 40))
    # the slot state (cache [8, 40] per layer + rows) is an argument of the decode chunk, aliased to its output
    assert refill["rollout/decode"].alias_bytes > 0


def test_collectives_are_counted_per_loop_trip():
    text = """HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag = f32[32]{0} all-gather(%x), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %ar = f32[8]{0} all-reduce(%x), channel_id=2, replica_groups=[1,4]<=[4], to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(%i, %x)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %rs = f32[2]{0} reduce-scatter(%a), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}
  %w = (s32[], f32[8]) while(%t0), condition=%cond, body=%body
  ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
}
"""
    c = hlo.collectives(text, 4)
    assert c.loops == [("body", 5)]
    assert c.bytes["all-gather"] == pytest.approx(5 * 128 * 3 / 4)
    assert c.bytes["all-reduce"] == pytest.approx(5 * 2 * 32 * 3 / 4)
    assert c.bytes["reduce-scatter"] == pytest.approx(8 * 3)
    assert c.count == {"all-gather": 5, "all-reduce": 5, "reduce-scatter": 1}


def test_ragged_all_to_all_counts_the_rows_sent():
    """The MoE exchange (as XLA's TPU compiler prints it: operands by name, one channel id for both directions):
    each counted at the smaller of its operand and output, times (n-1)/n: dispatch 512 rows into a 2048-row receive
    buffer over 4 devices, return 512 rows from it (over 2 here, to tell the two apart)."""
    text = """HloModule m

ENTRY %main (a: bf16[512,256]) -> bf16[512,256] {
  %rows = bf16[512,256]{1,0} parameter(0)
  %buf = bf16[2048,256]{1,0} broadcast(%z), dimensions={}
  %sent = bf16[2048,256]{1,0} ragged-all-to-all(%rows, %buf, %o, %s, %oo, %r), channel_id=1, replica_groups={{0,1,2,3}}
  %back = bf16[512,256]{1,0} broadcast(%z), dimensions={}
  ROOT %ret = bf16[512,256]{1,0} ragged-all-to-all(%sent, %back, %o, %s, %oo, %r), channel_id=1, replica_groups={{0,1}}
}
"""
    c = hlo.collectives(text.replace("  %back", '  %k = f32[8] custom-call(%rows), backend_config={"a": {\n'
                                      '}}, metadata={op_name="a Pallas call printed over two lines"}\n  %back'), 4)
    assert c.count == {"ragged-all-to-all": 2}  # the instructions after a multi-line custom call still count
    assert c.bytes["ragged-all-to-all"] == pytest.approx(512 * 256 * 2 * (3 / 4 + 1 / 2))  # groups of 4, of 2


def test_slice_names():
    assert topology_name("v5p-32")[1] == "v5p:2x2x4" and topology_name("v5p-64")[1] == "v5p:2x4x4"
    assert topology_name("v5e-16")[1] == "v5e:4x4" and topology_name("v6e-8")[1] == "v6e:2x4"
    assert topology_name("v5e:2x2")[0].peak_flops == 197e12
    with pytest.raises(ValueError, match="no v5p slice of 12 chips"):
        topology_name("v5p-24")
    with pytest.raises(ValueError, match="expected a slice name"):
        topology_name("h100-8")


@needs_libtpu
@pytest.mark.parametrize("remat", [False, True])
def test_learner_flops_on_a_tpu_topology_agree_with_6NT(remat):
    """One micro-batch, one LM-head chunk, einsum attention: every FLOP is in XLA's count, which must agree with
    6 * N * tokens + attention (+ the recomputed forward under remat, + the checkpointed LM head) within 5 %. The
    einsum path also computes the masked upper triangle of the scores, which model FLOPs leave out: it is added
    here. What remains is XLA counting elementwise work (softmaxes, norms, AdamW) that model FLOPs ignore."""
    cfg = ModelConfig(vocab_size=1024, hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=32, dtype="bfloat16", attention_impl="xla", eos_token_ids=(2,))
    rl = RLConfig(prompts_per_step=4, group_size=4, max_new_tokens=32, max_prompt_tokens=32, remat=remat,
                  pack_sequences=False)  # the padded program (the packed one: test_plan_counts_packed_passes...)
    plan = plan_step(cfg, rl, (1, -1, 1), make_target("v5e-4"))
    learner = next(s for s in plan.stages if s.name == "learner/update")
    xla_total = learner.xla_flops * plan.target.num_chips
    expected = F.train_flops(cfg, 16, 64, remat)
    masked_half = F.attention_flops(cfg, 16 * 64, 64 - 65 / 2) * (4 if remat else 3)
    ratio = xla_total / (expected + masked_half)
    print(f"remat={remat}: XLA {xla_total:.4e} vs model {expected:.4e} + masked half {masked_half:.3e} "
          f"({ratio - 1:+.1%})")
    assert abs(ratio - 1) < 0.05
    six_nt = 6 * F.active_matmul_params(cfg) * 16 * 64
    assert expected > six_nt  # attention and recomputation on top


@needs_libtpu
def test_auto_attention_is_splash_when_compiling_for_tpu():
    from arm_jax.models import layers
    from arm_jax.sharding import make_mesh
    mesh = make_mesh((1, -1, 1), devices=list(make_target("v5e-4").devices))
    with jax.set_mesh(mesh):
        assert layers.resolve_attention_impl("auto") == "splash"
    assert layers.resolve_attention_impl("auto") in ("xla", "cudnn")


@needs_libtpu
def test_a_stage_that_does_not_fit_is_a_named_error():
    """4096 x 2048-token micro-batches of einsum attention need far more than a v5e chip's 16 GB: the plan names
    the stage, the bytes and the levers."""
    cfg = TINY.replace(attention_impl="xla")
    rl = RLConfig(prompts_per_step=512, group_size=8, max_new_tokens=1024, max_prompt_tokens=1024,
                  micro_batch_size=4096, logprob_batch_size=64, rollout_rows_per_pass=64)
    plan = plan_step(cfg, rl, (1, -1, 1), make_target("v5e-4"))
    assert not plan.fits
    with pytest.raises(PlanDoesNotFit, match=r"stage learner/update on v5e-4.*levers: RLConfig.micro_batch_size"):
        plan.check()


def test_command_writes_the_plan(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "eos_token_id": 2}))
    out = tmp_path / "plan.json"
    rc = plan_main(["--gin_file=gin_configs/model_qwen2.5_0.5b.gin", f"--gin_param=experiment.model_dir='{folder}'",
                    "--gin_param=experiment.mesh_shape=(1, 8, 1)", "--gin_param=RLConfig.prompts_per_step=4",
                    "--gin_param=RLConfig.group_size=4", "--gin_param=RLConfig.max_new_tokens=8",
                    "--gin_param=RLConfig.max_prompt_tokens=8", "--topology=local", f"--out={out}"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [s["name"] for s in data["stages"]] == ["rollout/prefill", "rollout/insert", "rollout/decode",
                                                   "logprobs/policy", "learner/update", "eval/prefill",
                                                   "eval/insert", "eval/decode"]
    assert data["chips"] == 8 and data["mesh_shape"] == [1, 8, 1]
    assert data["state_bytes_per_chip"] == 3 * _sharded_bytes(TINY, 8, 4) + 8  # + two int32 counters
    assert np.all([s["fits"] for s in data["stages"]])
    from arm_jax.plan.report import compact_table
    rows = compact_table(data).splitlines()
    assert len(rows) == 2 + 8 and rows[2].startswith("| rollout/prefill | 1 |")


def test_active_parameters_of_released_configs():
    """Model FLOPs count the matrices a token passes: Qwen2.5-7B's 7.62 B parameters less its 0.54 B embedding
    table and its norm vectors; DeepSeek-V2-Lite's 2.45 B active of 15.7 B (6 of 64 routed experts, as its model
    card's 2.4 B)."""
    from arm_jax.models import num_params
    from arm_jax.plan.__main__ import model_config
    qwen = model_config(None, "Qwen2.5-7B", "bfloat16", "float32")
    norms = (2 * qwen.num_layers + 1) * qwen.hidden_size
    assert F.active_matmul_params(qwen) == num_params(qwen) - qwen.vocab_size * qwen.hidden_size - norms
    ds = model_config(None, "DeepSeek-V2-Lite-Chat", "bfloat16", "float32")
    assert 2.40e9 < F.active_matmul_params(ds) < 2.50e9 and num_params(ds) > 15.7e9


def test_answer_length_model_and_decode_schedules():
    """The plan's length model (lognormal, mean as asked) and its replay of the two engines' schedules, checked on
    a case small enough to follow by hand."""
    from arm_jax.plan.lengths import answer_lengths, lockstep_schedule, refill_schedule
    lengths = answer_lengths(1024, 8192, 2048)
    assert abs(lengths.mean() - 2048) < 1 and lengths.max() == 8192 and np.median(lengths) < 2048
    assert (answer_lengths(16, 24, 24) == 24).all()
    # 2 prompts x G=2, 2 slots, chunks of 4, prompt 8, budget 10: prompt 0's answers (3, 10) run 4 + 4 + 2 steps
    # (windows 16, 16, 18), then prompt 1's (5, 5) 4 + 1 (windows 16, 16)
    s = refill_schedule(np.asarray([3, 10, 5, 5]), group=2, slots=2, chunk=4, prompt=8, budget=10)
    assert (s.steps, s.calls, s.slot_steps) == (15, 5, 30)
    assert s.kv_slot_reads == 2 * (4 * 16 + 4 * 16 + 2 * 18 + 4 * 16 + 1 * 16)
    rows = sum(n * 8 + n * (n + 1) / 2 for n in (3, 10, 5, 5))  # each row reads prompt + i keys at its step i
    assert s.kv_row_reads == rows and s.generated == 23
    t = lockstep_schedule(np.asarray([3, 10, 5, 5]), rows_per_pass=2, prompt=8, budget=10)
    assert (t.steps, t.calls, t.kv_slot_reads) == (15, 2, 2 * 15 * 18)
    # row-bounded: a row reads prompt + i keys at its step i, then its whole answer until its pass ends
    assert t.kv_row_reads == (10 * 8 + 6 + 7 * 3) + (10 * 8 + 55) + 2 * (5 * 8 + 15)


@needs_libtpu
def test_decode_reads_are_row_bounded_when_compiling_for_tpu():
    """On TPU the decode kernel reads each row's own keys (dense family, no sliding window); the plan counts that."""
    from arm_jax.plan.stages import decode_reads_row_bounded
    from arm_jax.sharding import make_mesh
    mesh = make_mesh((1, -1, 1), devices=list(make_target("v5e-4").devices))
    assert decode_reads_row_bounded(TINY, mesh)
    assert not decode_reads_row_bounded(TINY.replace(sliding_window=64), mesh)
    assert not decode_reads_row_bounded(TINY, make_mesh((1, 8, 1)))  # CPU: the live window


def test_plan_counts_packed_passes_and_twelve_bytes_per_parameter():
    """At a mean answer of 6 of the 24-token budget (prompts of 8 of 16 slots), the packed log-prob pass and
    learner are compiled for the packed rows and counted at them; the train state is 12 bytes per parameter
    (float32 masters + Adam; replicated norms and biases add a little on 8 devices)."""
    rl = dataclasses.replace(RL, rollout_slots=8, rollout_chunk_steps=8, micro_batch_size=16)
    full = plan_step(TINY, dataclasses.replace(rl, pack_sequences=False), (1, 8, 1), make_target("local"))
    short = plan_step(TINY, rl, (1, 8, 1), make_target("local"), mean_response_tokens=6, mean_prompt_tokens=8)
    a, b = ({s.name: s for s in p.stages} for p in (full, short))
    assert "packed in 8 rows x 40" in b["learner/update"].note  # 16 seqs of 14 tokens: 6 rows, rounded to 8 devices
    # the LM head at the answers' share of each row: bucket(40 x 6 / 14) = 24 positions
    assert "LM head at 24 answer positions per row" in b["learner/update"].note
    assert b["learner/update"].flops_per_call == pytest.approx(F.train_flops(TINY, 8, 40, False, 8 * 24))
    assert F.train_flops(TINY, 8, 40, False, 8 * 24) < F.train_flops(TINY, 8, 40, False)
    assert a["learner/update"].flops_per_call == pytest.approx(F.train_flops(TINY, 16, 40, False))
    assert b["logprobs/policy"].flops_per_call == pytest.approx(F.forward_flops(TINY, 8, 40))
    assert b["rollout/decode"].runs < a["rollout/decode"].runs
    per_param = short.bytes_per_param()
    assert 12.0 <= per_param["state_bytes_per_param"] < 12.6
    assert per_param["state_bytes_per_param"] < per_param["learner_argument_bytes_per_param"] < 14


@needs_libtpu
def test_the_evaluation_is_planned_with_the_runs_levers():
    """The held-out evaluation's rollout is compiled with the run's engine levers (8 slots here) on its own rows
    (eval_n = 4 samples of 64 prompts, one refill call of 256 rows): it must fit, and it is not in the step's time
    bound."""
    rl = dataclasses.replace(RL, rollout_slots=8, rollout_chunk_steps=8, eval_n=4, eval_prompts=64)
    plan = plan_step(TINY, rl, (1, -1, 1), make_target("v5e-4"))
    stages = {s.name: s for s in plan.stages}
    assert {"eval/prefill", "eval/insert", "eval/decode"} <= set(stages)
    assert all(s.fits for s in plan.stages)
    assert stages["eval/prefill"].runs == 64 // 2  # 8 slots hold 2 prompts of 4 samples per prefill
    assert "per evaluation (64 prompts x 4, 1 call(s) of 256 rows)" in stages["eval/decode"].note
    chip, chips = plan.target.chip, plan.target.num_chips
    step = sum(s.runs * s.bound_s(chip, chips)["bound_s"] for s in plan.stages if not s.name.startswith("eval/"))
    assert plan.step_bound_s() == pytest.approx(step)


@needs_libtpu
def test_disaggregated_plan_compiles_each_side_on_its_chips():
    """v5e-16 split 4 + 12: the rollout's programs hold the compute-dtype weights sharded over its 4 chips, the
    learner's state is 12 bytes per parameter per data-parallel copy over its 12, the transfer moves each rollout
    chip's shard, and the step bound is max(rollout, learner) + transfer one-step-off, their sum synchronous."""
    rl = dataclasses.replace(RL, prompts_per_step=6, micro_batch_size=12, rollout_devices=4, eval_every=0,
                             max_staleness=1)
    plan = plan_step(TINY, rl, (3, 4, 1), make_target("v5e-16"))
    stages = {s.name: s for s in plan.stages}
    assert plan.rollout_mesh_shape == (1, 4, 1) and plan.mesh_shape == (3, 4, 1)
    assert {stages[n].chips for n in ("rollout/prefill", "rollout/decode", "transfer/weights")} == {4}
    assert {stages[n].chips for n in ("logprobs/policy", "learner/update")} == {12}
    bf16_on_two = _sharded_bytes(TINY, 4, 2)
    assert stages["transfer/weights"].collective_bytes["weights"] == pytest.approx(bf16_on_two, abs=0)
    assert stages["rollout/prefill"].resident_bytes == 0  # the weights are its argument; no optimizer state here
    assert stages["rollout/prefill"].argument_bytes >= bf16_on_two
    # 12 bytes per parameter ZeRO-sharded over fsdp 4, one copy per data-parallel rank (3), over the 12 chips
    assert plan.bytes_per_param()["state_bytes_per_param"] == pytest.approx(3 * 12.0, rel=0.02)
    sides = plan.side_bounds_s()
    assert sides["transfer_s"] == pytest.approx(bf16_on_two / plan.target.chip.ici_bandwidth)
    assert plan.step_bound_s() == pytest.approx(max(sides["rollout_s"], sides["learner_s"]) + sides["transfer_s"])
    assert plan.serial_bound_s() == pytest.approx(sum(sides.values()))
    synchronous = dataclasses.replace(plan, max_staleness=0)  # the same programs; the sides take turns
    assert synchronous.step_bound_s() == pytest.approx(sum(sides.values()))
    assert "Disaggregated: rollout 4 chips" in __import__("arm_jax.plan.report", fromlist=["table"]).table(plan)


@needs_libtpu
def test_lora_plan_holds_adapters_state_and_a_frozen_bf16_base():
    """LoRA rank 8 on v5e-4: the train state is the adapters' float32 masters + Adam (12 bytes per adapter
    parameter), the frozen base 2 bytes per parameter; the learner program takes the base as an argument."""
    from arm_jax.config import LoRAConfig
    cfg = TINY.replace(lora=LoRAConfig(rank=8, alpha=16.0))
    rl = dataclasses.replace(RL, eval_every=0)
    plan = plan_step(cfg, rl, (1, -1, 1), make_target("v5e-4"))
    full = plan_step(TINY, rl, (1, -1, 1), make_target("v5e-4"))
    assert plan.fits and full.fits
    D, F_, H, K, Dh, L = 64, 128, 4, 2, 16, 2
    r = 8
    # A + B of the 7 kernels, every one ZeRO-sharded over the 4 chips (the rank axis where the kernel's are not)
    adapters = L * r * ((D + H * Dh) + 2 * (D + K * Dh) + (H * Dh + D) + 2 * (D + F_) + (F_ + D))
    assert plan.state_bytes * 4 == pytest.approx(12 * adapters, rel=0.01)  # summed over the 4 chips
    learner = {s.name: s for s in plan.stages}["learner/update"]
    base_bf16 = _sharded_bytes(TINY, 4, 2)
    assert learner.argument_bytes >= base_bf16 + plan.state_bytes
    assert learner.argument_bytes < {s.name: s for s in full.stages}["learner/update"].argument_bytes
