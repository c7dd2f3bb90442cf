"""Abstract inputs and the ahead-of-time compile of every jitted stage of one RL step.

Nothing here allocates a parameter or runs on the target: parameters, optimizer state, caches and batches are
`jax.ShapeDtypeStruct`s carrying the shardings the run would give them (the same rules object, `LogicalRules`, and
the same jitted functions the trainer calls), so the compiled programs are the trainer's own.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from arm_jax.buckets import bucket_length
from arm_jax.config import ModelConfig
from arm_jax.models import abstract_model, cache_axes, compute_params, init_cache, param_shardings
from arm_jax.models.logprobs import DEFAULT_CHUNK_SIZE
from arm_jax.models.moe import routing_layout
from arm_jax.models.qwen2 import Routing
from arm_jax.plan import flops as F
from arm_jax.plan import hlo
from arm_jax.plan.lengths import DecodeSchedule, answer_lengths, lockstep_schedule, packed_rows, refill_schedule
from arm_jax.policy import Policy, _packed_logprobs, _token_logprobs
from arm_jax.rollout import sampler, steps
from arm_jax.rollout.sampling import SamplingParams, flags_for
from arm_jax.sharding import DEFAULT_RULES, batch_devices, batch_sharding
from arm_jax.train.learner import Learner, TrainBatch, init_train_state
from arm_jax.train.rl_config import RLConfig

LEVERS = {
    "rollout": "RLConfig.rollout_slots (refill) or rollout_rows_per_pass (lockstep): the KV cache is slots x "
               "(prompt + max_new_tokens) per layer; RLConfig.rollout_param_layout, more chips on the mesh",
    "logprobs": "RLConfig.logprob_batch_size (rows per pass), attention_impl 'splash' ('auto' on TPU), more chips",
    "learner": "RLConfig.micro_batch_size, RLConfig.remat = True, attention_impl 'splash' ('auto' on TPU), the "
               "mesh (more chips on 'fsdp', or 'tensor')",
    "eval": "the held-out evaluation runs with the rollout's levers (RLConfig.rollout_slots / rollout_rows_per_pass, "
            "rollout_param_layout) on chunks of about 256 rows: fewer slots, RLConfig.eval_n",
}


def shard_bytes(x: jax.ShapeDtypeStruct) -> float:
    """Bytes of one device's shard of an abstract array (its sharding's shard shape)."""
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return float(math.prod(shape) * jnp.dtype(x.dtype).itemsize)


def tree_shard_bytes(tree) -> float:
    return sum(shard_bytes(x) for x in jax.tree.leaves(tree))


def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def abstract_params(cfg: ModelConfig, mesh, layout: str = "train"):
    """(graphdef, params as ShapeDtypeStructs). 'train': the stored dtype, sharded by the rules (ZeRO-3 over
    'fsdp'); 'replicated': the sampler's compute-dtype copy on every chip (`sampler.rollout_params`)."""
    graphdef, abstract = abstract_model(cfg)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    shardings = param_shardings(abstract, mesh)
    params = jax.tree.map(lambda v, sh: v.replace(_sds(v.get_value().shape, v.get_value().dtype, sh)),
                          abstract, shardings, is_leaf=is_var)
    if layout == "train":
        return graphdef, params
    replicated = NamedSharding(mesh, PartitionSpec())
    cast = jax.eval_shape(lambda p: compute_params(p, cfg), params)
    return graphdef, jax.tree.map(lambda x: _sds(x.shape, x.dtype, replicated), cast)


