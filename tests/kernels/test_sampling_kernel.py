"""Gumbel-max sampling kernel: exact greedy argmax, the exact Gumbel-max argmax of its own noise (tile
skipping, splits and ties included), determinism per row, and the sampled distribution (the Triton
interpreter on CPU; the compiled kernel and the sampler's GPU path under the `gpu` marker).

Distribution checks use a Bernstein bound per token that a correct sampler exceeds with probability
< 1e-9 (as tests/unit/test_sampler.py does); seeds are fixed, so runs are deterministic.
"""

import math

import pytest
import torch
import triton
import triton.language as tl

from nanovllm.kernels import sampling
from nanovllm.kernels.backend import kernel_backend
from nanovllm.kernels.sampling import (
    _NOISE_SPREAD,
    _gumbel_noise,
    gumbel_argmax,
    gumbel_argmax_torch,
    gumbel_argmax_triton,
)
from nanovllm.layers import sampler as sampler_module
from nanovllm.layers.sampler import Sampler
from nanovllm.layers.sampling_batch import SamplingBatch, SamplingRequest
from nanovllm.sampling_params import SamplingParams
from tests.sm90 import compile_sm90
from tests.stats import assert_matches

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
LOG2E = 1.4426950408889634
# Eleven tokens (not a multiple of 4 or of a tile), two of them filtered out.
LOGITS = [1.2, 0.9, float("-inf"), 2.0, -0.3, 0.4, -1.5, 0.0, 1.6, float("-inf"), -0.7]


