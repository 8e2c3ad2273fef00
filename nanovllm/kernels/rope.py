"""Rotary position embedding, NeoX / Llama "rotate_half" style, out of place.

cos_sin_cache: [max_position, rotary_dim], each row cat(cos, sin) of the token's angles (already scaled by the
rope type's attention factor). The first rotary_dim dims of each head are rotated, the rest pass through:
    out[:half]            = x[:half] * cos - x[half:rotary_dim] * sin
    out[half:rotary_dim]  = x[half:rotary_dim] * cos + x[:half] * sin
As in transformers' apply_rotary_pos_emb, cos/sin are first cast to the input dtype and each product is
rounded to it, so bf16 results match transformers bit for bit.

The Triton helper `norm_rope_heads` (one token's heads: optional per-head RMSNorm, then rope) is shared
with the fused q/k-norm + rope + KV-store kernel (qk_norm_rope_store.py), which the engine runs.
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
def norm_rope_heads(
    src_ptr,
    src_head_stride,
    dst_ptr,
    weight_ptr,
    eps,
    cos,
    sin,
    NUM_HEADS: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    # All NUM_HEADS heads of one token, each HEAD_DIM long: head h read at src_ptr + h * src_head_stride,
    # RMS-normed if HAS_NORM (weight_ptr, eps), rotated, and written at dst_ptr + h * HEAD_DIM. The heads
    # are held as three tiles: the rotated halves x1, x2 [BLOCK_HEADS, BLOCK_HALF] and the pass-through tail
    # xp [BLOCK_HEADS, BLOCK_PASS] (partial rotary only). cos, sin: [1, BLOCK_HALF] fp32, rounded to dtype.
    half: tl.constexpr = ROTARY_DIM // 2
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < NUM_HEADS) & (dims < half)
    src = src_ptr + heads * src_head_stride
    dst = dst_ptr + heads * HEAD_DIM
    x1 = tl.load(src + dims, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = tl.load(src + half + dims, mask=mask, other=0.0).to(tl.float32)
    if BLOCK_PASS > 0:
        pass_dims = ROTARY_DIM + tl.arange(0, BLOCK_PASS)[None, :]
        pass_mask = (heads < NUM_HEADS) & (pass_dims < HEAD_DIM)
        xp = tl.load(src + pass_dims, mask=pass_mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        # As rms_norm_torch: normed = (x * rsqrt(mean(x^2) + eps)) rounded to dtype, then weight * normed
        # rounded to dtype. Masked lanes hold 0 and add nothing to the sum.
        sum_sq = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
        if BLOCK_PASS > 0:
            sum_sq += tl.sum(xp * xp, axis=1)
        rstd = tl.rsqrt(sum_sq / HEAD_DIM + eps)[:, None]  # [BLOCK_HEADS, 1]
        w1 = tl.load(weight_ptr + dims, mask=dims < half, other=0.0).to(tl.float32)
        w2 = tl.load(weight_ptr + half + dims, mask=dims < half, other=0.0).to(tl.float32)
        x1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
        if BLOCK_PASS > 0:
            wp = tl.load(weight_ptr + pass_dims, mask=pass_dims < HEAD_DIM, other=0.0).to(tl.float32)
            xp = ((xp * rstd).to(dtype).to(tl.float32) * wp).to(dtype).to(tl.float32)
    # As apply_rope_torch: each product rounded to dtype, then the sum.
    out1 = (x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)
    out2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    tl.store(dst + dims, out1.to(dtype), mask=mask)
    tl.store(dst + half + dims, out2.to(dtype), mask=mask)
    if BLOCK_PASS > 0:
        tl.store(dst + pass_dims, xp.to(dtype), mask=pass_mask)


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
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
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
    q_out = q_out_ptr + token * (NUM_Q_HEADS * HEAD_DIM)
    k_out = k_out_ptr + token * (NUM_KV_HEADS * HEAD_DIM)
    norm_rope_heads(
        q_ptr + token * q_token_stride, q_head_stride, q_out, q_ptr, 0.0, cos, sin,
        NUM_Q_HEADS, False, HEAD_DIM, ROTARY_DIM, BLOCK_Q_HEADS, BLOCK_HALF, BLOCK_PASS,
    )  # fmt: skip
    norm_rope_heads(
        k_ptr + token * k_token_stride, k_head_stride, k_out, k_ptr, 0.0, cos, sin,
        NUM_KV_HEADS, False, HEAD_DIM, ROTARY_DIM, BLOCK_KV_HEADS, BLOCK_HALF, BLOCK_PASS,
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
            NUM_Q_HEADS=num_q_heads,
            NUM_KV_HEADS=num_kv_heads,
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
