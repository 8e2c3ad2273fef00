"""Small-batch linear layer (GEMV) with the decoder's neighbours folded in, for batch-1-like decode.

    y = linear(prologue(x), W, b)          x: [M, K], W: [N, K] (nn.Linear layout), M <= GEMV_MAX_ROWS
    prologue (optional): s = x + residual (returned as the new residual); x = rmsnorm(s) * norm_weight
    epilogue (optional, silu_mul): W holds [gate; up] rows, y = silu(gate) * up: [M, N / 2]

At decode batch 1 a layer's matmuls read 4-12 MB of weights each, and cuBLAS spends 5-7 us on one of them
(~1.3 TB/s): per-kernel ramp-up and latency, not bandwidth. Two things go here instead:

- Fewer kernels: the add + RMSNorm before qkv_proj and gate_up_proj and the SiLU-and-mul after gate_up_proj
  run inside the matmul (every program recomputes the norm of the M input rows: M x K values, far less than
  its slice of W), so a layer is qkv, q/k-norm + rope + store, attention, o, gate_up, down.
- Weights before the wait: with programmatic dependent launch (`backend.check_pdl`), a program loads its
  whole [BLOCK_N, K] slice of W, which no earlier kernel writes, *then* waits for the previous kernel
  (`gdc_wait`) before reading x. The weight stream of the next matmul thus overlaps the kernels before
  it; each program holds its slice in registers (BLOCK_N * BLOCK_K <= GEMV_TILE_ELEMENTS).

Numerics follow the unfused ops: the add and the norm round where kernels/rmsnorm.py rounds, the matmul
accumulates in fp32 and rounds once, and the SiLU epilogue rounds gate and up first, as
kernels/activation.py does on the rounded gate_up output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanovllm.kernels.activation import silu_and_mul_torch, silu_mul_rounded
from nanovllm.kernels.backend import check_pdl, gdc_launch_dependents, gdc_wait, tl, triton
from nanovllm.kernels.rmsnorm import rms_norm_torch
from nanovllm.utils.env import env_int

# Decode batches up to this size take the GEMV path: at 4 rows it ties cuBLAS, at 8 it loses (it redoes the
# norm and the conversions per row). NANOVLLM_GEMV_MAX_ROWS=0 turns it off, to measure what it buys.
GEMV_MAX_ROWS = env_int("NANOVLLM_GEMV_MAX_ROWS", 2)
GEMV_MAX_K = 8192  # a program holds a whole row of W: larger K (8B's down_proj, 12288) stays on cuBLAS
GEMV_TILE_ELEMENTS = 16384  # weights per program (32 KB in bf16), so two kernels' tiles fit one SM
GEMV_NUM_WARPS = 4

# ---------------------------------------------------------------- torch reference


def gemv_ref(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    residual: torch.Tensor | None = None,  # [M, K]
    norm_weight: torch.Tensor | None = None,  # [K]
    eps: float = 1e-6,
    silu_mul: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # y: [M, N] or [M, N / 2]; new residual [M, K] or None
    """The unfused ops `gemv` replaces: (add +) RMSNorm, linear, (SiLU-and-mul)."""
    new_residual = None
    if norm_weight is not None:
        if residual is not None:
            x, new_residual = rms_norm_torch(x, norm_weight, eps, residual)
        else:
            x, new_residual = rms_norm_torch(x, norm_weight, eps), x
    elif residual is not None:
        x = new_residual = x + residual
    y = F.linear(x, weight, bias)
    return (silu_and_mul_torch(y) if silu_mul else y), new_residual


# ---------------------------------------------------------------- Triton kernel


@triton.jit(do_not_specialize=["num_rows"])
def _gemv_kernel(
    x_ptr,
    x_row_stride,
    residual_ptr,
    residual_row_stride,
    residual_out_ptr,  # [M, K], written by program 0 (HAS_RESIDUAL)
    norm_weight_ptr,  # [K]
    w_ptr,  # [N, K], rows contiguous
    w_row_stride,
    bias_ptr,  # [N]
    out_ptr,  # [M, N_OUT], contiguous
    num_rows,  # M
    n_out,  # N_OUT: N, or N / 2 with SILU_MUL
    k,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU_MUL: tl.constexpr,  # W rows [0, N_OUT) are gate, [N_OUT, 2 N_OUT) up; a program does both
    USE_PDL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # next power of two >= K
):
    pid = tl.program_id(0)
    if USE_PDL:
        gdc_launch_dependents()  # the next kernel may start loading its own weights now
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns of this program
    col_mask = cols < n_out
    ks = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    k_mask = ks < k
    w_mask = col_mask[:, None] & k_mask[None, :]
    w_offs = cols[:, None].to(tl.int64) * w_row_stride + ks[None, :]  # [BLOCK_N, BLOCK_K]
    # Weights first: nothing before this kernel writes them, so they load before the wait.
    w = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0)  # [BLOCK_N, BLOCK_K]
    if SILU_MUL:
        w_up = tl.load(w_ptr + n_out.to(tl.int64) * w_row_stride + w_offs, mask=w_mask, other=0.0)
    if USE_PDL:
        gdc_wait()  # x, residual (and the buffers written below) belong to earlier kernels
    dtype = out_ptr.dtype.element_ty
    if HAS_NORM:
        norm_weight = tl.load(norm_weight_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        if SILU_MUL:
            bias_up = tl.load(bias_ptr + n_out + cols, mask=col_mask, other=0.0).to(tl.float32)
    for row in range(num_rows):
        x = tl.load(x_ptr + row * x_row_stride + ks, mask=k_mask, other=0.0)  # [BLOCK_K]
        if HAS_RESIDUAL:
            residual = tl.load(residual_ptr + row * residual_row_stride + ks, mask=k_mask, other=0.0)
            x = (x.to(tl.float32) + residual.to(tl.float32)).to(dtype)
            if pid == 0:
                tl.store(residual_out_ptr + row * k + ks, x, mask=k_mask)
        if HAS_NORM:
            xf = x.to(tl.float32)
            variance = tl.sum(xf * xf, axis=0) / k
            normed = (xf * tl.rsqrt(variance + eps)).to(dtype).to(tl.float32)
            x = (normed * norm_weight).to(dtype)
        xf = x.to(tl.float32)[None, :]  # [1, BLOCK_K]
        acc = tl.sum(w.to(tl.float32) * xf, axis=1)  # [BLOCK_N]
        if HAS_BIAS:
            acc += bias
        if SILU_MUL:
            acc_up = tl.sum(w_up.to(tl.float32) * xf, axis=1)
            if HAS_BIAS:
                acc_up += bias_up
            acc = silu_mul_rounded(acc, acc_up, dtype)
        tl.store(out_ptr + row * n_out + cols, acc.to(dtype), mask=col_mask)


# ---------------------------------------------------------------- launcher


def gemv_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` takes these shapes. (DecoderLayer checks the same two limits itself: K once, when
    it is built, and the rows every step.)"""
    return x.dim() == 2 and 0 < x.shape[0] <= GEMV_MAX_ROWS and weight.shape[1] <= GEMV_MAX_K


