"""A policy = model config + parameters (+ tokenizer, + mesh), and the public forward entry points (docs/method.md §9).

Every jitted function here is pure in (graphdef, params, inputs); the `Policy` dataclass only carries them. The
rollout and the learner read the same `params` arrays: nothing is copied or converted between them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from arm_jax.config import ModelConfig
from arm_jax.models import hf
from arm_jax.models import abstract_model, build_model, merge_for_compute, param_shardings
from arm_jax.distributed import row_passes, to_global, to_local
from arm_jax.models import packing
from arm_jax.sharding import DEFAULT_RULES, LogicalRules, make_mesh
from arm_jax.models.logprobs import DEFAULT_CHUNK_SIZE, chunked_logprobs, pair_logprobs, positions_from_mask
from arm_jax.models.qwen2 import Routing


@dataclasses.dataclass
class Policy:
    """config: the architecture; graphdef/params: `nnx.split` of the model (params is a pytree of arrays, sharded
    over `mesh` by `rules`); tokenizer: a transformers tokenizer or None."""

    config: ModelConfig
    graphdef: Any
    params: nnx.State
    tokenizer: Any = None
    mesh: Optional[Mesh] = None
    rules: LogicalRules = DEFAULT_RULES

    def replace(self, **changes) -> "Policy":
        """A copy of the policy with `changes` (e.g. params=...)."""
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------------------------ creation


def init_policy(config: ModelConfig, *, seed: int = 0, mesh: Optional[Mesh] = None,
                rules: LogicalRules = DEFAULT_RULES, tokenizer: Any = None, init_std: float = 0.02) -> Policy:
    """A randomly initialized policy, created sharded in `config.param_dtype`: kernels and embeddings
    normal(init_std) (0.02 is HF's initializer_range), norm weights 1, biases 0."""
    mesh = mesh if mesh is not None else make_mesh()
    graphdef, abstract = abstract_model(config)
    shardings = param_shardings(abstract, mesh, rules)

    def create():
        with nnx.use_eager_sharding(False):
            state = nnx.split(build_model(config, nnx.Rngs(seed)))[1]
            scale = init_std / 0.02  # the model files initialize with std 0.02
            return jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, state) if scale != 1 else state

    params = jax.jit(create, out_shardings=shardings)()
    return Policy(config, graphdef, params, tokenizer, mesh, rules)


def load_policy(hf_dir: str, *, dtype: str = "float32", mesh: Optional[Mesh] = None,
                rules: LogicalRules = DEFAULT_RULES, load_tokenizer: bool = True,
                param_dtype: str = "float32") -> Policy:
    """Loads a Hugging Face folder (config.json + safetensors, single-file or sharded; + tokenizer when present)
    straight into the mesh's parameter shardings.

    dtype: the compute dtype (activations, KV cache, the parameter copy each forward reads); param_dtype: the
    stored parameters (default float32 master weights, what training needs; 'bfloat16' for inference-only use
    at half the memory). A bf16 checkpoint upcast to float32 masters keeps its exact values."""
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"checkpoint folder {hf_dir!r} does not exist")
    config = hf.read_config(hf_dir, dtype=dtype, param_dtype=param_dtype)
    mesh = mesh if mesh is not None else make_mesh()
    graphdef, params = hf.load_params(hf_dir, config, mesh, rules)
    tokenizer = read_tokenizer(hf_dir) if load_tokenizer else None
    return Policy(config, graphdef, params, tokenizer, mesh, rules)


