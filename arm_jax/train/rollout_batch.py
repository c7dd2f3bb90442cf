"""One rollout batch: what the sampler and the graders hand over (`Sampled`, saved with a checkpoint while it waits
for its update under one-step-off RL), with everything an update needs (`RolloutBatch`), how the loop computes its
advantages (one call for every estimator), and DAPO dynamic sampling's group-wise merge of extra rounds."""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

import numpy as np

from arm_jax.algorithms import advantages as adv_lib
from arm_jax.rewards.registry import upgrade_grading
from arm_jax.rollout.sampler import Rollout
from arm_jax.rollout.types import RolloutStats
from arm_jax.train.rl_config import RLConfig


@dataclasses.dataclass
class Sampled:
    """One graded rollout round of this process's rows, before any learner pass reads it.

    records [P]; out: the (trimmed) Rollout; qmask [P, Tp] (question tokens of c(q)); texts [P*G]; r: the reward
    composer's arrays ('total', 'accuracy', 'grading', one per reward); step: the RL step whose weights sampled
    it; data_state: the prompt iterator's state before its records were drawn (a resume draws them again);
    counters: the work that made it (rollout_s, rewards_s, slot_steps, generated)."""

    records: list
    out: Rollout
    qmask: np.ndarray
    texts: list
    r: dict
    step: int
    data_state: dict
    counters: dict

    def arrays(self) -> dict:
        """Everything but the records and texts (drawn and decoded again on resume) as named numpy arrays."""
        out = {f"out/{f.name}": getattr(self.out, f.name) for f in dataclasses.fields(Rollout)
               if f.name != "stats" and getattr(self.out, f.name) is not None}
        if self.out.stats is not None:
            out["stats"] = np.asarray(json.dumps(dataclasses.asdict(self.out.stats)))
        out.update({f"r/{k}": np.asarray(v) for k, v in self.r.items()})
        out["qmask"], out["step"] = self.qmask, np.asarray(self.step)
        out["data_state"] = np.asarray(json.dumps(self.data_state, default=str))
        out["counters"] = np.asarray(json.dumps(self.counters))
        return out

    @classmethod
    def from_arrays(cls, arrays: dict, records: list, decode) -> "Sampled":
        """The inverse of `arrays`, given the records drawn again and the task's `decode`."""
        fields = {k[4:]: v for k, v in arrays.items() if k.startswith("out/")}
        records = list(records)
        stats = RolloutStats(**json.loads(str(arrays["stats"]))) if "stats" in arrays else None
        out = Rollout(**fields, stats=stats)
        texts = [decode(t[:n]) for t, n in zip(out.tokens, out.lengths)]
        r = {k[2:]: v for k, v in arrays.items() if k.startswith("r/")}
        if "grading" in r:
            r["grading"] = upgrade_grading(r["grading"])  # batches saved before 'malformed' was counted
        return cls(records, out, arrays["qmask"], texts, r, int(arrays["step"]), json.loads(str(arrays["data_state"])),
                   json.loads(str(arrays["counters"])))


def compute_advantages(cfg: RLConfig, rewards, accuracy, logp, rollout: Rollout, qmask):
    """-> (A~ [P, G], the estimator's diagnostics as numpy, e.g. ARM's c_q [P], c_o / term [P, G]). One call for
    every estimator: the input carries everything any of them reads (the verifier's accuracy is "correct")."""
    G = rewards.shape[1]
    Tp = rollout.prompt_tokens.shape[1]
    inp = adv_lib.AdvantageInput(rewards=rewards, accuracy=accuracy, resp_logp=logp[:, Tp:], resp_mask=rollout.mask,
                                 prompt_logp=logp[::G, :Tp], prompt_mask=qmask)
    out = adv_lib.compute(cfg.advantage, inp, cfg.advantage_options)
    diag = {k: np.asarray(out.diagnostics[k]) for k in ("c_q", "c_o", "term") if k in out.diagnostics}
    return np.asarray(out.adv), diag


