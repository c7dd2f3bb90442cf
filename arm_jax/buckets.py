"""Bucket lengths: the few sequence widths the jitted programs are compiled for (prompt width, learner width,
the decode chunks' live window), so a run compiles each program once per bucket whatever its lengths."""

from __future__ import annotations


def bucket_length(n: int, minimum: int = 16) -> int:
    """The smallest bucket >= max(n, minimum) among 2^k and 3 * 2^(k-1) (16, 24, 32, 48, 64, 96, 128, ...): two
    shapes per octave, at most 1/3 of padding. Prompt widths and learner sequence widths use them, so programs
    compile once per bucket (MaxText and JetStream bucket prefill lengths in powers of two)."""
    n = max(int(n), minimum)
    p = 1 << (n - 1).bit_length()  # the power of two >= n
    return 3 * p // 4 if 3 * p // 4 >= n else p
