"""y = x @ W^T for decode-sized M (a few to a few hundred rows of activations): a split-K Triton GEMM.

In a decode step every linear layer multiplies a skinny x [M, K] (M = batch, 1..256) by a weight
W [N, K] that is read once from HBM, so the floor is the weight read: 2 * N * K bytes at ~3 TB/s, 1.4-4 us
for Qwen3-0.6B's layers. cuBLAS takes 6-9 us on these: the kernels are so short that launch, ramp-up and
tail dominate, and a plain [BLOCK_M, BLOCK_N] tiling of a 1024-wide output has only 8-32 tiles, which
leave most of the 132 SMs idle and the few busy ones unable to keep enough bytes in flight.

So the K dimension is cut too: the grid is (M tiles, N tiles, SPLIT_K), every program streams its
[BLOCK_N, K / SPLIT_K] slice of W once and multiplies it with the matching [BLOCK_M, K / SPLIT_K] slice of
x (small, hits L2). With SPLIT_K == 1 the program adds the bias and writes y itself. With SPLIT_K > 1 it
writes an fp32 partial [SPLIT_K, M, N] and a second small kernel sums the partials in split order, adds the
bias and casts: two launches, but the result is bitwise the same on every run. (fp32 atomics into a zeroed
buffer would save the second launch but make the last bits depend on the programs' finishing order.)

- M tiles are the fastest grid axis, so the programs that share a W tile run side by side and only the first
  of them reads it from HBM.
- M <= 16 is padded to a 16-row tile (tl.dot needs >= 16 rows); the padding rows re-read rows of x
  (index modulo M: no mask, so the loads stay vectorized) and are never stored.
- Accumulation is fp32; y has x's dtype.
- Launch shapes come from `gemm_config(M, N, K, num_sms)`, a pure function of ints: called at CUDA-graph
  capture and at replay it gives the same grid. No host sync, no data-dependent size: the op is capturable
  (the partial buffer is a torch.empty from the graph's pool).
"""

import functools
from typing import NamedTuple

import torch

