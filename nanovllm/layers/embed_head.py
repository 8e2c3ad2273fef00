"""Vocabulary-parallel embedding and LM head.

The vocabulary is split into equal contiguous ranges, one per rank (padded so it divides evenly).
Embedding: each rank looks up the ids in its range, writes zeros elsewhere, then all-reduce (or, with
reduce_results=False as in the decoder, the first AddRMSNorm reduces it).
LM head: each rank computes logits for its range; rank 0 gathers them and drops the padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.linear import _copy, load_shard
from nanovllm.utils.distributed import get_tp_group, get_tp_rank, get_tp_size


class VocabParallelEmbedding(nn.Module):
    """reduce_results=False: each rank returns its rows (zeros for ids outside its range), for a
    consumer that sums them over the ranks (the decoder's first AddRMSNorm)."""

    def __init__(self, vocab_size: int, hidden_size: int, reduce_results: bool = True):
        super().__init__()
        self.reduce_results = reduce_results
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
        return self.tp_group.all_reduce(y) if self.reduce_results else y


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
