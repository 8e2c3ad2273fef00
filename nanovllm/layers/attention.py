"""Paged attention: from the qkv projection, write this step's K/V into the cache, then attend over it.

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
from nanovllm.kernels.qk_norm_rope_store import qk_norm_rope_store, qk_norm_rope_store_ref
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.rotary_embedding import RotaryEmbedding


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
    decode_split_by_length: bool | None = None  # the splits cut the sequences by length (kernel's default)
    decode_counters: torch.Tensor | None = None  # [>= num_seqs * num_kv_heads] int32 zeros (the runner's)
    # The prefill kernel's ([num_items], [num_items]) int32 (sequence, query tile) items; None: built by
    # the kernel's launcher (a host sync)
    prefill_work: tuple[torch.Tensor, torch.Tensor] | None = None


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
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        rope: RotaryEmbedding,
        qk_norm: tuple[RMSNorm, RMSNorm] | None = None,
        input_norm: tuple[torch.Tensor, float, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Attention from the qkv projection's output: (finish the folded input norm,) split q/k/v, RMSNorm
        each q and k head (qk_norm: the (q_norm, k_norm) layers, Qwen3), rope, k/v into the cache, then attend
        over the cache. input_norm = (layer input [num_tokens, hidden], eps, qkv bias or None): qkv_proj read
        the un-normalized input with the norm's weight folded in and no bias; each token's qkv row is scaled
        by the input row's rsqrt(mean(x**2) + eps) and the bias added first (docs/model.md). On the Triton
        path everything before attention is one kernel (kernels/qk_norm_rope_store.py); the torch path runs
        the unfused reference ops."""
        # qkv: [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]; positions: [num_tokens]
        norm_args = {}
        if input_norm is not None:
            norm_src, eps, qkv_bias = input_norm
            norm_args = dict(norm_src=norm_src, norm_src_eps=eps, qkv_bias=qkv_bias)
        if qk_norm is not None:
            q_norm, k_norm = qk_norm
            norm_args.update(q_norm_weight=q_norm.weight, k_norm_weight=k_norm.weight, eps=q_norm.eps)
        norm_rope_store = qk_norm_rope_store if use_triton(qkv) else qk_norm_rope_store_ref
        cos_sin_cache = rope.cos_sin_cache_on(qkv.device)
        q = norm_rope_store(
            qkv,
            positions,
            cos_sin_cache,
            self.k_cache,
            self.v_cache,
            meta.slot_mapping,
            self.num_heads,
            **norm_args,
        )  # [num_tokens, num_heads, head_dim]
        return self._attend(q, meta)

    def _attend(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim]; the cache already holds
        # this step's keys and values.
        if use_triton(q):
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
                    counters=meta.decode_counters,
                    split_by_length=meta.decode_split_by_length,
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
                work=meta.prefill_work,
            )
        return paged_attention_ref(
            q, self.k_cache, self.v_cache, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, self.scale
        )
