"""The decode-sized tensor-core linear with its folded-RMSNorm scale, SiLU-and-mul and residual epilogues
against the unfused torch ops (the interpreter on CPU in fp32/fp16 with small explicit tiles, the compiled
kernel under `gpu` in bf16 too)."""

import os
import subprocess
import sys

import pytest
import torch

from nanovllm.kernels import decode_linear as decode_linear_module
from nanovllm.kernels.backend import check_pdl, kernel_backend
from nanovllm.kernels.decode_linear import (
    DECODE_LINEAR_KERNEL_MAX_ROWS,
    DECODE_LINEAR_MAX_ROWS,
    DECODE_LINEAR_SMALL_MAX_ROWS,
    DECODE_LINEAR_SMALL_WEIGHT_BYTES,
    DECODE_LINEAR_SMEM_BYTES,
    decode_linear,
    decode_linear_config,
    decode_linear_max_rows,
    decode_linear_ref,
    takes_decode_linear,
)
from nanovllm.kernels.rmsnorm import rms_norm, rms_norm_torch
from tests.kernels.matmul_inputs import TOLERANCE, check_graph_replays, gpu, randn


def check_decode_linear(
    rows: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    device: str,
    *,
    bias: bool = False,
    silu_mul: bool = False,
    norm: bool = False,
    residual: bool = False,
    config: tuple | None = None,
    x_row_stride: int | None = None,
) -> None:
    if x_row_stride is None:
        x = randn(rows, k, dtype=dtype, device=device, seed=1)
    else:  # a column slice of a wider tensor: rows x_row_stride apart
        x = randn(rows, x_row_stride, dtype=dtype, device=device, seed=1)[:, 3 : 3 + k]
        assert x.stride() == (x_row_stride, 1)
    weight = randn(n, k, dtype=dtype, device=device, seed=2, scale=k**-0.5)
    b = randn(n, dtype=dtype, device=device, seed=3) if bias else None
    n_out = n // 2 if silu_mul else n
    res = randn(rows, n_out, dtype=dtype, device=device, seed=4) if residual else None
    eps = 1e-6 if norm else None
    if norm:  # the un-normalized residual stream: rows of very different scales
        x = x * torch.linspace(0.05, 30.0, rows, device=device, dtype=torch.float32)[:, None].to(dtype)
    inputs = [t for t in (x, weight, b, res) if t is not None]
    before = [t.clone() for t in inputs]
    out = decode_linear(x, weight, b, silu_mul=silu_mul, rms_norm_eps=eps, residual=res, config=config)
    expected = decode_linear_ref(x, weight, b, silu_mul=silu_mul, rms_norm_eps=eps, residual=res)
    assert all(torch.equal(t, saved) for t, saved in zip(inputs, before))  # inputs are never written
    assert out.shape == (rows, n_out) and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


# (rows, n, k, config): one row to several row tiles (the last one partial), n and k not multiples of their
# tiles (k = 24 smaller than one), tiles kept small so the interpreter stays fast
SHAPES = [
    (1, 48, 80, (16, 16, 64, 4, 2)),
    (3, 72, 200, (16, 32, 64, 4, 2)),
    (17, 40, 24, (16, 16, 32, 4, 2)),
    (64, 56, 96, (64, 16, 32, 4, 3)),
    (100, 50, 144, (32, 16, 64, 4, 2)),
]


