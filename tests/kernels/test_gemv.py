"""The small-batch GEMV with its fused prologue (add + RMSNorm) and epilogue (SiLU-and-mul) against the
unfused torch ops (the interpreter on CPU in fp32/fp16, the compiled kernel under `gpu` in bf16 too)."""

import pytest
import torch

from nanovllm.kernels.gemv import GEMV_MAX_K, GEMV_MAX_ROWS, gemv, gemv_ref

TOLERANCE = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def randn(*shape: int, dtype: torch.dtype, device: str, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator)).to(dtype).to(device)


def check_gemv(
    rows: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    device: str,
    *,
    residual: bool = False,
    norm: bool = False,
    bias: bool = False,
    silu_mul: bool = False,
) -> None:
    x = randn(rows, k, dtype=dtype, device=device, seed=1)
    weight = randn(n, k, dtype=dtype, device=device, seed=2, scale=k**-0.5)
    args = dict(
        bias=randn(n, dtype=dtype, device=device, seed=3) if bias else None,
        residual=randn(rows, k, dtype=dtype, device=device, seed=4) if residual else None,
        norm_weight=(1 + 0.1 * randn(k, dtype=dtype, device=device, seed=5)) if norm else None,
        eps=1e-6,
        silu_mul=silu_mul,
    )
    before = [t.clone() for t in (x, weight) if t is not None]
    out, new_residual = gemv(x, weight, **args)
    expected, expected_residual = gemv_ref(x, weight, **args)
    assert all(torch.equal(a, b) for a, b in zip((x, weight), before))  # inputs are never written
    assert out.shape == (rows, n // 2 if silu_mul else n) and out.dtype == dtype
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    if expected_residual is None:
        assert new_residual is None
    else:
        assert torch.equal(new_residual, expected_residual)  # the add rounds as the reference does


# (rows, n, k): one row and the largest batch, n not a multiple of the tile, k not a power of two
SHAPES = [(1, 64, 32), (GEMV_MAX_ROWS, 40, 48), (GEMV_MAX_ROWS, 96, 160)]


@pytest.mark.parametrize("rows,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_plain(rows, n, k, dtype):
    check_gemv(rows, n, k, dtype, "cpu")


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_norm_prologue_and_silu_epilogue(residual, silu_mul, bias):
    rows = GEMV_MAX_ROWS
    check_gemv(rows, 48, 80, torch.float32, "cpu", residual=residual, norm=True, bias=bias, silu_mul=silu_mul)


def test_residual_without_norm():
    check_gemv(2, 32, 64, torch.float16, "cpu", residual=True)


def test_rejects_what_it_cannot_run():
    x, w = torch.zeros(GEMV_MAX_ROWS + 1, 16), torch.zeros(8, 16)
    with pytest.raises(ValueError, match="rows"):
        gemv(x, w)
    with pytest.raises(ValueError, match="weight must be"):
        gemv(torch.zeros(1, 16), torch.zeros(8, 12))
    with pytest.raises(ValueError, match="even"):
        gemv(torch.zeros(1, 16), torch.zeros(7, 16), silu_mul=True)
    with pytest.raises(ValueError, match="norm_weight"):
        gemv(torch.zeros(1, 16), w, norm_weight=torch.ones(8))
    with pytest.raises(ValueError, match="rows"):
        gemv(torch.zeros(1, GEMV_MAX_K + 1), torch.zeros(8, GEMV_MAX_K + 1))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, GEMV_MAX_ROWS])
def test_gpu_model_shapes(dtype, rows):
    # Qwen3-0.6B's four matmuls: qkv (norm prologue), o, gate_up (norm + SiLU), down (K = 3072).
    check_gemv(rows, 4096, 1024, dtype, "cuda", residual=True, norm=True)
    check_gemv(rows, 1024, 2048, dtype, "cuda")
    check_gemv(rows, 6144, 1024, dtype, "cuda", residual=True, norm=True, silu_mul=True)
    check_gemv(rows, 1024, 3072, dtype, "cuda", bias=True)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])  # q/k norm; qkv bias
@pytest.mark.parametrize("first_layer", [True, False])
def test_decoder_layer_gemv_path_equals_unfused(arch, first_layer):
    # The decode path of a whole decoder layer (gemv in the interpreter, attention through its reference)
    # against the unfused layer on the same inputs and cache.
    from nanovllm.layers.attention import AttentionMetadata
    from nanovllm.models.decoder import DecoderLayer, DecoderOptions
    from tests.checkpoints import _BASE, ARCHS

    config_cls, _, extra = ARCHS[arch]
    config = config_cls(**{**_BASE, **extra})
    opts = DecoderOptions(qk_norm=arch == "qwen3", qkv_bias=arch == "qwen2")
    torch.manual_seed(0)
    layer = DecoderLayer(config, opts, max_position=1024)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else 0.1 * torch.randn_like(p))
    assert layer.gemv_decode
    attn = layer.self_attn
    block_size, num_blocks, batch = 16, 8, GEMV_MAX_ROWS
    cache_shape = (num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
    attn.attn.k_cache, attn.attn.v_cache = torch.randn(cache_shape), torch.randn(cache_shape)
    seq_lens = torch.tensor([17, 30, 5][:batch], dtype=torch.int32)
    block_tables = torch.tensor([[1, 2], [3, 4], [0, -1]][:batch], dtype=torch.int32)
    positions = (seq_lens - 1).long()
    blocks = block_tables[torch.arange(batch), positions // block_size].long()
    slots = blocks * block_size + positions % block_size
    meta = AttentionMetadata(
        slot_mapping=slots,
        cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32),
        seq_lens=seq_lens,
        block_tables=block_tables,
        max_query_len=1,
        max_seq_len=int(seq_lens.max()),
        is_decode=True,
    )
    hidden = torch.randn(batch, config.hidden_size)
    residual = None if first_layer else torch.randn(batch, config.hidden_size)
    with torch.no_grad():
        expected = layer(positions, hidden, residual, meta)  # CPU tensors: the unfused torch path
        got = layer._forward_gemv(positions, hidden, residual, meta)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