def gemv(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    residual: torch.Tensor | None = None,  # [M, K]
    norm_weight: torch.Tensor | None = None,  # [K]
    eps: float = 1e-6,
    silu_mul: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # y: [M, N] or [M, N / 2]; new residual [M, K] or None
    """Triton version of `gemv_ref`. The new residual is x + residual with a residual, x itself with a norm
    and no residual (the first decoder layer), else None. Never writes its inputs."""
    num_rows, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"weight must be [N, {k}] with contiguous rows, got {tuple(weight.shape)}")
    if not gemv_supported(x, weight):
        raise ValueError(
            f"gemv takes x of 1..{GEMV_MAX_ROWS} rows and K <= {GEMV_MAX_K}, got {tuple(x.shape)}"
        )
    if silu_mul and n % 2:
        raise ValueError(f"silu_mul needs an even number of weight rows (gate, up), got {n}")
    for name, t, shape in (("residual", residual, x.shape), ("norm_weight", norm_weight, (k,)),
                           ("bias", bias, (n,))):  # fmt: skip
        if t is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    use_pdl = check_pdl(x)
    x = x if x.stride(1) == 1 else x.contiguous()
    n_out = n // 2 if silu_mul else n
    out = torch.empty(num_rows, n_out, dtype=x.dtype, device=x.device)
    residual_out = None
    if residual is not None:
        residual = residual if residual.stride(1) == 1 else residual.contiguous()
        residual_out = torch.empty_like(x)
    block_k = triton.next_power_of_2(k)
    tile_rows = GEMV_TILE_ELEMENTS // block_k // (2 if silu_mul else 1)
    block_n = max(1, min(tile_rows, triton.next_power_of_2(n_out)))
    _gemv_kernel[(triton.cdiv(n_out, block_n),)](
        x, x.stride(0),
        residual if residual is not None else x, residual.stride(0) if residual is not None else 0,
        residual_out if residual_out is not None else out,
        norm_weight if norm_weight is not None else x,
        weight, weight.stride(0),
        bias if bias is not None else x,
        out, num_rows, n_out, k, eps,
        HAS_RESIDUAL=residual is not None,
        HAS_NORM=norm_weight is not None,
        HAS_BIAS=bias is not None,
        SILU_MUL=silu_mul,
        USE_PDL=use_pdl,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=GEMV_NUM_WARPS,
        launch_pdl=use_pdl,
    )  # fmt: skip
    if residual_out is None and norm_weight is not None:
        residual_out = x
    return out, residual_out
