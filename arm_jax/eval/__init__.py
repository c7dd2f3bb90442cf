"""Evaluation: unbiased Pass@k and friends."""
