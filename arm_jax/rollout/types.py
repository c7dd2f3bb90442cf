"""What a rollout engine hands back to `aj.generate`: the samples of this process's rows and the work it did."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass
class RolloutStats:
    """The work one `generate` call did (global: summed over processes and passes).

    engine: 'lockstep' or 'refill'; samples: rows generated; generated_tokens: valid new tokens (the useful work);
    slot_steps: decode slots computed (rows or slots x decode steps run), each a forward of one token;
    decode_steps: decode steps run; prefill_tokens: prompt slots prefilled (rows x Tp, padding rows included);
    prefill_calls, chunks: jitted prefill / decode-chunk calls.
    """

    engine: str
    samples: int
    generated_tokens: int
    slot_steps: int
    decode_steps: int
    prefill_tokens: int
    prefill_calls: int = 0
    chunks: int = 0

    def add_chunk(self, steps: int, slots: int) -> None:
        """Counts one decode chunk that ran `steps` steps over `slots` slots (a chunk of zero steps is no call)."""
        self.chunks += steps > 0
        self.decode_steps += steps
        self.slot_steps += slots * steps

    @property
    def useful_fraction(self) -> float:
        """Valid generated tokens / slot-steps computed (1 = no decode slot ever idle)."""
        return self.generated_tokens / max(self.slot_steps, 1)


@dataclasses.dataclass
class Samples:
    """An engine's output for this process's R rows (row b * n + j = sample j of prompt b), NumPy:
    tokens [R, N] int32 (0 after the end), mask [R, N] bool, logp / logp_sampling [R, N] float32, stopped [R]
    (ended by a stop id; otherwise it reached its budget); routing [R, N, L_moe, k] (MoE models, else None): the
    experts, per MoE layer, of the forward that produced each token's logits (`moe.routing_layout`'s dtype);
    prompt_routing [R, Tp, L_moe, k]: those of the prompt's positions in the prefill (MoE models, else None)."""

    tokens: np.ndarray
    mask: np.ndarray
    logp: np.ndarray
    logp_sampling: np.ndarray
    stopped: np.ndarray
    stats: RolloutStats
    routing: Optional[np.ndarray] = None
    prompt_routing: Optional[np.ndarray] = None
