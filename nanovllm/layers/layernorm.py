import torch
from torch import nn

from nanovllm.kernels.rmsnorm import rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, numerically as transformers' LlamaRMSNorm / Qwen3RMSNorm.

    forward(x) -> rmsnorm(x); forward(x, residual) -> (rmsnorm(x + residual), x + residual), the fused
    add+norm (the decoder's final norm after GEMV-path layers). Any leading shape, so it also serves as the
    per-head q/k norm on [num_tokens, num_heads, head_dim]. The decoder's per-layer norms keep only their
    weights here, and only until they are folded into the matmuls (DecoderLayer.fold_norm_weights).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return rms_norm(x, self.weight, self.eps, residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
