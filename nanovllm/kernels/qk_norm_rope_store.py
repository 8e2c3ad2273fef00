"""From the qkv projection to the paged cache in one launch: per-head q/k RMSNorm, rope, K/V store.

Between the qkv projection and attention, each layer would otherwise launch: two copies of the strided q and
k views, rms_norm(q), rms_norm(k) (Qwen3's q_norm/k_norm), the rope kernel and store_kvcache: six small
kernels with q/k norm, two without, of 2-3.5 us each at batch 256 on an H100 and ~2 us each even at batch 1
inside a CUDA graph.
This kernel does all of it per token, reading q/k/v straight from the projection output:

    qkv = qkv * rsqrt(mean(norm_src**2) + norm_src_eps) + bias
                                                      (optional, norm_src: the layer's input RMSNorm, folded
                                                       into qkv_proj, finished here; docs/model.md)
    q, k, v = qkv.split(...)                          (views, per rank: num_heads, num_kv_heads)
    q, k = rms_norm(q, q_norm_weight), rms_norm(k, k_norm_weight)      (optional, each head on its own)
    q, k = rope(q, k, cos_sin_cache[positions])       (NeoX rotate-half over the first rotary_dim dims)
    k_cache[slot], v_cache[slot] = k, v               (slot -1: padding, not stored)
    return q                                          ([num_tokens, num_heads, head_dim], contiguous)

Every step rounds where the unfused references do (rmsnorm.py, rope.py), so outputs differ from them only
by the fp32 order of the variance sum. The reference below is the plain composition of those references.
"""

import torch

from nanovllm.kernels.backend import check_pdl, gdc_launch_dependents, gdc_wait, tl, triton
from nanovllm.kernels.rmsnorm import rms_norm_torch, rms_scale_row, rms_scale_torch, row_rstd
from nanovllm.kernels.rope import apply_rope_torch, head_tiles, rotate_halves
from nanovllm.kernels.store_kvcache import check_kv_cache, check_triton_device, store_kvcache_ref

# ---------------------------------------------------------------- torch reference


