"""Decode-sized linear layer on tensor cores, for batches of 1..256 rows (decode steps, short prefill chunks).

    y = linear(x, W, b)          x: [M, K], W: [N, K] (nn.Linear layout), M <= DECODE_LINEAR_KERNEL_MAX_ROWS
    norm (optional, rms_norm_eps): y = linear(rmsnorm(x), W, b), the norm's weight folded into W's columns
                                   (docs/model.md): each row of x @ W.T times rsqrt(mean(x**2) + eps)
    epilogue (optional, silu_mul): W holds [gate; up] rows, y = silu(gate) * up: [M, N / 2]
    epilogue (optional, residual): y = residual + linear(x, W, b), the decoder's residual add

It does what cuBLAS does for these shapes, with two things cuBLAS cannot do:

- Weights before the wait: launched with programmatic dependent launch (`backend.check_pdl`), a program
  loads the first K chunk of its W tile, which no earlier kernel writes, *then* waits for the previous
  kernel (`gdc_wait`) before reading x; so the next matmul's weight stream starts under the tail of the
  kernels before it. The residual loads right after the wait too, under the K loop, not in the epilogue.
- The SiLU-and-mul after gate_up_proj runs in the epilogue, so the [M, N] gate_up output is never written;
  so do the RMSNorm before it (every program sees whole rows of x: it sums their squares on the way) and the
  residual add after o_proj and down_proj.

"Swap AB": a program computes acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T, so the large N is the tensor-core
MMA's M dimension (64 rows per warpgroup on Hopper) and the few decode rows are its N dimension (16..64);
the output tile is stored transposed. Unlike kernels/gemv.py (a whole row of W per program, for M <= 2,
on the CUDA cores) it loops over K in BLOCK_K chunks that Triton software-pipelines.

Numerics follow the unfused ops, as in kernels/gemv.py: the matmul accumulates in fp32 (plus the bias) and
rounds once; with the norm, the rounded product is scaled and the bias added, as kernels/rmsnorm.py's
rms_scale_torch does; the SiLU epilogue rounds gate and up first, as kernels/activation.py does on the
rounded gate_up output; the residual is added to the rounded result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanovllm.kernels.activation import silu_and_mul_torch, silu_mul_rounded
from nanovllm.kernels.backend import (
    check_pdl,
    device_num_sms,
    gdc_launch_dependents,
    gdc_wait,
    hopper_or_later,
    tl,
    triton,
    use_triton,
)
from nanovllm.kernels.paged_attention import dot_precision
from nanovllm.kernels.rmsnorm import rms_scale_torch
from nanovllm.utils.env import env_int

DECODE_LINEAR_KERNEL_MAX_ROWS = 256  # the kernel's limit; larger batches are prefill-like
# Matmuls of up to this many rows take this kernel in the model (layers/linear.py), on Hopper or later (the
# tiles below are sized for an H100's shared memory, and the gain is PDL's). Qwen3-0.6B's decode graphs on an
# H100 had it beat cuBLAS up to 32 rows (graph time -7% at 8 and 16 rows, -4% at 32), tie at 48 and lose from
# 64 (+1% at 64, +2% at 256: cuBLAS's large-M tiles). gate_up_proj takes the same limits although its SiLU
# epilogue saves a kernel: letting it alone go to 128 or 256 rows did not pay (session 21).
DECODE_LINEAR_MAX_ROWS = env_int("NANOVLLM_DECODE_LINEAR_ROWS", 32, DECODE_LINEAR_KERNEL_MAX_ROWS)
# A weight of at most DECODE_LINEAR_SMALL_WEIGHT_BYTES takes it up to this many rows instead: such a matmul is
# mostly fixed cost, which PDL overlaps, and the kernel also applies the folded norm's scale and the SiLU.
# Session 29, H200, default workload (Qwen3-0.6B, weights of 6-12 MiB; the two-stream halves of 33-56 rows
# are what moves): 74.2-74.8% of the floor with every matmul to 64 rows against 73.1-73.4% to 32, 71.1-71.6%
# with every batch (256). Qwen3-8B's weights (32-192 MiB) lose at 48-64 rows: decode graph 7.25 / 7.83 ms
# against 6.72 / 7.18. The bound is the largest weight measured to gain (0.6B's gate_up); Qwen3-8B's o_proj
# at TP=2 (16 MiB) stays out. NANOVLLM_DECODE_LINEAR_ROWS=0 and NANOVLLM_DECODE_LINEAR_SMALL_ROWS=0 leave
# every matmul to cuBLAS.
DECODE_LINEAR_SMALL_MAX_ROWS = env_int("NANOVLLM_DECODE_LINEAR_SMALL_ROWS", 64, DECODE_LINEAR_KERNEL_MAX_ROWS)
DECODE_LINEAR_SMALL_WEIGHT_BYTES = 12 * 2**20
DECODE_LINEAR_NUM_SMS = 132  # (H100 SXM) the default SM count: the N tile shrinks when SMs would idle
DECODE_LINEAR_MIN_BLOCK = 16  # tl.dot needs every tile dimension >= 16
DECODE_LINEAR_MAX_BLOCK_M = 64  # more rows per tile would raise the MMA's N beyond what 4 warps hold well
DECODE_LINEAR_STAGE_BYTES = 48 * 1024  # W + x tile bytes of one pipeline stage for BLOCK_K = 128 to be taken
DECODE_LINEAR_SMEM_BYTES = 160 * 1024  # all stages together (H100: 227 KB a block; the epilogue needs some)
DECODE_LINEAR_NUM_WARPS = 4  # one warpgroup: a wgmma of 64 W rows

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
DecodeLinearConfig = tuple[int, int, int, int, int]

# ---------------------------------------------------------------- torch reference


def decode_linear_ref(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    silu_mul: bool = False,
    rms_norm_eps: float | None = None,
    residual: torch.Tensor | None = None,  # [M, N]
) -> torch.Tensor:  # [M, N] or [M, N / 2]
    """The unfused ops `decode_linear` replaces: (RMSNorm scale,) linear, (SiLU-and-mul), (residual add)."""
    if rms_norm_eps is not None:
        y = rms_scale_torch(F.linear(x, weight), x, rms_norm_eps, bias)
    else:
        y = F.linear(x, weight, bias)
    y = silu_and_mul_torch(y) if silu_mul else y
    return y if residual is None else residual + y


# ---------------------------------------------------------------- Triton kernel


@triton.jit(do_not_specialize=["num_rows"])
def _decode_linear_kernel(
    x_ptr,  # [M, K], rows x_row_stride apart, contiguous along K
    x_row_stride,
    w_ptr,  # [N, K], rows contiguous
    w_row_stride,
    bias_ptr,  # [N]
    residual_ptr,  # [M, N_OUT], contiguous (HAS_RESIDUAL)
    out_ptr,  # [M, N_OUT], contiguous
    num_rows,  # M: not specialized, so a new decode batch size reuses the compiled kernel
    n_out,  # N_OUT: N, or N / 2 with SILU_MUL
    k,
    eps,  # (NORM)
    HAS_BIAS: tl.constexpr,
    SILU_MUL: tl.constexpr,  # W rows [0, N_OUT) are gate, [N_OUT, 2 N_OUT) up; a program does both
    NORM: tl.constexpr,  # x is the un-normalized input of an RMSNorm folded into W: scale rows by its rstd
    HAS_RESIDUAL: tl.constexpr,
    USE_PDL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Grid: (cdiv(N_OUT, BLOCK_N), cdiv(M, BLOCK_M)); a program owns out[rows, cols].
    if USE_PDL:
        gdc_launch_dependents()  # the next kernel may start loading its own weights now
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns = rows of W
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows of x and out
    col_mask = cols < n_out
    row_mask = rows < num_rows
    ks = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * w_row_stride + ks[None, :]  # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * x_row_stride + ks[None, :]  # [BLOCK_M, BLOCK_K]
    if SILU_MUL:
        w_up_ptrs = w_ptr + (n_out + cols)[:, None].to(tl.int64) * w_row_stride + ks[None, :]

    # The first K chunk of the weights: nothing before this kernel writes them, so they load before the wait.
    k_mask = ks < k
    w = tl.load(w_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
    if SILU_MUL:
        w_up = tl.load(w_up_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
    if USE_PDL:
        gdc_wait()  # x (and the output buffer) belong to earlier kernels
    x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
    out_offs = rows[None, :].to(tl.int64) * n_out + cols[:, None]  # [BLOCK_N, BLOCK_M]
    out_mask = col_mask[:, None] & row_mask[None, :]
    if HAS_RESIDUAL:  # loaded now, under the K loop: at the epilogue it would be one more round trip
        residual = tl.load(residual_ptr + out_offs, mask=out_mask)  # [BLOCK_N, BLOCK_M]
    acc = tl.dot(w, tl.trans(x), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M] fp32
    if SILU_MUL:
        acc_up = tl.dot(w_up, tl.trans(x), input_precision=DOT_PRECISION)
    if NORM:
        x32 = x.to(tl.float32)
        sum_sq = tl.sum(x32 * x32, axis=1)  # [BLOCK_M]: the squares of the rows' K values, chunk by chunk

    for k0 in range(BLOCK_K, k, BLOCK_K):
        k_mask = k0 + ks < k
        w = tl.load(w_ptrs + k0, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
        if SILU_MUL:
            w_up = tl.load(w_up_ptrs + k0, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            acc_up = tl.dot(w_up, tl.trans(x), acc_up, input_precision=DOT_PRECISION)
        if NORM:
            x32 = x.to(tl.float32)
            sum_sq += tl.sum(x32 * x32, axis=1)

    dtype = out_ptr.dtype.element_ty
    if NORM:  # as rms_scale_torch on the rounded matmul output: the row's scale, then the bias
        rstd = tl.rsqrt(sum_sq / k + eps)[None, :]  # [1, BLOCK_M]
        acc = acc.to(dtype).to(tl.float32) * rstd
        if SILU_MUL:
            acc_up = acc_up.to(dtype).to(tl.float32) * rstd
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[:, None]
        if SILU_MUL:
            acc_up += tl.load(bias_ptr + n_out + cols, mask=col_mask, other=0.0).to(tl.float32)[:, None]
    if SILU_MUL:
        acc = silu_mul_rounded(acc, acc_up, dtype)
    if HAS_RESIDUAL:  # as `residual + y` on dtype tensors: y rounded first
        acc = acc.to(dtype).to(tl.float32) + residual.to(tl.float32)
    tl.store(out_ptr + out_offs, acc.to(dtype), mask=out_mask)


# ---------------------------------------------------------------- launcher


def decode_linear_config(
    num_rows: int,
    n_out: int,
    k: int,
    silu_mul: bool,
    element_bytes: int = 2,
    num_sms: int = DECODE_LINEAR_NUM_SMS,
) -> DecodeLinearConfig:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for an H100, chosen by reasoning, not measurement.

    BLOCK_M: the rows, as a power of two in [16, 64]. BLOCK_N: 128 when that still gives each of the device's
    num_sms SMs a program, else 64 (the weight read is the whole cost, so idle SMs are idle bandwidth).
    BLOCK_K: 128 when a stage's W and x tiles fit DECODE_LINEAR_STAGE_BYTES, else 64; as many stages (2..4)
    as fit the shared memory.
    """
    block_m = min(max(triton.next_power_of_2(num_rows), DECODE_LINEAR_MIN_BLOCK), DECODE_LINEAR_MAX_BLOCK_M)
    num_m_tiles = triton.cdiv(num_rows, block_m)
    block_n = 128 if triton.cdiv(n_out, 128) * num_m_tiles >= num_sms else 64
    tile_rows = block_n * (2 if silu_mul else 1) + block_m  # W rows (gate and up) plus x rows per stage
    fits_128 = tile_rows * 128 * element_bytes <= DECODE_LINEAR_STAGE_BYTES
    block_k = 128 if k >= 128 and fits_128 else 64
    block_k = max(DECODE_LINEAR_MIN_BLOCK, min(block_k, triton.next_power_of_2(k)))
    num_stages = min(4, max(2, DECODE_LINEAR_SMEM_BYTES // (tile_rows * block_k * element_bytes)))
    return block_m, block_n, block_k, DECODE_LINEAR_NUM_WARPS, num_stages


def decode_linear_max_rows(weight: torch.Tensor) -> int:
    """The most rows of x for which the model runs a matmul by this weight here: DECODE_LINEAR_SMALL_MAX_ROWS
    for a weight of at most DECODE_LINEAR_SMALL_WEIGHT_BYTES, DECODE_LINEAR_MAX_ROWS for a larger one."""
    small = weight.numel() * weight.element_size() <= DECODE_LINEAR_SMALL_WEIGHT_BYTES
    return DECODE_LINEAR_SMALL_MAX_ROWS if small else DECODE_LINEAR_MAX_ROWS


def takes_decode_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the model should run this matmul here rather than in cuBLAS: a CUDA tensor with Triton
    (`use_triton`) on Hopper or later, up to `decode_linear_max_rows` rows, the layouts the kernel takes."""
    return (
        x.dim() == 2
        and 0 < x.shape[0] <= decode_linear_max_rows(weight)
        and x.dtype == weight.dtype
        and weight.stride(1) == 1
        and use_triton(x)
        and hopper_or_later(x)
    )


def _check_config(config: tuple) -> DecodeLinearConfig:
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    if len(config) != 5 or not all(isinstance(v, int) and v > 0 for v in config):
        raise ValueError(f"config must be 5 positive ints {names}, got {config!r}")
    for name, value in zip(names[:4], config):
        min_value = 1 if name == "num_warps" else DECODE_LINEAR_MIN_BLOCK
        if value & (value - 1) or value < min_value:
            raise ValueError(f"config {name} must be a power of two >= {min_value}, got {value}")
    return tuple(config)


def decode_linear(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    silu_mul: bool = False,
    rms_norm_eps: float | None = None,
    residual: torch.Tensor | None = None,  # [M, N] or [M, N / 2]
    config: DecodeLinearConfig | None = None,
) -> torch.Tensor:  # [M, N] or [M, N / 2]
    """Triton version of `decode_linear_ref`. `config` overrides `decode_linear_config` (for sweeps)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got shape {tuple(x.shape)}")
    num_rows, k = x.shape
    if not 1 <= num_rows <= DECODE_LINEAR_KERNEL_MAX_ROWS:
        raise ValueError(f"decode_linear takes x of 1..{DECODE_LINEAR_KERNEL_MAX_ROWS} rows, got {num_rows}")
    if weight.dim() != 2 or weight.shape[1] != k or weight.shape[0] == 0 or weight.stride(1) != 1:
        raise ValueError(
            f"weight must be [N, {k}] with N >= 1 and contiguous rows, got {tuple(weight.shape)} "
            f"with strides {weight.stride()}"
        )
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype must match x ({x.dtype}), got {weight.dtype}")
    n = weight.shape[0]
    if silu_mul and n % 2:
        raise ValueError(f"silu_mul needs an even number of weight rows (gate, up), got {n}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    n_out = n // 2 if silu_mul else n
    if residual is not None and (tuple(residual.shape) != (num_rows, n_out) or residual.dtype != x.dtype):
        raise ValueError(
            f"residual must be [{num_rows}, {n_out}] {x.dtype}, got {tuple(residual.shape)} {residual.dtype}"
        )
    if config is None:
        num_sms = device_num_sms(x.device.index or 0) if x.is_cuda else DECODE_LINEAR_NUM_SMS
        config = decode_linear_config(num_rows, n_out, k, silu_mul, x.element_size(), num_sms)
    block_m, block_n, block_k, num_warps, num_stages = _check_config(config)
    use_pdl = check_pdl(x)
    x = x if x.stride(1) == 1 else x.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    out = torch.empty(num_rows, n_out, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n_out, block_n), triton.cdiv(num_rows, block_m))
    _decode_linear_kernel[grid](
        x, x.stride(0),
        weight, weight.stride(0),
        bias if bias is not None else x,
        residual.contiguous() if residual is not None else x,
        out, num_rows, n_out, k,
        rms_norm_eps if rms_norm_eps is not None else 0.0,
        HAS_BIAS=bias is not None,
        SILU_MUL=silu_mul,
        NORM=rms_norm_eps is not None,
        HAS_RESIDUAL=residual is not None,
        USE_PDL=use_pdl,
        DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
        launch_pdl=use_pdl,
    )  # fmt: skip
    return out
