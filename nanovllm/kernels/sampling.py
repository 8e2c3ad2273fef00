"""Gumbel-max sampling: one token per row, drawn from softmax(logits * inv_temperature), in one read.

With g_i independent standard Gumbel noise (g = -log(-log(u)), u uniform in (0, 1)),
argmax_i(logit_i * inv_temperature + g_i) is an exact sample from softmax(logit * inv_temperature):
the Gumbel-max trick. So no softmax, no normalisation and no fp32 copy of the [B, V] logits is ever
materialised: the kernel reads each logit once, in its own dtype, and keeps a running max.

- Filtered tokens (-inf logits) stay -inf and are never drawn (a row that is all -inf gives token 0,
  as torch.argmax does).
- Greedy rows get no noise and no scaling: plain argmax, ties to the smallest index, exactly
  torch.argmax.
- The noise of (row, column) is a function of (seeds[row], column, vocabulary size) only, so a row's
  token depends on nothing else in the batch (nor on how the launch splits it). The Triton kernel and
  the torch reference use different random streams (Philox in the kernel, torch's generator in the
  reference): same distribution, different draws; greedy rows agree exactly.
- u = (k + 1/2) / 2^23 for a 23-bit k, so u lies in [2^-24, 1 - 2^-24]: strictly inside (0, 1), and
  every token's probability is exact to about 1e-7.
"""

from typing import NamedTuple

import torch

from nanovllm.kernels.backend import device_num_sms, tl, triton, use_triton

_MASK_64 = (1 << 64) - 1

# ---------------------------------------------------------------- torch reference


def gumbel_argmax_torch(
    logits: torch.Tensor,  # [B, V], any float dtype
    inv_temperature: torch.Tensor | None,  # [B] fp32; None: 1
    seeds: torch.Tensor,  # [B] int64
    greedy: torch.Tensor | None = None,  # [B] bool; None: no greedy row
) -> torch.Tensor:  # [B] int64
    num_rows, vocab_size = logits.shape
    scores = logits.to(torch.float32, copy=True)
    if inv_temperature is not None:
        scores.mul_(inv_temperature.to(torch.float32)[:, None])
    # One generator per row, seeded with the row's seed: a row's noise depends on its seed only.
    gen = torch.Generator()
    tiny = 2.0**-24
    noise = torch.empty(num_rows, vocab_size)
    for row, seed in enumerate(seeds.tolist()):
        gen.manual_seed(seed & _MASK_64)
        noise[row] = torch.rand(vocab_size, generator=gen).clamp_(tiny, 1 - tiny).log_().neg_().log_().neg_()
    scores += noise.to(scores.device)
    if greedy is not None:
        scores = torch.where(greedy[:, None], logits.to(torch.float32), scores)
    return scores.argmax(dim=-1)


# ---------------------------------------------------------------- Triton kernels

# Scores are kept in log2 units (score * log2(e)), so the noise is -log2(-log2(u)): with u in
# [2^-24, 1 - 2^-24] it lies in [-log2(24), -log2(2^-24 * log2(e))] = [-4.59, 23.47]. A token whose
# scaled logit is more than this spread (plus a margin for rounding) below another token's can never
# win; a tile made only of such tokens is skipped without drawing its noise, which changes no result.
_NOISE_SPREAD = 29.0