def qk_norm_rope_store_ref(
    qkv: torch.Tensor,  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
    positions: torch.Tensor,  # [num_tokens] int
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim], rows cat(cos, sin)
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64, negative = skip
    num_heads: int,
    q_norm_weight: torch.Tensor | None = None,  # [head_dim]
    k_norm_weight: torch.Tensor | None = None,  # [head_dim]
    eps: float = 1e-6,
    norm_src: torch.Tensor | None = None,  # [num_tokens, hidden]
    norm_src_eps: float = 1e-6,
    qkv_bias: torch.Tensor | None = None,  # [(num_heads + 2 * num_kv_heads) * head_dim] (with norm_src)
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Plain-PyTorch `qk_norm_rope_store`: the unfused reference ops one after the other; the CPU path."""
    _check_args(qkv, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, num_heads, q_norm_weight,
                k_norm_weight, norm_src, qkv_bias)  # fmt: skip
    if norm_src is not None:
        qkv = rms_scale_torch(qkv, norm_src, norm_src_eps, qkv_bias)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(-1, num_heads, head_dim)  # [num_tokens, num_heads, head_dim]
    k = k.view(-1, num_kv_heads, head_dim)  # [num_tokens, num_kv_heads, head_dim]
    v = v.view(-1, num_kv_heads, head_dim)
    if q_norm_weight is not None:
        q, k = rms_norm_torch(q, q_norm_weight, eps), rms_norm_torch(k, k_norm_weight, eps)
    q, k = apply_rope_torch(q, k, cos_sin_cache, positions)
    store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping)
    return q


# ---------------------------------------------------------------- Triton kernel


@triton.jit
def _load_heads(
    src_ptr,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    # All NUM_HEADS heads of one token, each HEAD_DIM long at src_ptr, as three fp32 tiles: the rotated halves
    # x1, x2 [BLOCK_HEADS, BLOCK_HALF] and the pass-through tail xp [BLOCK_HEADS, BLOCK_PASS] (partial rotary
    # only; x1 stands in for it otherwise). Masked lanes hold 0.
    heads, dims, mask, pass_dims, pass_mask = head_tiles(
        NUM_HEADS, HEAD_DIM, ROTARY_DIM, BLOCK_HEADS, BLOCK_HALF, BLOCK_PASS
    )
    src = src_ptr + heads * HEAD_DIM
    x1 = tl.load(src + dims, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + ROTARY_DIM // 2 + dims, mask=mask, other=0.0).to(tl.float32)
    xp = x1
    if BLOCK_PASS > 0:
        xp = tl.load(src + pass_dims, mask=pass_mask, other=0.0).to(tl.float32)
    return x1, x2, xp


@triton.jit
def _norm_rope_store_heads(
    x1,  # [BLOCK_HEADS, BLOCK_HALF] fp32, from _load_heads
    x2,
    xp,  # [BLOCK_HEADS, BLOCK_PASS] fp32 (BLOCK_PASS > 0)
    dst_ptr,
    store,  # scalar: False skips the store (a padding token's cache slot)
    weight_ptr,
    eps,
    cos,
    sin,
    row_scale,  # fp32 (ROW_NORM)
    bias_ptr,  # these heads' bias (HAS_BIAS)
    dtype: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    ROW_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    # The loaded heads' (row scale,) norm and rope, written HEAD_DIM apart at dst_ptr. cos, sin:
    # [1, BLOCK_HALF] fp32, rounded to dtype.
    half: tl.constexpr = ROTARY_DIM // 2
    heads, dims, mask, pass_dims, pass_mask = head_tiles(
        NUM_HEADS, HEAD_DIM, ROTARY_DIM, BLOCK_HEADS, BLOCK_HALF, BLOCK_PASS
    )
    if ROW_NORM:
        bias = bias_ptr + heads * HEAD_DIM
        x1 = rms_scale_row(x1, row_scale, bias + dims, mask, HAS_BIAS, dtype)
        x2 = rms_scale_row(x2, row_scale, bias + half + dims, mask, HAS_BIAS, dtype)
        if BLOCK_PASS > 0:
            xp = rms_scale_row(xp, row_scale, bias + pass_dims, pass_mask, HAS_BIAS, dtype)
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
    out1, out2 = rotate_halves(x1, x2, cos, sin, dtype)
    dst = dst_ptr + heads * HEAD_DIM
    tl.store(dst + dims, out1.to(dtype), mask=mask & store)
    tl.store(dst + half + dims, out2.to(dtype), mask=mask & store)
    if BLOCK_PASS > 0:
        tl.store(dst + pass_dims, xp.to(dtype), mask=pass_mask & store)


@triton.jit
def _qk_norm_rope_store_kernel(
    qkv_ptr,
    qkv_token_stride,
    positions_ptr,
    cos_sin_ptr,
    cos_sin_stride,
    q_norm_weight_ptr,
    k_norm_weight_ptr,
    eps,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    src_ptr,  # [num_tokens, src_size] (ROW_NORM)
    src_token_stride,
    src_size,
    src_eps,
    bias_ptr,  # [(NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM] (HAS_BIAS)
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    ROW_NORM: tl.constexpr,  # qkv is still to be scaled by the rstd of this token's src row (+ the bias)
    HAS_BIAS: tl.constexpr,
    SRC_BLOCK: tl.constexpr,  # src values summed per chunk
    HAS_NORM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,  # next power of two >= NUM_HEADS
    BLOCK_KV_HEADS: tl.constexpr,  # next power of two >= NUM_KV_HEADS
    BLOCK_HALF: tl.constexpr,  # next power of two >= ROTARY_DIM // 2
    BLOCK_PASS: tl.constexpr,  # next power of two >= HEAD_DIM - ROTARY_DIM, or 0
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM
    USE_PDL: tl.constexpr,  # launched with programmatic dependent launch: wait for the qkv projection
):
    # One program per token: all q heads into q_out and, unless the token is padding (slot < 0), all k heads
    # and the v heads into their cache slot. A program is a chain of memory round trips, so it issues every
    # load as early as it may: what no earlier kernel writes (the step's positions and slots, then the cos/sin
    # row, which needs the position) before the PDL wait, then q, k, v and the norm's source row together.
    # One round trip after the wait where loading each piece just before its use took five (~4 us a call at
    # 256 tokens on an H200, the kernel's whole time).
    if USE_PDL:
        gdc_launch_dependents()
    token = tl.program_id(0).to(tl.int64)  # int64: token * stride can pass 2**31 in long prefills
    position = tl.load(positions_ptr + token).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    dtype = q_out_ptr.dtype.element_ty
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dims_mask = dims < ROTARY_DIM // 2
    cos_sin_row = cos_sin_ptr + position * cos_sin_stride
    cos = tl.load(cos_sin_row + dims, mask=dims_mask, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(cos_sin_row + ROTARY_DIM // 2 + dims, mask=dims_mask, other=0.0).to(dtype).to(tl.float32)
    if USE_PDL:
        gdc_wait()  # qkv and the norm's source row come from the kernels before
    # qkv row of this token: [q heads | k heads | v heads], each head HEAD_DIM long.
    q_src = qkv_ptr + token * qkv_token_stride
    k_src = q_src + NUM_HEADS * HEAD_DIM
    v_src = k_src + NUM_KV_HEADS * HEAD_DIM
    q1, q2, qp = _load_heads(q_src, NUM_HEADS, HEAD_DIM, ROTARY_DIM, BLOCK_HEADS, BLOCK_HALF, BLOCK_PASS)
    k1, k2, kp = _load_heads(
        k_src, NUM_KV_HEADS, HEAD_DIM, ROTARY_DIM, BLOCK_KV_HEADS, BLOCK_HALF, BLOCK_PASS
    )
    heads = tl.arange(0, BLOCK_KV_HEADS)[:, None]
    head_dims = tl.arange(0, BLOCK_D)[None, :]
    v_mask = (heads < NUM_KV_HEADS) & (head_dims < HEAD_DIM)
    v_offs = heads * HEAD_DIM + head_dims  # [BLOCK_KV_HEADS, BLOCK_D]
    v = tl.load(v_src + v_offs, mask=v_mask).to(tl.float32)
    row_scale = 1.0
    if ROW_NORM:
        row_scale = row_rstd(src_ptr + token * src_token_stride, src_size, src_eps, SRC_BLOCK)

    _norm_rope_store_heads(
        q1, q2, qp, q_out_ptr + token * (NUM_HEADS * HEAD_DIM), True, q_norm_weight_ptr, eps, cos, sin,
        row_scale, bias_ptr, dtype, NUM_HEADS, ROW_NORM, HAS_BIAS, HAS_NORM, HEAD_DIM, ROTARY_DIM,
        BLOCK_HEADS, BLOCK_HALF, BLOCK_PASS,
    )  # fmt: skip
    # The cache is contiguous: a slot's row is NUM_KV_HEADS * HEAD_DIM elements long.
    cache_row = tl.maximum(slot, 0) * (NUM_KV_HEADS * HEAD_DIM)
    k_bias_ptr = bias_ptr + NUM_HEADS * HEAD_DIM
    _norm_rope_store_heads(
        k1, k2, kp, k_cache_ptr + cache_row, slot >= 0, k_norm_weight_ptr, eps, cos, sin, row_scale,
        k_bias_ptr, dtype, NUM_KV_HEADS, ROW_NORM, HAS_BIAS, HAS_NORM, HEAD_DIM, ROTARY_DIM, BLOCK_KV_HEADS,
        BLOCK_HALF, BLOCK_PASS,
    )  # fmt: skip
    if ROW_NORM:
        v_bias_ptrs = k_bias_ptr + NUM_KV_HEADS * HEAD_DIM + v_offs
        v = rms_scale_row(v, row_scale, v_bias_ptrs, v_mask, HAS_BIAS, dtype)
    tl.store(v_cache_ptr + cache_row + v_offs, v.to(dtype), mask=v_mask & (slot >= 0))


# ---------------------------------------------------------------- launcher


def qk_norm_rope_store(
    qkv: torch.Tensor,  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
    positions: torch.Tensor,  # [num_tokens] int
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim], rows cat(cos, sin)
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64, negative = skip
    num_heads: int,
    q_norm_weight: torch.Tensor | None = None,  # [head_dim]
    k_norm_weight: torch.Tensor | None = None,  # [head_dim]
    eps: float = 1e-6,
    norm_src: torch.Tensor | None = None,  # [num_tokens, hidden]
    norm_src_eps: float = 1e-6,
    qkv_bias: torch.Tensor | None = None,  # [(num_heads + 2 * num_kv_heads) * head_dim] (with norm_src)
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """With norm_src: first each token's qkv row times rsqrt(mean(norm_src row**2) + norm_src_eps), plus
    qkv_bias, as rms_scale_torch (qkv_proj read the un-normalized layer input, the input norm's weight folded
    into it). Per-head RMSNorm of q and k (with both weights given; eps for both), rope on the first
    rotary_dim = cos_sin_cache.shape[-1] dims of each head, then k and v into the cache at slot_mapping (in
    place; negative slots skipped). Returns the new q, contiguous; qkv is not written.

    num_heads and the cache's num_kv_heads are this rank's heads. Each position must be < max_position
    (not checked: that would sync with the GPU). The grid depends on num_tokens only (CUDA graphs)."""
    _check_args(qkv, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, num_heads, q_norm_weight,
                k_norm_weight, norm_src, qkv_bias)  # fmt: skip
    check_triton_device(qkv, "qk_norm_rope_store")
    num_tokens = qkv.shape[0]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    rotary_dim = cos_sin_cache.shape[-1]
    q_out = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q_out
    has_norm = q_norm_weight is not None
    pass_dim = head_dim - rotary_dim
    cos_sin_cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    use_pdl = check_pdl(qkv)
    _qk_norm_rope_store_kernel[(num_tokens,)](
        qkv, qkv.stride(0),
        positions.contiguous(), cos_sin_cache, cos_sin_cache.stride(0),
        q_norm_weight.contiguous() if has_norm else qkv,  # (not read without the norm)
        k_norm_weight.contiguous() if has_norm else qkv,
        eps,
        q_out, k_cache, v_cache, slot_mapping.contiguous(),
        norm_src if norm_src is not None else qkv,
        norm_src.stride(0) if norm_src is not None else 0,
        norm_src.shape[1] if norm_src is not None else 1,
        norm_src_eps,
        qkv_bias.contiguous() if qkv_bias is not None else qkv,
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        ROTARY_DIM=rotary_dim,
        ROW_NORM=norm_src is not None,
        HAS_BIAS=qkv_bias is not None,
        SRC_BLOCK=min(triton.next_power_of_2(norm_src.shape[1]), 1024) if norm_src is not None else 16,
        HAS_NORM=has_norm,
        BLOCK_HEADS=triton.next_power_of_2(num_heads),
        BLOCK_KV_HEADS=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(rotary_dim // 2),
        BLOCK_PASS=triton.next_power_of_2(pass_dim) if pass_dim > 0 else 0,
        BLOCK_D=triton.next_power_of_2(head_dim),
        USE_PDL=use_pdl,
        num_warps=4,
        launch_pdl=use_pdl,
    )  # fmt: skip
    return q_out


def _check_args(
    qkv,
    positions,
    cos_sin_cache,
    k_cache,
    v_cache,
    slot_mapping,
    num_heads,
    q_norm_weight,
    k_norm_weight,
    norm_src=None,
    qkv_bias=None,
) -> None:
    check_kv_cache(k_cache, v_cache)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width:
        raise ValueError(
            f"qkv must be [num_tokens, (num_heads={num_heads} + 2 * num_kv_heads={num_kv_heads}) * "
            f"head_dim={head_dim} = {width}] to match the cache, got {tuple(qkv.shape)}"
        )
    if qkv.stride(-1) != 1:
        raise ValueError("qkv must be contiguous in its last dimension (stride 1)")
    if qkv.dtype != k_cache.dtype:
        raise ValueError(f"qkv and the cache must share a dtype, got {qkv.dtype} and {k_cache.dtype}")
    num_tokens = qkv.shape[0]
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"positions must be [num_tokens={num_tokens}] int32 or int64, "
            f"got {tuple(positions.shape)} {positions.dtype}"
        )
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot_mapping must be [num_tokens={num_tokens}] int32 or int64, "
            f"got {tuple(slot_mapping.shape)} {slot_mapping.dtype}"
        )
    rotary_dim = cos_sin_cache.shape[-1] if cos_sin_cache.dim() == 2 else None
    if rotary_dim is None or rotary_dim % 2 != 0 or not 0 < rotary_dim <= head_dim:
        raise ValueError(
            f"cos_sin_cache must be [max_position, rotary_dim] with rotary_dim even and in "
            f"(0, head_dim={head_dim}], got {tuple(cos_sin_cache.shape)}"
        )
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight must be given together (or neither)")
    if norm_src is not None and (
        norm_src.dim() != 2 or norm_src.shape[0] != num_tokens or norm_src.stride(1) != 1
        or norm_src.dtype != qkv.dtype
    ):  # fmt: skip
        raise ValueError(
            f"norm_src must be [num_tokens={num_tokens}, hidden] {qkv.dtype}, contiguous along hidden, got "
            f"{tuple(norm_src.shape)} {norm_src.dtype} with strides {norm_src.stride()}"
        )
    if qkv_bias is not None and (norm_src is None or tuple(qkv_bias.shape) != (width,)):
        raise ValueError(f"qkv_bias is taken only with norm_src, as [{width}]; got {tuple(qkv_bias.shape)}")
    for name, weight in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if weight is not None and (weight.shape != (head_dim,) or weight.dtype != qkv.dtype):
            raise ValueError(
                f"{name} must be [head_dim={head_dim}] {qkv.dtype}, got {tuple(weight.shape)} {weight.dtype}"
            )
