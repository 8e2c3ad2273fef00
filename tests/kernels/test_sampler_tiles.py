"""benchmarks/sampler_tiles.py (an experimental two-level Gumbel-max sampler, not used by the engine) in the
Triton interpreter on the CPU: greedy rows are torch.argmax, a random row's token is exactly the argmax its
own noise gives (a tile by L_t + g_t, then a column of it by x_i + g_i), it depends on the seed only (not on
the batch nor on num_splits), filtered columns are never drawn, and draws follow softmax, at the tile level
included; compiled for sm_90 it fits 128 registers without spills.

Distribution checks use tests/stats.py's Bernstein bound, exceeded by a correct sampler with probability
< 1e-9 per token; seeds are fixed, so runs are deterministic.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import triton
import triton.language as tl

from nanovllm.kernels.sampling import _gumbel_noise
from tests.kernels.test_sampling_kernel import LOG2E, LOGITS, seeds_for, softmax
from tests.scripts import ROOT, load_script
from tests.sm90 import compile_sm90
from tests.stats import assert_matches

SCRIPT = "benchmarks/sampler_tiles.py"
TILE = 4096  # columns of a tile for any vocabulary of more than 4096


@pytest.fixture(scope="module")
def tiles():
    return load_script(SCRIPT)


# ---------------------------------------------------------------- the kernels' own noise


@triton.jit
def _philox_noise_kernel(keys_ptr, out_ptr, num_counters, BLOCK: tl.constexpr):
    # Grid: (num_rows,). out: [num_rows, num_counters, 4] fp32, the Gumbel noise (log2 units) of word `lane`
    # of Philox counter c under the row's key, as _gumbel_noise draws it.
    row = tl.program_id(0)
    key = tl.load(keys_ptr + row + tl.zeros([1, 1], tl.int32))  # [1, 1]
    counters = tl.arange(0, BLOCK)[:, None]  # [C, 1]
    lanes = tl.arange(0, 4)[None, :]  # [1, 4]
    noise = _gumbel_noise(key, counters + tl.zeros([1, 4], tl.int32), lanes, False)  # [C, 4]
    tl.store(out_ptr + row * num_counters * 4 + counters * 4 + lanes, noise, mask=counters < num_counters)


def philox_noise(keys: torch.Tensor, num_counters: int) -> torch.Tensor:
    """[B, num_counters, 4] fp32: the noise of each (counter, word) under each row's key."""
    out = torch.empty(len(keys), num_counters, 4)
    _philox_noise_kernel[(len(keys),)](keys, out, num_counters, BLOCK=triton.next_power_of_2(num_counters))
    return out


