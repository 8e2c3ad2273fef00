"""RMSNorm, SiLU-and-mul and rope: each Triton kernel against its torch reference (the Triton interpreter on
CPU, the real thing under the `gpu` marker), and the layers against transformers."""

import pytest
import torch
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from nanovllm.kernels import backend
from nanovllm.kernels.activation import silu_and_mul, silu_and_mul_torch, silu_and_mul_triton
from nanovllm.kernels.backend import kernel_backend, use_triton
from nanovllm.kernels.rmsnorm import rms_norm, rms_norm_torch, rms_norm_triton
from nanovllm.kernels.rope import apply_rope, apply_rope_torch, apply_rope_triton
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.rotary_embedding import get_rope

# Within a couple of units in the last place: the kernels round where the references do, so only the fp32
# reduction order (rmsnorm) and exp (silu) can differ.
TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}
ROPE_PARAMETERS = {"rope_type": "default", "rope_theta": 10000.0}
MAX_POSITION = 4096
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def randn(*shape: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=generator, device=device, dtype=torch.float32).to(dtype)


def check_rms_norm(
    num_rows: int, hidden_size: int, dtype: torch.dtype, with_residual: bool, device: str
) -> None:
    x = randn(num_rows, hidden_size, dtype=dtype, device=device, seed=1)
    weight = 1 + 0.1 * randn(hidden_size, dtype=dtype, device=device, seed=2)
    residual = randn(num_rows, hidden_size, dtype=dtype, device=device, seed=3) if with_residual else None
    x_before = x.clone()
    out = rms_norm_triton(x, weight, 1e-6, residual)
    expected = rms_norm_torch(x, weight, 1e-6, residual)
    assert torch.equal(x, x_before)  # inputs are never written
    if with_residual:
        (out, residual_out), (expected, expected_residual) = out, expected
        assert torch.equal(residual_out, expected_residual)  # the add is rounded the same way
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


def check_silu_and_mul(
    num_rows: int,
    intermediate_size: int,
    dtype: torch.dtype,
    device: str,
    norm: bool = False,
    bias: bool = False,
) -> None:
    x = randn(num_rows, 2 * intermediate_size, dtype=dtype, device=device)
    args = {}
    if norm:  # the un-normalized stream the gate_up matmul read (hidden 700), rows of very different scales
        scales = torch.linspace(0.05, 30.0, num_rows, device=device)[:, None]
        src = randn(num_rows, 700, dtype=torch.float32, device=device, seed=4) * scales
        args = dict(norm_src=src.to(dtype))
        args["bias"] = randn(2 * intermediate_size, dtype=dtype, device=device, seed=5) if bias else None
    out = silu_and_mul_triton(x, **args)
    assert out.shape == (num_rows, intermediate_size)
    torch.testing.assert_close(out, silu_and_mul_torch(x, **args), **TOLERANCE[dtype])


def check_rope(
    num_tokens: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
    rotary_dim: int | None = None,
) -> None:
    cos_sin_cache = get_rope(head_dim, MAX_POSITION, ROPE_PARAMETERS, rotary_dim).cos_sin_cache.to(device)
    # q, k as the model makes them: strided views into one qkv projection output.
    qkv = randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=device)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(
        num_tokens, num_kv_heads, head_dim
    )
    generator = torch.Generator(device=device).manual_seed(0)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=generator, device=device)
    positions[-1] = MAX_POSITION - 1
    qkv_before = qkv.clone()
    q_out, k_out = apply_rope_triton(q, k, cos_sin_cache, positions)
    q_expected, k_expected = apply_rope_torch(q, k, cos_sin_cache, positions)
    assert torch.equal(qkv, qkv_before)  # out of place
    torch.testing.assert_close(q_out, q_expected, **TOLERANCE[dtype])
    torch.testing.assert_close(k_out, k_expected, **TOLERANCE[dtype])


# ---------------------------------------------------------------- CPU: Triton interpreter vs reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize(("num_rows", "hidden_size"), [(1, 96), (7, 1000), (33, 128)])
def test_rms_norm_kernel(num_rows: int, hidden_size: int, dtype: torch.dtype, with_residual: bool) -> None:
    check_rms_norm(num_rows, hidden_size, dtype, with_residual, "cpu")


def test_rms_norm_kernel_per_head_and_strided() -> None:
    # Per-head q norm: [num_tokens, num_heads, head_dim] cut from a wider qkv tensor (rows are strided).
    qkv = randn(5, 3 * 4 * 64, dtype=torch.float32)
    q = qkv[:, : 4 * 64].view(5, 4, 64)
    weight = randn(64, dtype=torch.float32, seed=1)
    out = rms_norm_triton(q, weight, 1e-6)
    assert out.shape == (5, 4, 64)
    torch.testing.assert_close(out, rms_norm_torch(q, weight, 1e-6), **TOLERANCE[torch.float32])
    assert rms_norm_triton(q[:0], weight, 1e-6).shape == (0, 4, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("num_rows", "intermediate_size"), [(1, 96), (7, 1000), (33, 128)])
def test_silu_and_mul_kernel(num_rows: int, intermediate_size: int, dtype: torch.dtype) -> None:
    check_silu_and_mul(num_rows, intermediate_size, dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("num_rows", "intermediate_size"), [(1, 96), (7, 1500)])
def test_silu_and_mul_kernel_finishes_the_folded_norm(num_rows, intermediate_size, bias, dtype) -> None:
    check_silu_and_mul(num_rows, intermediate_size, dtype, "cpu", norm=True, bias=bias)


