"""Sample n responses per held-out prompt and grade them: the one evaluation pipeline behind `RLRun.evaluate` and
`python -m arm_jax.eval`.

Prompts go in chunks of a fixed size (the last one padded with repeats whose results are dropped, so one compiled
shape serves all); with several processes each reads its block of every chunk and the results are gathered.
Entropy and answer confidence are computed at the evaluation temperature, i.e. of the distribution sampled from
(before top-p), not of the temperature-1 model. The grader's statuses are counted (`GradedSamples.grading`), so a
grader that timed out or failed shows beside Pass@k (`grading_warning`) instead of as responses that are wrong.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np

from arm_jax import distributed
from arm_jax.algorithms.confidence import answer_confidence
from arm_jax.policy import Policy, token_logprobs
from arm_jax.rewards.registry import GRADING_STATUSES, grading_metrics
from arm_jax.rollout.sampler import EngineOptions, generate


@dataclasses.dataclass
class GradedSamples:
    """Per prompt p and sample j (global, every process's prompts in order):
    correct [P, n] bool (the verifier's accuracy); texts [P][n]; lengths [P, n] generated tokens;
    entropy [P, n] summed token entropy of each response; confidence [P, n] c(o|q) (rho-lowest tokens);
    distinct [P] distinct (whitespace-normalized) correct responses; n: samples per prompt; grading: the grader's
    status counts over every response (`registry.GRADING_STATUSES` + graded, summed over processes; zero when
    `grade` returns accuracies alone). texts are kept only in a single-process run (the CLI's diversity metrics
    read them)."""

    correct: np.ndarray
    texts: list
    lengths: np.ndarray
    entropy: np.ndarray
    confidence: np.ndarray
    distinct: np.ndarray
    n: int
    grading: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(len(GRADING_STATUSES) + 1, np.int64))

    @property
    def mean_token_entropy(self) -> float:
        """Summed response entropy / generated tokens (at the evaluation temperature)."""
        return float(self.entropy.sum() / max(self.lengths.sum(), 1))


def sample_and_grade(policy: Policy, records: Sequence[dict], *, encode: Callable[[dict], list[int]],
                     decode: Callable[[Sequence[int]], str], grade: Callable, stop_ids: Sequence[int], n: int,
                     max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                     seed: int = 0, chunk_rows: int = 256, rho: float = 0.2,
                     engine: EngineOptions = EngineOptions(), logprob_batch_size: Optional[int] = None,
                     pack: bool = True, pack_length: Optional[int] = None,
                     scan_layers: bool = False) -> GradedSamples:
    """records: every prompt (the same list on every process). grade(texts, examples, lengths, max_len) -> accuracy
    per response, or a RewardComposer's output (its 'accuracy' and its 'grading' counts, summed into
    GradedSamples.grading); the repeats that pad the last chunk are not graded. engine, logprob_batch_size, pack,
    pack_length, scan_layers: the run's levers (`EngineOptions`, `token_logprobs`), so an evaluation needs no more
    memory than the run's own stages. The refill engine takes every prompt in one call (its memory is bounded by its
    slots; prompts wait for free ones, so the evaluation costs about rows x mean answer / slots decode steps, not a
    wait for the longest answer of every chunk); lockstep runs chunks of about chunk_rows rows. Chunks are rounded
    so that the processes, lockstep's rows_per_pass and logprob_batch_size divide them. Sample j of prompt i is
    drawn with the keys of row i * n + j whatever the chunks (`generate(row_offset=)`), so results depend neither on
    the engine, the chunking nor the process count."""
    procs = distributed.process_count()
    chunk = len(records) if engine.engine == "refill" else min(max(1, chunk_rows // n), len(records))
    multiple = procs
    for rows in (logprob_batch_size, engine.rows_per_pass if engine.engine == "lockstep" else None):
        if rows:  # chunk * n must be a multiple of rows
            multiple = math.lcm(multiple, rows // math.gcd(rows, n))
    chunk = -(-chunk // multiple) * multiple
    lp_temperature = temperature if temperature > 0 else 1.0  # greedy: report the model's own distribution
    parts: dict[str, list] = {"correct": [], "lengths": [], "entropy": [], "confidence": [], "distinct": []}
    texts_all: list = []
    grading = np.zeros(len(GRADING_STATUSES) + 1, np.int64)
    for s in range(0, len(records), chunk):
        real = min(chunk, len(records) - s)
        part = [records[s + (i if i < real else 0)] for i in range(chunk)][distributed.local_slice(chunk)]
        out = generate(policy, [encode(r) for r in part], max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, top_k=top_k, n=n, seed=seed, step=0, row_offset=s * n, stop_ids=list(stop_ids),
                       **engine.kwargs()).trimmed()
        texts = [decode(t[:k]) for t, k in zip(out.tokens, out.lengths)]
        index = np.asarray(out.prompt_index)
        graded = np.flatnonzero(distributed.local_slice(chunk).start + index < real)  # not the padding repeats
        acc = np.zeros(len(texts), bool)
        if len(graded):
            res = grade([texts[i] for i in graded], [part[index[i]] for i in graded],
                        np.asarray(out.lengths)[graded], max_new_tokens)
            if isinstance(res, dict):
                grading += np.asarray(res["grading"], np.int64)
                res = res["accuracy"]
            acc[graded] = np.asarray(res) > 0
        tokens, attn, _ = out.sequences()
        logp, ent = (distributed.to_local(x) for x in token_logprobs(
            policy, tokens, attn, temperature=lp_temperature, batch_size=logprob_batch_size, pack=pack,
            pack_length=pack_length, scan_layers=scan_layers))
        Tp = out.prompt_tokens.shape[1]
        resp_logp, resp_ent = np.asarray(logp)[:, Tp:], np.asarray(ent)[:, Tp:]
        conf = np.asarray(answer_confidence(resp_logp, out.mask, rho))
        per_prompt = [texts[p * n:(p + 1) * n] for p in range(len(part))]
        distinct = [len({" ".join(t.split()) for t, ok in zip(ts, row) if ok})
                    for ts, row in zip(per_prompt, acc.reshape(-1, n))]
        local = dict(correct=acc.reshape(-1, n), lengths=out.lengths.reshape(-1, n),
                     entropy=(resp_ent * out.mask).sum(axis=1).reshape(-1, n), confidence=conf.reshape(-1, n),
                     distinct=np.asarray(distinct))
        for k, v in local.items():
            parts[k].append(distributed.allgather(v)[:real])
        if procs == 1:
            texts_all.extend(per_prompt[:real])
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    return GradedSamples(texts=texts_all, n=n, grading=distributed.allgather(grading[None]).sum(axis=0), **arrays)


def grading_warning(counts: np.ndarray, max_error_frac: float, max_timeout_frac: Optional[float]) -> Optional[str]:
    """A warning when the grader, not the model, failed on more of the evaluated responses than a training step
    may (RLConfig.max_reward_error_frac for status 'error', max_reward_timeout_frac for 'timeout'; None: no limit),
    else None. An evaluation is never aborted for it: it reports, and its Pass@k counts those responses wrong."""
    fracs = grading_metrics(counts)
    over = [f"{fracs[f'reward/{status}_frac']:.0%} of the responses got status {status!r}, more than "
            f"RLConfig.{option}={limit}" for status, option, limit in (
                ("error", "max_reward_error_frac", max_error_frac),
                ("timeout", "max_reward_timeout_frac", max_timeout_frac))
            if limit is not None and fracs[f"reward/{status}_frac"] > limit]
    if not over:
        return None
    return "; ".join(over) + ": the grader failed on them and Pass@k counts them as wrong (not aborted)"