@pytest.mark.parametrize("rows,n,k,config", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias,silu_mul", [(False, False), (True, True)])
def test_shapes(rows, n, k, config, dtype, bias, silu_mul):
    check_decode_linear(rows, n, k, dtype, "cpu", bias=bias, silu_mul=silu_mul, config=config)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bias_and_silu_epilogue(bias, silu_mul, dtype):
    # n_out = 40 or 20: the up half starts inside a BLOCK_N tile of the gate half
    check_decode_linear(17, 80, 80, dtype, "cpu", bias=bias, silu_mul=silu_mul, config=(16, 16, 32, 4, 2))


@pytest.mark.parametrize("bias,silu_mul,norm,residual", [
    (False, False, True, False), (True, True, True, False), (True, False, True, False),
    (False, False, False, True), (True, False, False, True),
])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_norm_and_residual_epilogues(bias, silu_mul, norm, residual, dtype):
    # the norm's sum of squares runs over three K chunks, the last one partial (k = 80, BLOCK_K = 32)
    check_decode_linear(
        17, 80, 80, dtype, "cpu", bias=bias, silu_mul=silu_mul, norm=norm, residual=residual,
        config=(16, 16, 32, 4, 2),
    )  # fmt: skip


def test_silu_epilogue_rounds_where_silu_and_mul_does():
    # With one-hot weight rows the matmul is exact (gate = x[:, :32], up = x[:, 32:]), so the fp16 result
    # depends only on the epilogue's rounding points: gate and up to fp16, silu(gate) to fp16, the product.
    # Keeping silu in fp32 for the multiply moves about a third of these outputs by an ulp.
    x = randn(5, 64, dtype=torch.float16, device="cpu", seed=21, scale=4.0)
    weight = torch.eye(64, dtype=torch.float16)  # [gate; up] = [eye[:32]; eye[32:]]
    out = decode_linear(x, weight, silu_mul=True, config=(16, 16, 32, 4, 2))
    assert torch.equal(out, decode_linear_ref(x, weight, silu_mul=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_x_rows_with_a_stride(dtype):
    check_decode_linear(
        20, 48, 80, dtype, "cpu", bias=True, silu_mul=True, config=(16, 16, 64, 4, 2), x_row_stride=96
    )


def test_weight_rows_with_a_stride():
    # W as a row slice of a wider matrix (rows 112 apart, K = 80): the kernel reads rows by their stride
    x = torch.randn(5, 80, dtype=torch.float32)
    wide = torch.randn(64, 112, dtype=torch.float32) / 9
    weight = wide[:, 16:96]
    out = decode_linear(x, weight, silu_mul=True, config=(16, 16, 64, 4, 2))
    torch.testing.assert_close(
        out, decode_linear_ref(x, weight.contiguous(), silu_mul=True), **TOLERANCE[torch.float32]
    )


@pytest.mark.parametrize("name", ["NANOVLLM_DECODE_LINEAR_ROWS", "NANOVLLM_DECODE_LINEAR_SMALL_ROWS"])
def test_rows_switch_is_checked_at_import(name):
    # A bad rows limit fails loudly when the module loads, not with a late odd error
    for bad in ("-1", "257", "x", "²"):
        env = {**os.environ, name: bad}
        result = subprocess.run([sys.executable, "-c", "import nanovllm.kernels.decode_linear"], env=env,
                                capture_output=True, text=True)  # fmt: skip
        assert result.returncode != 0 and f"{name} must be an integer" in result.stderr


@pytest.mark.parametrize("rows", [1, 100])
def test_default_config(rows):
    check_decode_linear(rows, 96, 200, torch.float16, "cpu", silu_mul=True)


def test_config_heuristic():
    # BLOCK_M: the rows as a power of two in [16, 64]
    assert [decode_linear_config(m, 4096, 1024, False)[0] for m in (1, 16, 17, 100, 256)] == [
        16,
        16,
        32,
        64,
        64,
    ]
    # BLOCK_N: 64 while 128 would leave SMs idle (Qwen3-0.6B's qkv: 32 tiles), 128 once it fills them
    assert decode_linear_config(1, 4096, 1024, False)[1] == 64
    assert decode_linear_config(1, 32768, 1024, False)[1] == 128
    assert decode_linear_config(256, 6144, 4096, False)[1] == 128  # 48 column tiles x 4 row tiles
    # BLOCK_K: 128 unless the stage gets too big (gate and up tiles of 128 rows plus 64 x rows)
    assert decode_linear_config(64, 4096, 4096, True)[2] == 128
    assert decode_linear_config(64, 32768, 4096, True)[1:3] == (128, 64)
    assert decode_linear_config(1, 1024, 48, False)[2] == 64  # never more than K rounded up
    for rows in (1, 8, 32, 64, 256):
        for n_out in (1024, 4096, 32768):
            for silu_mul in (False, True):
                for element_bytes in (2, 4):
                    block_m, block_n, block_k, _, num_stages = decode_linear_config(
                        rows, n_out, 4096, silu_mul, element_bytes
                    )
                    tile_rows = block_n * (2 if silu_mul else 1) + block_m
                    assert 2 <= num_stages <= 4
                    assert num_stages * tile_rows * block_k * element_bytes <= DECODE_LINEAR_SMEM_BYTES


def test_rejects_what_it_cannot_run():
    w = torch.zeros(8, 16)
    with pytest.raises(ValueError, match="rows"):
        decode_linear(torch.zeros(DECODE_LINEAR_KERNEL_MAX_ROWS + 1, 16), w)
    with pytest.raises(ValueError, match="rows"):
        decode_linear(torch.zeros(0, 16), w)
    with pytest.raises(ValueError, match="x must be"):
        decode_linear(torch.zeros(16), w)
    with pytest.raises(ValueError, match="weight must be"):
        decode_linear(torch.zeros(1, 16), torch.zeros(8, 12))
    with pytest.raises(ValueError, match="weight must be"):
        decode_linear(torch.zeros(1, 16), torch.zeros(16, 8).t())  # K not contiguous
    with pytest.raises(ValueError, match="dtype"):
        decode_linear(torch.zeros(1, 16), w.half())
    with pytest.raises(ValueError, match="even"):
        decode_linear(torch.zeros(1, 16), torch.zeros(7, 16), silu_mul=True)
    with pytest.raises(ValueError, match="bias"):
        decode_linear(torch.zeros(1, 16), w, torch.zeros(4))
    with pytest.raises(ValueError, match="5 positive ints"):
        decode_linear(torch.zeros(1, 16), w, config=(16, 16, 16, 4))
    with pytest.raises(ValueError, match="BLOCK_N"):
        decode_linear(torch.zeros(1, 16), w, config=(16, 8, 16, 4, 2))  # tl.dot needs >= 16
    with pytest.raises(ValueError, match="BLOCK_K"):
        decode_linear(torch.zeros(1, 16), w, config=(16, 16, 48, 4, 2))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 5, 64, 100, 256])
def test_gpu_model_shapes(dtype, rows):
    # Qwen3-0.6B's four matmuls: qkv, o, gate_up (SiLU epilogue), down (K = 3072), with the default configs
    check_decode_linear(rows, 4096, 1024, dtype, "cuda")
    check_decode_linear(rows, 1024, 2048, dtype, "cuda")
    check_decode_linear(rows, 6144, 1024, dtype, "cuda", silu_mul=True)
    check_decode_linear(rows, 1024, 3072, dtype, "cuda", bias=True)
    # as the decoder calls them: gate_up with the folded norm, o_proj and down_proj with the residual add
    check_decode_linear(rows, 6144, 1024, dtype, "cuda", silu_mul=True, norm=True)
    check_decode_linear(rows, 1024, 2048, dtype, "cuda", residual=True)


@gpu
@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and check_pdl(torch.zeros(1, device="cuda"))),
                    reason="without PDL nothing overlaps: the test would pass trivially")  # fmt: skip
