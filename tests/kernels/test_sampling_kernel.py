"""Gumbel-max sampling kernels (nanovllm/kernels/sampling.py: a tile by its log-sum-exp plus one Gumbel
value, then a column of it): greedy rows are exactly torch.argmax, a random row's token is exactly the
two-level argmax of its own noise (splits, ties and filtered columns included), it depends on the row's seed
only (not on the batch nor on the splits), and draws follow softmax, the tile level included (the Triton
interpreter on CPU; the compiled kernels and the sampler's GPU path under the `gpu` marker; their sm_90 build
under `slow`).

Distribution checks use a Bernstein bound per token that a correct sampler exceeds with probability
< 1e-9 (tests/stats.py); seeds are fixed, so runs are deterministic.
"""

import math

import pytest
import torch
import triton
import triton.language as tl

from nanovllm.kernels import sampling
from nanovllm.kernels.backend import kernel_backend
from nanovllm.kernels.sampling import _gumbel_noise, gumbel_argmax, gumbel_argmax_torch, gumbel_argmax_triton
from nanovllm.layers import sampler as sampler_module
from nanovllm.layers.sampler import Sampler
from nanovllm.layers.sampling_batch import SamplingBatch, SamplingRequest
from nanovllm.sampling_params import SamplingParams
from tests.sm90 import compile_sm90
from tests.stats import assert_matches

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
LOG2E = 1.4426950408889634
QUADS = sampling.SAMPLING_BLOCK_QUADS  # a tile is 4 lanes of QUADS columns
TILE = 4 * QUADS  # columns of a tile for any vocabulary of more than one tile
# Eleven tokens (not a multiple of 4 or of a tile), two of them filtered out.
LOGITS = [1.2, 0.9, float("-inf"), 2.0, -0.3, 0.4, -1.5, 0.0, 1.6, float("-inf"), -0.7]


