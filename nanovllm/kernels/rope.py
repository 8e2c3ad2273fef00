"""Rotary position embedding, NeoX / Llama "rotate_half" style, out of place.

cos_sin_cache: [max_position, rotary_dim], each row cat(cos, sin) of the token's angles (already scaled by the
rope type's attention factor). The first rotary_dim dims of each head are rotated, the rest pass through:
    out[:half]            = x[:half] * cos - x[half:rotary_dim] * sin
    out[half:rotary_dim]  = x[half:rotary_dim] * cos + x[:half] * sin
As in transformers' apply_rotary_pos_emb, cos/sin are first cast to the input dtype and each product is
rounded to it, so bf16 results match transformers bit for bit.
"""

import torch

from nanovllm.kernels.backend import tl, triton, use_triton

# ---------------------------------------------------------------- torch reference


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [num_tokens, num_heads, head_dim]; cos, sin: [num_tokens, 1, rotary_dim // 2]
    rotary_dim = 2 * cos.shape[-1]
    x1, x2 = x[..., :rotary_dim].chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rotary_dim:]), dim=-1)


def apply_rope_torch(
    q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # cos, sin: [num_tokens, 1, rotary_dim // 2]
    cos, sin = cos_sin_cache.index_select(0, positions).to(q.dtype).unsqueeze(1).chunk(2, dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


# ---------------------------------------------------------------- Triton kernel


@triton.jit
def head_tiles(
    num_heads,
    HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    """Offsets and masks of one token's heads held as tiles: heads [BLOCK_HEADS, 1], the rotated half's dims
    [1, BLOCK_HALF] and its mask, the pass-through tail's dims [1, BLOCK_PASS] and its mask (partial rotary;
    the half's stand in when BLOCK_PASS is 0). A head's first half is at dims, its second at half + dims."""
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < num_heads) & (dims < ROTARY_DIM // 2)
    pass_dims, pass_mask = dims, mask
    if BLOCK_PASS > 0:
        pass_dims = ROTARY_DIM + tl.arange(0, BLOCK_PASS)[None, :]
        pass_mask = (heads < num_heads) & (pass_dims < HEAD_DIM)
    return heads, dims, mask, pass_dims, pass_mask


@triton.jit
def rotate_halves(x1, x2, cos, sin, dtype: tl.constexpr):
    """As apply_rope_torch on fp32 tiles of the two halves: each product rounded to dtype, then the sum."""
    out1 = (x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)
    out2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    return out1, out2


@triton.jit
def _rope_heads(
    x_ptr,
    x_token_stride,
    x_head_stride,
    out_ptr,
    token,
    cos,
    sin,
    num_heads,
    HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    # Rotates all heads of one token of q or k. cos, sin: [1, BLOCK_HALF] fp32, already rounded to x's dtype.
    half: tl.constexpr = ROTARY_DIM // 2
    heads, dims, mask, pass_dims, pass_mask = head_tiles(
        num_heads, HEAD_DIM, ROTARY_DIM, BLOCK_HEADS, BLOCK_HALF, BLOCK_PASS
    )
    src = x_ptr + token * x_token_stride + heads * x_head_stride
    dst = out_ptr + token * num_heads * HEAD_DIM + heads * HEAD_DIM
    x1 = tl.load(src + dims, mask=mask, other=0.0)
    x2 = tl.load(src + half + dims, mask=mask, other=0.0)
    dtype = x1.dtype
    out1, out2 = rotate_halves(x1.to(tl.float32), x2.to(tl.float32), cos, sin, dtype)
    tl.store(dst + dims, out1.to(dtype), mask=mask)
    tl.store(dst + half + dims, out2.to(dtype), mask=mask)
    if BLOCK_PASS > 0:
        tl.store(dst + pass_dims, tl.load(src + pass_dims, mask=pass_mask), mask=pass_mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    q_token_stride,
    q_head_stride,
    k_ptr,
    k_token_stride,
    k_head_stride,
    q_out_ptr,
    k_out_ptr,
    cos_sin_ptr,
    cos_sin_stride,
    positions_ptr,
    num_q_heads,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_KV_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    # One program per token: look up its cos/sin row once, then rotate every q and k head.
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token)
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dims_mask = dims < ROTARY_DIM // 2
    row = cos_sin_ptr + position * cos_sin_stride
    dtype = q_ptr.dtype.element_ty
    cos = tl.load(row + dims, mask=dims_mask, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(row + ROTARY_DIM // 2 + dims, mask=dims_mask, other=0.0).to(dtype).to(tl.float32)
    _rope_heads(
        q_ptr, q_token_stride, q_head_stride, q_out_ptr, token, cos, sin, num_q_heads,
        HEAD_DIM, ROTARY_DIM, BLOCK_Q_HEADS, BLOCK_HALF, BLOCK_PASS,
    )  # fmt: skip
    _rope_heads(
        k_ptr, k_token_stride, k_head_stride, k_out_ptr, token, cos, sin, num_kv_heads,
        HEAD_DIM, ROTARY_DIM, BLOCK_KV_HEADS, BLOCK_HALF, BLOCK_PASS,
    )  # fmt: skip


# ---------------------------------------------------------------- launcher


def apply_rope_triton(
    q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    rotary_dim = cos_sin_cache.shape[-1]
    if k.shape != (num_tokens, num_kv_heads, head_dim) or k.dtype != q.dtype:
        raise ValueError(
            f"k must be [{num_tokens}, num_kv_heads, {head_dim}] {q.dtype}, got {tuple(k.shape)} {k.dtype}"
        )
    if positions.shape != (num_tokens,):
        raise ValueError(f"positions must be [{num_tokens}], got {tuple(positions.shape)}")
    if rotary_dim % 2 != 0 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be even and <= head_dim={head_dim}, got {rotary_dim}")
    # The kernel takes any token/head strides but needs unit stride along head_dim.
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos_sin_cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens > 0:
        pass_dim = head_dim - rotary_dim
        _rope_kernel[(num_tokens,)](
            q, q.stride(0), q.stride(1),
            k, k.stride(0), k.stride(1),
            q_out, k_out,
            cos_sin_cache, cos_sin_cache.stride(0),
            positions.contiguous(),
            num_q_heads, num_kv_heads,
            HEAD_DIM=head_dim,
            ROTARY_DIM=rotary_dim,
            BLOCK_Q_HEADS=triton.next_power_of_2(num_q_heads),
            BLOCK_KV_HEADS=triton.next_power_of_2(num_kv_heads),
            BLOCK_HALF=triton.next_power_of_2(rotary_dim // 2),
            BLOCK_PASS=triton.next_power_of_2(pass_dim) if pass_dim > 0 else 0,
            num_warps=4,
        )  # fmt: skip
    return q_out, k_out


# ---------------------------------------------------------------- op


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [num_tokens, num_heads, head_dim] and k [num_tokens, num_kv_heads, head_dim] by the angles of
    `positions` [num_tokens] (int64, each < max_position). Returns new tensors; q and k are left untouched."""
    if use_triton(q):
        return apply_rope_triton(q, k, cos_sin_cache, positions)
    return apply_rope_torch(q, k, cos_sin_cache, positions)
