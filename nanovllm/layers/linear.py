"""Linear layers split across tensor-parallel ranks (Megatron-style).

Column-parallel layers split the output features: each rank computes a slice, no communication.
Row-parallel layers split the input features: each rank computes a partial sum, then all-reduce (the
decoder's `forward_add` puts the residual stream into rank 0's partial sum first).
Every parameter carries a `weight_loader(param, loaded, shard_id=None)` that copies this rank's
shard out of a checkpoint tensor, so loading streams each weight straight into place. `loaded` is a
tensor or a safetensors slice (only the shard is read from disk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels.activation import silu_and_mul
from nanovllm.kernels.decode_linear import decode_linear, takes_decode_linear
from nanovllm.utils.distributed import get_tp_group, get_tp_rank, get_tp_size


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.linear (+ residual: the decoder's residual add inside the matmul, cuBLAS's beta = 1, which may write
    the sum into residual itself); decode-sized batches on the GPU run kernels/decode_linear.py instead, whose
    weight reads start under the kernels before it. The two round the add differently (one rounding of
    residual + x @ W.T here, then the bias; decode_linear rounds x @ W.T + b, then adds): within an ulp."""
    if takes_decode_linear(x, weight):
        return decode_linear(x, weight, bias, residual=residual)
    if residual is None:
        return F.linear(x, weight, bias)
    y = residual.addmm_(x, weight.t())  # [M, N] = residual + x @ W.T, in place: no copy of residual first
    return y if bias is None else y.add_(bias)


def load_shard(loaded, dim: int, start: int, size: int) -> torch.Tensor:
    """Rows/columns [start, start+size) of `loaded` along dim; reads only that part of a slice."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    index = [slice(None)] * len(loaded.get_shape())
    index[dim] = slice(start, start + size)
    return loaded[tuple(index)]


def load_full(loaded) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def _copy(param: torch.Tensor, shard: torch.Tensor) -> None:
    if param.shape != shard.shape:
        raise ValueError(
            f"checkpoint shard of shape {tuple(shard.shape)} does not fit parameter {tuple(param.shape)}"
        )
    param.data.copy_(shard)


class ReplicatedLinear(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size))
        self.weight.weight_loader = self.weight_loader
        self.bias = nn.Parameter(torch.empty(output_size)) if bias else None
        if bias:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        _copy(param, load_full(loaded))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ColumnParallelLinear(nn.Module):
    """y[:, shard] = x @ W[shard].T — output features split across ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        if output_size % self.tp_size:
            raise ValueError(
                f"output size {output_size} is not divisible by tensor_parallel_size {self.tp_size}"
            )
        self.weight = nn.Parameter(torch.empty(output_size // self.tp_size, input_size))
        self.weight.weight_loader = self.weight_loader
        self.bias = nn.Parameter(torch.empty(output_size // self.tp_size)) if bias else None
        if bias:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        size = param.shape[0]
        _copy(param, load_shard(loaded, 0, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate_up_proj).
    Each rank holds [shard of output 0 | shard of output 1 | ...]."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        tp_size = get_tp_size()
        if any(size % tp_size for size in output_sizes):  # each part is split, not only their sum
            raise ValueError(
                f"output sizes {output_sizes} are not all divisible by tensor_parallel_size {tp_size}"
            )
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: int) -> None:
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        _copy(param.data.narrow(0, offset, size), load_shard(loaded, 0, self.tp_rank * size, size))

    def forward_silu_mul(self, x: torch.Tensor, rms_norm_eps: float | None = None) -> torch.Tensor:
        """silu(gate) * up of a [gate; up] projection (gate_up_proj): [M, K] -> [M, I / tp_size]. Decode-sized
        batches do the SiLU-and-mul in the matmul's epilogue. rms_norm_eps: x is the un-normalized residual
        stream and the norm's weight is folded into this layer's columns (docs/model.md); each row's
        rsqrt(mean(x**2) + eps) is applied after the matmul, in the same kernel as the SiLU-and-mul."""
        if len(self.output_sizes) != 2 or self.output_sizes[0] != self.output_sizes[1]:
            raise ValueError(f"forward_silu_mul needs two equal outputs (gate, up), got {self.output_sizes}")
        if takes_decode_linear(x, self.weight):
            return decode_linear(x, self.weight, self.bias, silu_mul=True, rms_norm_eps=rms_norm_eps)
        if rms_norm_eps is None:
            return silu_and_mul(F.linear(x, self.weight, self.bias))
        return silu_and_mul(F.linear(x, self.weight), norm_src=x, eps=rms_norm_eps, bias=self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused. Query heads are split across ranks; KV heads too, or
    replicated when there are fewer KV heads than ranks. Each rank holds [q | k | v] of its heads."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False
    ):
        tp_size = get_tp_size()
        if num_heads % tp_size or (num_kv_heads % tp_size and tp_size % num_kv_heads):
            raise ValueError(
                f"tensor_parallel_size {tp_size} must divide num_heads={num_heads} and divide or be "
                f"a multiple of num_kv_heads={num_kv_heads}"
            )
        self.head_dim = head_dim
        self.num_heads = num_heads // tp_size  # per rank
        self.num_kv_heads = max(1, num_kv_heads // tp_size)  # per rank
        self.kv_replicas = max(1, tp_size // num_kv_heads)  # ranks sharing one KV head
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: str) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, start = 0, q_size, self.tp_rank * q_size
        elif shard_id in ("k", "v"):
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, start = kv_size, (self.tp_rank // self.kv_replicas) * kv_size
        else:
            raise ValueError(f"shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        _copy(param.data.narrow(0, offset, size), load_shard(loaded, 0, start, size))


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x[:, shard] @ W[:, shard].T — input features split, then all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.tp_group = get_tp_group()
        if input_size % self.tp_size:
            raise ValueError(
                f"input size {input_size} is not divisible by tensor_parallel_size {self.tp_size}"
            )
        self.weight = nn.Parameter(torch.empty(output_size, input_size // self.tp_size))
        self.weight.weight_loader = self.weight_loader
        self.bias = nn.Parameter(torch.empty(output_size)) if bias else None
        if bias:
            self.bias.weight_loader = self.bias_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        size = param.shape[1]
        _copy(param, load_shard(loaded, 1, self.tp_rank * size, size))

    def bias_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        _copy(param, load_full(loaded))

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + forward(x), reduced over the ranks, with the add inside the matmul: the decoder's
        residual add after o_proj and down_proj. Under TP, rank 0's partial sum carries residual and bias.
        residual may be overwritten (it is the residual stream, which the sum replaces)."""
        if self.tp_rank > 0:
            return self.tp_group.all_reduce(linear(x, self.weight))
        return self.tp_group.all_reduce(linear(x, self.weight, self.bias, residual))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp_group.all_reduce(linear(x, self.weight))  # the bias once, after the reduction
        return y + self.bias if self.bias is not None else y
