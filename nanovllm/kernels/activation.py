"""Gated SiLU of Llama/Qwen MLPs: x [..., 2 * I] -> silu(x[..., :I]) * x[..., I:].

As in transformers (act_fn(gate_proj(x)) * up_proj(x)), silu is rounded to the input dtype before the
multiply, so bf16 results match it.
"""

import torch
import torch.nn.functional as F

from nanovllm.kernels.backend import tl, triton, use_triton

# ---------------------------------------------------------------- torch reference


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
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
def _silu_and_mul_kernel(x_ptr, x_row_stride, out_ptr, intermediate_size, BLOCK_SIZE: tl.constexpr):
    # Grid: (num_rows, cdiv(intermediate_size, BLOCK_SIZE)); each program handles one slice of one row.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < intermediate_size
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * x_row_stride + intermediate_size + cols, mask=mask, other=0.0)
    out = silu_mul_rounded(gate, up, gate.dtype)
    tl.store(out_ptr + row * intermediate_size + cols, out.to(gate.dtype), mask=mask)


# ---------------------------------------------------------------- launcher


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % 2 != 0:
        raise ValueError(f"last dim of x must be even (gate and up halves), got {x.shape[-1]}")
    intermediate_size = x.shape[-1] // 2
    # x_rows: [num_rows, 2 * intermediate_size]
    x_rows = x.reshape(-1, x.shape[-1])
    if x_rows.stride(-1) != 1:
        x_rows = x_rows.contiguous()
    num_rows = x_rows.shape[0]
    out = torch.empty((*x.shape[:-1], intermediate_size), dtype=x.dtype, device=x.device)
    if num_rows > 0 and intermediate_size > 0:
        block_size = min(triton.next_power_of_2(intermediate_size), 1024)
        grid = (num_rows, triton.cdiv(intermediate_size, block_size))
        _silu_and_mul_kernel[grid](
            x_rows, x_rows.stride(0), out, intermediate_size, BLOCK_SIZE=block_size, num_warps=4
        )
    return out


# ---------------------------------------------------------------- op


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * I] -> [..., I], silu(first half) * second half."""
    if use_triton(x):
        return silu_and_mul_triton(x)
    return silu_and_mul_torch(x)
