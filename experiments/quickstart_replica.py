"""A plain-JAX replica of QUICKSTART-FACTS' prototype, to separate "the architecture" from "arm_jax's RL loop".

It trains the mini-Countdown task with arm_jax's data, verifier and Pass@k (so only the model and the loop differ):
SFT (Adam 2e-3, 50 warm-up, clip 1, loss on prompt and response) then on-policy RL (μ = 1 so the PPO ratio is 1:
loss = token-mean of -Ã · log π, P 32 x G 8, Adam 1e-4, T = 1) and prints held-out / training-set Pass@1 before
and after RL. Sampling recomputes the whole sequence each step (no KV cache): slow (~6-8 min on 2 cores) but simple.

    python experiments/quickstart_replica.py --sft_steps 800 --rl_steps 300   # learned positions, LN, ReLU
    python experiments/quickstart_replica.py --rope --gated --rms             # a Qwen2-like block
    python experiments/quickstart_replica.py --rope --arm                     # ARM α 1, ρ 0.2 (additive)

Results (2 cores, seed 0; experiments/README.md "Quick-start: architecture"): learned positions + LayerNorm + ReLU
0.298 -> 0.449 (GRPO); RoPE + RMSNorm + SwiGLU 0.307 -> 0.409 (GRPO).
"""

from __future__ import annotations

import argparse
import random
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import arm_jax.rewards.countdown  # noqa: F401 - registers the 'countdown' reward
from arm_jax.data import countdown as cd
from arm_jax.rewards.registry import RewardComposer, RewardSpec
from arm_jax.train.sft import pack

D, L, H, M = 64, 2, 4, 256
TP, TR = cd.MAX_PROMPT_TOKENS, cd.MAX_RESPONSE_TOKENS
T = TP + TR


def init_params(seed: int, std: float = 0.02) -> dict:
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 8 * L + 4))

    def normal(shape):
        return jax.random.normal(next(keys), shape) * std

    params = {"emb": normal((len(cd.VOCAB), D)), "pos": normal((T, D)), "lnf": jnp.ones(D), "lnfb": jnp.zeros(D)}
    for i in range(L):
        params[f"l{i}"] = dict(ln1=jnp.ones(D), ln1b=jnp.zeros(D), ln2=jnp.ones(D), ln2b=jnp.zeros(D),
                               qkv=normal((D, 3 * D)), o=normal((D, D)), up=normal((D, M)), down=normal((M, D)),
                               gate=normal((D, M)))
    return params


