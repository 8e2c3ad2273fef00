import torch
from torch import nn

from nanovllm.kernels.rmsnorm import rms_norm
from nanovllm.utils.distributed import get_tp_group


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, numerically as transformers' LlamaRMSNorm / Qwen3RMSNorm.

    forward(x) -> rmsnorm(x); forward(x, residual) -> (rmsnorm(x + residual), x + residual), the fused
    add+norm between decoder layers. Any leading shape, so it also serves as the per-head q/k norm on
    [num_tokens, num_heads, head_dim].
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


class AddRMSNorm(RMSNorm):
    """The norm between decoder blocks: forward(h, residual) -> (rmsnorm(h + residual), h + residual),
    and (rmsnorm(h), h) for the first block (residual None).

    Under tensor parallelism h arrives as each rank's partial sum (the embedding and the row-parallel
    o_proj / down_proj skip their all-reduce) and is summed over the ranks here: for decode-size batches
    the all-reduce, the add and the norm are one kernel (nanovllm/kernels/all_reduce.py).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        self.tp_group = get_tp_group()

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # (a single-rank group's all-reduce is a no-op: this is the plain add + norm)
        return self.tp_group.all_reduce_rms_norm(x, self.weight, self.eps, residual)