def seeds_for(num_rows: int, salt: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(salt)
    return torch.randint(-(2**62), 2**62, (num_rows,), generator=gen)


def softmax(logits: list[float], inv_temperature: float) -> list[float]:
    m = max(logits)
    weights = [math.exp((x - m) * inv_temperature) for x in logits]
    return [w / sum(weights) for w in weights]


# ---------------------------------------------------------------- the kernel's own noise


@triton.jit
def _noise_kernel(seeds_ptr, out_ptr, vocab_size, BLOCK_QUADS: tl.constexpr, FAST_LOG: tl.constexpr):
    # The noise the sampling kernel adds at each column (same column -> Philox word mapping).
    row = tl.program_id(0)
    tile_start = tl.program_id(1) * 4 * BLOCK_QUADS
    lanes = tl.arange(0, 4)[None, :, None]
    quads = tl.arange(0, BLOCK_QUADS)[None, None, :]
    seeds = tl.load(seeds_ptr + row + tl.zeros([1, 1, 1], tl.int32))
    noise = _gumbel_noise(seeds, tile_start // 4 + quads, lanes, FAST_LOG)
    cols = tile_start + lanes * BLOCK_QUADS + quads
    tl.store(out_ptr + row * vocab_size + cols, noise, mask=cols < vocab_size)


def kernel_noise(seeds: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] fp32: the noise (log2 units) that gumbel_argmax_triton adds for these seeds."""
    block_quads = sampling._block_quads(vocab_size)
    out = torch.empty(len(seeds), vocab_size, device=seeds.device)
    grid = (len(seeds), -(-vocab_size // (4 * block_quads)))
    _noise_kernel[grid](seeds, out, vocab_size, block_quads, FAST_LOG=seeds.is_cuda)
    return out


def exact_gumbel_argmax(logits, inv_temperature, seeds, greedy) -> torch.Tensor:
    """What the kernel must return: the first argmax of logits * inv_t * log2(e) + its noise."""
    scale = (
        inv_temperature * LOG2E
        if inv_temperature is not None
        else torch.full_like(seeds, LOG2E, dtype=torch.float32)
    )
    scores = logits.float() * scale[:, None] + kernel_noise(seeds, logits.shape[1])
    if greedy is not None:
        scores = torch.where(greedy[:, None], logits.float(), scores)
    return scores.argmax(dim=-1)


def test_noise_is_standard_gumbel_within_the_spread():
    noise = kernel_noise(seeds_for(4), 4096).flatten().double()  # 16k values
    assert noise.min() > -math.log2(24) - 1e-6 and noise.max() < 23.5
    assert noise.max() - noise.min() < _NOISE_SPREAD
    gumbel = noise * math.log(2) - math.log(math.log(2))  # log2 units -> a standard Gumbel variable
    # Kolmogorov-Smirnov against exp(-exp(-x)); 1.95 / sqrt(n) is exceeded with probability 0.001.
    values = gumbel.sort().values
    n = len(values)
    cdf = torch.exp(-torch.exp(-values))
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    distance = torch.maximum(ranks / n - cdf, cdf - (ranks - 1) / n).max().item()
    assert distance < 1.95 / math.sqrt(n)


# ---------------------------------------------------------------- exactness (interpreter on CPU)


def greedy_case(dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 5003, generator=gen) * 3).to(dtype)  # 5003: two tiles, the last ragged
    logits[:, 1::3] = float("-inf")
    logits[1, 4100] = logits[1, 17] = logits[1].max() + 1  # tie: the first column wins
    logits[2] = float("-inf")  # all filtered: column 0, as torch.argmax
    logits[3, 5002] = logits[3].max() + 1  # the very last column
    return logits.to(device), torch.ones(6, dtype=torch.bool, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_rows_are_torch_argmax(dtype):
    logits, greedy = greedy_case(dtype, "cpu")
    seeds = seeds_for(6)
    expected = logits.argmax(dim=-1)
    assert expected[1] == 17 and expected[2] == 0
    for num_splits in (None, 1):
        assert torch.equal(gumbel_argmax_triton(logits, None, seeds, greedy, num_splits), expected)
    inv_t = torch.full((6,), 3.0)
    assert torch.equal(gumbel_argmax_torch(logits, inv_t, seeds, greedy), expected)


@pytest.mark.parametrize("num_splits", [None, 1, 2])
def test_kernel_is_the_exact_argmax_of_its_noise(num_splits):
    gen = torch.Generator().manual_seed(1)
    vocab_size = 3 * 4096 + 77
    logits = torch.randn(8, vocab_size, generator=gen) * 2
    logits[0, 5] = 40.0  # far ahead in the first tile: later tiles are skipped without noise
    logits[1, vocab_size - 3] = 40.0  # ahead in the last tile only
    logits[2, 100:4000] = float("-inf")
    logits[3, ::2] = float("-inf")
    logits[4, 6000] = logits[4, 9000] = 30.0  # two far-ahead candidates in different tiles
    wide = torch.zeros(8, vocab_size + 50)
    wide[:, :vocab_size] = logits
    logits = wide[:, :vocab_size]  # a row stride that is not the row length
    inv_t = torch.tensor([1.0, 1.7, 0.5, 1.0, 10.0, 1.0, 0.9, 2.0])
    greedy = torch.tensor([False, False, False, False, False, True, False, True])
    seeds = seeds_for(8, salt=num_splits or 0)
    tokens = gumbel_argmax_triton(logits, inv_t, seeds, greedy, num_splits)
    assert torch.equal(tokens, exact_gumbel_argmax(logits, inv_t, seeds, greedy))
    assert tokens[0] == 5 and tokens[1] == vocab_size - 3 and tokens[4] in (6000, 9000)
    assert torch.isfinite(logits[torch.arange(8), tokens]).all()


def test_same_seed_same_token_whatever_the_batch():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(12, 1500, generator=gen) * 0.5  # flat: many tokens in play
    inv_t = torch.rand(12, generator=gen) + 0.5
    seeds = seeds_for(12)
    tokens = gumbel_argmax_triton(logits, inv_t, seeds)
    assert torch.equal(gumbel_argmax_triton(logits, inv_t, seeds), tokens)
    order = torch.randperm(12, generator=gen)
    assert torch.equal(gumbel_argmax_triton(logits[order], inv_t[order], seeds[order]), tokens[order])
    assert torch.equal(gumbel_argmax_triton(logits[3:4], inv_t[3:4], seeds[3:4]), tokens[3:4])
    assert torch.equal(gumbel_argmax_triton(logits, inv_t, seeds, num_splits=1), tokens)
    # Different seeds on identical rows: different tokens, mostly.
    same_rows = logits[:1].expand(48, -1)
    spread = gumbel_argmax_triton(same_rows, None, seeds_for(48, salt=5))
    assert len(set(spread.tolist())) > 30


def test_reference_is_deterministic_per_row():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 500, generator=gen)
    seeds = seeds_for(10)
    tokens = gumbel_argmax_torch(logits, None, seeds)
    order = torch.randperm(10, generator=gen)
    assert torch.equal(gumbel_argmax_torch(logits[order], None, seeds[order]), tokens[order])
    assert len(set(gumbel_argmax_torch(logits[:1].expand(64, -1), None, seeds_for(64)).tolist())) > 5


def test_argument_checks():
    logits = torch.zeros(3, 10)
    with pytest.raises(ValueError, match="seeds must be a \\[3\\] torch.int64"):
        gumbel_argmax(logits, None, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="inv_temperature"):
        gumbel_argmax(logits, torch.ones(2), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="logits must be a float"):
        gumbel_argmax(torch.zeros(3, 10, dtype=torch.int64), None, torch.zeros(3, dtype=torch.int64))
    assert gumbel_argmax_triton(torch.zeros(0, 10), None, torch.zeros(0, dtype=torch.int64)).shape == (0,)


# ---------------------------------------------------------------- distributions


def draw_distribution(draw, device: str, num_rows: int = 20_000) -> None:
    inv_t = 1 / 0.7
    logits = torch.tensor([LOGITS], device=device).expand(num_rows, -1)  # row stride 0
    greedy = torch.zeros(num_rows, dtype=torch.bool, device=device)
    greedy[::10] = True
    tokens = draw(
        logits,
        torch.full((num_rows,), inv_t, device=device),
        seeds_for(num_rows, salt=7).to(device),
        greedy,
    )
    assert (tokens[greedy] == LOGITS.index(max(LOGITS))).all()
    assert_matches(tokens[~greedy], softmax(LOGITS, inv_t))


@pytest.mark.parametrize("draw", [gumbel_argmax_triton, gumbel_argmax_torch], ids=["triton", "torch"])
def test_distribution_matches_softmax(draw):
    draw_distribution(draw, "cpu")


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
    # The exact argmax of the kernel's noise, up to fp32 rounding on near-ties (FMA contraction).
    expected = exact_gumbel_argmax(logits, inv_t, seeds, greedy)
    scores = logits.float() * (inv_t * LOG2E)[:, None] + kernel_noise(seeds, logits.shape[1])
    gap = (scores.gather(1, expected[:, None]) - scores.gather(1, tokens[:, None])).squeeze(1)
    assert (gap[tokens != expected] < 1e-3).all()
    assert (tokens != expected).sum() <= 2


@pytest.mark.gpu
@needs_cuda
def test_distribution_gpu():
    draw_distribution(gumbel_argmax_triton, "cuda", num_rows=100_000)
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
def test_split_kernel_reads_logits_in_16_byte_loads(dtype, has_temperature, has_greedy):
    # Compiled for an H100 as the launch builds it on a 151,936-wide vocabulary. Each thread holds 8 adjacent
    # columns of a lane; they come in 16-byte loads only if Triton can see the tile's alignment and a column
    # mask that is constant over them. Before session 15 it saw neither (the hint sat on the loop variable,
    # where Triton drops it; the mask's bound was the split's end) and read the logits an element at a time.
    constants = dict(HAS_TEMPERATURE=has_temperature, HAS_GREEDY=has_greedy, FAST_LOG=True,
                     NOISE_SPREAD=_NOISE_SPREAD, BLOCK_ROWS=1)  # fmt: skip
    constants["BLOCK_QUADS"] = sampling.SAMPLING_BLOCK_QUADS
    types = dict(logits_ptr="*" + dtype, inv_temperature_ptr="*fp32", seeds_ptr="*i64", greedy_ptr="*u8",
                 partial_max_ptr="*fp32", partial_idx_ptr="*i64")  # fmt: skip
    divisible = [*types, "row_stride", "vocab_size"]  # as at 151,936 columns
    kernel = sampling._gumbel_argmax_split_kernel
    options = dict(num_warps=sampling.SAMPLING_NUM_WARPS, maxnreg=sampling.SAMPLING_MAX_REGISTERS)
    usage = compile_sm90(kernel, constants, types, divisible, **options)
    loads = {op: n for op, n in usage["memory_ops"].items() if op.startswith("ld")}
    per_thread = 4 * sampling.SAMPLING_BLOCK_QUADS // (32 * sampling.SAMPLING_NUM_WARPS)  # logits of a tile
    assert loads.pop("ld.global.v4.b32") == per_thread * (2 if dtype == "bf16" else 4) // 16, loads
    # the rest: a row's seed (b64), temperature (b32) and greedy flag (b8: once in each of two layouts)
    expected = {"ld.global.b64": 1}
    expected |= {"ld.global.b32": 1} if has_temperature else {}
    expected |= {"ld.global.b8": 2} if has_greedy else {}
    assert loads == expected, loads
    # 4 programs per SM (SAMPLING_PROGRAMS_PER_SM): unbounded, ptxas took 141-149 without greedy rows
    assert usage["registers"] <= 128 and usage["stack"] == 0, usage