def expected_tokens(tiles, logits: torch.Tensor, inv_temperature: torch.Tensor, seeds: torch.Tensor):
    """(tokens, gaps): for random rows of a vocabulary of TILE-column tiles, the first argmax of L_t + g_t
    (L_t in float64) and then the first argmax of x_i + g_i over that tile; gaps: the margin of each
    row's tile choice (a smaller one than fp32 rounding could flip it)."""
    num_rows, vocab_size = logits.shape
    num_tiles = -(-vocab_size // TILE)
    scores = torch.full((num_rows, num_tiles * TILE), float("-inf"), dtype=torch.float64)
    scores[:, :vocab_size] = logits.double() * (inv_temperature.double() * LOG2E)[:, None]
    per_tile = scores.view(num_rows, num_tiles, TILE)
    top = per_tile.amax(dim=2, keepdim=True).clamp(min=-1e300)  # (all -inf tiles: no NaN)
    lse = top.squeeze(2) + torch.exp2(per_tile - top).sum(dim=2).log2()  # [B, T]
    tile_score = lse + philox_noise(seeds, num_tiles)[:, :, 0].double()  # key = seed, counter = tile
    ranked = tile_score.sort(dim=1, descending=True).values
    gaps = ranked[:, 0] - ranked[:, 1] if num_tiles > 1 else torch.full((num_rows,), math.inf)
    tile = tile_score.argmax(dim=1)  # [B]
    # Column tile_start + lane * 1024 + q takes word `lane` of counter tile_start / 4 + q, key = seed ^ C.
    offsets = torch.arange(TILE)
    counters = (tile * TILE // 4)[:, None] + offsets % 1024  # [B, TILE]
    noise = philox_noise(seeds ^ tiles.DRAW_KEY_XOR, num_tiles * TILE // 4)  # [B, counters, 4]
    tile_noise = noise[torch.arange(num_rows)[:, None], counters, offsets // 1024]  # [B, TILE]
    in_tile = per_tile[torch.arange(num_rows), tile] + tile_noise.double()  # [B, TILE]
    return tile * TILE + in_tile.argmax(dim=1), gaps


# ---------------------------------------------------------------- exactness


def greedy_case(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    wide = (torch.randn(6, 5003 + 45, generator=gen) * 3).to(dtype)
    logits = wide[:, :5003]  # 5003: two tiles, the last ragged; a row stride that is not the row length
    logits[:, 1::3] = float("-inf")
    logits[1, 4100] = logits[1, 17] = logits[1].max() + 1  # tie across tiles: the first column wins
    logits[2] = float("-inf")  # all filtered: column 0, as torch.argmax
    logits[3, 5002] = logits[3].max() + 1  # the very last column
    logits[4, 7] = logits[4, 9] = logits[4].max() + 1  # tie within a tile
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_rows_are_torch_argmax(tiles, dtype):
    logits = greedy_case(dtype)
    assert logits.stride(0) != logits.shape[1]
    expected = logits.argmax(dim=-1)
    assert expected[1] == 17 and expected[2] == 0 and expected[3] == 5002 and expected[4] == 7
    seeds = seeds_for(6)
    greedy = torch.ones(6, dtype=torch.bool)
    for num_splits in (None, 1):
        assert torch.equal(
            tiles.tiled_gumbel_argmax_triton(logits, None, seeds, greedy, num_splits), expected
        )
    # Mixed with random rows (and a temperature): the greedy rows still get no noise and no scaling.
    greedy[::2] = False
    inv_t = torch.full((6,), 3.0)
    tokens = tiles.tiled_gumbel_argmax_triton(logits, inv_t, seeds, greedy)
    assert torch.equal(tokens[greedy], expected[greedy])
    assert tokens[2] == 0  # a random row that is all -inf: column 0 too


def multi_tile_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    vocab_size = 3 * TILE + 77  # four tiles, the last ragged
    wide = torch.zeros(8, vocab_size + 50)
    wide[:, :vocab_size] = torch.randn(8, vocab_size, generator=gen) * 0.5  # flat: every tile in play
    logits = wide[:, :vocab_size]  # a row stride that is not the row length
    logits[0, 5] = 40.0  # far ahead in the first tile
    logits[1, vocab_size - 3] = 40.0  # ... in the last tile
    logits[2, 100:TILE] = float("-inf")  # the first tile nearly empty
    logits[3, ::2] = float("-inf")  # half the columns filtered
    logits[4] = float("-inf")  # all filtered: column 0
    logits[5, TILE : 2 * TILE] = float("-inf")  # an all -inf tile between finite ones
    logits[6, 2 * TILE :] += 3.0  # the last two tiles heavier
    inv_t = torch.tensor([1.0, 1.7, 0.5, 1.0, 1.0, 0.9, 2.0, 1 / 0.6])
    return logits, inv_t, seeds_for(8, salt=1)


def test_random_rows_are_the_exact_two_level_argmax_of_their_noise(tiles):
    logits, inv_t, seeds = multi_tile_case()
    tokens = tiles.tiled_gumbel_argmax_triton(logits, inv_t, seeds)
    expected, gaps = expected_tokens(tiles, logits, inv_t, seeds)
    clear = gaps > 1e-3  # no tile choice within rounding of a tie (row 4: all -inf, no choice)
    assert clear[:4].all() and clear[5:].all(), gaps
    assert torch.equal(tokens, expected), (tokens, expected)
    assert tokens[0] == 5 and tokens[1] == logits.shape[1] - 3 and tokens[4] == 0
    finite = torch.isfinite(logits[torch.arange(8), tokens])
    assert finite[:4].all() and finite[5:].all()  # filtered columns are never drawn
    assert not TILE <= tokens[5] < 2 * TILE


def test_same_seed_same_token_whatever_the_batch_and_splits(tiles):
    logits, inv_t, seeds = multi_tile_case()
    tokens = tiles.tiled_gumbel_argmax_triton(logits, inv_t, seeds)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(
        tiles.tiled_gumbel_argmax_triton(logits[order], inv_t[order], seeds[order]), tokens[order]
    )
    assert torch.equal(tiles.tiled_gumbel_argmax_triton(logits[5:7], inv_t[5:7], seeds[5:7]), tokens[5:7])
    for num_splits in (1, 2):
        assert torch.equal(
            tiles.tiled_gumbel_argmax_triton(logits, inv_t, seeds, num_splits=num_splits), tokens
        )
    # One tile (rows packed into a program): the same, whatever the batch.
    small = logits[:, :1500].clone()
    small_tokens = tiles.tiled_gumbel_argmax_triton(small, inv_t, seeds)
    assert torch.equal(
        tiles.tiled_gumbel_argmax_triton(small[order], inv_t[order], seeds[order]), small_tokens[order]
    )
    assert torch.equal(
        tiles.tiled_gumbel_argmax_triton(small[3:4], inv_t[3:4], seeds[3:4]), small_tokens[3:4]
    )
    # Different seeds on identical rows: different tokens, mostly.
    spread = tiles.tiled_gumbel_argmax_triton(small[6:7].expand(48, -1), None, seeds_for(48, salt=5))
    assert len(set(spread.tolist())) > 30


def test_argument_checks(tiles):
    logits = torch.zeros(3, 10)
    with pytest.raises(ValueError, match="seeds must be a \\[3\\] torch.int64"):
        tiles.tiled_gumbel_argmax_triton(logits, None, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="num_splits"):
        tiles.tiled_gumbel_argmax_triton(logits, None, torch.zeros(3, dtype=torch.int64), num_splits=0)
    assert tiles.tiled_gumbel_argmax_triton(
        torch.zeros(0, 10), None, torch.zeros(0, dtype=torch.int64)
    ).shape == (0,)


# ---------------------------------------------------------------- distributions


@pytest.mark.parametrize("inv_temperature", [1.0, 0.6])
def test_distribution_matches_softmax(tiles, inv_temperature):
    num_rows = 20_000
    logits = torch.tensor([LOGITS]).expand(num_rows, -1)  # row stride 0
    greedy = torch.zeros(num_rows, dtype=torch.bool)
    greedy[::10] = True
    inv_t = torch.full((num_rows,), inv_temperature)
    tokens = tiles.tiled_gumbel_argmax_triton(logits, inv_t, seeds_for(num_rows, salt=7), greedy)
    assert (tokens[greedy] == LOGITS.index(max(LOGITS))).all()
    assert_matches(tokens[~greedy], softmax(LOGITS, inv_temperature))


def test_tiles_are_drawn_with_their_mass(tiles):
    # Two real tiles of about equal mass: one strong column in the first (the rest filtered), 4,076 flat and
    # weaker ones in the second (ragged, a few filtered). Choosing a tile by its largest logit would take the
    # first almost always, a natural log in place of log2 in L_t 9 times in 10; the fraction drawn in each
    # tile must be its exact softmax mass.
    num_rows, vocab_size = 150, 2 * TILE - 20
    gen = torch.Generator().manual_seed(3)
    row = torch.full((vocab_size,), float("-inf"))
    row[2000] = 5.0
    row[TILE:] = torch.randn(vocab_size - TILE, generator=gen) * 0.2
    row[TILE + 5 :: 50] = float("-inf")
    row = row.bfloat16().float()  # what the kernel reads, exactly
    probs = torch.softmax(row.double() / 0.6, dim=0)
    mass = [probs[:TILE].sum().item(), probs[TILE:].sum().item()]
    assert 0.45 < mass[1] < 0.55, mass
    logits = row.bfloat16()[None].expand(num_rows, -1)
    inv_t = torch.full((num_rows,), 1 / 0.6)
    tokens = tiles.tiled_gumbel_argmax_triton(logits, inv_t, seeds_for(num_rows, 9))
    assert torch.isfinite(row[tokens]).all()
    assert_matches((tokens >= TILE).long(), mass)


def test_many_small_tiles_draw_softmax(tiles, monkeypatch):
    # Tiles of 16 columns (the launcher asks _block_quads; this test alone shrinks it) make a 44-column
    # vocabulary three tiles of many packed rows, so 20,000 rows run fast in the interpreter and the
    # per-token counts test both levels: which tile, then which column of it. The tiles' maxima rank them
    # otherwise than their masses: a few strong columns, sixteen medium ones, two (the last tile, ragged).
    monkeypatch.setattr(tiles, "_block_quads", lambda vocab_size: 4)
    values = [*LOGITS, 2.5, *[float("-inf")] * 4]
    values += [1.0 + 0.02 * i for i in range(16)]
    values += [*[float("-inf")] * 10, 2.2, 0.5]
    num_rows = 20_000
    logits = torch.tensor([values]).expand(num_rows, -1)
    for inv_temperature, num_splits, salt in ((1.0, None, 11), (1 / 0.6, 1, 12)):
        inv_t = torch.full((num_rows,), inv_temperature)
        tokens = tiles.tiled_gumbel_argmax_triton(logits, inv_t, seeds_for(num_rows, salt), None, num_splits)
        assert_matches(tokens, softmax(values, inv_temperature))


# ---------------------------------------------------------------- compiled for sm_90


@pytest.mark.slow
def test_split_kernel_fits_128_registers_on_sm90(tiles, monkeypatch):
    # As the launch builds it at 151,936 columns: bf16, a temperature, with and without greedy rows.
    # (The compiling subprocess imports the kernel's module by name: from benchmarks/ on its path.)
    path = os.pathsep.join(
        p for p in (str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH")) if p
    )
    monkeypatch.setenv("PYTHONPATH", path)
    types = dict(logits_ptr="*bf16", inv_temperature_ptr="*fp32", seeds_ptr="*i64", greedy_ptr="*u8",
                 partial_score_ptr="*fp32", partial_col_ptr="*i32")  # fmt: skip
    options = dict(num_warps=tiles.SAMPLING_NUM_WARPS, maxnreg=tiles.SAMPLING_MAX_REGISTERS)
    for has_greedy in (False, True):
        constants = dict(HAS_TEMPERATURE=True, HAS_GREEDY=has_greedy, FAST_LOG=True, BLOCK_ROWS=1,
                         BLOCK_QUADS=1024)  # fmt: skip
        usage = compile_sm90(tiles._tile_choice_split_kernel, constants, types,
                             [*types, "row_stride", "vocab_size"], **options)  # fmt: skip
        assert usage["registers"] <= 128 and usage["stack"] == 0, usage
        assert usage["memory_ops"]["ld.global.v4.b32"] == 4, usage  # 32 bf16 logits a thread, 16-byte loads