def test_gpu_chained_decode_linears_in_a_graph_wait_for_their_input():
    # Under PDL the second matmul may start while the first still runs (the first lets it launch at once):
    # it must read its input only after gdc_wait(). Replayed with new inputs each time, a read before the
    # wait would see the previous replay's (or a half-written) y.
    torch.manual_seed(0)
    x0 = torch.zeros(32, 1024, device="cuda", dtype=torch.bfloat16)
    w1 = (torch.randn(6144, 1024, device="cuda") / 32).to(torch.bfloat16)
    w2 = (torch.randn(1024, 3072, device="cuda") / 55).to(torch.bfloat16)

    norm_weight = torch.ones(1024, device="cuda", dtype=torch.bfloat16)

    def chain():  # as in the model: a PDL RMSNorm, then the matmuls
        h = rms_norm(x0, norm_weight, 1e-6)
        y = decode_linear(h, w1, silu_mul=True)  # [32, 3072]
        return decode_linear(y, w2)  # [32, 1024]

    def reference():
        return decode_linear_ref(
            decode_linear_ref(rms_norm_torch(x0, norm_weight, 1e-6), w1, silu_mul=True), w2
        )

    check_graph_replays(chain, x0, reference)


@pytest.mark.parametrize("rows,small_rows", [(32, 64), (0, 0), (16, 0), (128, 64)])
def test_small_weights_have_their_own_rows_limit(monkeypatch, rows, small_rows):
    # A matmul by a small weight is mostly fixed cost (PDL overlaps it): it takes the kernel up to
    # DECODE_LINEAR_SMALL_MAX_ROWS; a large one (an 8B model's) streams its weight, and cuBLAS's tiles won at
    # 48-64 rows there (session 29, H200): up to DECODE_LINEAR_MAX_ROWS. Both 0: every matmul to cuBLAS.
    monkeypatch.setattr(decode_linear_module, "DECODE_LINEAR_MAX_ROWS", rows)
    monkeypatch.setattr(decode_linear_module, "DECODE_LINEAR_SMALL_MAX_ROWS", small_rows)
    limit = DECODE_LINEAR_SMALL_WEIGHT_BYTES // 2048  # weight rows of 1024 bf16 values: exactly the bound
    small = torch.empty(limit, 1024, dtype=torch.bfloat16, device="meta")
    one_more = torch.empty(limit + 1, 1024, dtype=torch.bfloat16, device="meta")
    large = torch.empty(4096, 4096, dtype=torch.bfloat16, device="meta")  # 32 MiB: qwen3-8b's o_proj
    assert decode_linear_max_rows(small) == small_rows
    assert decode_linear_max_rows(one_more) == decode_linear_max_rows(large) == rows