def read_tokenizer(hf_dir: str):
    if not any(os.path.isfile(os.path.join(hf_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    cfg_path = os.path.join(hf_dir, "tokenizer_config.json")
    declared = json.load(open(cfg_path)).get("tokenizer_class") if os.path.isfile(cfg_path) else None
    if declared == "PreTrainedTokenizerFast":  # a generic tokenizer.json: do not let model_type pick a class
        return PreTrainedTokenizerFast.from_pretrained(hf_dir, local_files_only=True)
    return AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)


def save_policy(policy: Policy, out_dir: str, *, max_shard_bytes: int = 5 * 1024 ** 3,
                dtype: Optional[str] = None) -> None:
    """Writes an HF folder (config.json + safetensors + tokenizer) that `AutoModelForCausalLM.from_pretrained`
    loads. dtype: of the written tensors (default the compute dtype `policy.config.dtype`, as HF checkpoints are;
    'float32' exports the float32 masters exactly). LoRA adapters are folded into their kernels first
    (`models.lora.merged_policy`; `arm_jax.export --peft` writes them as a PEFT adapter folder instead)."""
    from arm_jax.models.lora import merged_policy
    policy = merged_policy(policy)
    hf.save_params(policy.params, policy.config, out_dir, max_shard_bytes=max_shard_bytes, dtype=dtype)
    if policy.tokenizer is not None and jax.process_index() == 0:
        policy.tokenizer.save_pretrained(out_dir)


def cast_policy(policy: Policy, param_dtype: str) -> Policy:
    """A copy of `policy` whose parameters are stored in `param_dtype` (new buffers, same shardings), e.g. a
    frozen bf16 reference model beside float32 masters (2 bytes per parameter instead of 4)."""
    config = policy.config.replace(param_dtype=param_dtype)
    graphdef, abstract = abstract_model(config)
    shardings = param_shardings(abstract, policy.mesh, policy.rules)
    dtypes = [x.dtype for x in jax.tree.leaves(abstract)]

    def copy(params):
        leaves, tree = jax.tree.flatten(params)
        return jax.tree.unflatten(tree, [jnp.array(x, dtype=t, copy=True) for x, t in zip(leaves, dtypes)])

    with jax.set_mesh(policy.mesh):
        params = jax.jit(copy, out_shardings=shardings)(policy.params)
    return Policy(config, graphdef, params, policy.tokenizer, policy.mesh, policy.rules)


def policy_param_shardings(params: nnx.State, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """NamedShardings for a params tree on `mesh` (e.g. to move a policy to another mesh with `jax.device_put`)."""
    return param_shardings(params, mesh, rules)


# ------------------------------------------------------------------------------------------- pure functions


def hidden_states(graphdef, params, tokens: jax.Array, attention_mask: jax.Array, remat: bool = False,
                  routing: Optional[Routing] = None, replay: bool = True, scan_layers: bool = False):
    """(graphdef, params, tokens [B, T], attention_mask [B, T]) -> (final hidden [B, T, D], merged model).
    The parameters are cast to the compute dtype here (`merge_for_compute`), once per jitted call.
    routing (MoE models: the sampler's experts, `Routing`): with `replay` the forward uses them where
    routing.use is set; either way the result has a third element, [4] float32: (tokens whose experts this
    forward's router picks differently in some MoE layer, tokens compared) at routing.use (`routing_mismatch`),
    then (pairs the capacity factor dropped, pairs) over the MoE layers (`MoEConfig.capacity_factor`).
    remat: rematerialize each block in the backward; scan_layers: one scanned body per run of identical blocks
    (`DecoderLM.__call__`; the same values, a program that does not grow with depth)."""
    model = merge_for_compute(graphdef, params)
    return _run(model, routing, replay, tokens, positions_from_mask(attention_mask), attention_mask.astype(bool),
                remat=remat, scan_layers=scan_layers)


def _run(model, routing: Optional[Routing], replay: bool, *args, **kwargs):
    """model(*args, **kwargs) -> (hidden, model), with `routing` (hidden, model, the [4] routing counts)."""
    if routing is None:
        return model(*args, **kwargs)[0], model
    hidden, _, fresh, dropped = model(*args, **kwargs, routing=routing if replay else None, return_routing=True)
    return hidden, model, jnp.concatenate([routing_mismatch(fresh, routing), dropped])


def routing_mismatch(fresh: jax.Array, routing: Routing) -> jax.Array:
    """fresh [B, T, L_moe, k] (a forward's own top-k) vs routing.ids at routing.use -> [2] float32: (positions
    whose expert set differs in at least one MoE layer, positions compared)."""
    a = jnp.sort(fresh.astype(jnp.int32), axis=-1)
    b = jnp.sort(routing.ids.astype(jnp.int32), axis=-1)
    differ = jnp.any(a != b, axis=(-2, -1)) & routing.use
    return jnp.stack([jnp.sum(differ), jnp.sum(routing.use)]).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0,))
def _forward_logits(graphdef, params, tokens, attention_mask):
    hidden, model = hidden_states(graphdef, params, tokens, attention_mask)
    return model.logits(hidden)


def logprobs_fn(graphdef, params, tokens, attention_mask, temperature=1.0, chunk_size=DEFAULT_CHUNK_SIZE,
                remat=False, routing: Optional[Routing] = None, replay: bool = True, scan_layers: bool = False):
    """Pure: -> (logp [B, T], entropy [B, T]) float32, chunked over the vocabulary projection; with `routing`
    (MoE routing replay, `hidden_states`) also the [2] routing-mismatch counts."""
    hidden, model, *mismatch = hidden_states(graphdef, params, tokens, attention_mask, remat, routing, replay,
                                             scan_layers)
    head, spec = model.head_kernel()
    return (*chunked_logprobs(hidden, head, spec, tokens, attention_mask, temperature, chunk_size), *mismatch)


_token_logprobs = jax.jit(logprobs_fn, static_argnums=(0,),
                          static_argnames=("chunk_size", "remat", "replay", "scan_layers"))


def packed_hidden_states(graphdef, params, tokens, segment_ids, positions, remat: bool = False,
                         routing: Optional[Routing] = None, replay: bool = True, scan_layers: bool = False):
    """`hidden_states` over packed rows (`models.packing`): tokens, segment_ids, positions [R, C] -> (final hidden
    [R, C, D], merged model), each sequence attending to its own tokens only; `routing` (in the packed layout) as
    for `hidden_states`."""
    model = merge_for_compute(graphdef, params)
    return _run(model, routing, replay, tokens, positions, segment_ids > 0, remat=remat, segment_ids=segment_ids,
                scan_layers=scan_layers)


def packed_logprobs_fn(graphdef, params, tokens, segment_ids, positions, temperature=1.0,
                       chunk_size=DEFAULT_CHUNK_SIZE, remat=False, routing: Optional[Routing] = None,
                       replay: bool = True, scan_layers: bool = False):
    """Pure, over packed rows (`models.packing`): tokens, segment_ids, positions [R, C] -> (logp, entropy) [R, C]
    float32, each sequence conditioned on its own tokens only; 0 at each sequence's first token and on padding
    (with `routing`, also the [2] routing-mismatch counts)."""
    hidden, model, *mismatch = packed_hidden_states(graphdef, params, tokens, segment_ids, positions, remat,
                                                    routing, replay, scan_layers)
    head, spec = model.head_kernel()
    return (*chunked_logprobs(hidden, head, spec, tokens, segment_ids, temperature, chunk_size), *mismatch)


_packed_logprobs = jax.jit(packed_logprobs_fn, static_argnums=(0,),
                           static_argnames=("chunk_size", "remat", "replay", "scan_layers"))


def packed_head_logprobs_fn(graphdef, params, tokens, segment_ids, positions, head_cols, temperature=1.0,
                            chunk_size=DEFAULT_CHUNK_SIZE, remat=False, routing: Optional[Routing] = None,
                            scan_layers: bool = False):
    """Pure, over packed rows [R, C] with the LM head at `head_cols` [R, H] only (`models.packing`, the learner:
    the positions whose log-prob the loss reads) -> (logp, entropy) [R, H] of tokens[r, head_cols[r, j]] given
    its sequence's tokens before it. routing: MoE routing replay in the packed layout (replayed)."""
    hidden, model, *_ = packed_hidden_states(graphdef, params, tokens, segment_ids, positions, remat, routing,
                                             scan_layers=scan_layers)
    h = jnp.take_along_axis(hidden, (head_cols - 1)[..., None], axis=1)  # the position before each target
    head, spec = model.head_kernel()
    return pair_logprobs(h, jnp.take_along_axis(tokens, head_cols, axis=1), head, spec, temperature, chunk_size)


def place_batch(policy: Policy, *arrays) -> list[jax.Array]:
    """Puts [B, ...] arrays on the policy's mesh, batch over the batch axes where it divides. With several
    processes the arrays are this process's rows of the global batch (`arm_jax.distributed`)."""
    return [to_global(policy.mesh, a, policy.rules) for a in arrays]


def _check_tokens(policy: Policy, tokens, attention_mask):
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    if attention_mask is None:
        attention_mask = np.ones_like(tokens)
    attention_mask = np.asarray(attention_mask)
    if attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != tokens shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= policy.config.vocab_size):
        raise ValueError(f"tokens must lie in [0, vocab_size={policy.config.vocab_size}), got range "
                         f"[{tokens.min()}, {tokens.max()}]")
    return tokens.astype(np.int32), attention_mask.astype(np.int32)