from nanovllm.kernels.paged_attention import dot_precision
from nanovllm.kernels.store_kvcache import check_triton_device

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def skinny_gemm_ref(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [M, N], x's dtype
    """Plain-PyTorch y = x @ W^T + bias, computed in fp32 and rounded once to x's dtype."""
    bias_fp32 = bias.float() if bias is not None else None
    return torch.nn.functional.linear(x.float(), weight.float(), bias_fp32).to(x.dtype)


class GemmConfig(NamedTuple):
    """Launch shape of `skinny_gemm`; a plain 6-tuple in this order works as well."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int  # an upper bound: the launch uses no more splits than leave every split some K
    num_warps: int
    num_stages: int


# The heuristic's constants, chosen by reasoning for an H100 (132 SMs, 3.35 TB/s, 228 KB shared memory per
# SM), not yet by measurement: benchmarks/gemm_decode.py sweeps the alternatives; change them here.
# Compiled offline for sm_90 (triton 3.6, bf16): the M <= 16 default, 16 x 32 x 128 with 4 warps and 4
# stages, uses mma.sync, 40 registers and 36 KB of shared memory (that path keeps num_stages - 1 buffers),
# and fills them with 16-byte cp.async; BLOCK_M 64 uses wgmma (num_stages buffers: 96 KB at 64 x 64 x 128
# and 3 stages, 96 registers). No spills anywhere.
#
# Programs per SM to aim for. One program keeps (num_stages - 1) W tiles of BLOCK_N x BLOCK_K in flight
# (8 KB each at 32 x 128 bf16); HBM needs ~3 TB/s x ~1 us / 132 SMs = ~25 KB in flight per SM, so 2-4
# programs per SM hide the latency with room to spare, and more only adds per-program overhead.
GEMM_PROGRAMS_PER_SM = 3
# No split gets less K than this: below ~2 tiles of BLOCK_K a program is all prologue and epilogue.
GEMM_MIN_K_PER_SPLIT = 256
GEMM_MAX_SPLIT_K = 16
# Partials cost 2 * 4 * SPLIT_K * M * N bytes (written, then read back by the reduce) against the weight's
# 2 * N * K: keep that ratio, 4 * SPLIT_K * M / K, below this. It is what stops splitting at large M, where
# there are M tiles enough to fill the GPU anyway (most partials stay in L2, so this is on the safe side).
GEMM_MAX_PARTIAL_FRACTION = 0.5
GEMM_BLOCK_K = 128  # 256 B of each W row per load: whole 128-byte lines, 16-byte vectors
GEMM_BLOCK_N = 64
GEMM_SMALL_BLOCK_N = 32  # when 64-wide tiles leave SMs without a tile (N = 1024: 16 tiles at M <= 16)
GEMM_NUM_WARPS = 4
# Shared memory stays small enough for 3+ programs per SM at M <= 32 (36-48 KB) and 2 at BLOCK_M 64, where
# the x tile is as big as the W tile and wgmma keeps one more buffer (72-96 KB at 3 stages).
GEMM_NUM_STAGES = 4
GEMM_NUM_STAGES_LARGE_M = 3
GEMM_MIN_BLOCK_M = 16  # tl.dot needs >= 16 rows
GEMM_MAX_BLOCK_M = 64
# The split-K reduce: one program sums REDUCE_BLOCK outputs (4 fp32 per thread at 4 warps, 16-byte loads).
REDUCE_BLOCK = 512
REDUCE_NUM_WARPS = 4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    # triton.next_power_of_2 without needing triton (gemm_config is also called where it is absent).
    return 1 << (max(n, 1) - 1).bit_length()


def k_per_split(K: int, block_k: int, split_k: int) -> int:
    """Width of each split's K range: K / split_k rounded up to whole BLOCK_K tiles (at least one)."""
    return max(1, _cdiv(_cdiv(K, split_k), block_k)) * block_k


def effective_split_k(K: int, block_k: int, split_k: int) -> int:
    """Splits actually launched for a requested split_k: none is left empty (K = 300, BLOCK_K = 64 and
    split_k = 4 give ranges of 128, so 3 splits)."""
    return max(1, _cdiv(K, k_per_split(K, block_k, split_k)))


# Shared-memory bytes of a launch shape, an upper estimate: num_stages buffers of the x and W tiles (Triton's
# wgmma path keeps that many, its mma.sync path one fewer). The benchmark skips shapes over the limit.
def smem_bytes(config: GemmConfig, element_size: int) -> int:
    tile_bytes = (config.block_m + config.block_n) * config.block_k * element_size
    return config.num_stages * tile_bytes


def gemm_config(M: int, N: int, K: int, num_sms: int) -> GemmConfig:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) for y[M, N] = x[M, K] @ W[N, K]^T.

    A pure function of its arguments: the same M gives the same launch at CUDA-graph capture and replay.
    Tiles first (BLOCK_M from M, BLOCK_N 64, or 32 if 64 leaves SMs idle), then enough K splits to give
    every SM GEMM_PROGRAMS_PER_SM programs, as long as each split keeps GEMM_MIN_K_PER_SPLIT of K and the
    fp32 partials stay small next to the weight.
    """
    rows = max(M, 1)
    block_m = min(max(GEMM_MIN_BLOCK_M, _next_power_of_2(rows)), GEMM_MAX_BLOCK_M)
    num_m_tiles = _cdiv(rows, block_m)
    block_n = GEMM_BLOCK_N
    if num_m_tiles * _cdiv(N, block_n) < num_sms:
        block_n = GEMM_SMALL_BLOCK_N
    num_tiles = max(1, num_m_tiles * _cdiv(N, block_n))
    wanted = _cdiv(GEMM_PROGRAMS_PER_SM * num_sms, num_tiles)
    useful = K // GEMM_MIN_K_PER_SPLIT
    affordable = int(GEMM_MAX_PARTIAL_FRACTION * K / (4 * rows))
    split_k = max(1, min(wanted, useful, affordable, GEMM_MAX_SPLIT_K))
    split_k = effective_split_k(K, GEMM_BLOCK_K, split_k)
    num_stages = GEMM_NUM_STAGES if block_m <= 32 else GEMM_NUM_STAGES_LARGE_M
    return GemmConfig(block_m, block_n, GEMM_BLOCK_K, split_k, GEMM_NUM_WARPS, num_stages)


@functools.lru_cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


if HAS_TRITON:
    # M changes with the batch: not specialized on, or a batch of 1 or a multiple of 16 would compile a
    # variant of its own mid-run (~1 s). N, K and the strides are fixed per layer, and their divisibility
    # by 16 is what lets the compiler prove 16-byte alignment of the W and x rows (vectorized loads).
    @triton.jit(do_not_specialize=["M"])
    def _skinny_gemm_kernel(
        x_ptr,  # [M, K], unit stride along K
        w_ptr,  # [N, K], unit stride along K
        bias_ptr,  # [N]; unread without HAS_BIAS
        out_ptr,  # [M, N] contiguous, x's dtype; written when ONE_SPLIT
        partial_ptr,  # [num_splits, M, N] fp32 contiguous; written when not ONE_SPLIT
        M,
        N,
        K,
        k_per_split,  # a multiple of BLOCK_K
        stride_xm,
        stride_wn,
        HAS_BIAS: tl.constexpr,
        ONE_SPLIT: tl.constexpr,  # one split: add the bias and write y here, no reduce pass
        EVEN_K: tl.constexpr,  # every K tile is whole: no mask on K
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        split = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
        # Rows past M (the padding of a small batch) and past N (the last N tile) re-read valid rows
        # instead of being masked, so that every load but K's tail is unpredicated; they are never stored.
        rows_x = (offs_m % M).to(tl.int64)  # [BLOCK_M]
        rows_w = (offs_n % N).to(tl.int64)  # [BLOCK_N]
        k_start = split * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        x_ptrs = x_ptr + rows_x[:, None] * stride_xm + (k_start + offs_k)[None, :]  # [BLOCK_M, BLOCK_K]
        w_ptrs = w_ptr + rows_w[:, None] * stride_wn + (k_start + offs_k)[None, :]  # [BLOCK_N, BLOCK_K]

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(k_start, k_end, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs)  # [BLOCK_M, BLOCK_K]
                w = tl.load(w_ptrs)  # [BLOCK_N, BLOCK_K]
            else:
                # Splits are BLOCK_K-aligned and only the last one ends short of a tile: at K itself.
                k_valid = (k + offs_k) < K  # [BLOCK_K]
                x = tl.load(x_ptrs, mask=k_valid[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_valid[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

        store_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]  # [BLOCK_M, BLOCK_N]
        if ONE_SPLIT:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            out_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
            tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=store_mask)
        else:
            partial_rows = split.to(tl.int64) * M + offs_m  # [BLOCK_M]
            tl.store(partial_ptr + partial_rows[:, None] * N + offs_n[None, :], acc, mask=store_mask)

    # num_outputs = M * N is specialized on: it is a multiple of 16 for every M when N is (no new variant
    # per batch size), and knowing that lets each split's row start be read with 16-byte loads.
    @triton.jit
    def _split_k_reduce_kernel(
        partial_ptr,  # [SPLIT_K, M, N] fp32 contiguous
        bias_ptr,  # [N]; unread without HAS_BIAS
        out_ptr,  # [M, N] contiguous
        num_outputs,  # M * N
        N,
        HAS_BIAS: tl.constexpr,
        SPLIT_K: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # Sums the splits in split order (deterministic), unrolled so that all SPLIT_K loads are in flight.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat (m, n)
        mask = offs < num_outputs
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        partial_ptrs = partial_ptr + offs  # split 0; each next split is num_outputs further on
        for _ in tl.static_range(SPLIT_K):
            acc += tl.load(partial_ptrs, mask=mask, other=0.0)
            partial_ptrs += num_outputs
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def check_gemm_config(config) -> GemmConfig:
    """A GemmConfig from any 6-sequence of ints, or a ValueError that says which field is wrong."""
    try:
        config = GemmConfig(*(int(v) for v in config))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            "config must be 6 ints (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages), "
            f"got {config!r}"
        ) from exc
    for name in ("block_m", "block_n", "block_k"):
        value = getattr(config, name)
        if value < 16 or value & (value - 1):
            raise ValueError(f"config {name} must be a power of two >= 16, got {value}")
    if config.split_k < 1:
        raise ValueError(f"config split_k must be >= 1, got {config.split_k}")
    if config.num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"config num_warps must be 1, 2, 4, 8 or 16, got {config.num_warps}")
    if config.num_stages < 1:
        raise ValueError(f"config num_stages must be >= 1, got {config.num_stages}")
    return config


def check_gemm_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be [N, K={x.shape[1]}] to match x, got shape {tuple(weight.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")
    if x.stride(1) != 1 and x.shape[1] > 1:
        raise ValueError(f"x must be contiguous along K (stride 1 in the last dimension), got {x.stride()}")
    if weight.stride(1) != 1 and weight.shape[1] > 1:
        raise ValueError(
            f"weight must be contiguous along K (stride 1 in the last dimension), got {weight.stride()}"
        )
    if bias is not None:
        if bias.shape != (weight.shape[0],) or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(
                f"bias must be a [{weight.shape[0]}] {x.dtype} tensor on {x.device}, "
                f"got {bias.dtype} {tuple(bias.shape)} on {bias.device}"
            )


def skinny_gemm(
    x: torch.Tensor,  # [M, K], stride 1 along K (any row stride)
    weight: torch.Tensor,  # [N, K], nn.Linear's layout, stride 1 along K
    bias: torch.Tensor | None = None,  # [N]
    config: GemmConfig | tuple | None = None,  # None: gemm_config(M, N, K, number of SMs)
) -> torch.Tensor:  # [M, N] contiguous, x's dtype
    """y = x @ weight^T + bias on the GPU (Triton), fp32 accumulation, deterministic.

    Built for decode-sized M; any M is correct. The launch depends on (M, N, K, config) only, so a call
    can be captured in a CUDA graph. Layers choose between this and F.linear (`use_triton`).
    """
    check_gemm_args(x, weight, bias)
    check_triton_device(x, "skinny_gemm")
    M, K = x.shape
    N = weight.shape[0]
    if config is None:
        num_sms = _num_sms(x.device.index or 0) if x.device.type == "cuda" else 132
        config = gemm_config(M, N, K, num_sms)
    config = check_gemm_config(config)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out

    split_width = k_per_split(K, config.block_k, config.split_k)
    num_splits = effective_split_k(K, config.block_k, config.split_k)
    one_split = num_splits == 1
    partial = torch.empty(num_splits if not one_split else 0, M, N, dtype=torch.float32, device=x.device)
    bias_arg = bias if bias is not None else out  # unread without HAS_BIAS
    grid = (_cdiv(M, config.block_m), _cdiv(N, config.block_n), num_splits)
    _skinny_gemm_kernel[grid](
        x,
        weight,
        bias_arg,
        out,
        partial,
        M,
        N,
        K,
        split_width,
        x.stride(0),
        weight.stride(0),
        HAS_BIAS=bias is not None,
        ONE_SPLIT=one_split,
        EVEN_K=K % split_width == 0 and K % config.block_k == 0,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if one_split:
        return out
    _split_k_reduce_kernel[(_cdiv(M * N, REDUCE_BLOCK),)](
        partial,
        bias_arg,
        out,
        M * N,
        N,
        HAS_BIAS=bias is not None,
        SPLIT_K=num_splits,
        BLOCK=REDUCE_BLOCK,
        num_warps=REDUCE_NUM_WARPS,
    )
    return out
