"""Paged attention: write this step's K/V into the cache, then attend over the cache.

The model runner builds one `AttentionMetadata` per step and passes it down the model explicitly.
The cache of each layer is [num_blocks, block_size, num_kv_heads, head_dim]; a sequence's tokens
live in the blocks its block table lists. See docs/paged_attention.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.kernels.backend import use_triton
from nanovllm.kernels.decode_attention import decode_attention
from nanovllm.kernels.paged_attention import paged_attention_ref, paged_prefill_attention
from nanovllm.kernels.store_kvcache import store_kvcache, store_kvcache_ref


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int: cache slot of each new token (-1: padding, skip)
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32: start of each sequence's new tokens
    seq_lens: torch.Tensor  # [num_seqs] int32: context length incl. the new tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    max_query_len: int
    max_seq_len: int
    is_decode: bool  # every sequence computes exactly one token (the CUDA-graph case)
    decode_num_splits: int | None = None  # fixed split-KV count when replaying a captured graph


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = (
            num_heads,
            num_kv_heads,
            head_dim,
            scale,
        )
        # Views into the engine's KV cache, set by the model runner once it is allocated.
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        if use_triton(q):
            store_kvcache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
            if meta.is_decode:
                return decode_attention(
                    q,
                    self.k_cache,
                    self.v_cache,
                    meta.seq_lens,
                    meta.block_tables,
                    self.scale,
                    meta.max_seq_len,
                    num_splits=meta.decode_num_splits,
                )
            return paged_prefill_attention(
                q,
                self.k_cache,
                self.v_cache,
                meta.cu_seqlens_q,
                meta.seq_lens,
                meta.block_tables,
                meta.max_query_len,
                meta.max_seq_len,
                self.scale,
            )
        store_kvcache_ref(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return paged_attention_ref(
            q, self.k_cache, self.v_cache, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, self.scale
        )
