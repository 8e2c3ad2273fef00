"""Scores of text pairs from an embedding model (vLLM's score and rerank for embedding models): each text is
embedded once, and a pair's score is the cosine similarity of its two vectors (docs/embeddings.md).

Which pairs, as vLLM pairs them: one text against N (1 -> N), or two lists of equal length, element by element
(N -> N). A cross-encoder (a model that reads both texts together, such as Qwen3-Reranker) is not this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ScoringOutput:
    score: float


@dataclass
class ScoringRequestOutput:
    """One pair's score (vLLM's ScoringRequestOutput); prompt_token_ids: the two texts' ids, one after the
    other."""

    request_id: str
    outputs: ScoringOutput
    prompt_token_ids: list[int]
    finished: bool = True


def score_pairs(num_1: int, num_2: int) -> list[tuple[int, int]]:
    """The (index into data_1, index into data_2) of every pair scored: 1 -> N or N -> N; ValueError else."""
    if num_1 == 0 or num_2 == 0:
        raise ValueError("score needs at least one text on each side")
    if num_1 == 1:
        return [(0, j) for j in range(num_2)]
    if num_1 != num_2:
        raise ValueError(
            f"score pairs one text with N, or N texts with N, element by element; got {num_1} and {num_2}"
        )
    return [(i, i) for i in range(num_1)]


def cosine(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """The cosine similarity of two vectors ([dims] each), in float32."""
    a, b = (torch.as_tensor(x, dtype=torch.float32) for x in (a, b))
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()