def make_forward(rope: bool, gated: bool, rms: bool):
    def norm(x, g, b):
        if rms:
            return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * g
        centred = x - x.mean(-1, keepdims=True)
        return centred * jax.lax.rsqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5) * g + b

    def rotate(x, pos):  # x [B, T, H, Dh]; rotate-half RoPE
        hd = x.shape[-1]
        ang = pos[..., None].astype(jnp.float32) / (10000 ** (jnp.arange(0, hd, 2) / hd))
        cos, sin = jnp.cos(ang)[:, :, None], jnp.sin(ang)[:, :, None]
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def forward(params, tok, attn):
        """tok, attn [B, T] -> logits [B, T, V]."""
        B, n = tok.shape
        pos = jnp.maximum(jnp.cumsum(attn, -1) - 1, 0)
        x = params["emb"][tok] + (0 if rope else params["pos"][None, :n])
        mask = jnp.tril(jnp.ones((n, n), bool))[None] & (attn[:, None, :] > 0)
        for i in range(L):
            p = params[f"l{i}"]
            q, k, v = (t.reshape(B, n, H, D // H) for t in jnp.split(norm(x, p["ln1"], p["ln1b"]) @ p["qkv"], 3, -1))
            if rope:
                q, k = rotate(q, pos), rotate(k, pos)
            s = jnp.where(mask[:, None], jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // H), -1e9)
            x = x + jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(B, n, D) @ p["o"]
            h = norm(x, p["ln2"], p["ln2b"])
            x = x + ((jax.nn.silu(h @ p["gate"]) * (h @ p["up"])) if gated else jax.nn.relu(h @ p["up"])) @ p["down"]
        return norm(x, params["lnf"], params["lnfb"]) @ params["emb"].T

    return forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft_steps", type=int, default=800)
    ap.add_argument("--rl_steps", type=int, default=300)
    ap.add_argument("--rope", action="store_true", help="RoPE instead of learned absolute positions")
    ap.add_argument("--gated", action="store_true", help="SwiGLU instead of a ReLU MLP")
    ap.add_argument("--rms", action="store_true", help="RMSNorm instead of LayerNorm")
    ap.add_argument("--arm", action="store_true", help="ARM advantages (α 1, ρ 0.2) instead of GRPO")
    args = ap.parse_args()
    forward = make_forward(args.rope, args.gated, args.rms)
    train, test = cd.splits()
    rewards = RewardComposer([RewardSpec("countdown", accuracy=True)])

    def token_logp(params, tok, attn):  # [B, T - 1]: log π(tok[:, t + 1] | tok[:, :t + 1])
        lg = jax.nn.log_softmax(forward(params, tok, attn)[:, :-1])
        return jnp.take_along_axis(lg, tok[:, 1:, None], -1)[..., 0]

    def sft_loss(params, tok, attn):
        m = attn[:, 1:] * attn[:, :-1]
        return -(token_logp(params, tok, attn) * m).sum() / m.sum()

    def rl_loss(params, tok, attn, rmask, adv):  # token-mean of -Ã · log π over response tokens (ratio = 1)
        m = rmask[:, 1:]
        return -(token_logp(params, tok, attn) * m * adv[:, None]).sum() / m.sum()

    def make_step(loss_fn, optimizer):
        @jax.jit
        def step(params, opt_state, *batch):
            grads = jax.grad(loss_fn)(params, *batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state
        return step

    @jax.jit
    def sample(params, tok, attn, key):  # fills slots TP..T-1 at temperature 1, stopping rows at EOS
        def body(t, carry):
            tok, attn, done, key = carry
            key, sub = jax.random.split(key)
            nxt = jax.random.categorical(sub, jax.lax.dynamic_index_in_dim(forward(params, tok, attn), t - 1, 1,
                                                                            keepdims=False)).astype(tok.dtype)
            tok = tok.at[:, t].set(jnp.where(done, 0, nxt))
            attn = attn.at[:, t].set((~done).astype(attn.dtype))
            return tok, attn, done | (nxt == cd.EOS_ID), key
        tok, attn, _, _ = jax.lax.fori_loop(TP, T, body, (tok, attn, jnp.zeros(tok.shape[0], bool), key))
        return tok, attn

    def rollout(params, recs, n, key):
        b = pack([cd.prompt_ids(r["question"]) for r in recs for _ in range(n)], [[]] * (len(recs) * n), TP, TR)
        tok, attn = (np.array(x) for x in sample(params, jnp.asarray(b["tokens"]), jnp.asarray(b["attention_mask"]),
                                                 key))
        texts = [cd.decode(tok[i, TP:]) for i in range(len(tok))]
        acc = rewards(texts, [recs[i // n] for i in range(len(tok))], lengths=np.full(len(tok), TR),
                      max_len=TR)["accuracy"]
        return tok, attn, (acc.reshape(len(recs), n) > 0).astype(np.float32)

    def report(params, tag):
        out = []
        for name, recs in (("heldout", list(test)), ("train", [train[i] for i in range(0, 1800, 9)])):
            c = rollout(params, recs, 8, jax.random.PRNGKey(1))[2]
            out.append(f"{name} Pass@1 {c.mean():.3f} Pass@8 {c.max(1).mean():.3f}")
        print(tag, " | ".join(out), vars(args), flush=True)

    params = init_params(0)
    sched = optax.join_schedules([optax.linear_schedule(0, 2e-3, 50), optax.constant_schedule(2e-3)], [50])
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))
    step, opt_state, rng, t0 = make_step(sft_loss, optimizer), optimizer.init(params), random.Random(0), time.time()
    for _ in range(args.sft_steps):
        pairs = [cd.sft_example(train[rng.randrange(len(train))], rng) for _ in range(128)]
        b = pack([p for p, _ in pairs], [r for _, r in pairs], TP, TR)
        params, opt_state = step(params, opt_state, jnp.asarray(b["tokens"]), jnp.asarray(b["attention_mask"]))
    print(f"SFT {args.sft_steps} steps in {time.time() - t0:.0f} s")
    report(params, "after SFT:")

    P, G = 32, 8
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-4))
    step, opt_state, key = make_step(rl_loss, optimizer), optimizer.init(params), jax.random.PRNGKey(9)
    lp_fn = jax.jit(token_logp)
    for s in range(args.rl_steps):
        recs = [train[rng.randrange(len(train))] for _ in range(P)]
        key, sub = jax.random.split(key)
        tok, attn, r = rollout(params, recs, G, sub)
        adv = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)
        rmask = attn.copy()
        rmask[:, :TP] = 0
        if args.arm:
            lp = np.asarray(lp_fn(params, jnp.asarray(tok), jnp.asarray(attn)))
            resp = rmask[:, 1:] > 0
            low = [np.sort(lp[i][resp[i]])[:max(1, int(np.ceil(0.2 * resp[i].sum())))] for i in range(len(lp))]
            c_o = np.exp([v.mean() for v in low]).reshape(P, G)
            question = (attn[:, 1:] > 0) & (attn[:, :-1] > 0) & (np.arange(1, T) < TP)[None]  # after BOS
            c_q = np.exp([lp[i][question[i]].mean() for i in range(0, len(lp), G)])
            adv = adv + np.where(r.sum(1, keepdims=True) > 0, c_q[:, None] - c_o, 0.0)
        params, opt_state = step(params, opt_state, jnp.asarray(tok), jnp.asarray(attn), jnp.asarray(rmask),
                                 jnp.asarray(adv.reshape(-1), jnp.float32))
        if (s + 1) % 50 == 0:
            print(f"RL step {s + 1}: rollout accuracy {r.mean():.3f}", flush=True)
    report(params, "after RL:")


if __name__ == "__main__":
    main()
