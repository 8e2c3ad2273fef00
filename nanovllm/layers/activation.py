import torch
from torch import nn

from nanovllm.kernels.activation import silu_and_mul


class SiluAndMul(nn.Module):
    """x: [..., 2 * intermediate_size] (gate, up) -> silu(gate) * up: [..., intermediate_size]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)
