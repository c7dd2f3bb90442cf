"""Supervised warm start: token-mean negative log-likelihood with the learner's optimizer and state."""

from __future__ import annotations

import functools
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from arm_jax.policy import Policy, logprobs_fn, place_batch
from arm_jax.train.learner import OptimConfig, TrainState, init_state_sharded, make_optimizer


def pack(prompts: list[list[int]], responses: list[list[int]], prompt_len: int, response_len: int,
         pad_id: int = 0) -> dict[str, np.ndarray]:
    """Left-padded prompts + right-padded responses -> tokens, attention_mask, prompt_mask, response_mask
    [B, prompt_len + response_len]."""
    B, T = len(prompts), prompt_len + response_len
    out = {k: np.zeros((B, T), np.int32) for k in ("tokens", "attention_mask", "prompt_mask", "response_mask")}
    out["tokens"][:] = pad_id
    for b, (p, r) in enumerate(zip(prompts, responses)):
        if len(p) > prompt_len or len(r) > response_len:
            raise ValueError(f"example {b}: prompt {len(p)} / response {len(r)} tokens exceed {prompt_len} / "
                             f"{response_len}")
        s = prompt_len - len(p)
        out["tokens"][b, s:prompt_len] = p
        out["tokens"][b, prompt_len:prompt_len + len(r)] = r
        out["attention_mask"][b, s:prompt_len + len(r)] = 1
        out["prompt_mask"][b, s:prompt_len] = 1
        out["response_mask"][b, prompt_len:prompt_len + len(r)] = 1
    return out


def _sft_step(graphdef, optimizer, state: TrainState, tokens, attention_mask, loss_mask):
    def loss_fn(params):
        logp, _ = logprobs_fn(graphdef, params, tokens, attention_mask)
        m = loss_mask.astype(jnp.float32)
        return -jnp.sum(logp * m) / jnp.maximum(jnp.sum(m), 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state.params, updates)
    return TrainState(params, opt_state, state.step + 1, state.skipped), loss


def run_sft(policy: Policy, batches: Iterator[dict], steps: int, optim_cfg: OptimConfig,
            log: Optional[Callable[[int, float], None]] = None, log_every: int = 100) -> Policy:
    """Trains `policy` for `steps` batches (dicts from `pack`, loss on `loss_mask`); returns the new policy."""
    optimizer = make_optimizer(optim_cfg)
    step_fn = jax.jit(functools.partial(_sft_step, policy.graphdef, optimizer), donate_argnums=(0,))
    state = init_state_sharded(policy.params, optimizer, policy.mesh)
    with jax.set_mesh(policy.mesh):
        for i in range(steps):
            b = next(batches)
            tokens, attn, mask = place_batch(policy, b["tokens"], b["attention_mask"], b["loss_mask"])
            state, loss = step_fn(state, tokens, attn, mask)
            if log is not None and (i % log_every == 0 or i == steps - 1):
                log(i, float(loss))
    return policy.replace(params=state.params)