def test_silu_and_mul_rejects_bad_norm_arguments() -> None:
    x = torch.randn(3, 8)
    for op in (silu_and_mul, silu_and_mul_triton):
        with pytest.raises(ValueError, match="norm_src must be"):
            op(x, norm_src=torch.randn(2, 5))
        with pytest.raises(ValueError, match="bias must have shape"):
            op(x, norm_src=torch.randn(3, 5), bias=torch.randn(4))
        with pytest.raises(ValueError, match="bias is only taken with norm_src"):
            op(x, bias=torch.randn(8))


def test_silu_and_mul_kernel_leading_dims() -> None:
    x = randn(2, 3, 2 * 48, dtype=torch.float32)
    torch.testing.assert_close(silu_and_mul_triton(x), silu_and_mul_torch(x), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_kernel(num_tokens: int, head_dim: int, dtype: torch.dtype) -> None:
    check_rope(num_tokens, 6, 2, head_dim, dtype, "cpu")


def test_rope_kernel_partial_rotary() -> None:
    check_rope(5, 4, 4, 128, torch.float32, "cpu", rotary_dim=64)


# ---------------------------------------------------------------- layers and switch


def test_rms_norm_layer_matches_transformers() -> None:
    hidden_size = 96
    ours, theirs = RMSNorm(hidden_size, eps=1e-5), Qwen3RMSNorm(hidden_size, eps=1e-5)
    weight = randn(hidden_size, dtype=torch.float32, seed=1)
    ours.weight.data.copy_(weight)
    theirs.weight.data.copy_(weight)
    x = randn(3, 5, hidden_size, dtype=torch.float32, seed=2)
    residual = randn(3, 5, hidden_size, dtype=torch.float32, seed=3)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        out, residual_out = ours(x, residual)
        assert torch.equal(out, theirs(x + residual)) and torch.equal(residual_out, x + residual)
        # The Triton kernel, on the same weights.
        torch.testing.assert_close(rms_norm_triton(x, ours.weight, 1e-5), theirs(x), rtol=1e-5, atol=1e-5)


def test_kernel_backend_switch() -> None:
    assert backend._active_backend.get() == "auto"
    with kernel_backend("torch"):
        assert backend._active_backend.get() == "torch"
        with kernel_backend("triton"):
            assert backend._active_backend.get() == "triton"
        assert backend._active_backend.get() == "torch"
    assert backend._active_backend.get() == "auto"
    with pytest.raises(ValueError, match="kernel backend must be one of"):
        with kernel_backend("cuda"):
            pass
    for name in ("auto", "triton", "torch"):
        with kernel_backend(name):
            assert not use_triton(torch.zeros(1))  # CPU tensors always take the torch reference


# ---------------------------------------------------------------- GPU: compiled kernels at real sizes


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden_size", [1024, 4096])
@pytest.mark.parametrize("num_rows", [1, 257])
def test_rms_norm_kernel_gpu(num_rows: int, hidden_size: int, with_residual: bool) -> None:
    check_rms_norm(num_rows, hidden_size, torch.bfloat16, with_residual, "cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("intermediate_size", [3072, 11008])
@pytest.mark.parametrize("num_rows", [1, 257])
def test_silu_and_mul_kernel_gpu(num_rows: int, intermediate_size: int) -> None:
    check_silu_and_mul(num_rows, intermediate_size, torch.bfloat16, "cuda")
    check_silu_and_mul(num_rows, intermediate_size, torch.bfloat16, "cuda", norm=True, bias=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(16, 8, 128), (32, 8, 128), (14, 2, 64)])
@pytest.mark.parametrize("num_tokens", [1, 257])
def test_rope_kernel_gpu(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    check_rope(num_tokens, num_heads, num_kv_heads, head_dim, torch.bfloat16, "cuda")


@pytest.mark.gpu
@gpu
def test_ops_follow_the_switch_gpu() -> None:
    x = randn(33, 1024, dtype=torch.bfloat16, device="cuda")
    weight = randn(1024, dtype=torch.bfloat16, device="cuda", seed=1)
    positions = torch.arange(33, device="cuda")
    q, k = x.view(33, 8, 128), x[:, :256].reshape(33, 2, 128)
    cos_sin_cache = get_rope(128, MAX_POSITION, ROPE_PARAMETERS).cos_sin_cache.cuda()
    with kernel_backend("triton"):
        assert use_triton(x)
        assert torch.equal(rms_norm(x, weight, 1e-6), rms_norm_triton(x, weight, 1e-6))
        assert torch.equal(silu_and_mul(x), silu_and_mul_triton(x))
        assert all(
            map(
                torch.equal,
                apply_rope(q, k, cos_sin_cache, positions),
                apply_rope_triton(q, k, cos_sin_cache, positions),
            )
        )
    with kernel_backend("torch"):
        assert not use_triton(x)
        assert torch.equal(rms_norm(x, weight, 1e-6), rms_norm_torch(x, weight, 1e-6))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("hidden_size", [1024, 4096])
def test_rms_norm_layer_matches_transformers_gpu(hidden_size: int) -> None:
    ours = RMSNorm(hidden_size).to("cuda", torch.bfloat16)
    theirs = Qwen3RMSNorm(hidden_size).to("cuda", torch.bfloat16)
    weight = 1 + 0.1 * randn(hidden_size, dtype=torch.bfloat16, device="cuda", seed=1)
    ours.weight.data.copy_(weight)
    theirs.weight.data.copy_(weight)
    x = randn(257, hidden_size, dtype=torch.bfloat16, device="cuda", seed=2)
    residual = randn(257, hidden_size, dtype=torch.bfloat16, device="cuda", seed=3)
    with torch.no_grad(), kernel_backend("triton"):
        out, residual_out = ours(x, residual)
        assert torch.equal(residual_out, x + residual)
        torch.testing.assert_close(out, theirs(x + residual), **TOLERANCE[torch.bfloat16])