def forward_logits(policy: Policy, tokens, attention_mask=None) -> jax.Array:
    """tokens/attention_mask [B, T] -> logits [B, T, V] float32. Materializes the full logits: small inputs only."""
    tokens, attention_mask = _check_tokens(policy, tokens, attention_mask)
    with jax.set_mesh(policy.mesh):
        tokens, attention_mask = place_batch(policy, tokens, attention_mask)
        return _forward_logits(policy.graphdef, policy.params, tokens, attention_mask)


def token_logprobs(policy: Policy, tokens, attention_mask=None, *, temperature: float = 1.0,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, batch_size: Optional[int] = None, pack: bool = False,
                   pack_length: Optional[int] = None, routing: Optional[tuple] = None, replay: bool = True,
                   scan_layers: bool = False):
    """[B, T] each: logp[b, t] = log p(tokens[b, t] | tokens[b, <t]) under softmax(logits / temperature) and ent[b, t]
    the entropy of that distribution; position 0 and masked positions are 0. Never builds [B, T, V] float32.
    batch_size: rows per forward pass (None = all B; with several processes, rows of the global batch), the memory
    lever of the log-prob and reference passes; it must divide B.
    pack: each pass runs over its sequences packed into rows of `pack_length` tokens (None: T, the
    padded width), `models.packing`: it computes about the valid tokens instead of rows x T; same values (the
    sequences' real tokens must be contiguous, as prompt + response rows are).
    routing (MoE models): the sampler's experts (ids [B, T, L_moe, k], use [B, T]; `Rollout.replay_routing`):
    with `replay` the forward uses them where `use` is set (routing replay); either way a third result is the [4]
    NumPy counts (tokens whose experts this forward's router picks differently, tokens compared, expert pairs the
    capacity factor dropped, pairs). scan_layers: compile one scanned body per run of identical blocks (the
    same values; `RLConfig.scan_layers`)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    tokens, attention_mask = _check_tokens(policy, tokens, attention_mask)
    passes = row_passes(tokens.shape[0], batch_size, "log-prob batch_size")
    outs, counts = [], np.zeros(4, np.float64)
    with jax.set_mesh(policy.mesh):
        for rows in passes:
            pass_routing = None if routing is None else tuple(np.asarray(r)[rows] for r in routing)
            if pack:
                out = _packed_pass(policy, tokens[rows], attention_mask[rows], temperature, chunk_size,
                                   pack_length, pass_routing, replay, scan_layers)
            else:
                tok, mask = place_batch(policy, tokens[rows], attention_mask[rows])
                kw = {}
                if pass_routing is not None:
                    kw = dict(routing=Routing(*place_batch(policy, *pass_routing)), replay=replay)
                out = _token_logprobs(policy.graphdef, policy.params, tok, mask, jnp.float32(temperature),
                                      chunk_size=chunk_size, scan_layers=scan_layers, **kw)
            if routing is not None:
                counts += np.asarray(out[2], np.float64)
            outs.append(out[:2])
        extra = (counts,) if routing is not None else ()
        if len(outs) == 1:
            return (*outs[0], *extra)
        # each pass holds every process's rows of that pass: join this process's rows in order, then re-place
        return (*(to_global(policy.mesh, np.concatenate([to_local(x) for x in parts]), policy.rules)
                  for parts in zip(*outs)), *extra)


def _packed_pass(policy: Policy, tokens: np.ndarray, attention_mask: np.ndarray, temperature: float,
                 chunk_size: int, pack_length: Optional[int], routing=None, replay: bool = True,
                 scan_layers: bool = False) -> tuple:
    """One log-prob pass over this process's rows, packed; returns the padded layout's [rows, T] (global arrays)
    (and the routing-mismatch counts with `routing`)."""
    extras = {} if routing is None else {"routing_ids": routing[0], "routing_use": routing[1]}
    packed = packing.pack(tokens, attention_mask, 1, pack_length, packing.row_multiple(policy.mesh, policy.rules),
                          extras=extras)
    tok, seg, pos = place_batch(policy, packed.tokens, packed.segment_ids, packed.positions)
    kw = {}
    if routing is not None:
        kw = dict(routing=Routing(*place_batch(policy, packed.extras["routing_ids"],
                                               packed.extras["routing_use"].astype(bool))), replay=replay)
    out = _packed_logprobs(policy.graphdef, policy.params, tok, seg, pos, jnp.float32(temperature),
                           chunk_size=chunk_size, scan_layers=scan_layers, **kw)
    return (*(to_global(policy.mesh, packing.unpack_host(to_local(x), packed.index), policy.rules)
              for x in out[:2]), *out[2:])
