"""skinny_gemm (split-K Triton GEMM for decode-sized M) matches skinny_gemm_ref for any tiling, split count
and ragged M/N/K, gives bitwise-equal results on every call, and rejects bad arguments with ValueError.
The Triton interpreter runs it on the CPU at small sizes; the `gpu` tests use Qwen3-0.6B's real shapes."""

import pytest
import torch

from nanovllm.kernels.skinny_gemm import (
    GEMM_MAX_PARTIAL_FRACTION,
    GEMM_MAX_SPLIT_K,
    check_gemm_config,
    effective_split_k,
    gemm_config,
    k_per_split,
    skinny_gemm,
    skinny_gemm_ref,
    smem_bytes,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (N, K) of Qwen3-0.6B's decode GEMMs and of Qwen3-8B's.
QWEN3_0_6B_SHAPES = {"qkv_proj": (4096, 1024), "o_proj": (1024, 2048), "gate_up_proj": (6144, 1024)}
QWEN3_0_6B_SHAPES["down_proj"] = (1024, 3072)
QWEN3_8B_SHAPES = [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)]
DECODE_BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]

# (M, N, K, config); config = (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages), None = default.
CASES = {
    "default-m1": (1, 64, 128, None),
    "default-split": (2, 64, 512, None),  # the heuristic splits K = 512 in two
    "m1-split4": (1, 48, 256, (16, 32, 64, 4, 4, 3)),
    "ragged-split2": (5, 96, 300, (16, 64, 64, 2, 4, 3)),  # M, N and K all ragged; last K tile partial
    "m17-split3": (17, 80, 200, (32, 32, 32, 3, 4, 2)),
    "m33-one-split": (33, 128, 256, (64, 64, 64, 1, 4, 3)),
    "split8": (3, 40, 512, (16, 32, 32, 8, 4, 2)),
    "m-tiles-n-tiles": (40, 24, 96, (16, 16, 32, 2, 2, 1)),  # 3 M tiles, 2 N tiles, one stage
    "block-k-past-k": (7, 33, 64, (16, 32, 128, 1, 4, 3)),  # one masked K tile
}


def make_inputs(M, N, K, dtype, device="cpu", seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(dtype).to(device)  # [M, K]
    weight = (
        (torch.randn(N, K, generator=gen) * max(K, 1) ** -0.5).to(dtype).to(device)
    )  # [N, K]: outputs ~ N(0, 1)
    b = torch.randn(N, generator=gen).to(dtype).to(device) if bias else None  # [N]
    return x, weight, b


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_ref(tol, case, dtype, with_bias):
    M, N, K, config = CASES[case]
    x, weight, bias = make_inputs(M, N, K, dtype, seed=M + N + K, bias=with_bias)
    inputs_before = [t.clone() for t in (x, weight, bias) if t is not None]
    out = skinny_gemm(x, weight, bias, config=config)
    assert out.shape == (M, N) and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, skinny_gemm_ref(x, weight, bias), **tol(dtype))
    assert all(torch.equal(a, b) for a, b in zip(inputs_before, (x, weight, bias)))  # inputs never written


def test_split_results_are_bitwise_repeatable():
    x, weight, bias = make_inputs(5, 96, 300, torch.float32, bias=True)
    config = (16, 32, 32, 4, 4, 2)
    first = skinny_gemm(x, weight, bias, config=config)
    assert torch.equal(first, skinny_gemm(x, weight, bias, config=config))


def test_strided_rows(tol):
    # x and weight as column slices of wider tensors (e.g. a view into a fused buffer): row stride > K.
    x_wide, weight_wide, _ = make_inputs(6, 40, 200, torch.float16)
    x, weight = x_wide[:, 8:168], weight_wide[:, 24:184]
    out = skinny_gemm(x, weight, config=(16, 32, 32, 2, 4, 2))
    torch.testing.assert_close(out, skinny_gemm_ref(x, weight), **tol(torch.float16))


def test_split_k_never_leaves_a_split_empty(tol):
    # K = 300 in BLOCK_K = 64 tiles asked for 4 splits: ranges of 128, so 3 splits; K = 64 allows 2 of 32.
    assert (k_per_split(300, 64, 4), effective_split_k(300, 64, 4)) == (128, 3)
    assert effective_split_k(64, 32, 8) == 2
    assert effective_split_k(0, 32, 8) == 1
    x, weight, _ = make_inputs(2, 32, 64, torch.float32)
    out = skinny_gemm(x, weight, config=(16, 32, 32, 8, 4, 2))
    torch.testing.assert_close(out, skinny_gemm_ref(x, weight), **tol(torch.float32))


def test_empty_and_degenerate_sizes(tol):
    x, weight, bias = make_inputs(0, 32, 64, torch.float32, bias=True)
    assert skinny_gemm(x, weight, bias).shape == (0, 32)
    x, weight, _ = make_inputs(3, 0, 64, torch.float32)
    assert skinny_gemm(x, weight).shape == (3, 0)
    x, weight, bias = make_inputs(3, 16, 0, torch.float32, bias=True)  # K = 0: y is the bias
    torch.testing.assert_close(skinny_gemm(x, weight, bias), bias.expand(3, 16), **tol(torch.float32))


