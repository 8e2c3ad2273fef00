"""Statistical checks shared by the sampler tests."""

from __future__ import annotations

import math

import torch

# Each token's count may fail its bound with at most this probability (union bound over a suite of
# a few hundred tokens: under 1e-6 false failures in all).
FAILURE_PROB_PER_TOKEN = 1e-9


def assert_matches(token_ids: torch.Tensor, expected: list[float]) -> None:
    """Draw counts agree with the exact probabilities `expected`; a zero-probability token never drawn."""
    counts = torch.bincount(token_ids.cpu(), minlength=len(expected)).tolist()
    n = len(token_ids)
    a = math.log(2 / FAILURE_PROB_PER_TOKEN)
    for token, (count, p) in enumerate(zip(counts, expected)):
        if p == 0.0:
            assert count == 0, f"token {token} has probability 0 but was drawn {count} times"
            continue
        # Bernstein: P(|X - np| >= t) <= 2 exp(-t^2 / (2 (n p (1-p) + t/3))) for X ~ Binomial(n, p).
        var = n * p * (1 - p)
        bound = a / 3 + math.sqrt((a / 3) ** 2 + 2 * a * var)
        assert abs(count - n * p) <= bound, (
            f"token {token}: {count} draws, expected {n * p:.1f} ± {bound:.1f}"
        )