def seeds_for(num_rows: int, salt: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(salt)
    return torch.randint(-(2**62), 2**62, (num_rows,), generator=gen)


def softmax(logits: list[float], inv_temperature: float) -> list[float]:
    m = max(logits)
    weights = [math.exp((x - m) * inv_temperature) for x in logits]
    return [w / sum(weights) for w in weights]


# ---------------------------------------------------------------- the kernels' own noise


@triton.jit
def _philox_noise_kernel(keys_ptr, out_ptr, num_counters, BLOCK: tl.constexpr, FAST_LOG: tl.constexpr):
    # Grid: (num_rows, cdiv(num_counters, BLOCK)). out: [num_rows, num_counters, 4] fp32, the Gumbel noise
    # (log2 units) of word `lane` of Philox counter c under the row's key, as _gumbel_noise draws it.
    row = tl.program_id(0)
    key = tl.load(keys_ptr + row + tl.zeros([1, 1], tl.int32))  # [1, 1]
    counters = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[:, None]  # [C, 1]
    lanes = tl.arange(0, 4)[None, :]  # [1, 4]
    noise = _gumbel_noise(key, counters + tl.zeros([1, 4], tl.int32), lanes, FAST_LOG)  # [C, 4]
    tl.store(out_ptr + row * num_counters * 4 + counters * 4 + lanes, noise, mask=counters < num_counters)


def philox_noise(keys: torch.Tensor, num_counters: int) -> torch.Tensor:
    """[B, num_counters, 4] fp32: the noise of each (counter, word) under each row's key."""
    out = torch.empty(len(keys), num_counters, 4, device=keys.device)
    block = min(1024, triton.next_power_of_2(num_counters))
    grid = (len(keys), triton.cdiv(num_counters, block))
    _philox_noise_kernel[grid](keys, out, num_counters, BLOCK=block, FAST_LOG=keys.is_cuda)
    return out


def test_noise_is_standard_gumbel():
    noise = philox_noise(seeds_for(4), 1024).flatten().double()  # 16k values
    assert noise.min() > -math.log2(24) - 1e-6 and noise.max() < 23.5  # u in [2^-24, 1 - 2^-24]
    gumbel = noise * math.log(2) - math.log(math.log(2))  # log2 units -> a standard Gumbel variable
    # Kolmogorov-Smirnov against exp(-exp(-x)); 1.95 / sqrt(n) is exceeded with probability 0.001.
    values = gumbel.sort().values
    n = len(values)
    cdf = torch.exp(-torch.exp(-values))
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    distance = torch.maximum(ranks / n - cdf, cdf - (ranks - 1) / n).max().item()
    assert distance < 1.95 / math.sqrt(n)


def expected_tokens(logits: torch.Tensor, inv_temperature: torch.Tensor, seeds: torch.Tensor):
    """(tokens, gaps): for random rows of a vocabulary of TILE-column tiles, the first argmax of L_t + g_t
    (L_t in float64) and then the first argmax of x_i + g_i over that tile; gaps: the margin of each
    row's tile choice (a smaller one than fp32 rounding could flip it)."""
    num_rows, vocab_size = logits.shape
    num_tiles = -(-vocab_size // TILE)
    rows = torch.arange(num_rows, device=logits.device)
    scores = torch.full((num_rows, num_tiles * TILE), float("-inf"), dtype=torch.float64)
    scores = scores.to(logits.device)
    scores[:, :vocab_size] = logits.double() * (inv_temperature.double() * LOG2E)[:, None]
    per_tile = scores.view(num_rows, num_tiles, TILE)
    top = per_tile.amax(dim=2, keepdim=True).clamp(min=-1e300)  # (all -inf tiles: no NaN)
    lse = top.squeeze(2) + torch.exp2(per_tile - top).sum(dim=2).log2()  # [B, T]
    tile_score = lse + philox_noise(seeds, num_tiles)[:, :, 0].double()  # key = seed, counter = tile
    ranked = tile_score.sort(dim=1, descending=True).values
    gaps = ranked[:, 0] - ranked[:, 1] if num_tiles > 1 else torch.full((num_rows,), math.inf)
    tile = tile_score.argmax(dim=1)  # [B]
    # Column tile_start + lane * QUADS + q takes word `lane` of counter tile_start / 4 + q, key = seed ^ C.
    offsets = torch.arange(TILE, device=logits.device)
    counters = (tile * TILE // 4)[:, None] + offsets % QUADS  # [B, TILE]
    noise = philox_noise(seeds ^ sampling.DRAW_KEY_XOR, num_tiles * TILE // 4)  # [B, counters, 4]
    tile_noise = noise[rows[:, None], counters, offsets // QUADS]  # [B, TILE]
    in_tile = per_tile[rows, tile] + tile_noise.double()  # [B, TILE]
    return tile * TILE + in_tile.argmax(dim=1), gaps


# ---------------------------------------------------------------- exactness (interpreter on CPU)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_rows_are_torch_argmax(dtype):
    logits = greedy_case(dtype)
    assert logits.stride(0) != logits.shape[1]
    expected = logits.argmax(dim=-1)
    assert expected[1] == 17 and expected[2] == 0 and expected[3] == 5002 and expected[4] == 7
    seeds = seeds_for(6)
    greedy = torch.ones(6, dtype=torch.bool)
    for num_splits in (None, 1):
        assert torch.equal(gumbel_argmax_triton(logits, None, seeds, greedy, num_splits), expected)
    assert torch.equal(gumbel_argmax_torch(logits, torch.full((6,), 3.0), seeds, greedy), expected)
    # Mixed with random rows (and a temperature): the greedy rows still get no noise and no scaling.
    greedy[::2] = False
    inv_t = torch.full((6,), 3.0)
    tokens = gumbel_argmax_triton(logits, inv_t, seeds, greedy)
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


def test_random_rows_are_the_exact_two_level_argmax_of_their_noise():
    logits, inv_t, seeds = multi_tile_case()
    tokens = gumbel_argmax_triton(logits, inv_t, seeds)
    expected, gaps = expected_tokens(logits, inv_t, seeds)
    clear = gaps > 1e-3  # no tile choice within rounding of a tie (row 4: all -inf, no choice)
    assert clear[:4].all() and clear[5:].all(), gaps
    assert torch.equal(tokens, expected), (tokens, expected)
    assert tokens[0] == 5 and tokens[1] == logits.shape[1] - 3 and tokens[4] == 0
    finite = torch.isfinite(logits[torch.arange(8), tokens])
    assert finite[:4].all() and finite[5:].all()  # filtered columns are never drawn
    assert not TILE <= tokens[5] < 2 * TILE


def test_same_seed_same_token_whatever_the_batch_and_splits():
    logits, inv_t, seeds = multi_tile_case()
    tokens = gumbel_argmax_triton(logits, inv_t, seeds)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(gumbel_argmax_triton(logits[order], inv_t[order], seeds[order]), tokens[order])
    assert torch.equal(gumbel_argmax_triton(logits[5:7], inv_t[5:7], seeds[5:7]), tokens[5:7])
    for num_splits in (1, 2, 3):  # (3 over four tiles: splits of 2 and 2)
        assert torch.equal(gumbel_argmax_triton(logits, inv_t, seeds, num_splits=num_splits), tokens)
    # The compiled variants the sampler switches between by what else is in the batch: no greedy row
    # (greedy=None) or all False, no temperature (None) or all 1.
    no_greedy = torch.zeros(8, dtype=torch.bool)
    assert torch.equal(gumbel_argmax_triton(logits, inv_t, seeds, no_greedy), tokens)
    assert torch.equal(
        gumbel_argmax_triton(logits, torch.ones(8), seeds), gumbel_argmax_triton(logits, None, seeds)
    )
    # One tile (rows packed into a program): the same, whatever the batch.
    small = logits[:, :1500].clone()
    small_tokens = gumbel_argmax_triton(small, inv_t, seeds)
    assert torch.equal(gumbel_argmax_triton(small[order], inv_t[order], seeds[order]), small_tokens[order])
    assert torch.equal(gumbel_argmax_triton(small[3:4], inv_t[3:4], seeds[3:4]), small_tokens[3:4])
    # Different seeds on identical rows: different tokens, mostly.
    spread = gumbel_argmax_triton(small[6:7].expand(48, -1), None, seeds_for(48, salt=5))
    assert len(set(spread.tolist())) > 30


def test_argument_checks():
    logits = torch.zeros(3, 10)
    with pytest.raises(ValueError, match="seeds must be a \\[3\\] torch.int64"):
        gumbel_argmax_triton(logits, None, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="num_splits"):
        gumbel_argmax_triton(logits, None, torch.zeros(3, dtype=torch.int64), num_splits=0)
    with pytest.raises(ValueError, match="inv_temperature"):
        gumbel_argmax(logits, torch.ones(2), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="logits must be a float"):
        gumbel_argmax(torch.zeros(3, 10, dtype=torch.int64), None, torch.zeros(3, dtype=torch.int64))
    assert gumbel_argmax_triton(torch.zeros(0, 10), None, torch.zeros(0, dtype=torch.int64)).shape == (0,)


# ---------------------------------------------------------------- distributions


def draw_distribution(draw, device: str, inv_temperature: float, num_rows: int = 20_000) -> None:
    logits = torch.tensor([LOGITS], device=device).expand(num_rows, -1)  # row stride 0
    greedy = torch.zeros(num_rows, dtype=torch.bool, device=device)
    greedy[::10] = True
    inv_t = torch.full((num_rows,), inv_temperature, device=device)
    tokens = draw(logits, inv_t, seeds_for(num_rows, salt=7).to(device), greedy)
    assert (tokens[greedy] == LOGITS.index(max(LOGITS))).all()
    assert_matches(tokens[~greedy], softmax(LOGITS, inv_temperature))


@pytest.mark.parametrize("inv_temperature", [1.0, 1 / 0.6])
@pytest.mark.parametrize("draw", [gumbel_argmax_triton, gumbel_argmax_torch], ids=["triton", "torch"])
def test_distribution_matches_softmax(draw, inv_temperature):
    draw_distribution(draw, "cpu", inv_temperature)


def test_tiles_are_drawn_with_their_mass():
    # Two real tiles: one strong column in the first (the rest filtered; ~12% of the mass), 4,076 flat and
    # weaker ones in the second (ragged, a few filtered; ~88%). Choosing a tile by its largest logit would
    # take the first always, a natural log in place of log2 in L_t ~64% of the time; the fraction drawn in
    # each tile must be its exact softmax mass (at 300 rows the bound allows about +-0.15).
    num_rows, vocab_size = 300, 2 * TILE - 20
    gen = torch.Generator().manual_seed(3)
    row = torch.full((vocab_size,), float("-inf"))
    row[2000] = 3.8
    row[TILE:] = torch.randn(vocab_size - TILE, generator=gen) * 0.2
    row[TILE + 5 :: 50] = float("-inf")
    row = row.bfloat16().float()  # what the kernel reads, exactly
    probs = torch.softmax(row.double() / 0.6, dim=0)
    mass = [probs[:TILE].sum().item(), probs[TILE:].sum().item()]
    assert 0.08 < mass[0] < 0.16, mass
    logits = row.bfloat16()[None].expand(num_rows, -1)
    inv_t = torch.full((num_rows,), 1 / 0.6)
    tokens = gumbel_argmax_triton(logits, inv_t, seeds_for(num_rows, 9))
    assert torch.isfinite(row[tokens]).all()
    assert_matches((tokens >= TILE).long(), mass)


def test_many_small_tiles_draw_softmax(monkeypatch):
    # Tiles of 16 columns (the launcher asks _block_quads; this test alone shrinks it) make a 44-column
    # vocabulary three tiles of many packed rows, so 20,000 rows run fast in the interpreter and the
    # per-token counts test both levels: which tile, then which column of it. The tiles' maxima rank them
    # otherwise than their masses: a few strong columns, sixteen medium ones, two (the last tile, ragged).
    monkeypatch.setattr(sampling, "_block_quads", lambda vocab_size: 4)
    values = [*LOGITS, 2.5, *[float("-inf")] * 4]
    values += [1.0 + 0.02 * i for i in range(16)]
    values += [*[float("-inf")] * 10, 2.2, 0.5]
    num_rows = 20_000
    logits = torch.tensor([values]).expand(num_rows, -1)
    for inv_temperature, num_splits, salt in ((1.0, None, 11), (1 / 0.6, 1, 12)):
        inv_t = torch.full((num_rows,), inv_temperature)
        tokens = gumbel_argmax_triton(logits, inv_t, seeds_for(num_rows, salt), None, num_splits)
        assert_matches(tokens, softmax(values, inv_temperature))
    # Greedy rows among packed random rows (and a temperature): the largest logit, 2.5 at column 11, over the
    # third tile's 2.2, whatever the splits.
    rows = logits[:64]
    greedy = torch.arange(64) % 3 == 0
    for num_splits in (None, 1, 2):
        tokens = gumbel_argmax_triton(rows, torch.full((64,), 1.7), seeds_for(64, 13), greedy, num_splits)
        assert (tokens[greedy] == values.index(max(values))).all()


def test_infinite_logits_win_as_in_the_reference():
    # A +inf logit on a random row: its tile's L_t is +inf and the draw in it takes the (first) +inf column,
    # as argmax(logits / T + noise) does in the reference. Rows: one +inf; two in different tiles; two in one.
    logits = torch.randn(3, 3 * TILE, generator=torch.Generator().manual_seed(4))
    logits[0, TILE + 9] = float("inf")
    logits[1, [2 * TILE + 1, 10]] = float("inf")
    logits[2, [TILE + 8, TILE + 3]] = float("inf")
    expected = torch.tensor([TILE + 9, 10, TILE + 3])
    seeds = seeds_for(3, salt=14)
    assert torch.equal(gumbel_argmax_triton(logits, torch.full((3,), 1.3), seeds), expected)
    assert torch.equal(gumbel_argmax_torch(logits, torch.full((3,), 1.3), seeds), expected)


def test_reference_is_deterministic_per_row():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 500, generator=gen)
    seeds = seeds_for(10)
    tokens = gumbel_argmax_torch(logits, None, seeds)
    order = torch.randperm(10, generator=gen)
    assert torch.equal(gumbel_argmax_torch(logits[order], None, seeds[order]), tokens[order])
    assert len(set(gumbel_argmax_torch(logits[:1].expand(64, -1), None, seeds_for(64)).tolist())) > 5


def sampler_distribution(device: str, settings: dict, num_rows: int = 20_000) -> torch.Tensor:
    logits = torch.tensor([[x if x > float("-inf") else -1.0 for x in LOGITS]], device=device)
    rows = [SamplingRequest(SamplingParams(**settings), [], [], ())] * num_rows
    batch = SamplingBatch.build(rows, len(LOGITS), torch.device(device))
    return Sampler(seed=3)(logits.expand(num_rows, -1), batch).token_ids


def reference_probs(settings: dict) -> list[float]:
    logits = [x if x > float("-inf") else -1.0 for x in LOGITS]
    probs = softmax(logits, 1 / settings.get("temperature", 1.0))
    if "top_p" in settings:  # (no ties in LOGITS) keep the smallest prefix reaching top_p
        order = sorted(range(len(probs)), key=lambda i: -probs[i])
        kept, mass = set(), 0.0
        for i in order:
            if mass < settings["top_p"]:
                kept.add(i)
                mass += probs[i]
        total = sum(probs[i] for i in kept)
        probs = [p / total if i in kept else 0.0 for i, p in enumerate(probs)]
    return probs


SAMPLER_SETTINGS = {"temperature 0.6": dict(temperature=0.6), "top_p 0.6": dict(top_p=0.6, temperature=0.8)}


@pytest.mark.parametrize("settings", SAMPLER_SETTINGS.values(), ids=SAMPLER_SETTINGS.keys())
def test_sampler_gpu_path_runs_the_kernel(monkeypatch, settings):
    # The sampler's CUDA path on CPU: the kernel in the interpreter.
    monkeypatch.setattr(sampler_module, "use_triton", lambda x: True)
    monkeypatch.setattr(sampling, "use_triton", lambda x: True)
    assert_matches(sampler_distribution("cpu", settings, num_rows=10_000), reference_probs(settings))


# ---------------------------------------------------------------- GPU: the compiled kernel at real sizes


def real_size_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(256, 151936, generator=gen, device="cuda") * 3).to(torch.bfloat16)
    logits[::3, 1::2] = float("-inf")  # a third of the rows filtered
    logits[1, 150000] = 40.0  # one far-ahead token near the end
    inv_t = torch.full((256,), 1 / 0.6, device="cuda")
    greedy = torch.zeros(256, dtype=torch.bool, device="cuda")
    greedy[::4] = True
    return logits, inv_t, seeds_for(256).cuda(), greedy


@pytest.mark.gpu
@needs_cuda
def test_real_size_gpu():
    logits, inv_t, seeds, greedy = real_size_case()
    tokens = gumbel_argmax_triton(logits, inv_t, seeds, greedy)
    assert torch.equal(tokens[greedy], logits[greedy].argmax(dim=-1))
    assert torch.isfinite(logits[torch.arange(256, device="cuda"), tokens].float()).all()
    assert tokens[1] == 150000
    assert torch.equal(gumbel_argmax_triton(logits, inv_t, seeds, greedy), tokens)
    order = torch.randperm(256, device="cuda")
    assert torch.equal(
        gumbel_argmax_triton(logits[order], inv_t[order], seeds[order], greedy[order]), tokens[order]
    )
    assert torch.equal(gumbel_argmax_triton(logits, inv_t, seeds, greedy, num_splits=1), tokens)
    # The exact two-level argmax of the kernels' noise, up to fp32 rounding on near-ties: a row whose tile
    # choice is that close may differ.
    expected, gaps = expected_tokens(logits[~greedy], inv_t[~greedy], seeds[~greedy])
    differ = tokens[~greedy] != expected
    assert differ.sum() <= 2 and (gaps[differ] < 1e-3).all(), (differ.sum(), gaps[differ])


@pytest.mark.gpu
@needs_cuda
def test_distribution_gpu():
    draw_distribution(gumbel_argmax_triton, "cuda", 1 / 0.7, num_rows=100_000)
    # The real vocabulary: the same eleven logits scattered over 151936 columns, the rest -inf.
    num_rows, vocab_size = 20_000, 151936
    columns = torch.tensor([0, 3, 4095, 4096, 40000, 75001, 75002, 100003, 131071, 151934, 151935])
    row = torch.full((vocab_size,), float("-inf"))
    row[columns] = torch.tensor(LOGITS)
    logits = row.to(torch.bfloat16).cuda()[None].expand(num_rows, -1)
    tokens = gumbel_argmax_triton(logits, None, seeds_for(num_rows).cuda())
    assert torch.isin(tokens, columns.cuda()).all()
    as_index = torch.searchsorted(columns.cuda(), tokens)
    assert_matches(as_index, softmax(torch.tensor(LOGITS).bfloat16().float().tolist(), 1.0))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("settings", SAMPLER_SETTINGS.values(), ids=SAMPLER_SETTINGS.keys())
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_sampler_gpu_path_matches_cpu_path_distribution_gpu(settings, backend):
    # Both GPU paths and the CPU path against the same exact target (no timing involved).
    expected = reference_probs(settings)
    with kernel_backend(backend):
        assert_matches(sampler_distribution("cuda", settings, num_rows=50_000), expected)
    assert_matches(sampler_distribution("cpu", settings, num_rows=50_000), expected)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("has_temperature,has_greedy", [(True, False), (False, False), (True, True)])
def test_kernels_read_logits_in_16_byte_loads_within_128_registers(dtype, has_temperature, has_greedy):
    # Compiled for an H100 as the launch builds them on a 151,936-wide vocabulary. Each thread holds 8
    # adjacent columns of a lane; they come in 16-byte loads only if Triton can see the tile's alignment and
    # a column mask that is constant over them (session 15 found the sampler reading the logits an element
    # at a time: the hint sat on the loop variable, where Triton drops it).
    constants = dict(HAS_TEMPERATURE=has_temperature, HAS_GREEDY=has_greedy, FAST_LOG=True, BLOCK_ROWS=1,
                     BLOCK_QUADS=sampling.SAMPLING_BLOCK_QUADS)  # fmt: skip
    types = dict(logits_ptr="*" + dtype, inv_temperature_ptr="*fp32", seeds_ptr="*i64", greedy_ptr="*u8",
                 partial_score_ptr="*fp32", partial_col_ptr="*i32", out_ptr="*i64")  # fmt: skip
    options = dict(num_warps=sampling.SAMPLING_NUM_WARPS, maxnreg=sampling.SAMPLING_MAX_REGISTERS)
    per_thread = 4 * sampling.SAMPLING_BLOCK_QUADS // (32 * sampling.SAMPLING_NUM_WARPS)  # logits of a tile
    tile_loads = per_thread * (2 if dtype == "bf16" else 4) // 16
    draw_constants = dict(constants, DRAW_KEY_XOR=sampling.DRAW_KEY_XOR, SPLITS_P2=64)
    usages = {}
    for kernel, kernel_constants in (
        (sampling._tile_choice_split_kernel, constants),
        (sampling._tile_draw_kernel, draw_constants),
    ):
        kernel_types = {k: v for k, v in types.items() if k in kernel.arg_names}
        divisible = [*kernel_types, "row_stride", "vocab_size"]  # as at 151,936 columns
        usage = compile_sm90(kernel, kernel_constants, kernel_types, divisible, **options)
        usages[kernel.fn.__name__] = usage
        assert usage["memory_ops"]["ld.global.v4.b32"] == tile_loads, (kernel, usage)
        # 4 programs per SM (SAMPLING_PROGRAMS_PER_SM), no spills
        assert usage["registers"] <= 128 and usage["stack"] == 0, (kernel, usage)
    # Beside its tiles, the split kernel reads only a row's seed (b64), temperature (b32), greedy flag (b8).
    split_ops = usages["_tile_choice_split_kernel"]["memory_ops"]
    loads = {op: n for op, n in split_ops.items() if op.startswith("ld")}
    expected = {"ld.global.v4.b32": tile_loads, "ld.global.b64": 1}
    expected |= {"ld.global.b32": 1} if has_temperature else {}
    expected |= {"ld.global.b8": 1} if has_greedy else {}
    assert loads == expected, loads
