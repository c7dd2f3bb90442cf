"""RLConfig: every option of an RL run, validated when it is built (docs/method.md §1-§2)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from arm_jax import distributed, sharding
from arm_jax.algorithms import advantages as adv_lib
from arm_jax.algorithms import losses as L
from arm_jax.algorithms import rollout_correction as RC
from arm_jax.rollout.refill import check_slots
from arm_jax.rollout.sampler import ENGINES, PARAM_LAYOUTS, EngineOptions
from arm_jax.sharding import DEFAULT_RULES
from arm_jax.train.learner import OptimConfig


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """The RL run. Defaults are ProGRPO's (ARM + Clip-Higher + token-mean, docs/method.md §1). Each entry:
    name (default): meaning, formula, paper.

    Batch and rollout
    steps (100): RL steps, one rollout batch and mu x num_minibatches optimizer updates each.
    prompts_per_step (32): P, prompts per step (divisible by the process count).
    group_size (8): G, responses sampled per prompt; group-relative advantages compare them.
    max_new_tokens (512): the generation budget N per response (also Dr.GRPO's max_len by default).
    max_prompt_tokens (None = keep all): training prompts longer than this many tokens (chat template included) are
        dropped at start-up and counted, as verl's `filter_overlong_prompts`; held-out prompts are never dropped.
    temperature (1.0): the rollout temperature; logp_old and the trained log-probs use the same one.
    top_p (1.0), top_k (0 = off): rollout nucleus / top-k filters (transformers' order: temperature, top-k, top-p).
    rollout_rows_per_pass (None = all P*G rows): rows decoded together (`aj.generate`'s rows_per_pass), the
        rollout's memory lever: its KV cache is rows x (prompt + max_new_tokens) slots; must divide P*G. Samples do
        not depend on it.
    rollout_engine ('refill'): 'refill' (`rollout/refill.py`): decode slots refilled between chunks, each prompt
        prefilled once and copied into its G samples' slots, so no slot waits for the longest answer (continuous
        batching, as vLLM/SGLang behind verl and EasyDeL's eSurge); 'lockstep': every row of a pass decoded until
        its last row ends. Both give the same samples.
    rollout_slots (None = rollout_rows_per_pass, else all P*G rows): the refill engine's decode slots, its memory
        lever (the KV cache is slots x (prompt + max_new_tokens)); at least G per process. Samples do not depend
        on it.
    rollout_chunk_steps (32): decode steps per jitted refill chunk at most (a chunk also returns once enough
        slots are free for a prompt); the host refills between chunks.
    rollout_param_layout ('train'): the parameters the sampler reads (`rollout.sampler.rollout_params`): 'train',
        the learner's ZeRO-3 shards (every decode step all-gathers every weight), or 'replicated', a compute-dtype
        copy on every chip made once per RL step (no weight traffic while decoding; costs 2 bytes per parameter
        per chip in bf16). `python -m arm_jax.plan` shows both the memory and the collective bytes.
    logprob_batch_size (None = micro_batch_size, else all rows): sequences per log-prob pass (logp_old, entropy,
        ARM's confidences, the reference model), as verl's `log_prob_micro_batch_size`; must divide P*G.
    pack_sequences (True): the log-prob passes and the learner run over sequences packed into rows
        (`models.packing`; tunix's segment ids, verl's `use_remove_padding`): a pass costs about the valid tokens
        instead of rows x the longest sequence; attention stays within each sequence (splash segment ids on TPU,
        a block-diagonal causal mask elsewhere); the same sequences per micro-batch, so losses, gradients and
        every metric equal the padded layout's to float tolerance. False: the padded rows (as before).
    pack_length (None): tokens per packed row; None = the padded width (the prompt bucket + the trimmed answers'
        bucket: packing adds no shape of its own; the row count is bucketed), or a fixed budget such as 16384 for
        the paper setup (one row shape for the whole run, verl's `max_token_len_per_gpu`); a longer sequence is an
        error naming this key.
    routing_replay (False; True in the MoE gin files): MoE models only. The rollout records the experts of every
        prompt and response token (`Rollout.routing`, `Rollout.prompt_routing`), and the log-prob passes and the
        learner use them instead of their own top-k (routing replay: slime's rollout routing replay, verl's R3),
        the gate weights recomputed so the router still gets gradients; without it, GRPO on MoE models is
        reported to collapse when sampler and learner route a token to different experts. Either way
        `moe/routing_mismatch` logs the fraction of recorded positions (prompt and response) whose experts the
        learner's router, before the update, picks differently from the sampler's. The reference model (KL)
        routes afresh: it is not the sampler.

    Sampler-learner gap and one-step-off RL (docs/method.md §10)
    rollout_correction ('none'): how the learner corrects for the sampler's distribution mu differing from the
        learner's pi_old (numerics, top-p / top-k truncation, stale weights), with the token ratio
        r_t = pi_old / mu and the sequence ratio rho = prod_t r_t (`algorithms.rollout_correction`): 'none';
        'tis', token-level truncated IS, each token's policy-gradient term times min(r_t, C) (Yao et al. 2025);
        'mis', sequence-level masked IS, times rho, sequences with rho outside [1/C, C] dropped (Liu et al.
        2025); 'icepop', token-level masked IS, times r_t, tokens outside [1/C, C] dropped (IcePop). verl's
        "rollout correction" (rollout_is / rollout_rs). The gap itself (`mismatch/*`: mean and max |logp_old -
        logp_mu|, k3 KL, token-ratio mean, sequence-ratio quantiles) is logged every step in every mode.
    rollout_correction_threshold (2.0): C above (verl's rollout_is_threshold 2; IcePop's band [0.5, 2]); > 1.
    lora_sampler ('unmerged'): LoRA runs only (`experiment.lora`): how the rollout reads base + adapters.
        'unmerged': the adapters' term computed beside each frozen kernel, as the learner does (the sampler's
        log-probs are the learner's up to batch layout); 'merged': a copy with W + (alpha / r) A B folded in once
        per RL step (faster decode steps, one more base copy in memory, and in bf16 the adapters' small term is
        rounded into the weights: `experiments/bench_lora_sampler.py` measures both).
    rollout_devices (None = colocated): a disaggregated layout: this many devices (an int) or this share of them
        (a float in (0, 1)) run the rollout on a mesh of their own, the learner's mesh holds the rest
        (`rollout.placement`: every process gives the same number of its devices to each side). After each update
        the weights move to the rollout mesh device to device, in its own layout. With max_staleness >= 1 the two
        meshes work at once (the rollout of step t + k beside update t); with 0 they take turns.
    rollout_mesh_shape (None = all rollout devices on 'fsdp'): the rollout mesh's (data, fsdp, tensor[, expert])
        shape, -1 the rest, when rollout_devices is set.
    max_staleness (0): k, how many steps older than the learner's the sampling weights may be. 0: the
        synchronous loop (sample, grade, score, update), bitwise as before. k >= 1: one-step-off RL (verl's
        one-step-off policy, AReaL with max staleness k): while step t's update runs, batch t + k is sampled with
        step t's weights (a compute-dtype copy kept from the donated masters) and graded; the first k batches
        are sampled with the starting weights. The update keeps PPO's ratio against pi_old, the learner's weights
        at the start of the step, recomputed by the log-prob pass (decoupled PPO: AReaL's proximal policy, verl's
        recomputed old_log_prob), and `rollout_correction` weights it by pi_old / mu for the behaviour policy mu
        that sampled. Waiting batches are saved with each checkpoint, so a resume is exact.
        `async/staleness` logs the step's largest lag. Dynamic sampling's extra rounds are sampled with the
        current weights.

    Objective
    advantage ('arm'): a registered estimator: 'arm' (ProGRPO, arXiv:2602.05281), 'grpo' (Shao et al. 2024),
        'drgrpo' (Liu et al. 2025), 'rloo' (Ahmadian et al. 2024), 'passk' (Chen et al. 2025), 'unlikeliness'
        (He et al. 2025).
    advantage_kwargs (()): its options as ((name, value), ...), fields of its options dataclass (`ARMConfig`:
        alpha 1, rho 0.2, ...; `GRPOConfig`; `PassKConfig`; `UnlikelinessConfig`); () = their defaults; an unknown
        name is an error when the RLConfig is built.
    loss (LossConfig()): policy loss, clip range, aggregation, KL, entropy bonus (`LossConfig`).
    optim (OptimConfig()): AdamW, clipping and schedule (`OptimConfig`).
    num_iterations (1): mu, passes over each rollout batch (mu > 1 reuses logp_old: PPO's importance ratio).
    num_minibatches (1): optimizer updates per pass, each on a contiguous slice of whole groups (P*G /
        num_minibatches must be a multiple of G). OptimConfig's warmup_steps / total_steps count RL steps, each
        num_iterations x num_minibatches updates.
    micro_batch_size (None = the whole update): sequences per gradient micro-batch; exact for every split.
    dynamic_sampling (False): DAPO's filter (Yu et al. 2025), stated on advantages: groups whose advantages are all
        zero (GRPO: equal rewards; ARM: all wrong and equal, its term moves all-correct groups) are replaced.
        With shaping terms on (the overlong penalty), a group whose answers are all right but whose lengths are
        penalised differently is kept; DAPO's recipe filters on accuracy and would drop it.
    max_sampling_rounds (3): extra prompt batches dynamic sampling may draw; `uninformative_groups` counts what
        is left after them.
    mask_truncated (False): DAPO's overlong filtering, no loss on responses that hit max_new_tokens.
    top_entropy_quantile (None = all): TRL's option (Wang et al. 2025, "Beyond the 80/20 rule"): the fraction of
        highest-entropy response tokens trained on (0.2 = the top 20 %, 1.0 = all), one threshold over the global
        batch.
    remat (False): rematerialize each block in the backward pass (less memory, ~30 % more compute).
    scan_layers (False): the learner's update and the log-prob passes run each run of consecutive identical blocks
        (all L of a dense model; DeepSeek's dense first layers, then its MoE layers) as one `lax.scan` over their
        stacked parameters, as MaxText's `scan_layers`: the compiled program holds one block body per run instead
        of L, so it stops growing with depth. XLA's TPU compiler: DeepSeek-V2-Lite's learner compiles in 142 s
        instead of 480 with 0.59x the temporaries, and Qwen3-30B-A3B's compiles in 131 s on a 24 GiB host, where
        the unrolled one was killed for memory (README "Benchmarks"); XLA:CPU compiles it slower. The same values
        in float32 up to summation order; in bf16 rounded at other points, as close to float32 as the unrolled
        program (tests/models/test_scan_layers.py). The stacked copy of the layers is one compute-dtype copy per
        micro-batch. The sampler's decode loop is not scanned (its per-layer KV cache).

    Failing loudly
    max_reward_error_frac (0.5): a step whose share of responses graded with status 'error' (a grader that raised,
        a worker that died) exceeds this stops the run with an error naming the share; `reward/error_frac`,
        `reward/timeout_frac`, `reward/no_answer_frac` and `reward/malformed_frac` are logged every step (1.0 =
        never stop). The model's own failures (no answer; 'malformed': e.g. an answer too long to grade) are
        graded answers with reward 0 and never stop a run.
    max_reward_timeout_frac (0.5): a step whose share of responses the grader timed out on (status 'timeout', no
        verdict within the grader's timeout_s) exceeds this stops the run with an error naming the share: when
        most answers get no verdict, the reward the run trains on is the grader's clock, not the answers (an
        overloaded host, too few reward_workers, a timeout_s too short). 1.0 or None = never stop.
    max_skipped_updates (3): this many consecutive optimizer updates skipped for a non-finite loss or gradient
        stop the run with an error (the parameters would otherwise stay frozen while the run goes on); the
        `skipped_updates` metric counts them per step.

    Evaluation and outputs
    eval_every (100): held-out evaluation every N steps, before the first and after the last (0 = never).
    eval_n (8): samples per held-out prompt (Pass@k for k <= eval_n, unbiased: Chen et al. 2021).
    eval_temperature (1.0): sampling temperature of the evaluation (its entropy and confidences use it too).
    eval_prompts (None = all): the first eval_prompts held-out prompts.
    checkpoint_every (50): steps between orbax checkpoints (and the last step).
    keep_checkpoints (3): checkpoints kept.
    samples_every (50): steps between sampled completions written to samples.jsonl (0 = never).
    seed (0): the root of every random stream (rollout rows, learner, evaluation).
    data_seed (0): the prompt shuffling seed.
    """

    steps: int = 100
    prompts_per_step: int = 32
    group_size: int = 8
    max_new_tokens: int = 512
    max_prompt_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    rollout_rows_per_pass: Optional[int] = None
    rollout_engine: str = "refill"
    rollout_slots: Optional[int] = None
    rollout_chunk_steps: int = 32
    rollout_param_layout: str = "train"
    logprob_batch_size: Optional[int] = None
    pack_sequences: bool = True
    pack_length: Optional[int] = None
    routing_replay: bool = False
    rollout_correction: str = "none"
    rollout_correction_threshold: float = 2.0
    lora_sampler: str = "unmerged"
    rollout_devices: Optional[float] = None
    rollout_mesh_shape: Optional[tuple] = None
    max_staleness: int = 0
    advantage: str = "arm"
    advantage_kwargs: tuple = ()  # the estimator's defaults (ARMConfig: alpha 1, rho 0.2)
    loss: L.LossConfig = L.LossConfig()
    optim: OptimConfig = OptimConfig()
    num_iterations: int = 1
    num_minibatches: int = 1
    micro_batch_size: Optional[int] = None
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    mask_truncated: bool = False
    top_entropy_quantile: Optional[float] = None
    eval_every: int = 100
    eval_n: int = 8
    eval_temperature: float = 1.0
    eval_prompts: Optional[int] = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    samples_every: int = 50
    seed: int = 0
    data_seed: int = 0
    remat: bool = False
    scan_layers: bool = False
    max_reward_error_frac: float = 0.5
    max_reward_timeout_frac: Optional[float] = 0.5
    max_skipped_updates: int = 3

    def __post_init__(self):
        self.advantage_options  # an unknown estimator or option is an error here, naming it
        if self.loss.agg_mode == "seq-mean-token-sum-norm" and self.loss.max_len is None:
            # Dr.GRPO normalizes token sums by the generation budget
            object.__setattr__(self, "loss", dataclasses.replace(self.loss, max_len=self.max_new_tokens))

    @property
    def advantage_options(self):
        """The estimator's typed options (`ARMConfig`, `GRPOConfig`, ...) built from `advantage_kwargs`."""
        try:
            return adv_lib.make_options(self.advantage, self.advantage_kwargs)
        except (KeyError, ValueError) as e:
            raise ValueError(f"RLConfig.advantage={self.advantage!r}, advantage_kwargs={self.advantage_kwargs!r}: "
                             f"{e}") from e

    @property
    def engine_options(self) -> EngineOptions:
        """The rollout engine's levers (rollout_engine, _slots, _chunk_steps, _rows_per_pass, _param_layout)."""
        return EngineOptions(self.rollout_engine, self.rollout_slots, self.rollout_chunk_steps,
                             self.rollout_rows_per_pass, self.rollout_param_layout)

    @property
    def logprob_rows(self) -> Optional[int]:
        """Sequences per log-prob pass: logprob_batch_size, else micro_batch_size, else None (all rows)."""
        return self.logprob_batch_size or self.micro_batch_size

    def validate(self, mesh, rollout_mesh=None) -> None:
        """Checks the batch arithmetic against the mesh (and the rollout's own mesh when disaggregated) and the
        process count; errors name the RLConfig field."""
        n = self.prompts_per_step * self.group_size
        for name in ("rollout_rows_per_pass", "logprob_batch_size"):
            value = getattr(self, name)
            if value is not None and (value < 1 or n % value):
                raise ValueError(f"RLConfig.{name}={value} must divide P*G = {n}")
        if self.rollout_engine not in ENGINES:
            raise ValueError(f"RLConfig.rollout_engine must be one of {ENGINES}, got {self.rollout_engine!r}")
        if self.rollout_slots is not None:
            check_slots(self.rollout_slots, self.group_size, "RLConfig.rollout_slots")
        if self.rollout_chunk_steps < 1:
            raise ValueError(f"RLConfig.rollout_chunk_steps must be >= 1, got {self.rollout_chunk_steps}")
        if self.rollout_param_layout not in PARAM_LAYOUTS:
            raise ValueError(f"RLConfig.rollout_param_layout must be one of {PARAM_LAYOUTS}, got "
                             f"{self.rollout_param_layout!r}")
        if self.rollout_correction not in RC.CORRECTIONS:
            raise ValueError(f"RLConfig.rollout_correction must be one of {RC.CORRECTIONS}, got "
                             f"{self.rollout_correction!r}")
        if not self.rollout_correction_threshold > 1.0:
            raise ValueError(f"RLConfig.rollout_correction_threshold must be > 1 (the band is [1/C, C]), got "
                             f"{self.rollout_correction_threshold}")
        if self.rollout_correction != "none" and self.temperature <= 0:
            raise ValueError(f"RLConfig.rollout_correction={self.rollout_correction!r} needs the sampler's "
                             f"probabilities: RLConfig.temperature={self.temperature} samples greedily")
        if self.lora_sampler not in ("unmerged", "merged"):
            raise ValueError(f"RLConfig.lora_sampler must be 'unmerged' or 'merged', got {self.lora_sampler!r}")
        if self.max_staleness < 0:
            raise ValueError(f"RLConfig.max_staleness must be >= 0 (0 = synchronous), got {self.max_staleness}")
        if n % self.num_minibatches:
            raise ValueError(f"P*G = {n} is not divisible by RLConfig.num_minibatches={self.num_minibatches}")
        per_update = n // self.num_minibatches
        if per_update % self.group_size:
            raise ValueError(f"a mini-batch of P*G/num_minibatches = {per_update} sequences does not hold whole groups "
                             f"of G = {self.group_size} (RLConfig.num_minibatches={self.num_minibatches}, "
                             f"prompts_per_step={self.prompts_per_step}): use a num_minibatches that divides "
                             f"prompts_per_step")
        if not 0.0 <= self.max_reward_error_frac <= 1.0:
            raise ValueError(f"RLConfig.max_reward_error_frac must be in [0, 1], got {self.max_reward_error_frac}")
        if self.max_reward_timeout_frac is not None and not 0.0 <= self.max_reward_timeout_frac <= 1.0:
            raise ValueError(f"RLConfig.max_reward_timeout_frac must be in [0, 1] or None, got "
                             f"{self.max_reward_timeout_frac}")
        if self.pack_length is not None and self.pack_length < 1:
            raise ValueError(f"RLConfig.pack_length must be a positive number of tokens, got {self.pack_length}")
        if self.max_skipped_updates < 1:
            raise ValueError(f"RLConfig.max_skipped_updates must be >= 1, got {self.max_skipped_updates}")
        if self.micro_batch_size and per_update % self.micro_batch_size:
            raise ValueError(f"P*G/num_minibatches = {per_update} is not divisible by "
                             f"RLConfig.micro_batch_size={self.micro_batch_size}")
        batch_axes = DEFAULT_RULES.mesh_axes("batch")  # the axes the batch is sharded over (one rules object)
        batch_devices = sharding.batch_devices(mesh)
        rollout_devices = sharding.batch_devices(rollout_mesh) if rollout_mesh is not None else batch_devices
        for name in ("rollout_slots", "rollout_rows_per_pass", "logprob_batch_size"):
            value = getattr(self, name)
            on_rollout = name != "logprob_batch_size" and rollout_mesh is not None
            where = rollout_devices if name != "logprob_batch_size" else batch_devices
            if value is not None and value % where:  # would be replicated on every chip, silently
                raise ValueError(f"RLConfig.{name}={value} does not divide over the "
                                 f"{'rollout ' if on_rollout else ''}mesh's batch axes "
                                 f"({' x '.join(batch_axes)} = {where} devices): every chip would hold all "
                                 f"{value} rows (a whole KV cache or batch); use a multiple of {where}")
        if rollout_mesh is not None and n % rollout_devices:
            raise ValueError(f"P*G = {n} rows do not divide over the rollout mesh's batch axes ({rollout_devices} "
                             f"devices, RLConfig.rollout_devices={self.rollout_devices}, rollout_mesh_shape="
                             f"{self.rollout_mesh_shape})")
        mb = self.micro_batch_size or per_update
        if mb % batch_devices:
            raise ValueError(f"the mesh's batch axes ({' x '.join(batch_axes)} = {batch_devices} devices) do not "
                             f"divide the micro-batch of {mb} sequences (RLConfig.micro_batch_size / P*G)")
        if self.prompts_per_step % distributed.process_count():
            raise ValueError(f"RLConfig.prompts_per_step={self.prompts_per_step} does not divide over "
                             f"{distributed.process_count()} processes")
