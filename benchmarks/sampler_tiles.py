"""EXPERIMENTAL hierarchical ("two-level") Gumbel-max sampler, and its GPU timing against the engine's kernel.
Not used by the engine: nothing in nanovllm/ imports it.

    python benchmarks/sampler_tiles.py [--out DIR] [--batches 1,16,64,128,256]   # needs a CUDA GPU; without
                                                                                 # one it says so, exits 0

Why: on flat logits (the benchmark's random-weight model) the engine's `gumbel_argmax_triton` cannot skip
any tile, so it draws Philox noise for every logit (~64 instructions a logit; 0.113 ms a batch-256 step on
an H200 at vocabulary 151,936, where reading the bf16 logits takes ~0.018 ms). Gumbel-max works on any
partition of the columns into tiles: draw a tile with probability exp(L_t) / sum exp(L), L_t the tile's
log-sum-exp, by the argmax of L_t + g_t (one Gumbel value g_t per tile), then a column of that tile with
probability softmax restricted to the tile, by the argmax of x_i + g_i over its columns (noise of an
independent stream). The product is exactly softmax(logits * inv_temperature) (up to fp32 rounding), with
one random number per tile plus one tile of noise per row instead of one per column.

- Split phase (`_tile_choice_split_kernel`): each program takes whole tiles of a column range (the
  engine's tiles, 4 * _block_quads(vocab) columns, fixed by the vocabulary alone) and keeps per row the
  tile with the largest L_t + g_t (ties: the earlier tile), in log2 units as the engine works.
- Reduce phase (`_tile_draw_kernel`, always launched): picks the best split (ties: the earlier), loads the
  chosen tile and returns its first column with the largest x_i + g_i.
- Greedy rows: plain argmax with torch.argmax's ties (the split phase keeps each split's first maximum, the
  reduce phase takes the first split with the best), no noise. An all -inf row gives column 0.
- A row's token depends on its seed, logits and temperature only: not on the batch, nor on num_splits. The
  draws differ from the engine kernel's (other noise), the distribution is the same.

main() times both kernels on bf16 logits of 151,936 columns at several batches, flat (randn * 0.5) and peaked
(randn * 8), temperature 0.6, each call captured MIN_CALLS times in a CUDA graph (median of 5 replays; the
logits stay hot in L2 where they fit), checks that both draw the same distribution and that greedy rows
match torch.argmax, prints a table and writes sampler_tiles-<card>-<date>.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from nanovllm.benchmark.common import (  # noqa: E402
    DEFAULT_OUT_DIR,
    median_graph_us,
    print_table,
    run_info,
    write_report,
)
from nanovllm.kernels.backend import tl, triton  # noqa: E402
from nanovllm.kernels.sampling import (  # noqa: E402
    SAMPLING_MAX_REGISTERS,
    SAMPLING_NUM_WARPS,
    _block_quads,
    _gumbel_noise,
    _launch_plan,
    _prepared_args,
    _row_scale_and_greedy,
    gumbel_argmax_triton,
)

# The within-tile draw's Philox key is the row's seed XOR this odd 64-bit constant (0x9E3779B97F4A7C15, the
# golden-ratio constant, as a signed int64), so its noise is independent of the tile choice's (key = seed).
DRAW_KEY_XOR = -0x61C8864680B583EB

# ---------------------------------------------------------------- Triton kernels


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
    # than one tile; several for a small one). A tile is [4, BLOCK_QUADS] as in the engine's kernel (column
    # tile_start + lane * BLOCK_QUADS + q); here its layout only matters for the loads.
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
        # As in the engine's kernel: the alignment stated on a sum, the vocabulary the only column bound.
        tile_start = tl.multiple_of(start + tile_offset, 4 * BLOCK_QUADS)
        cols = tile_start + lanes * BLOCK_QUADS + quads  # [1, 4, Q]
        mask = row_ok[:, None, None] & (cols < vocab_size)
        x = tl.load(row_ptrs + cols, mask=mask, other=float("-inf")).to(tl.float32) * scale  # [R, 4, Q]
        tile_max = tl.max(tl.max(x, axis=2), axis=1)  # [R]
        # L_t = m + log2(sum 2^(x - m)); the sum is >= 1 (the max's own term) unless the tile is all -inf,
        # which gets L_t = -inf (shifting by 0, not by -inf, keeps NaN out).
        shift = tl.where(tile_max == float("-inf"), 0.0, tile_max)
        total = tl.sum(tl.sum(tl.exp2(x - shift[:, None, None]), axis=2), axis=1)  # [R]
        lse = tl.where(tile_max == float("-inf"), float("-inf"), shift + tl.log2(tl.maximum(total, 1.0)))
        # One Gumbel value per (row, tile): word 0 of Philox counter = the tile's index, key = the seed.
        tile_noise = _gumbel_noise(seeds, zeros + tile_start // (4 * BLOCK_QUADS), zeros, FAST_LOG)  # [R]
        score = lse + tile_noise
        col = zeros + tile_start
        if HAS_GREEDY:  # greedy rows: the tile's first column with its largest logit
            first = tl.min(tl.min(tl.where(x == tile_max[:, None, None], cols, 2147483647), axis=2), axis=1)
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
    tile_start = tl.multiple_of(chosen, 4 * BLOCK_QUADS)[:, None, None]  # [R, 1, 1] (greedy: unused)
    cols = tile_start + lanes * BLOCK_QUADS + quads  # [R, 4, Q]
    mask = (row_ok & ~greedy)[:, None, None] & (cols < vocab_size)  # greedy rows read nothing here
    row_ptrs = logits_ptr + rows.to(tl.int64)[:, None, None] * row_stride  # [R, 1, 1]
    x = tl.load(row_ptrs + cols, mask=mask, other=float("-inf")).to(tl.float32) * scale[:, None, None]
    # Per-column noise with the engine's mapping: column tile_start + lane * Q + q takes word `lane` of
    # Philox counter tile_start / 4 + q. -inf columns stay -inf: never drawn (an all -inf tile, only
    # chosen for an all -inf row, which gets tile 0, gives its first column: 0).
    x += _gumbel_noise(keys, tile_start // 4 + quads, lanes, FAST_LOG)  # [R, 4, Q]
    x_max = tl.max(tl.max(x, axis=2), axis=1)  # [R]
    drawn = tl.min(tl.min(tl.where(x == x_max[:, None, None], cols, 2147483647), axis=2), axis=1)  # [R]
    tl.store(out_ptr + rows, tl.where(greedy, chosen, drawn).to(tl.int64), mask=row_ok)


# ---------------------------------------------------------------- launcher


def tiled_gumbel_argmax_triton(
    logits: torch.Tensor,  # [B, V], any float dtype, any row stride
    inv_temperature: torch.Tensor | None,  # [B] fp32; None: 1
    seeds: torch.Tensor,  # [B] int64
    greedy: torch.Tensor | None = None,  # [B] bool; None: no greedy row
    num_splits: int | None = None,  # column ranges per row in the split phase; None: enough to fill the GPU
) -> torch.Tensor:  # [B] int64
    """One token per row, a sample from softmax(logits * inv_temperature) (greedy rows: argmax), drawn by a
    Gumbel-max over tiles and then within the chosen tile. Same arguments and checks as the engine's
    gumbel_argmax_triton, other draws."""
    logits, inv_temperature, seeds, greedy = _prepared_args(logits, inv_temperature, seeds, greedy)
    num_rows, vocab_size = logits.shape
    if num_rows == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    # the engine kernel's tiles and splits
    block_quads, block_rows, num_row_blocks, num_tiles, tiles_per_split, num_splits = _launch_plan(
        logits, num_splits
    )
    block_cols = 4 * block_quads

    partial_score = torch.empty(num_rows, num_splits, dtype=torch.float32, device=logits.device)
    partial_col = torch.empty(num_rows, num_splits, dtype=torch.int32, device=logits.device)
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


# ---------------------------------------------------------------- GPU benchmark

DEVICE = "cuda"  # (the checks run on any device)
VOCAB_SIZE = 151_936
TEMPERATURE = 0.6
MIN_CALLS = 20
DRAWS = 200_000  # rows of the distribution checks
# A count passes if within a Bernstein bound exceeded with probability < FAILURE_PROB (as tests/stats.py).
FAILURE_PROB = 1e-9


def seeds_for(num_rows: int, salt: int) -> torch.Tensor:  # [num_rows] int64 on the GPU
    gen = torch.Generator().manual_seed(salt)
    return torch.randint(-(2**62), 2**62, (num_rows,), generator=gen).to(DEVICE)


def timing_case(kind: str, batch: int) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(batch)
    std = {"flat": 0.5, "peaked": 8.0}[kind]
    # logits: [batch, VOCAB_SIZE] bf16
    logits = (torch.randn(batch, VOCAB_SIZE, generator=gen, device=DEVICE) * std).to(torch.bfloat16)
    inv_t = torch.full((batch,), 1 / TEMPERATURE, device=DEVICE)
    seeds = seeds_for(batch, salt=batch)
    engine_us = median_graph_us([lambda: gumbel_argmax_triton(logits, inv_t, seeds)], MIN_CALLS)
    tiled_us = median_graph_us([lambda: tiled_gumbel_argmax_triton(logits, inv_t, seeds)], MIN_CALLS)
    logit_bytes = logits.numel() * logits.element_size()
    return dict(
        logits=kind,
        batch=batch,
        engine_us=engine_us,
        tiled_us=tiled_us,
        speedup=engine_us / tiled_us,
        engine_gb_per_s=logit_bytes / engine_us / 1e3,
        tiled_gb_per_s=logit_bytes / tiled_us / 1e3,
    )


def bernstein_ratio(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """max over bins of |count - n p| / its Bernstein bound (<= 1: consistent with probs)."""
    n = counts.sum().item()
    a = math.log(2 / FAILURE_PROB)
    var = n * probs * (1 - probs)
    bound = a / 3 + torch.sqrt((a / 3) ** 2 + 2 * a * var)
    return ((counts - n * probs).abs() / bound).max().item()


def distribution_case(name: str, row: torch.Tensor, bins: torch.Tensor, num_bins: int) -> dict:
    """Both kernels on DRAWS copies of `row` ([VOCAB_SIZE] fp32, bf16-exact) with different seeds, their
    draws counted in bins (bins: [VOCAB_SIZE] int64, -1 for columns of probability 0) against the exact
    probabilities of the bins."""
    probs = torch.softmax(row.double().cpu() / TEMPERATURE, dim=0)  # [VOCAB_SIZE]
    cpu_bins = bins.cpu()
    bin_probs = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, cpu_bins.clamp(min=0), probs)
    logits = row.to(torch.bfloat16)[None].expand(DRAWS, -1)  # [DRAWS, VOCAB_SIZE], row stride 0
    inv_t = torch.full((DRAWS,), 1 / TEMPERATURE, device=DEVICE)
    out = dict(case=name, draws=DRAWS, bins=num_bins)
    freqs = {}
    for label, draw in (("engine", gumbel_argmax_triton), ("tiled", tiled_gumbel_argmax_triton)):
        tokens = draw(logits, inv_t, seeds_for(DRAWS, salt=len(label)))
        token_bins = bins[tokens]
        out[f"{label}_zero_probability_draws"] = (token_bins < 0).sum().item()
        counts = torch.bincount(token_bins.clamp(min=0), minlength=num_bins).double().cpu()
        freqs[label] = counts / DRAWS
        out[f"{label}_bernstein_ratio"] = bernstein_ratio(counts, bin_probs)
        out[f"{label}_max_freq_diff"] = (freqs[label] - bin_probs).abs().max().item()
    out["engine_vs_tiled_max_freq_diff"] = (freqs["engine"] - freqs["tiled"]).abs().max().item()
    out["ok"] = all(
        out[f"{k}_bernstein_ratio"] <= 1 and out[f"{k}_zero_probability_draws"] == 0 for k in freqs
    )
    return out


def distribution_checks() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    # 64 tokens spread over every tile of the vocabulary, the rest filtered: each token a bin.
    sparse = torch.full((VOCAB_SIZE,), float("-inf"))
    columns = torch.linspace(0, VOCAB_SIZE - 1, 64).long()
    sparse[columns] = (torch.randn(64, generator=gen) * 1.5).bfloat16().float()
    sparse_bins = torch.full((VOCAB_SIZE,), -1, dtype=torch.int64)
    sparse_bins[columns] = torch.arange(64)
    # Flat over the whole vocabulary, tiles of different masses (a slope along the columns): each tile a bin.
    cols = torch.arange(VOCAB_SIZE)
    flat = (torch.randn(VOCAB_SIZE, generator=gen) * 0.5 + cols / VOCAB_SIZE).bfloat16().float()
    tile_bins = cols // (4 * _block_quads(VOCAB_SIZE))
    return [
        distribution_case("64 tokens over all tiles", sparse.to(DEVICE), sparse_bins.to(DEVICE), 64),
        distribution_case("flat, by tile", flat.to(DEVICE), tile_bins.to(DEVICE), int(tile_bins[-1]) + 1),
    ]


def greedy_check() -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    logits = (torch.randn(256, VOCAB_SIZE, generator=gen, device=DEVICE) * 3).to(torch.bfloat16)
    logits[::3, 1::2] = float("-inf")
    logits[5] = float("-inf")  # all filtered: column 0
    logits[7, 100] = logits[7, VOCAB_SIZE - 1] = 40.0  # a tie across tiles: the first column
    inv_t = torch.full((256,), 1 / TEMPERATURE, device=DEVICE)
    greedy = torch.zeros(256, dtype=torch.bool, device=DEVICE)
    greedy[::2] = True
    greedy[[5, 7]] = True
    seeds = seeds_for(256, salt=1)
    expected = logits.argmax(dim=-1)
    engine = gumbel_argmax_triton(logits, inv_t, seeds, greedy)
    tiled = tiled_gumbel_argmax_triton(logits, inv_t, seeds, greedy)
    tiled_1 = tiled_gumbel_argmax_triton(logits, inv_t, seeds, greedy, num_splits=1)
    finite = torch.isfinite(logits[torch.arange(256, device=DEVICE), tiled].float())
    return dict(
        greedy_rows=int(greedy.sum()),
        engine_equal_argmax=torch.equal(engine[greedy], expected[greedy]),
        tiled_equal_argmax=torch.equal(tiled[greedy], expected[greedy]),
        tiled_same_with_one_split=torch.equal(tiled, tiled_1),
        tiled_random_rows_finite=bool(finite[~greedy].all()),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", str(DEFAULT_OUT_DIR)), help="folder for the JSON")
    p.add_argument("--batches", default="1,16,64,128,256")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sampler_tiles needs a CUDA GPU; nothing measured.")
        return 0
    batches = [int(b) for b in args.batches.split(",")]
    timings = [timing_case(kind, batch) for kind in ("flat", "peaked") for batch in batches]
    distributions = distribution_checks()
    greedy = greedy_check()
    report = {**run_info(), "args": vars(args), "vocab_size": VOCAB_SIZE, "temperature": TEMPERATURE}
    report |= dict(timings=timings, distributions=distributions, greedy=greedy)
    print_table(
        f"Gumbel-max sampling, bf16 logits [batch, {VOCAB_SIZE}], temperature {TEMPERATURE}: us per call "
        f"(CUDA graph, median); GB/s of logits read",
        ["logits", "batch", "engine us", "tiled us", "speedup", "engine GB/s", "tiled GB/s"],
        [
            [
                t["logits"],
                t["batch"],
                t["engine_us"],
                t["tiled_us"],
                t["speedup"],
                t["engine_gb_per_s"],
                t["tiled_gb_per_s"],
            ]
            for t in timings
        ],  # fmt: skip
    )
    print_table(
        f"distribution over {DRAWS} draws (Bernstein ratio <= 1: consistent with the exact probabilities)",
        ["case", "bins", "engine ratio", "tiled ratio", "engine-tiled max |freq diff|", "ok"],
        [
            [
                d["case"],
                d["bins"],
                d["engine_bernstein_ratio"],
                d["tiled_bernstein_ratio"],
                d["engine_vs_tiled_max_freq_diff"],
                str(d["ok"]),
            ]
            for d in distributions
        ],  # fmt: skip
    )
    print(f"\ngreedy: {greedy}")
    path = write_report("sampler_tiles", report, args.out)
    print(f"\n{report['card']}  {report['date']}  commit {report.get('git_commit')}  -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
