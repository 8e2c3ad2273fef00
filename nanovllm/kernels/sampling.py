"""Gumbel-max sampling: one token per row, drawn from softmax(logits * inv_temperature), in one read of the
logits plus one tile.

With g_i independent standard Gumbel noise (g = -log(-log(u)), u uniform in (0, 1)),
argmax_i(logit_i * inv_temperature + g_i) is an exact sample from softmax(logit * inv_temperature):
the Gumbel-max trick. So no softmax, no normalisation and no fp32 copy of the [B, V] logits is ever
materialised. The torch reference does exactly that, with one noise value per logit.

The Triton kernels draw the same distribution in two levels, so that they need one random number per tile
of 4,096 columns instead of one per logit (Philox and two logs cost ~50 instructions a value; on flat logits
per-logit noise made the pass compute-bound, 0.113 ms at batch 256 on an H200, 2.5x what the two levels take):
- Which tile: tile t is drawn with probability exp(L_t) / sum_s exp(L_s), L_t the log-sum-exp of its scaled
  logits, as the argmax of L_t + g_t (one Gumbel value per tile). The split kernel scans the vocabulary.
- Which column of it: softmax restricted to the chosen tile, the argmax of x_i + g_i over its columns (noise
  from an independent stream). The draw kernel reads that one tile again.
P(tile) * P(column | tile) = exp(x_i) / sum exp(x): exactly softmax, up to fp32 rounding.

- Filtered tokens (-inf logits) stay -inf and are never drawn (a row that is all -inf gives token 0,
  as torch.argmax does).
- Greedy rows get no noise and no scaling: plain argmax, ties to the smallest index, exactly
  torch.argmax.
- A row's token is a function of its seed, logits and temperature only: not of the rest of the batch, nor of
  how the launch splits it. The Triton kernels and the torch reference use different random streams (Philox
  in the kernels, torch's generator in the reference): same distribution, different draws; greedy rows agree
  exactly.
- u = (k + 1/2) / 2^23 for a 23-bit k, so u lies in [2^-24, 1 - 2^-24]: strictly inside (0, 1), and
  every token's probability is exact to about 1e-7.
"""

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


# The within-tile draw's Philox key is the row's seed XOR this odd 64-bit constant (0x9E3779B97F4A7C15, the
# golden-ratio constant, as a signed int64), so its noise is independent of the tile choice's (key = seed).
DRAW_KEY_XOR = -0x61C8864680B583EB