@triton.jit
def _log2_approx(x, FAST_LOG: tl.constexpr):
    # The outer log of the Gumbel noise needs no accuracy near 1 (a few 1e-7 off in a score is
    # harmless), so the GPU uses the one-instruction approximation; the interpreter has no inline asm.
    if FAST_LOG:
        return tl.inline_asm_elementwise(
            "lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.log2(x)


@triton.jit
def _row_scale_and_greedy(
    inv_temperature_ptr,  # [num_rows] fp32
    greedy_ptr,  # [num_rows] uint8 (bool)
    rows,  # [R] row indices
    row_ok,  # [R]
    HAS_TEMPERATURE: tl.constexpr,
    HAS_GREEDY: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    # ([R] fp32 the factor that puts a row's logits in log2 units: inv_temperature * log2(e), [R] greedy rows)
    if HAS_TEMPERATURE:
        scale = tl.load(inv_temperature_ptr + rows, mask=row_ok, other=1.0) * 1.4426950408889634
    else:
        scale = tl.full([BLOCK_ROWS], 1.4426950408889634, tl.float32)
    if HAS_GREEDY:
        greedy = tl.load(greedy_ptr + rows, mask=row_ok, other=0) != 0
    else:
        greedy = tl.zeros([BLOCK_ROWS], tl.int1)
    return scale, greedy


@triton.jit
def _gumbel_noise(seeds, counters, lanes, FAST_LOG: tl.constexpr):
    # seeds: [R, 1, 1] int64; counters: [R, 1, Q] int32; lanes: [1, 4, 1]. One Philox call gives four
    # 32-bit words, one for each lane. Returns [R, 4, Q] fp32.
    r0, r1, r2, r3 = tl.randint4x(seeds, counters)
    bits = tl.where(lanes == 0, r0, tl.where(lanes == 1, r1, tl.where(lanes == 2, r2, r3)))
    u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # [2^-24, 1 - 2^-24], all exact
    # The inner log must be accurate near u = 1, where -log2(u) is tiny: the accurate tl.log2.
    return -_log2_approx(-tl.log2(u), FAST_LOG)


# Arguments that change with the batch are not specialized on (Triton would compile a variant when one
# happens to be 1 or a multiple of 16: a ~1 s stall in the middle of serving).
@triton.jit(do_not_specialize=["num_rows", "cols_per_split", "num_splits"])
def _gumbel_argmax_split_kernel(
    logits_ptr,  # [num_rows, vocab_size], unit column stride
    row_stride,
    inv_temperature_ptr,  # [num_rows] fp32
    seeds_ptr,  # [num_rows] int64
    greedy_ptr,  # [num_rows] uint8 (bool)
    partial_max_ptr,  # [num_rows, num_splits] fp32: best score of each split
    partial_idx_ptr,  # [num_rows, num_splits] int64: its column
    num_rows,
    vocab_size,
    cols_per_split,  # a multiple of 4 * BLOCK_QUADS
    num_splits,
    HAS_TEMPERATURE: tl.constexpr,
    HAS_GREEDY: tl.constexpr,
    FAST_LOG: tl.constexpr,
    NOISE_SPREAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_QUADS: tl.constexpr,
):
    # Grid: (cdiv(num_rows, BLOCK_ROWS), num_splits). Each program scans columns
    # [split * cols_per_split, (split + 1) * cols_per_split) of BLOCK_ROWS rows (1 for a real
    # vocabulary; several for a small one) in tiles of 4 lanes x BLOCK_QUADS columns: column
    # tile_start + lane * BLOCK_QUADS + q takes word `lane` of Philox counter tile_start / 4 + q.
    # Lanes are BLOCK_QUADS apart rather than adjacent so that the compiler spreads threads along q
    # and keeps a thread's four lanes (one Philox call) in its own registers, whatever the alignment.
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [R]
    row_ok = rows < num_rows
    seeds = tl.load(seeds_ptr + rows, mask=row_ok, other=0)[:, None, None]  # [R, 1, 1]
    scale, greedy = _row_scale_and_greedy(
        inv_temperature_ptr, greedy_ptr, rows, row_ok, HAS_TEMPERATURE, HAS_GREEDY, BLOCK_ROWS
    )
    scale = tl.where(greedy, 1.0, scale)[:, None, None]  # greedy: the logits themselves, exactly
    greedy_3d = greedy[:, None, None]
    row_ptrs = logits_ptr + rows.to(tl.int64)[:, None, None] * row_stride  # [R, 1, 1]

    lanes = tl.arange(0, 4)[None, :, None]  # [1, 4, 1]
    quads = tl.arange(0, BLOCK_QUADS)[None, None, :]  # [1, 1, Q]
    start = split * cols_per_split
    end = tl.minimum(start + cols_per_split, vocab_size)
    # Per (row, q) best score over the columns seen so far and the first column with it (the four lanes
    # of a tile are reduced in registers first; strict > keeps the earlier tile's column on ties).
    # Until a finite score comes, the column is the split's first of that q: an all -inf row gives
    # its first column.
    best = tl.full([BLOCK_ROWS, BLOCK_QUADS], float("-inf"), tl.float32)
    best_col = tl.broadcast_to(start + tl.arange(0, BLOCK_QUADS)[None, :], [BLOCK_ROWS, BLOCK_QUADS])
    top_logit = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)  # largest scaled logit so far
    for tile_offset in range(0, end - start, 4 * BLOCK_QUADS):
        # A tile never crosses its split's end (cols_per_split is whole tiles), so the vocabulary is the only
        # column bound; with it and the tile's alignment stated (on a sum: a hint on the loop variable itself
        # is lost), a thread loads its 8 columns of a lane in 16-byte loads, not one element at a time.
        tile_start = tl.multiple_of(start + tile_offset, 4 * BLOCK_QUADS)
        cols = tile_start + lanes * BLOCK_QUADS + quads  # [1, 4, Q]
        mask = row_ok[:, None, None] & (cols < vocab_size)
        x = tl.load(row_ptrs + cols, mask=mask, other=float("-inf")).to(tl.float32) * scale  # [R, 4, Q]
        tile_top = tl.max(tl.max(x, axis=1), axis=1)  # [R]
        draw = (tile_top > top_logit - NOISE_SPREAD) & ~greedy  # random rows that can win here
        top_logit = tl.maximum(top_logit, tile_top)
        draw_3d = draw[:, None, None]
        if tl.max(draw.to(tl.int32), axis=0) != 0:
            counters = tl.broadcast_to(tile_start // 4 + quads, [BLOCK_ROWS, 1, BLOCK_QUADS])
            x = tl.where(draw_3d, x + _gumbel_noise(seeds, counters, lanes, FAST_LOG), x)
        x = tl.where(greedy_3d | draw_3d, x, float("-inf"))
        tile_best = tl.max(x, axis=1)  # [R, Q]
        tile_col = tl.min(tl.where(x == tile_best[:, None, :], cols, 2147483647), axis=1)  # [R, Q]
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_col = tl.where(better, tile_col, best_col)

    row_best = tl.max(best, axis=1)  # [R]
    ties = tl.where(best == row_best[:, None], best_col, 2147483647)
    row_col = tl.min(ties, axis=1)  # [R]: the first column with the best score
    out = rows.to(tl.int64) * num_splits + split
    tl.store(partial_max_ptr + out, row_best, mask=row_ok)
    tl.store(partial_idx_ptr + out, row_col.to(tl.int64), mask=row_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _gumbel_argmax_reduce_kernel(
    partial_max_ptr,  # [num_rows, num_splits] fp32
    partial_idx_ptr,  # [num_rows, num_splits] int64
    out_ptr,  # [num_rows] int64
    num_splits,
    SPLITS_P2: tl.constexpr,  # >= num_splits, a power of two fixed by the vocabulary (one compile)
):
    # Grid: (num_rows,). Splits are in column order, so the first split with the best score holds
    # the first column with it.
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, SPLITS_P2)
    valid = splits < num_splits
    scores = tl.load(partial_max_ptr + row * num_splits + splits, mask=valid, other=float("-inf"))
    cols = tl.load(partial_idx_ptr + row * num_splits + splits, mask=valid, other=9223372036854775807)
    best = tl.max(scores, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(scores == best, cols, 9223372036854775807), axis=0))


# ---------------------------------------------------------------- launcher

# Launch shape, chosen by reasoning (the kernel was first compiled offline for sm_90). A tile is 4 x 1024 =
# 4096 columns; with 4 warps each thread holds 8 adjacent columns of each lane, read in 16-byte loads when
# the row stride and the vocabulary are multiples of 16, and makes 8 Philox calls per tile. At most 128
# registers (SAMPLING_MAX_REGISTERS), so 4 programs fit on an SM. In SASS a tile that draws noise costs ~64
# instructions per logit (Philox ~25, the accurate inner log ~20), one that is skipped ~11: compute-bound
# where rows are flat, memory-bound where they are peaked (on an H100 at batch 256 and temperature 0.6 the
# 16-byte loads changed nothing: ~0.115 ms a step either way). So the grid wants every SM busy: enough
# splits of the vocabulary to give each SM SAMPLING_PROGRAMS_PER_SM programs (B=256: 3 splits; B=1: one
# tile per split).
SAMPLING_BLOCK_QUADS = 1024
SAMPLING_NUM_WARPS = 4
SAMPLING_PROGRAMS_PER_SM = 4
# 4 programs of 128 threads per SM need <= 128 registers a thread. Left to itself ptxas takes 141-149 for the
# variants without greedy rows (the common ones) and 109-117 with; capped, it fits all in 109-122 with no
# spills (a CPU test compiles every variant for sm_90 and checks).
SAMPLING_MAX_REGISTERS = 128
SAMPLING_TILE_ELEMENTS = 4 * SAMPLING_BLOCK_QUADS  # a small vocabulary packs rows into a tile this big


def _block_quads(vocab_size: int) -> int:
    # Quads per tile, a function of the vocabulary size only: it fixes which Philox word each column
    # takes, so it must not depend on the batch.
    return min(SAMPLING_BLOCK_QUADS, triton.next_power_of_2(-(-vocab_size // 4)))


def _check_args(
    logits: torch.Tensor,
    inv_temperature: torch.Tensor | None,
    seeds: torch.Tensor,
    greedy: torch.Tensor | None,
) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float [B, V] tensor, got {logits.dtype} {tuple(logits.shape)}")
    num_rows, vocab_size = logits.shape
    if vocab_size == 0:
        raise ValueError("logits must have at least one column")
    for name, t, dtype in (
        ("inv_temperature", inv_temperature, torch.float32),
        ("seeds", seeds, torch.int64),
        ("greedy", greedy, torch.bool),
    ):
        if t is not None and (t.shape != (num_rows,) or t.dtype != dtype or t.device != logits.device):
            raise ValueError(
                f"{name} must be a [{num_rows}] {dtype} tensor on {logits.device}, "
                f"got {t.dtype} {tuple(t.shape)} on {t.device}"
            )


class LaunchPlan(NamedTuple):
    """How a sampling launch cuts its [B, V] logits: a function of the vocabulary size and the batch only."""

    block_quads: int  # a tile is 4 x block_quads columns (`_block_quads`)
    block_rows: int  # rows a program takes: 1 for a vocabulary of more than one tile
    num_row_blocks: int
    num_tiles: int
    tiles_per_split: int
    num_splits: int  # column ranges per row, none of them empty


def _prepared_args(
    logits: torch.Tensor,  # [B, V]
    inv_temperature: torch.Tensor | None,  # [B]
    seeds: torch.Tensor,  # [B]
    greedy: torch.Tensor | None,  # [B]
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """The arguments checked (`_check_args`) and in the layouts the kernels read: unit column stride, the rest
    contiguous."""
    _check_args(logits, inv_temperature, seeds, greedy)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    inv_temperature = inv_temperature.contiguous() if inv_temperature is not None else None
    greedy = greedy.contiguous() if greedy is not None else None
    return logits, inv_temperature, seeds.contiguous(), greedy


def _launch_plan(logits: torch.Tensor, num_splits: int | None) -> LaunchPlan:
    """The launch shape for logits [B, V] (B > 0); num_splits None: enough programs to fill the GPU."""
    num_rows, vocab_size = logits.shape
    block_quads = _block_quads(vocab_size)
    block_cols = 4 * block_quads
    block_rows = min(max(SAMPLING_TILE_ELEMENTS // block_cols, 1), triton.next_power_of_2(num_rows))
    num_row_blocks = -(-num_rows // block_rows)
    num_tiles = -(-vocab_size // block_cols)
    if num_splits is None:
        num_sms = device_num_sms(logits.device.index or 0) if logits.is_cuda else 132
        num_splits = -(-SAMPLING_PROGRAMS_PER_SM * num_sms // num_row_blocks)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    tiles_per_split = -(-num_tiles // min(num_splits, num_tiles))
    num_splits = -(-num_tiles // tiles_per_split)  # no empty split
    return LaunchPlan(block_quads, block_rows, num_row_blocks, num_tiles, tiles_per_split, num_splits)


def gumbel_argmax_triton(
    logits: torch.Tensor,  # [B, V], any float dtype, any row stride
    inv_temperature: torch.Tensor | None,  # [B] fp32; None: 1
    seeds: torch.Tensor,  # [B] int64
    greedy: torch.Tensor | None = None,  # [B] bool; None: no greedy row
    num_splits: int | None = None,  # column ranges per row; None: enough to fill the GPU
) -> torch.Tensor:  # [B] int64
    logits, inv_temperature, seeds, greedy = _prepared_args(logits, inv_temperature, seeds, greedy)
    num_rows, vocab_size = logits.shape
    if num_rows == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    block_quads, block_rows, num_row_blocks, num_tiles, tiles_per_split, num_splits = _launch_plan(
        logits, num_splits
    )
    block_cols = 4 * block_quads

    partial_max = torch.empty(num_rows, num_splits, dtype=torch.float32, device=logits.device)
    partial_idx = torch.empty(num_rows, num_splits, dtype=torch.int64, device=logits.device)
    _gumbel_argmax_split_kernel[(num_row_blocks, num_splits)](
        logits,
        logits.stride(0),
        inv_temperature if inv_temperature is not None else seeds,  # unread without HAS_TEMPERATURE
        seeds,
        greedy.view(torch.uint8) if greedy is not None else seeds,  # unread without HAS_GREEDY
        partial_max,
        partial_idx,
        num_rows,
        vocab_size,
        tiles_per_split * block_cols,
        num_splits,
        HAS_TEMPERATURE=inv_temperature is not None,
        HAS_GREEDY=greedy is not None,
        FAST_LOG=logits.is_cuda,
        NOISE_SPREAD=_NOISE_SPREAD,
        BLOCK_ROWS=block_rows,
        BLOCK_QUADS=block_quads,
        num_warps=SAMPLING_NUM_WARPS,
        maxnreg=SAMPLING_MAX_REGISTERS,
    )
    if num_splits == 1:
        return partial_idx.view(num_rows)
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    _gumbel_argmax_reduce_kernel[(num_rows,)](
        partial_max, partial_idx, out, num_splits, SPLITS_P2=triton.next_power_of_2(num_tiles)
    )
    return out


# ---------------------------------------------------------------- op


def gumbel_argmax(
    logits: torch.Tensor,  # [B, V], any float dtype (bf16 typical), any row stride
    inv_temperature: torch.Tensor | None,  # [B] fp32 > 0; None: 1
    seeds: torch.Tensor,  # [B] int64
    greedy: torch.Tensor | None = None,  # [B] bool; None: no greedy row
) -> torch.Tensor:  # [B] int64
    """One token per row: a sample from softmax(logits * inv_temperature) drawn with the noise of the
    row's seed (Gumbel-max), or on greedy rows argmax(logits). Never writes its inputs."""
    if use_triton(logits):
        return gumbel_argmax_triton(logits, inv_temperature, seeds, greedy)
    _check_args(logits, inv_temperature, seeds, greedy)
    return gumbel_argmax_torch(logits, inv_temperature, seeds, greedy)
