"""What the fused matmul kernels' tests (test_gemv.py, test_decode_linear.py) share: seeded inputs, the
tolerances against the unfused torch ops, the CUDA skip, and the check of a PDL chain in a CUDA graph."""

from collections.abc import Callable

import pytest
import torch

TOLERANCE = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def check_graph_replays(
    chain: Callable[[], torch.Tensor], x0: torch.Tensor, reference: Callable[[], torch.Tensor]
):
    """Capture chain() (which reads x0) in a CUDA graph and replay it 20 times with new values in x0: each
    replay's output must match reference() on those values. Under PDL a kernel that read its input before
    gdc_wait() would see the previous replay's (or a half-written) input."""
    chain()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for i in range(20):
        x0.copy_(torch.randn(x0.shape, device=x0.device) * (i + 1))
        graph.replay()
        torch.testing.assert_close(out, reference(), **TOLERANCE[x0.dtype])


def randn(*shape: int, dtype: torch.dtype, device: str, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator)).to(dtype).to(device)