# Arguments that change with the batch are not specialized on (Triton would compile a variant when one
# happens to be 1 or a multiple of 16: a ~1 s stall in the middle of serving).
@triton.jit(do_not_specialize=["num_rows", "cols_per_split", "num_splits"])
def _tile_choice_split_kernel(
    logits_ptr,  # [num_rows, vocab_size], unit column stride
    row_stride,
    inv_temperature_ptr,  # [num_rows] fp32
    seeds_ptr,  # [num_rows] int64
    greedy_ptr,  # [num_rows] uint8 (bool)
    partial_score_ptr,  # [num_rows, num_splits] fp32: random rows: best L_t + g_t; greedy: best logit
    partial_col_ptr,  # [num_rows, num_splits] int32: random rows: that tile's first column; greedy: argmax
    num_rows,
    vocab_size,
    cols_per_split,  # a multiple of 4 * BLOCK_QUADS
    num_splits,
    HAS_TEMPERATURE: tl.constexpr,
    HAS_GREEDY: tl.constexpr,
    FAST_LOG: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_QUADS: tl.constexpr,
):
    # Grid: (cdiv(num_rows, BLOCK_ROWS), num_splits). Each program scans the whole tiles of columns
    # [split * cols_per_split, (split + 1) * cols_per_split) of BLOCK_ROWS rows (1 for a vocabulary of more
    # than one tile; several for a small one) in tiles of 4 lanes x BLOCK_QUADS columns (column
    # tile_start + lane * BLOCK_QUADS + q). Lanes are BLOCK_QUADS apart rather than adjacent so that the
    # compiler spreads threads along q: each thread then holds adjacent columns of a lane, read in 16-byte
    # loads, and the four Philox words of one call in the draw kernel land in its own registers.
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [R]
    row_ok = rows < num_rows
    seeds = tl.load(seeds_ptr + rows, mask=row_ok, other=0)  # [R] int64
    scale, greedy = _row_scale_and_greedy(
        inv_temperature_ptr, greedy_ptr, rows, row_ok, HAS_TEMPERATURE, HAS_GREEDY, BLOCK_ROWS
    )
    scale = tl.where(greedy, 1.0, scale)[:, None, None]  # greedy: the logits themselves, exactly
    row_ptrs = logits_ptr + rows.to(tl.int64)[:, None, None] * row_stride  # [R, 1, 1]
    zeros = tl.zeros([BLOCK_ROWS], tl.int32)  # [R]: Philox word 0, and a broadcast helper

    lanes = tl.arange(0, 4)[None, :, None]  # [1, 4, 1]
    quads = tl.arange(0, BLOCK_QUADS)[None, None, :]  # [1, 1, Q]
    start = split * cols_per_split
    end = tl.minimum(start + cols_per_split, vocab_size)
    # Per row: the best score so far and its column (strict > keeps the earlier tile on ties). Until a finite
    # score comes, the split's first column: an all -inf row gives its first column.
    best = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    best_col = zeros + start
    for tile_offset in range(0, end - start, 4 * BLOCK_QUADS):
        # A tile never crosses its split's end (cols_per_split is whole tiles), so the vocabulary is the only
        # column bound; with it and the tile's alignment stated (on a sum: a hint on the loop variable itself
        # is lost), a thread loads its 8 columns of a lane in 16-byte loads, not one element at a time.
        tile_start = tl.multiple_of(start + tile_offset, 4 * BLOCK_QUADS)
        cols = tile_start + lanes * BLOCK_QUADS + quads  # [1, 4, Q]
        mask = row_ok[:, None, None] & (cols < vocab_size)
        x = tl.load(row_ptrs + cols, mask=mask, other=float("-inf")).to(tl.float32) * scale  # [R, 4, Q]
        tile_max = tl.max(tl.max(x, axis=2), axis=1)  # [R]
        # L_t = m + log2(sum 2^(x - m)); the sum is >= 1 (the max's own term). A tile that is all -inf gets
        # L_t = -inf, one with a +inf logit L_t = +inf, as the reference's argmax would treat them (shifting
        # by 0, not by an infinity, keeps NaN out). NaN logits are not supported (the model never makes them).
        finite = (tile_max != float("-inf")) & (tile_max != float("inf"))  # [R]
        shift = tl.where(finite, tile_max, 0.0)  # [R]
        total = tl.sum(tl.sum(tl.exp2(x - shift[:, None, None]), axis=2), axis=1)  # [R]
        lse = tl.where(finite, shift + tl.log2(tl.maximum(total, 1.0)), tile_max)  # [R]
        # One Gumbel value per (row, tile): word 0 of Philox counter = the tile's index, key = the seed.
        tile_noise = _gumbel_noise(seeds, zeros + tile_start // (4 * BLOCK_QUADS), zeros, FAST_LOG)  # [R]
        score = lse + tile_noise  # [R]
        col = zeros + tile_start  # [R]
        if HAS_GREEDY:  # greedy rows: the tile's first column with its largest logit
            at_max = tl.where(x == tile_max[:, None, None], cols, 2147483647)  # [R, 4, Q]: else int32 max
            first = tl.min(tl.min(at_max, axis=2), axis=1)  # [R]
            score = tl.where(greedy, tile_max, score)
            col = tl.where(greedy, first, col)
        better = score > best
        best = tl.where(better, score, best)
        best_col = tl.where(better, col, best_col)

    out = rows * num_splits + split
    tl.store(partial_score_ptr + out, best, mask=row_ok)
    tl.store(partial_col_ptr + out, best_col, mask=row_ok)


@triton.jit(do_not_specialize=["num_rows", "num_splits"])
def _tile_draw_kernel(
    logits_ptr,  # [num_rows, vocab_size], unit column stride
    row_stride,
    inv_temperature_ptr,  # [num_rows] fp32
    seeds_ptr,  # [num_rows] int64
    greedy_ptr,  # [num_rows] uint8 (bool)
    partial_score_ptr,  # [num_rows, num_splits] fp32
    partial_col_ptr,  # [num_rows, num_splits] int32
    out_ptr,  # [num_rows] int64
    num_rows,
    vocab_size,
    num_splits,
    HAS_TEMPERATURE: tl.constexpr,
    HAS_GREEDY: tl.constexpr,
    FAST_LOG: tl.constexpr,
    DRAW_KEY_XOR: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,  # the split kernel's: 1 for a vocabulary of more than one tile
    BLOCK_QUADS: tl.constexpr,
    SPLITS_P2: tl.constexpr,  # >= num_splits, a power of two fixed by the vocabulary (one compile)
):
    # Grid: (cdiv(num_rows, BLOCK_ROWS),): one program per row for a real vocabulary. Splits are in column
    # order, so the first split with the best score holds the earliest best tile (greedy: column).
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [R]
    row_ok = rows < num_rows
    splits = tl.arange(0, SPLITS_P2)[None, :]  # [1, S]
    partial = rows[:, None] * num_splits + splits  # [R, S]
    valid = row_ok[:, None] & (splits < num_splits)
    scores = tl.load(partial_score_ptr + partial, mask=valid, other=float("-inf"))  # [R, S]
    top = tl.max(scores, axis=1)  # [R]
    first_split = tl.min(tl.where(scores == top[:, None], splits, SPLITS_P2), axis=1)  # [R]
    chosen = tl.load(partial_col_ptr + rows * num_splits + first_split, mask=row_ok, other=0)  # [R] int32

    scale, greedy = _row_scale_and_greedy(
        inv_temperature_ptr, greedy_ptr, rows, row_ok, HAS_TEMPERATURE, HAS_GREEDY, BLOCK_ROWS
    )
    # The within-tile draw's key: the seed XOR a constant, a stream independent of the tile choice's.
    keys = (tl.load(seeds_ptr + rows, mask=row_ok, other=0) ^ DRAW_KEY_XOR)[:, None, None]  # [R, 1, 1]
    lanes = tl.arange(0, 4)[None, :, None]  # [1, 4, 1]
    quads = tl.arange(0, BLOCK_QUADS)[None, None, :]  # [1, 1, Q]
    first_col = chosen  # [R]: the chosen tile's first column
    if HAS_GREEDY:  # a greedy row's `chosen` is its token: it reads nothing below, and 0 keeps the hint
        first_col = tl.where(greedy, 0, chosen)
    tile_start = tl.multiple_of(first_col, 4 * BLOCK_QUADS)[:, None, None]  # [R, 1, 1]
    cols = tile_start + lanes * BLOCK_QUADS + quads  # [R, 4, Q]
    mask = (row_ok & ~greedy)[:, None, None] & (cols < vocab_size)  # greedy rows read nothing here
    row_ptrs = logits_ptr + rows.to(tl.int64)[:, None, None] * row_stride  # [R, 1, 1]
    x = tl.load(row_ptrs + cols, mask=mask, other=float("-inf")).to(tl.float32) * scale[:, None, None]
    # Per-column noise: column tile_start + lane * Q + q takes word `lane` of Philox counter
    # tile_start / 4 + q. -inf columns stay -inf: never drawn (an all -inf tile, only
    # chosen for an all -inf row, which gets tile 0, gives its first column: 0).
    x += _gumbel_noise(keys, tile_start // 4 + quads, lanes, FAST_LOG)  # [R, 4, Q]
    x_max = tl.max(tl.max(x, axis=2), axis=1)  # [R]
    drawn = tl.min(tl.min(tl.where(x == x_max[:, None, None], cols, 2147483647), axis=2), axis=1)  # [R]
    tl.store(out_ptr + rows, tl.where(greedy, chosen, drawn).to(tl.int64), mask=row_ok)


# ---------------------------------------------------------------- launcher

# Launch shape. A tile is 4 x 1024 = 4096 columns; with 4 warps each thread holds 8 adjacent columns of each
# lane, read in 16-byte loads when the row stride and the vocabulary are multiples of 16. The split kernel
# spends one exp2 and a few adds per logit (one Philox call per tile), so it is bound by reading the logits;
# the draw kernel reads one tile per row and draws its 4096 noise values. The split grid wants every SM busy:
# enough splits of the vocabulary to give each SM SAMPLING_PROGRAMS_PER_SM programs (B=256: 3 splits; B=1:
# one tile per split). Measured on an H200 (bf16, vocabulary 151,936, temperature 0.6, CUDA graph), both
# kernels together: 45.7 us at batch 256, 20.7 at 128, 6.0 at 1, flat or peaked logits alike; one pass of
# noise per logit (the kernel before) took 113.0, 57.6 and 5.2.
SAMPLING_BLOCK_QUADS = 1024
SAMPLING_NUM_WARPS = 4
SAMPLING_PROGRAMS_PER_SM = 4
# 4 programs of 128 threads per SM need <= 128 registers a thread (a CPU test compiles the kernels for sm_90
# and checks: no spills).
SAMPLING_MAX_REGISTERS = 128
SAMPLING_TILE_ELEMENTS = 4 * SAMPLING_BLOCK_QUADS  # a small vocabulary packs rows into a tile this big


def _block_quads(vocab_size: int) -> int:
    # Quads per tile, a function of the vocabulary size only: it fixes the tiles and which Philox word each
    # column takes, so it must not depend on the batch.
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


def gumbel_argmax_triton(
    logits: torch.Tensor,  # [B, V], any float dtype, any row stride
    inv_temperature: torch.Tensor | None,  # [B] fp32; None: 1
    seeds: torch.Tensor,  # [B] int64
    greedy: torch.Tensor | None = None,  # [B] bool; None: no greedy row
    num_splits: int | None = None,  # column ranges per row in the split kernel; None: enough to fill the GPU
) -> torch.Tensor:  # [B] int64
    """gumbel_argmax in two Triton kernels (the module docstring): a tile per row, then a column of it. The
    tokens do not depend on num_splits."""
    _check_args(logits, inv_temperature, seeds, greedy)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    num_rows, vocab_size = logits.shape
    if num_rows == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    inv_temperature = inv_temperature.contiguous() if inv_temperature is not None else None
    greedy = greedy.contiguous() if greedy is not None else None
    seeds = seeds.contiguous()

    block_quads = _block_quads(vocab_size)
    block_cols = 4 * block_quads
    block_rows = min(max(SAMPLING_TILE_ELEMENTS // block_cols, 1), triton.next_power_of_2(num_rows))
    num_row_blocks = -(-num_rows // block_rows)
    num_tiles = -(-vocab_size // block_cols)
    if num_splits is None:
        num_sms = device_num_sms(logits.device.index or 0) if logits.is_cuda else 132
        num_splits = -(-SAMPLING_PROGRAMS_PER_SM * num_sms // num_row_blocks)
    tiles_per_split = -(-num_tiles // min(num_splits, num_tiles))
    num_splits = -(-num_tiles // tiles_per_split)  # no empty split

    # per row and split: the best tile's L_t + g_t (greedy rows: the best logit) and its first column
    partial_score = torch.empty(num_rows, num_splits, dtype=torch.float32, device=logits.device)  # [B, S]
    partial_col = torch.empty(num_rows, num_splits, dtype=torch.int32, device=logits.device)  # [B, S]
    flags = dict(
        HAS_TEMPERATURE=inv_temperature is not None,
        HAS_GREEDY=greedy is not None,
        FAST_LOG=logits.is_cuda,
        BLOCK_ROWS=block_rows,
        BLOCK_QUADS=block_quads,
        num_warps=SAMPLING_NUM_WARPS,
        maxnreg=SAMPLING_MAX_REGISTERS,
    )
    row_args = (
        logits,
        logits.stride(0),
        inv_temperature if inv_temperature is not None else seeds,  # unread without HAS_TEMPERATURE
        seeds,
        greedy.view(torch.uint8) if greedy is not None else seeds,  # unread without HAS_GREEDY
        partial_score,
        partial_col,
    )
    _tile_choice_split_kernel[(num_row_blocks, num_splits)](
        *row_args, num_rows, vocab_size, tiles_per_split * block_cols, num_splits, **flags
    )
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    _tile_draw_kernel[(num_row_blocks,)](
        *row_args,
        out,
        num_rows,
        vocab_size,
        num_splits,
        DRAW_KEY_XOR=DRAW_KEY_XOR,
        SPLITS_P2=triton.next_power_of_2(num_tiles),
        **flags,
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
