"""Write the new tokens' keys and values into the paged KV cache.

Cache layout (one layer): k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous.
A token's slot is block_id * block_size + offset_in_block, so the cache read as
[num_blocks * block_size, num_kv_heads, head_dim] is indexed by slot directly.
A negative slot marks a padding token (CUDA-graph padding uses -1) and is skipped.
"""

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def store_kvcache_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64, negative = skip
) -> None:
    """Plain-PyTorch version of `store_kvcache`; also the CPU runtime path."""
    _check_args(key, value, k_cache, v_cache, slot_mapping)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    valid = slot_mapping >= 0  # [num_tokens]
    slots = slot_mapping[valid].long()  # [num_valid]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = key[valid]
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = value[valid]


if HAS_TRITON:

    @triton.jit
    def _store_kvcache_kernel(
        key_ptr,
        value_ptr,
        k_cache_ptr,
        v_cache_ptr,
        slot_mapping_ptr,
        stride_key_t,
        stride_key_h,
        stride_value_t,
        stride_value_h,
        NUM_KV_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_H: tl.constexpr,  # next power of two >= NUM_KV_HEADS
        BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM
    ):
        # One program copies one token: all its kv heads, for both K and V.
        token = tl.program_id(0).to(tl.int64)  # int64: token * stride can pass 2**31 in long prefills
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot < 0:
            return
        offs_h = tl.arange(0, BLOCK_H)  # [BLOCK_H]
        offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
        mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)  # [BLOCK_H, BLOCK_D]
        # The cache is contiguous: a slot's row is NUM_KV_HEADS * HEAD_DIM elements long.
        cache_offs = slot * (NUM_KV_HEADS * HEAD_DIM) + offs_h[:, None] * HEAD_DIM + offs_d[None, :]
        key_offs = token * stride_key_t + offs_h[:, None] * stride_key_h + offs_d[None, :]
        value_offs = token * stride_value_t + offs_h[:, None] * stride_value_h + offs_d[None, :]
        k = tl.load(key_ptr + key_offs, mask=mask)  # [BLOCK_H, BLOCK_D]
        v = tl.load(value_ptr + value_offs, mask=mask)  # [BLOCK_H, BLOCK_D]
        tl.store(k_cache_ptr + cache_offs, k, mask=mask)
        tl.store(v_cache_ptr + cache_offs, v, mask=mask)


def store_kvcache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64, negative = skip
) -> None:
    """Copy key/value rows into the cache at `slot_mapping` (in place); negative slots are skipped.

    key/value may be strided views (e.g. slices of a fused qkv tensor) as long as head_dim is contiguous.
    """
    _check_args(key, value, k_cache, v_cache, slot_mapping)
    check_triton_device(key, "store_kvcache")
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The paged cache layout every kernel here assumes."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")


def _check_args(key, value, k_cache, v_cache, slot_mapping) -> None:
    check_kv_cache(k_cache, v_cache)
    row_shape = tuple(k_cache.shape[2:])
    if key.dim() != 3 or tuple(key.shape[1:]) != row_shape or key.shape != value.shape:
        raise ValueError(
            f"key and value must be [num_tokens, {row_shape[0]}, {row_shape[1]}] to match the cache, "
            f"got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key and value must be contiguous in head_dim (stride 1 in the last dimension)")
    if slot_mapping.shape != (key.shape[0],) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot_mapping must be [num_tokens={key.shape[0]}] int32 or int64, "
            f"got {tuple(slot_mapping.shape)} {slot_mapping.dtype}"
        )
    if not (key.dtype == value.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(
            f"key, value, k_cache, v_cache must share a dtype, got {key.dtype}, {value.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype}"
        )


def check_triton_device(tensor: torch.Tensor, op_name: str) -> None:
    """Triton needs CUDA tensors, except under TRITON_INTERPRET=1 (CPU tests)."""
    if not HAS_TRITON:
        raise RuntimeError(f"{op_name} needs triton, which is not installed; use the *_ref version")
    if tensor.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{op_name} runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got device "
            f"{tensor.device}; use the *_ref version on CPU"
        )
