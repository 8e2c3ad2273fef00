"""RMSNorm, optionally fused with the residual add that precedes it.

Numerics follow transformers' LlamaRMSNorm / Qwen3RMSNorm step by step, so that bf16 results match it bit for
bit wherever the fp32 reduction order allows:
    s = x + residual                       (rounded to the input dtype, as the decoder layer's add is)
    normed = (s.float() * rsqrt(mean(s.float()**2) + eps)).to(input dtype)
    out = weight * normed                  (in the promoted dtype of weight and input)
"""

import torch

from nanovllm.kernels.backend import check_pdl, gdc_launch_dependents, gdc_wait, tl, triton, use_triton

# ---------------------------------------------------------------- torch reference


def rms_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
        residual = x
    x_fp32 = x.to(torch.float32)
    variance = x_fp32.pow(2).mean(-1, keepdim=True)
    normed = (x_fp32 * torch.rsqrt(variance + eps)).to(x.dtype)
    out = weight * normed
    return out if residual is None else (out, residual)


def rms_scale_torch(
    y: torch.Tensor, src: torch.Tensor, eps: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Finish a matmul that read the un-normalized rows of src (the RMSNorm's weight folded into the matmul's
    columns): y * rsqrt(mean(src**2) + eps) row by row, plus the bias, rounded to y's dtype.
    y: [M, N]; src: [M, K]; bias: [N]. See docs/model.md, "The norms folded into the matmuls"."""
    src32 = src.to(torch.float32)
    out = y.to(torch.float32) * torch.rsqrt(src32.pow(2).mean(-1, keepdim=True) + eps)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(y.dtype)


# ---------------------------------------------------------------- Triton kernel


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    x_row_stride,
    residual_ptr,
    residual_row_stride,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    hidden_size,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    USE_PDL: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # One program normalizes one row; BLOCK_SIZE >= hidden_size, so the whole row sits in registers.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < hidden_size
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # no kernel writes it
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()  # x and residual come from the kernel before
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    in_dtype = x.dtype
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(in_dtype)
        tl.store(residual_out_ptr + row * hidden_size + cols, x, mask=mask)
    x = x.to(tl.float32)
    variance = tl.sum(x * x, axis=0) / hidden_size
    normed = (x * tl.rsqrt(variance + eps)).to(in_dtype).to(tl.float32)
    out = normed * weight
    tl.store(out_ptr + row * hidden_size + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def row_rstd(row_ptr, n, eps, BLOCK: tl.constexpr):
    """rsqrt(mean(row**2) + eps) of the n values at row_ptr, in fp32 (BLOCK values a chunk): the scale that
    the consumers of a folded-norm matmul apply (rms_scale_torch)."""
    cols = tl.arange(0, BLOCK)
    sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        x = tl.load(row_ptr + start + cols, mask=start + cols < n, other=0.0).to(tl.float32)
        sum_sq += x * x
    return tl.rsqrt(tl.sum(sum_sq, axis=0) / n + eps)


@triton.jit
def rms_scale_row(x, rstd, bias_ptrs, mask, HAS_BIAS: tl.constexpr, dtype: tl.constexpr):
    """As rms_scale_torch, on a tile of one row: x (fp32, the matmul's values) times the row's rstd, plus the
    bias at bias_ptrs (HAS_BIAS), rounded to dtype; returned in fp32."""
    x = x * rstd
    if HAS_BIAS:
        x += tl.load(bias_ptrs, mask=mask, other=0.0).to(tl.float32)
    return x.to(dtype).to(tl.float32)


# ---------------------------------------------------------------- launcher


def as_rows(x: torch.Tensor) -> torch.Tensor:
    # [..., hidden] -> [num_rows, hidden] with unit stride along hidden (copies only if it must).
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    hidden_size = x.shape[-1]
    if weight.shape != (hidden_size,):
        raise ValueError(f"weight must have shape ({hidden_size},), got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual must match x {tuple(x.shape)} {x.dtype}, got {tuple(residual.shape)} {residual.dtype}"
        )
    # x_rows: [num_rows, hidden_size]
    x_rows = as_rows(x)
    num_rows = x_rows.shape[0]
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    residual_out = torch.empty_like(x) if residual is not None else None
    if num_rows > 0:
        residual_rows = as_rows(residual) if residual is not None else x_rows
        block_size = triton.next_power_of_2(hidden_size)
        use_pdl = check_pdl(x)
        _rms_norm_kernel[(num_rows,)](
            x_rows,
            x_rows.stride(0),
            residual_rows,
            residual_rows.stride(0),
            weight.contiguous(),
            out,
            residual_out if residual_out is not None else out,
            hidden_size,
            eps,
            HAS_RESIDUAL=residual is not None,
            USE_PDL=use_pdl,
            BLOCK_SIZE=block_size,
            num_warps=min(max(block_size // 256, 1), 16),
            launch_pdl=use_pdl,
        )
    return out if residual_out is None else (out, residual_out)


# ---------------------------------------------------------------- op


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of `x` (any leading shape). With `residual`, returns
    `(rms_norm(x + residual), x + residual)`: the fused add+norm. Never writes its inputs.
    On Hopper the kernel is launched with PDL and reads `weight` before the kernel before it has finished:
    `weight` must be a parameter that no kernel writes."""
    if use_triton(x):
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_torch(x, weight, eps, residual)