@dataclasses.dataclass
class StagePlan:
    """One jitted stage as compiled for the target. Bytes are per chip; `runs` = calls per RL step.

    argument/output/alias/temp/code_bytes: XLA's memory analysis of the program (compiler's own account);
    resident_bytes: buffers that live on the chip through the step but are not this program's arguments (the
    optimizer state during the rollout); footprint = argument + output - alias + temp + code + resident.
    xla_flops / xla_bytes: XLA's cost analysis per call per chip, loop bodies counted once (as XLA reports);
    min_bytes: the minimum HBM traffic of the call per chip and flops_per_call its model FLOPs, all chips
    (`plan.flops`); collective_bytes: per chip per call, loops scaled (`plan.hlo`)."""

    name: str
    runs: int
    note: str = ""
    compile_s: float = 0.0
    error: Optional[str] = None
    argument_bytes: float = 0.0
    output_bytes: float = 0.0
    alias_bytes: float = 0.0
    temp_bytes: float = 0.0
    code_bytes: float = 0.0
    resident_bytes: float = 0.0
    xla_flops: float = 0.0
    xla_bytes: float = 0.0
    min_bytes: float = 0.0
    flops_per_call: float = 0.0
    collective_bytes: dict = dataclasses.field(default_factory=dict)
    hbm_bytes: Optional[float] = None
    chips: Optional[int] = None  # the chips its program runs on (None: all of the target's)

    @property
    def footprint(self) -> float:
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes
                + self.resident_bytes)

    @property
    def fits(self) -> bool:
        return self.error is None and (self.hbm_bytes is None or self.footprint <= self.hbm_bytes)

    def bound_s(self, chip, chips: int) -> dict:
        """Roofline lower bounds of one call: compute (FLOPs / chips / peak), HBM (bytes / bandwidth), ICI
        (collective bytes / bandwidth), and their max (perfect overlap)."""
        if chip is None:
            return {}
        out = {"compute_s": self.flops_per_call / chips / chip.peak_flops,
               "hbm_s": self.min_bytes / chip.hbm_bandwidth,
               "ici_s": sum(self.collective_bytes.values()) / chip.ici_bandwidth if chip.ici_bandwidth else 0.0}
        out["bound_s"] = max(out.values())
        return out