@pytest.mark.parametrize("num_sms", [132, 114, 78])
def test_gemm_config_fills_the_gpu_within_its_limits(num_sms):
    for N, K in [*QWEN3_0_6B_SHAPES.values(), *QWEN3_8B_SHAPES]:
        for M in DECODE_BATCHES:
            config = gemm_config(M, N, K, num_sms)
            assert config == gemm_config(M, N, K, num_sms)  # a pure function: capture and replay agree
            assert check_gemm_config(config) == config
            assert config.block_m >= 16 and (config.block_m >= M or config.block_m == 64)
            assert 1 <= config.split_k <= GEMM_MAX_SPLIT_K
            assert config.split_k == effective_split_k(K, config.block_k, config.split_k)  # none empty
            assert config.split_k == 1 or 4 * config.split_k * M / K <= GEMM_MAX_PARTIAL_FRACTION
            assert smem_bytes(config, 2) <= 160 * 1024  # leaves room for 1+ more program per SM
            num_programs = -(-M // config.block_m) * -(-N // config.block_n) * config.split_k
            if M <= 16:
                assert num_programs >= num_sms, (M, N, K, config)


def test_gemm_config_for_odd_sizes():
    for M, N, K in [(0, 16, 16), (1, 1, 1), (300, 5, 7), (4096, 151936, 1024)]:
        config = check_gemm_config(gemm_config(M, N, K, 132))
        assert config.split_k == effective_split_k(K, config.block_k, config.split_k)


def test_rejects_bad_arguments():
    x, weight, bias = make_inputs(4, 32, 64, torch.float32, bias=True)
    bad_calls = {
        "x must be \\[M, K\\]": (x[0], weight, None),
        "weight must be \\[N, K=64\\]": (x, weight[:, :32], None),
        "x must be float16, bfloat16 or float32": (x.to(torch.int32), weight.to(torch.int32), None),
        "weight must have x's dtype": (x, weight.half(), None),
        "x must be contiguous along K": (torch.randn(64, 4).t(), weight, None),
        "weight must be contiguous along K": (x, torch.randn(64, 32).t(), None),
        "bias must be a \\[32\\]": (x, weight, bias[:16]),
    }
    for match, args in bad_calls.items():
        with pytest.raises(ValueError, match=match):
            skinny_gemm(*args)
    with pytest.raises(ValueError, match="bias must be"):
        skinny_gemm(x, weight, bias.half())
    bad_configs = {
        "6 ints": (16, 32, 32, 1, 4),
        "block_m must be a power of two >= 16": (8, 32, 32, 1, 4, 2),
        "block_n must be a power of two >= 16": (16, 48, 32, 1, 4, 2),
        "split_k must be >= 1": (16, 32, 32, 0, 4, 2),
        "num_warps": (16, 32, 32, 1, 3, 2),
        "num_stages": (16, 32, 32, 1, 4, 0),
    }
    for match, config in bad_configs.items():
        with pytest.raises(ValueError, match=match):
            skinny_gemm(x, weight, config=config)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 7, 16, 64, 256])
@pytest.mark.parametrize("layer", list(QWEN3_0_6B_SHAPES))
def test_qwen3_0_6b_shapes_bf16_gpu(tol, layer, M):
    N, K = QWEN3_0_6B_SHAPES[layer]
    x, weight, bias = make_inputs(M, N, K, torch.bfloat16, device="cuda", bias=layer == "qkv_proj")
    out = skinny_gemm(x, weight, bias)
    # Both sum in fp32 and round once: they differ by the summation order only, at most ~1 bf16 ulp.
    torch.testing.assert_close(out, skinny_gemm_ref(x, weight, bias), **tol(torch.bfloat16))
    assert torch.equal(out, skinny_gemm(x, weight, bias))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("config", [None, (16, 64, 128, 1, 4, 4), (32, 32, 64, 5, 8, 3)])
def test_other_dtypes_and_configs_gpu(tol, dtype, config):
    x, weight, bias = make_inputs(24, 1000, 1000, dtype, device="cuda", bias=True)  # ragged N and K
    torch.testing.assert_close(
        skinny_gemm(x, weight, bias, config), skinny_gemm_ref(x, weight, bias), **tol(dtype)
    )


@pytest.mark.gpu
@needs_cuda
def test_in_cuda_graph_gpu(tol):
    N, K = QWEN3_0_6B_SHAPES["o_proj"]  # the default config splits K here: two kernels in the graph
    x, weight, _ = make_inputs(8, N, K, torch.bfloat16, device="cuda")
    assert gemm_config(8, N, K, torch.cuda.get_device_properties(0).multi_processor_count).split_k > 1
    skinny_gemm(x, weight)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = skinny_gemm(x, weight)
    for seed in (1, 2):
        x.copy_(make_inputs(8, N, K, torch.bfloat16, device="cuda", seed=seed)[0])
        graph.replay()
        torch.testing.assert_close(out, skinny_gemm_ref(x, weight), **tol(torch.bfloat16))
