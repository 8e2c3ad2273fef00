"""Gated SiLU of Llama/Qwen MLPs: x [..., 2 * I] -> silu(x[..., :I]) * x[..., I:].

As in transformers (act_fn(gate_proj(x)) * up_proj(x)), silu is rounded to the input dtype before the
multiply, so bf16 results match it.

With `norm_src`, x is a gate_up projection of the un-normalized residual stream (the post-attention RMSNorm's
weight folded into gate_up_proj, docs/model.md): each row is first finished as `rms_scale_torch` does,
x * rsqrt(mean(norm_src**2) + eps) + bias, so the norm costs no kernel of its own.
"""

import torch
import torch.nn.functional as F

from nanovllm.kernels.backend import tl, triton, use_triton
from nanovllm.kernels.rmsnorm import as_rows, rms_scale_row, rms_scale_torch, row_rstd

# ---------------------------------------------------------------- torch reference


def silu_and_mul_torch(
    x: torch.Tensor,
    norm_src: torch.Tensor | None = None,
    eps: float = 1e-6,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    if norm_src is not None:
        x = rms_scale_torch(x, norm_src, eps, bias)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---------------------------------------------------------------- Triton kernel


@triton.jit
def silu_mul_rounded(gate, up, dtype: tl.constexpr):
    """silu(gate) * up in fp32, rounding as silu_and_mul_torch does on dtype tensors: gate and up to dtype
    first (fp32 matmul accumulators in the fused kernels, already dtype here), then silu. Round the result
    to dtype when storing it."""
    gate = gate.to(dtype).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    return silu * up.to(dtype).to(tl.float32)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    x_row_stride,
    out_ptr,
    intermediate_size,
    src_ptr,  # [num_rows, src_size] (ROW_NORM)
    src_row_stride,
    src_size,
    eps,
    bias_ptr,  # [2 * intermediate_size] (HAS_BIAS)
    ROW_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # Grid: (num_rows, cdiv(intermediate_size, BLOCK_SIZE)); each program handles one slice of one row.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < intermediate_size
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * x_row_stride + intermediate_size + cols, mask=mask, other=0.0)
    dtype = gate.dtype
    if ROW_NORM:  # as rms_scale_torch: scale, bias, round (each program of the row recomputes the rstd)
        rstd = row_rstd(src_ptr + row * src_row_stride, src_size, eps, BLOCK_SIZE)
        up_bias_ptr = bias_ptr + intermediate_size
        gate = rms_scale_row(gate.to(tl.float32), rstd, bias_ptr + cols, mask, HAS_BIAS, dtype)
        up = rms_scale_row(up.to(tl.float32), rstd, up_bias_ptr + cols, mask, HAS_BIAS, dtype)
    out = silu_mul_rounded(gate, up, dtype)
    tl.store(out_ptr + row * intermediate_size + cols, out.to(dtype), mask=mask)


# ---------------------------------------------------------------- launcher


def _check_args(x, norm_src, bias) -> None:
    if x.shape[-1] % 2 != 0:
        raise ValueError(f"last dim of x must be even (gate and up halves), got {x.shape[-1]}")
    if norm_src is None:
        if bias is not None:
            raise ValueError("bias is only taken with norm_src (otherwise the matmul adds it)")
        return
    if norm_src.shape[:-1] != x.shape[:-1] or norm_src.dtype != x.dtype:
        raise ValueError(
            f"norm_src must be [..., K] with x's leading dims {tuple(x.shape[:-1])} and dtype {x.dtype}, "
            f"got {tuple(norm_src.shape)} {norm_src.dtype}"
        )
    if bias is not None and tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"bias must have shape ({x.shape[-1]},), got {tuple(bias.shape)}")


def silu_and_mul_triton(
    x: torch.Tensor,
    norm_src: torch.Tensor | None = None,
    eps: float = 1e-6,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    _check_args(x, norm_src, bias)
    intermediate_size = x.shape[-1] // 2
    x_rows = as_rows(x)  # [num_rows, 2 * intermediate_size]
    num_rows = x_rows.shape[0]
    out = torch.empty((*x.shape[:-1], intermediate_size), dtype=x.dtype, device=x.device)
    if num_rows > 0 and intermediate_size > 0:
        src_rows = as_rows(norm_src) if norm_src is not None else x_rows  # [num_rows, K]
        # With the norm, whole rows up to 4096 wide per program (8 warps), so each row's rstd is summed once.
        max_block = 4096 if norm_src is not None else 1024
        block_size = min(triton.next_power_of_2(intermediate_size), max_block)
        grid = (num_rows, triton.cdiv(intermediate_size, block_size))
        _silu_and_mul_kernel[grid](
            x_rows, x_rows.stride(0), out, intermediate_size,
            src_rows, src_rows.stride(0), src_rows.shape[1], eps,
            bias.contiguous() if bias is not None else x_rows,
            ROW_NORM=norm_src is not None,
            HAS_BIAS=bias is not None,
            BLOCK_SIZE=block_size,
            num_warps=max(4, block_size // 512),
        )  # fmt: skip
    return out


# ---------------------------------------------------------------- op


def silu_and_mul(
    x: torch.Tensor,
    norm_src: torch.Tensor | None = None,
    eps: float = 1e-6,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: [..., 2 * I] -> [..., I], silu(first half) * second half. With norm_src ([..., K], the rows the
    gate_up matmul read un-normalized), x is first scaled by each row's rsqrt(mean(norm_src**2) + eps) and
    the bias added (see the module docstring)."""
    if use_triton(x):
        return silu_and_mul_triton(x, norm_src, eps, bias)
    _check_args(x, norm_src, bias)
    return silu_and_mul_torch(x, norm_src, eps, bias)