def _compile(stage: StagePlan, mesh, jitted, *args, **kwargs):
    """Lowers and compiles; fills the stage's memory, cost and collectives. Returns the compiled program or None
    (out of memory or another compile error, recorded in stage.error)."""
    t0 = time.time()
    try:
        with jax.set_mesh(mesh):
            compiled = jitted.lower(*args, **kwargs).compile()
    except Exception as e:  # XLA reports out-of-memory as a compile error
        text = str(e)
        line = next((ln for ln in text.splitlines() if "memory" in ln.lower()), text.splitlines()[0] if text else "")
        stage.error = line.strip()[:400]
        stage.compile_s = time.time() - t0
        print(f"[plan] {stage.name} failed after {stage.compile_s:.0f} s: {stage.error}", file=sys.stderr, flush=True)
        return None
    stage.compile_s = time.time() - t0
    print(f"[plan] compiled {stage.name} in {stage.compile_s:.0f} s", file=sys.stderr, flush=True)
    mem = compiled.memory_analysis()
    if mem is not None:
        stage.argument_bytes = float(mem.argument_size_in_bytes)
        stage.output_bytes = float(mem.output_size_in_bytes)
        stage.alias_bytes = float(mem.alias_size_in_bytes)
        stage.temp_bytes = float(mem.temp_size_in_bytes)
        stage.code_bytes = float(mem.generated_code_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    stage.xla_flops = float(cost.get("flops", 0.0))
    stage.xla_bytes = float(cost.get("bytes accessed", 0.0))
    stage.collective_bytes = hlo.collectives(compiled.as_text(), mesh.size).bytes
    return compiled


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The shapes of one RL step: P*G rows, prompt slots Tp (max_prompt_tokens rounded up to 8), N new tokens; and
    the lengths the work depends on: mean_response (answers, `plan.lengths`: default N, every answer at the
    budget) and mean_prompt (real prompt tokens, default Tp)."""

    rows: int
    prompt: int
    new_tokens: int
    mean_response: float = 0.0
    mean_prompt: float = 0.0

    @property
    def length(self) -> int:
        return self.prompt + self.new_tokens

    @property
    def mean_tokens(self) -> float:
        """Real tokens of a sequence on average (prompt + answer): what a packed pass computes per sequence."""
        return (self.mean_prompt or self.prompt) + (self.mean_response or self.new_tokens)

    def answer_lengths(self, rows: Optional[int] = None):
        return answer_lengths(rows or self.rows, self.new_tokens, self.mean_response or self.new_tokens)


def step_shape(rl: RLConfig, prompt_tokens: Optional[int], mean_response: Optional[float] = None,
               mean_prompt: Optional[float] = None) -> StepShape:
    prompt = prompt_tokens or rl.max_prompt_tokens
    if not prompt:
        raise ValueError("the plan needs the prompt length: set RLConfig.max_prompt_tokens or --prompt_tokens")
    mean_response = float(mean_response or rl.max_new_tokens)
    if not 1 <= mean_response <= rl.max_new_tokens:
        raise ValueError(f"--mean_response_tokens={mean_response} must lie in [1, RLConfig.max_new_tokens="
                         f"{rl.max_new_tokens}]")
    mean_prompt = float(mean_prompt or prompt)
    if not 1 <= mean_prompt <= prompt:
        raise ValueError(f"--mean_prompt_tokens={mean_prompt} must lie in [1, the prompt slots {prompt}]")
    return StepShape(rl.prompts_per_step * rl.group_size, int(math.ceil(prompt / 8) * 8), rl.max_new_tokens,
                     mean_response, mean_prompt)


def decode_reads_row_bounded(cfg: ModelConfig, mesh) -> bool:
    """Whether the decode steps compiled for `mesh` read only each row's own keys: the Pallas decode kernel
    ('pallas_decode', what 'auto' picks on TPU) of the dense family without a sliding window; DeepSeek's MLA decode
    (absorbed, over the latent cache) and windowed models read the live window."""
    from arm_jax.models.layers import resolve_attention_impl
    with jax.set_mesh(mesh):
        impl = resolve_attention_impl(cfg.attention_impl, cfg.dtype, self_attention=False)
    return impl == "pallas_decode" and cfg.mla is None and cfg.sliding_window is None


def _decode_costs(stage: StagePlan, sched: DecodeSchedule, cfg: ModelConfig, weights: float, cache_bytes: float,
                  cache_rows: int, cache_len: int, row_bounded: bool) -> None:
    """Per call (mean over the schedule's calls): HBM bytes (weights per step + the KV slots the program reads:
    each row's own with the row-bounded kernel, else the window of every computed slot) and model FLOPs (matmuls
    of every computed slot + attention over the keys read)."""
    per_slot = cache_bytes / (cache_rows * cache_len)  # one row's one cache slot on this chip, all layers
    reads = sched.kv_row_reads if row_bounded else sched.kv_slot_reads
    stage.runs = sched.calls
    stage.min_bytes = (sched.steps * weights + reads * per_slot) / sched.calls
    stage.flops_per_call = (2.0 * F.active_matmul_params(cfg) * sched.slot_steps
                            + F.attention_flops(cfg, reads, 1)) / sched.calls


def _abstract_cache(cfg: ModelConfig, rows: int, length: int, mesh):
    cache = jax.eval_shape(lambda: init_cache(cfg, rows, length))
    axes = cache_axes(cfg)
    return cache.with_layers([{k: _sds(v.shape, v.dtype, DEFAULT_RULES.sharding(axes[k], v.shape, mesh))
                               for k, v in layer.items()} for layer in cache.layers])


def _rows(shape, dtype, mesh) -> jax.ShapeDtypeStruct:
    return _sds(shape, dtype, batch_sharding(mesh, shape))


def rollout_stages(cfg: ModelConfig, rl: RLConfig, shape: StepShape, mesh, resident: float) -> list[StagePlan]:
    """The sampler copy (replicated layout only), then the engine's programs: lockstep's prefill and decode loop
    per pass, or the refill engine's prefill (slots / G prompts), insert and decode chunk."""
    layout = rl.rollout_param_layout
    graphdef, train_params = abstract_params(cfg, mesh)
    _, params = abstract_params(cfg, mesh, layout)
    stages = []
    params_arg = tree_shard_bytes(train_params)
    if layout == "replicated":
        copy = StagePlan("rollout/replicate", 1, note="compute-dtype copy of the weights on every chip",
                         resident_bytes=resident - params_arg)
        _compile(copy, mesh, sampler.replicate_jit(mesh), train_params, cfg)
        copy.min_bytes = params_arg + tree_shard_bytes(params)
        stages.append(copy)
        resident_rollout = resident  # the masters stay; the copy is the stages' argument
    else:
        resident_rollout = resident - params_arg  # the masters are the stages' argument
    Tp, N = shape.prompt, shape.new_tokens
    refill = rl.rollout_engine == "refill"
    rows = (rl.rollout_slots or rl.rollout_rows_per_pass or shape.rows) if refill else (
        rl.rollout_rows_per_pass or shape.rows)
    passes = -(-shape.rows // rows)  # refill: the upper bound where every sample runs N tokens
    weights = F.compute_weight_bytes(params, cfg, mesh)
    cache = _abstract_cache(cfg, rows, Tp + N, mesh)
    cache_bytes = tree_shard_bytes(cache)
    sampling = [_sds(s.shape, s.dtype, NamedSharding(mesh, PartitionSpec()))
                for s in SamplingParams(top_k=rl.top_k, top_p=rl.top_p).traced()]
    flags = flags_for(rl.top_k, rl.top_p, 0.0)

    prompts = rows // rl.group_size if refill else rows  # prefilled together
    prefill_runs = -(-(shape.rows // rl.group_size) // prompts) if refill else passes
    tok = _rows((prompts, Tp), jnp.int32, mesh)
    prefill = StagePlan("rollout/prefill", prefill_runs, note=f"{prompts} {'prompts' if refill else 'rows'} x "
                        f"{Tp} prompt slots", resident_bytes=resident_rollout)
    _compile(prefill, mesh, steps.prefill_jit, graphdef, params, tok, tok, max_new_tokens=0 if refill else N)
    prefill.flops_per_call = F.forward_flops(cfg, prompts, Tp)
    prefill.min_bytes = weights + cache_bytes * prompts / rows * Tp / (Tp + N)
    stages.append(prefill)

    lengths = shape.answer_lengths()
    bounded = decode_reads_row_bounded(cfg, mesh)
    reads = "each row's own keys (the Pallas decode kernel)" if bounded else "the live window"
    if not refill:
        logits = _rows((rows, cfg.vocab_size), jnp.float32, mesh)
        keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), rows))
        keys = _sds(keys.shape, keys.dtype, batch_sharding(mesh, (rows,)))
        sched = lockstep_schedule(lengths, rows, Tp, N, shape.mean_prompt)
        decode = StagePlan("rollout/decode", passes, resident_bytes=resident_rollout,
                           note=f"{sched.steps} steps (each pass to its longest answer; mean answer "
                                f"{lengths.mean():.0f}), each step reads "
                                f"{reads if bounded else f'all {Tp + N} cache slots'}, KV cache "
                                f"{cache_bytes / 2**30:.2f} GiB/chip")
        _compile(decode, mesh, steps.decode_jit, graphdef, params, cache, logits, tok, keys,
                 _rows((rows,), jnp.int32, mesh), *sampling, max_new_tokens=N, flags=flags)
        _decode_costs(decode, sched, cfg, weights, cache_bytes, rows, Tp + N, bounded)
        stages.append(decode)
        return stages

    empty = jax.eval_shape(lambda p: steps._empty_slots(graphdef, p, slots=rows, length=Tp + N), params)
    slots = jax.tree.map(lambda x: _rows(x.shape, x.dtype, mesh), dataclasses.replace(empty, cache=None))
    slots = dataclasses.replace(slots, cache=cache)  # the engine's own slot state, its cache sharded by its axes
    insert = StagePlan("rollout/insert", prefill_runs, resident_bytes=resident_rollout,
                       note=f"{prompts} prefilled prompts into {rows} slots")
    index = _rows((prompts * rl.group_size,), jnp.int32, mesh)  # the slots filled and their prefix rows
    _compile(insert, mesh, steps.insert_jit, slots, _abstract_cache(cfg, prompts, Tp, mesh),
             _rows((prompts, cfg.vocab_size), jnp.float32, mesh), tok, index, index,
             _rows((prompts * rl.group_size, 2), jnp.uint32, mesh), index)
    insert.min_bytes = cache_bytes * Tp / (Tp + N) * (1 + 1 / rl.group_size)  # write G copies of each prompt
    stages.append(insert)
    chunk = min(rl.rollout_chunk_steps, N)
    sched = refill_schedule(lengths, rl.group_size, rows, chunk, Tp, N, shape.mean_prompt)
    decode = StagePlan("rollout/decode", sched.calls, resident_bytes=resident_rollout,
                       note=f"{sched.calls} chunks of <= {chunk} steps over {rows} slots, {sched.steps} steps for "
                            f"answers of mean {lengths.mean():.0f} (modelled schedule, `plan.lengths`); reads "
                            f"{reads}: {sched.kv_row_reads / max(sched.slot_steps, 1):.0f} key slots per slot-step "
                            f"row-bounded, {sched.mean_window:.0f} in the live window, of {Tp + N}; KV cache "
                            f"{cache_bytes / 2**30:.2f} GiB/chip")
    exit_below = _sds((), jnp.int32, NamedSharding(mesh, PartitionSpec()))
    _compile(decode, mesh, steps.decode_chunk_jit, graphdef, params, slots, exit_below, *sampling,
             prompt_slots=Tp, chunk=chunk, flags=flags)  # the whole window: the memory a chunk can need
    _decode_costs(decode, sched, cfg, weights, cache_bytes, rows, Tp + N, bounded)
    stages.append(decode)
    return stages


def eval_stages(cfg: ModelConfig, rl: RLConfig, shape: StepShape, mesh, resident: float,
                eval_prompts: int = 500) -> list[StagePlan]:
    """The held-out evaluation's rollout as `HeldOutEval.from_rl_config` runs it (`eval.sampled.sample_and_grade`):
    eval_n samples per prompt, answers at the run's budget and length model; refill: every prompt in one call over
    the run's slots (rollout_slots, else rollout_rows_per_pass, else P x G); lockstep: chunks of about 256 rows in
    passes of rollout_rows_per_pass. Its log-prob pass is the run's own program (same rows per pass and widths).
    Named 'eval/...': they must fit, and are not part of the step's time (an evaluation runs every eval_every
    steps). eval_prompts: held-out prompts when RLConfig.eval_prompts is None (MATH-500's 500)."""
    n = rl.eval_n
    records = rl.eval_prompts or eval_prompts
    if rl.rollout_engine == "refill":
        chunk = records
        engine = dataclasses.replace(rl, prompts_per_step=chunk, group_size=n, rollout_slots=(
            rl.rollout_slots or rl.rollout_rows_per_pass or shape.rows))
    else:
        chunk = min(max(1, 256 // n), records)
        engine = dataclasses.replace(rl, prompts_per_step=chunk, group_size=n)
    rows = chunk * n
    stages = rollout_stages(cfg, engine, dataclasses.replace(shape, rows=rows), mesh, resident)
    calls = -(-records // chunk)
    for st in stages:
        st.name = "eval/" + st.name.split("/", 1)[1]
        st.note = f"per evaluation ({records} prompts x {n}, {calls} call(s) of {rows} rows): " + st.note
        st.runs *= calls
    return stages


def logprob_stages(cfg: ModelConfig, rl: RLConfig, shape: StepShape, mesh, resident: float) -> list[StagePlan]:
    """The policy's log-prob / entropy pass (logp_old, ARM's confidences) and, with a KL term, the reference's."""
    rows = rl.logprob_rows or shape.rows
    passes = shape.rows // rows
    L = shape.length
    if rl.pack_sequences:  # `models.packing`: the pass's sequences laid end to end in rows of C tokens
        C = rl.pack_length or L
        R = packed_rows(rows, shape.mean_tokens, C, batch_devices(mesh))
        tok = _sds((R, C), jnp.int32, batch_sharding(mesh, (R, C)))
        inputs, fn, note = (tok, tok, tok), _packed_logprobs, (f"{rows} seqs of {shape.mean_tokens:.0f} tokens on "
                                                              f"average packed in {R} rows x {C}")
    else:
        tok = _sds((rows, L), jnp.int32, batch_sharding(mesh, (rows, L)))
        R, C, inputs, fn, note = rows, L, (tok, tok), _token_logprobs, f"{rows} rows x {L} tokens (padded)"
    temp = _sds((), jnp.float32, NamedSharding(mesh, PartitionSpec()))
    models = [("logprobs/policy", cfg)]
    if rl.loss.kl_coef:
        models.append(("logprobs/reference", cfg.replace(param_dtype=cfg.dtype)))
    stages = []
    for name, model_cfg in models:
        graphdef, params = abstract_params(model_cfg, mesh)
        stage = StagePlan(name, passes, note=note,
                          resident_bytes=resident - tree_shard_bytes(params))  # its own weights are an argument
        # MoE: the policy's pass reads the sampler's experts (replayed or compared, `moe/routing_mismatch`)
        routing = _routing(cfg, R, C, mesh) if name == "logprobs/policy" else None
        kw = {} if routing is None else dict(routing=Routing(*routing), replay=rl.routing_replay)
        _compile(stage, mesh, fn, graphdef, params, *inputs, temp, chunk_size=DEFAULT_CHUNK_SIZE,
                 scan_layers=rl.scan_layers, **kw)
        stage.flops_per_call = F.forward_flops(model_cfg, R, C)
        stage.min_bytes = F.compute_weight_bytes(params, model_cfg, mesh)
        stages.append(stage)
    return stages


def _routing(cfg: ModelConfig, rows: int, cols: int, mesh):
    """The recorded experts [rows, cols, L_moe, k] (compact dtype) and their use mask [rows, cols] of a MoE model's
    pass (`moe.routing_layout`), or None for a dense model."""
    layout = routing_layout(cfg)
    if layout is None:
        return None
    shape = (rows, cols) + tuple(layout[:2])
    return (_sds(shape, layout[2], batch_sharding(mesh, shape)),
            _sds((rows, cols), jnp.bool_, batch_sharding(mesh, (rows, cols))))


def learner_stage(policy: Policy, rl: RLConfig, shape: StepShape, resident_other: float) -> StagePlan:
    """One optimizer update (all its micro-batches)."""
    cfg, mesh = policy.config, policy.mesh
    learner = Learner(policy, rl.loss, rl.optim, micro_batch_size=rl.micro_batch_size, remat=rl.remat,
                      temperature=rl.temperature, scan_layers=rl.scan_layers)
    per_update = shape.rows // rl.num_minibatches
    micro = learner.num_micro_batches(per_update)
    L = shape.length
    state = jax.eval_shape(lambda p: init_train_state(p, learner.optimizer), learner.trainable(policy.params))
    state = jax.tree.map(lambda x, sh: _sds(x.shape, x.dtype, sh), state, learner.state_shardings)
    seq = lambda dt: _sds((per_update, L), dt, batch_sharding(mesh, (per_update, L)))  # noqa: E731
    batch = TrainBatch(seq(jnp.int32), seq(jnp.int32), seq(jnp.float32),
                       _sds((per_update,), jnp.float32, batch_sharding(mesh, (per_update,))), seq(jnp.float32),
                       seq(jnp.float32))
    rows, C, H, packed = per_update, L, L, ""
    if rl.pack_sequences:  # each micro-batch's sequences packed in R rows of C tokens (`models.packing`)
        C = rl.pack_length or L
        R = packed_rows(per_update // micro, shape.mean_tokens, C, batch_devices(mesh))
        rows = micro * R
        pk = _sds((rows, C), jnp.int32, batch_sharding(mesh, (rows, C)))
        # the LM head runs at each row's answer tokens only: C x mean answer / mean sequence of them, bucketed
        H = min(C, bucket_length(math.ceil(C * shape.mean_response / shape.mean_tokens)))
        batch = dataclasses.replace(batch, pack_tokens=pk, pack_segments=pk, pack_positions=pk,
                                    pack_index=seq(jnp.int32),
                                    pack_head_cols=_sds((rows, H), jnp.int32, batch_sharding(mesh, (rows, H))))
        packed = f", packed in {R} rows x {C} per micro-batch, LM head at {H} answer positions per row"
        if rl.routing_replay and (routing := _routing(cfg, rows, C, mesh)) is not None:
            batch = dataclasses.replace(batch, pack_routing_ids=routing[0], pack_routing_use=routing[1])
            packed += ", routing replay"
    elif rl.routing_replay and (routing := _routing(cfg, per_update, L, mesh)) is not None:
        batch = dataclasses.replace(batch, routing_ids=routing[0], routing_use=routing[1])
    rng = jax.eval_shape(lambda: jax.random.key(0))
    rng = _sds(rng.shape, rng.dtype, NamedSharding(mesh, PartitionSpec()))
    stage = StagePlan("learner/update", rl.num_iterations * rl.num_minibatches, resident_bytes=resident_other,
                      note=f"{per_update} seqs x {L} tokens in {micro} micro-batches{packed}"
                           f"{', remat' if rl.remat else ''}")
    _compile(stage, mesh, learner._step, policy.graphdef, learner.optimizer, state, batch, rng, learner.frozen,
             num_micro_batches=micro, **learner._opts)
    stage.flops_per_call = F.train_flops(cfg, rows, C, rl.remat, head_positions=rows * H)
    passes = 3 + (1 if rl.remat else 0)  # forward, backward (two reads), the remat recompute
    stage.min_bytes = (micro * passes * F.compute_weight_bytes(policy.params, cfg, mesh)
                       + 7 * tree_shard_bytes(policy.params))  # 28 bytes per float32 parameter shard
    return stage
