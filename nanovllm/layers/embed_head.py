"""Vocabulary-parallel embedding and LM head.

The vocabulary is split into equal contiguous ranges, one per rank (padded so it divides evenly).
Embedding: each rank looks up the ids in its range, writes zeros elsewhere, then all-reduce.
LM head: each rank computes logits for its range; rank 0 gathers them and drops the padding. For a step
whose every row takes the plain argmax (greedy, nothing that needs the whole row), `greedy` gathers only
each rank's best (logit, token id) per row instead of [rows, vocab / ranks] logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.linear import _copy, load_shard
from nanovllm.utils.distributed import get_tp_group, get_tp_rank, get_tp_size


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a vocabulary range's rows; the all-reduce sums the ranks' lookups."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.tp_group = get_tp_group()
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // self.tp_size)  # padded: the last shard may be short
        self.vocab_start = self.shard_size * self.tp_rank
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        size = max(0, min(self.shard_size, self.vocab_size - self.vocab_start))
        param.data[size:].zero_()  # padding rows of the last shard
        if size:
            _copy(param.data[:size], load_shard(loaded, 0, self.vocab_start, size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [num_tokens] -> [num_tokens, hidden_size]
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        in_range = (local >= 0) & (local < self.shard_size)
        y = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * in_range.unsqueeze(1)
        return self.tp_group.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    def forward(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """hidden: [num_seqs, hidden_size] -> logits [num_seqs, vocab_size] on rank 0, None elsewhere.
        out ([num_seqs, shard_size], single rank only): where to write them, e.g. a CUDA graph's buffer."""
        if out is not None:
            if self.tp_size > 1:
                raise ValueError("ParallelLMHead takes `out` on a single rank only (TP gathers the logits)")
            return torch.mm(hidden, self.weight.t(), out=out)[:, : self.vocab_size]  # F.linear's matmul
        logits = F.linear(hidden, self.weight)  # [num_seqs, shard_size]
        if self.tp_size > 1:
            parts = self.tp_group.gather(logits, dst=0)  # collective: every rank calls it
            if parts is None:
                return None
            logits = torch.cat(parts, dim=-1)
        return logits[:, : self.vocab_size]

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden: [num_seqs, hidden_size] -> [num_seqs] int64 token ids on rank 0 (None elsewhere): the
        argmax of each row's logits, the first one on ties, as `logits.argmax(-1)` on the gathered logits
        gives. Each rank takes its range's maximum (padding rows excluded) and rank 0 picks the largest,
        the lowest rank on ties (the lower token id). A collective: every rank calls it."""
        logits = F.linear(hidden, self.weight)  # [num_seqs, shard_size]
        size = max(0, min(self.shard_size, self.vocab_size - self.vocab_start))
        if size < self.shard_size:  # the last range's padding rows never win
            logits[:, size:] = float("-inf")
        ids = logits.argmax(dim=-1, keepdim=True)  # [num_seqs, 1]
        values = logits.gather(1, ids).squeeze(1)  # [num_seqs]
        # fp64 holds every bf16/fp32 logit and every token id exactly: one gather of [2, num_seqs]
        best = torch.stack([values.to(torch.float64), (ids.squeeze(1) + self.vocab_start).to(torch.float64)])
        parts = self.tp_group.gather(best, dst=0)
        if parts is None:
            return None
        ranks = torch.stack(parts)  # [size, 2, num_seqs]
        winner = ranks[:, 0].argmax(dim=0)  # [num_seqs]: the first rank with the largest logit
        return ranks[winner, 1, torch.arange(ranks.shape[2], device=ranks.device)].to(torch.int64)