def test_default_rows_limits():
    # (unless the environment overrides them)
    if "NANOVLLM_DECODE_LINEAR_ROWS" not in os.environ:
        assert DECODE_LINEAR_MAX_ROWS == 32
    if "NANOVLLM_DECODE_LINEAR_SMALL_ROWS" not in os.environ:
        assert DECODE_LINEAR_SMALL_MAX_ROWS == 64
    assert DECODE_LINEAR_SMALL_WEIGHT_BYTES == 12 * 2**20  # Qwen3-0.6B's gate_up, its largest layer weight


def test_model_takes_it_only_on_the_gpu_within_its_rows():
    # layers/linear.py asks this for every matmul: never on CPU tensors (the torch path), never past the rows
    w = torch.zeros(8, 16)
    assert not takes_decode_linear(torch.zeros(4, 16), w)
    if torch.cuda.is_available():
        w, rows = w.cuda(), decode_linear_max_rows(w)
        assert takes_decode_linear(torch.zeros(rows, 16, device="cuda"), w) == (rows > 0)
        assert not takes_decode_linear(torch.zeros(rows + 1, 16, device="cuda"), w)
        assert not takes_decode_linear(torch.zeros(4, 16, device="cuda", dtype=torch.float16), w)  # dtypes
        with kernel_backend("torch"):  # the reference ops everywhere: F.linear
            assert not takes_decode_linear(torch.zeros(4, 16, device="cuda"), w)
        large = torch.zeros(4096, 4096, dtype=torch.bfloat16, device="cuda")  # past the small-weight bound
        x = torch.zeros(DECODE_LINEAR_MAX_ROWS + 1, 4096, dtype=torch.bfloat16, device="cuda")
        assert decode_linear_max_rows(large) == DECODE_LINEAR_MAX_ROWS and not takes_decode_linear(x, large)