@dataclasses.dataclass
class RolloutBatch:
    """One rollout round with everything the update needs, P prompts x G samples (row p * G + g).

    records [P]; out: the Rollout; qmask [P, Tp] (question tokens of c(q)); texts [P*G]; rewards, accuracy,
    adv [P, G]; logp, ent [P*G, Tp + N] (temperature-`cfg.temperature` log-probs of the policy that sampled, i.e.
    logp_old, and entropies); ref_logp [P*G, Tp + N] or None; arm: ARM's arrays (c_q [P], c_o, term [P, G])."""

    records: list
    out: Rollout
    qmask: np.ndarray
    texts: list
    rewards: np.ndarray
    accuracy: np.ndarray
    logp: np.ndarray
    ent: np.ndarray
    ref_logp: Optional[np.ndarray]
    adv: np.ndarray
    arm: dict

    def informative(self, tol: float = 1e-6) -> np.ndarray:
        """[P] bool: groups whose advantages are not all zero (DAPO's filter, stated on advantages so that ARM's
        all-correct groups, which carry its only signal there, are kept)."""
        return np.any(np.abs(self.adv) > tol, axis=1)


def merge_groups(batch: RolloutBatch, keep: np.ndarray, more: RolloutBatch, G: int) -> RolloutBatch:
    """Replaces the first dropped groups of `batch` by informative groups of `more` (shapes unchanged). Arrays
    with prompt columns are aligned to the longer left padding first."""
    src = np.nonzero(more.informative())[0]
    slots = np.nonzero(~keep)[0][:len(src)]
    if not len(slots):
        return batch
    Tp = max(batch.out.prompt_tokens.shape[1], more.out.prompt_tokens.shape[1])
    N = max(batch.out.tokens.shape[1], more.out.tokens.shape[1])
    a, b = _pad_columns(batch, Tp, N), _pad_columns(more, Tp, N)
    fields = {f.name: getattr(a.out, f.name).copy() for f in dataclasses.fields(Rollout)
              if f.name != "stats" and getattr(a.out, f.name) is not None}
    per_row = {k: getattr(a, k).copy() for k in ("logp", "ent") + (("ref_logp",) if a.ref_logp is not None else ())}
    per_group = {k: getattr(a, k).copy() for k in ("qmask", "rewards", "accuracy", "adv")}
    arm = {k: v.copy() for k, v in a.arm.items()}
    records, texts = list(a.records), list(a.texts)
    for slot, g in zip(slots, src[:len(slots)]):
        rows, m_rows = slice(slot * G, (slot + 1) * G), slice(g * G, (g + 1) * G)
        for name in fields:
            if name != "prompt_index":
                fields[name][rows] = getattr(b.out, name)[m_rows]
        for k in per_row:
            per_row[k][rows] = getattr(b, k)[m_rows]
        for k in per_group:
            per_group[k][slot] = getattr(b, k)[g]
        for k in arm:
            arm[k][slot] = b.arm[k][g]
        records[slot] = b.records[g]
        texts[rows] = b.texts[m_rows]
    return RolloutBatch(records, Rollout(**fields, stats=a.out.stats), per_group["qmask"], texts, per_group["rewards"],
                      per_group["accuracy"], per_row["logp"], per_row["ent"], per_row.get("ref_logp"),
                      per_group["adv"], arm)


def _pad_columns(rb: RolloutBatch, Tp: int, N: int) -> RolloutBatch:
    """Left-pads every array with prompt columns to Tp prompt slots and right-pads the response columns to N (the
    rounds' rollouts are trimmed to their own longest answers)."""
    pad, more = Tp - rb.out.prompt_tokens.shape[1], N - rb.out.tokens.shape[1]
    if pad == 0 and more == 0:
        return rb
    left = lambda x: None if x is None else np.pad(x, ((0, 0), (pad, 0)))  # noqa: E731
    right = lambda x: np.pad(x, ((0, 0), (0, more)))  # noqa: E731
    both = lambda x: None if x is None else np.pad(x, ((0, 0), (pad, more)))  # noqa: E731
    out = dataclasses.replace(rb.out, prompt_tokens=left(rb.out.prompt_tokens), prompt_mask=left(rb.out.prompt_mask),
                              **{k: right(getattr(rb.out, k)) for k in ("tokens", "mask", "logp", "logp_sampling")})
    if out.routing is not None:  # [R, N, L_moe, k]: the response columns; [R, Tp, L_moe, k]: the prompt's
        out = dataclasses.replace(out, routing=np.pad(out.routing, ((0, 0), (0, more), (0, 0), (0, 0))),
                                  prompt_routing=np.pad(out.prompt_routing, ((0, 0), (pad, 0), (0, 0), (0, 0))))
    return dataclasses.replace(rb, out=out, qmask=left(rb.qmask), logp=both(rb.logp), ent=both(rb.ent),
                               ref_logp=both(rb.ref_logp))
