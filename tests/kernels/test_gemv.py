"""The small-batch GEMV with its fused prologue (add + RMSNorm) and epilogue (SiLU-and-mul) against the
unfused torch ops (the interpreter on CPU in fp32/fp16, the compiled kernel under `gpu` in bf16 too)."""

from types import SimpleNamespace

import pytest
import torch

from nanovllm.kernels.gemv import GEMV_MAX_K, GEMV_MAX_ROWS, gemv, gemv_ref
from tests.kernels.matmul_inputs import TOLERANCE, check_graph_replays, gpu, randn


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
    inputs = [x, weight] + [t for t in (args["bias"], args["residual"], args["norm_weight"]) if t is not None]
    before = [t.clone() for t in inputs]
    out, new_residual = gemv(x, weight, **args)
    expected, expected_residual = gemv_ref(x, weight, **args)
    assert all(torch.equal(a, b) for a, b in zip(inputs, before))  # inputs are never written
    assert out.shape == (rows, n // 2 if silu_mul else n) and out.dtype == dtype
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    if expected_residual is None:
        assert new_residual is None
    else:
        assert torch.equal(new_residual, expected_residual)  # the add rounds as the reference does


if GEMV_MAX_ROWS < 2:
    pytest.skip(
        "NANOVLLM_GEMV_MAX_ROWS < 2 (a measuring switch): gemv takes too few rows", allow_module_level=True
    )

# (rows, n, k): one row and two, n not a multiple of the tile, k not a power of two
SHAPES = [(1, 64, 32), (2, 40, 48), (2, 96, 160)]


@pytest.mark.parametrize("rows,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_plain(rows, n, k, dtype):
    check_gemv(rows, n, k, dtype, "cpu")


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_norm_prologue_and_silu_epilogue(residual, silu_mul, bias):
    check_gemv(2, 48, 80, torch.float32, "cpu", residual=residual, norm=True, bias=bias, silu_mul=silu_mul)


def test_norm_prologue_rounds_where_rms_norm_does():
    # In fp16 the rounding points matter: the add, the normalized row and weight * row each round to fp16
    # (as kernels/rmsnorm.py does), then the matmul. A tolerance of a few fp16 ulps of the output would not
    # pass if the prologue kept any of them in fp32 (then y moves by up to |W| * ulp(x) * sqrt(K)).
    x = randn(2, 256, dtype=torch.float16, device="cpu", seed=11, scale=30.0)
    residual = randn(2, 256, dtype=torch.float16, device="cpu", seed=12, scale=30.0)
    norm_weight = 1 + 0.3 * randn(256, dtype=torch.float16, device="cpu", seed=13)
    weight = torch.eye(256, dtype=torch.float16)[:64]  # y = the first 64 normalized values themselves
    out, _ = gemv(x, weight, residual=residual, norm_weight=norm_weight, eps=1e-6)
    expected, _ = gemv_ref(x, weight, residual=residual, norm_weight=norm_weight, eps=1e-6)
    assert torch.equal(out, expected)


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
    with pytest.raises(ValueError, match="K <="):
        gemv(torch.zeros(1, GEMV_MAX_K + 1), torch.zeros(8, GEMV_MAX_K + 1))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 2])
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
    # against the layer's general path (norms folded into the matmuls) on the same inputs and cache. The
    # GEMV path returns the residual stream as (hidden, residual), the general one whole, as (stream, None).
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
    layer.fold_norm_weights()
    assert layer.gemv_decode
    attn = layer.self_attn
    block_size, num_blocks, batch = 16, 8, 2
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
        stream, none = layer(positions, hidden.clone(), residual, meta)  # CPU: the torch path (writes hidden)
        got_hidden, got_residual = layer._forward_gemv(positions, hidden, residual, meta)
    assert none is None
    torch.testing.assert_close(got_hidden + got_residual, stream, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "rows,is_decode,triton,tp_size,taken",
    [
        (1, True, True, 1, True),
        (2, True, True, 1, True),
        (3, True, True, 1, False),  # more rows than GEMV_MAX_ROWS
        (1, False, True, 1, False),  # a prefill step
        (1, True, False, 1, False),  # the torch path (CPU tensors)
        (1, True, True, 2, False),  # tensor parallel
    ],
)
def test_decoder_layer_takes_the_gemv_path_only_for_small_decode_batches(
    monkeypatch, rows, is_decode, triton, tp_size, taken
):
    from nanovllm.models import decoder
    from tests.checkpoints import _BASE, ARCHS

    config_cls, _, extra = ARCHS["qwen3"]
    monkeypatch.setattr(decoder, "get_tp_size", lambda: tp_size)
    layer = decoder.DecoderLayer(config_cls(**{**_BASE, **extra}), decoder.DecoderOptions(qk_norm=True), 1024)
    layer.fold_norm_weights()
    monkeypatch.setattr(decoder, "use_triton", lambda x: triton)
    calls = []
    monkeypatch.setattr(layer, "_forward_gemv", lambda *args: calls.append("gemv") or ("gemv", None))
    monkeypatch.setattr(layer.self_attn, "forward", lambda *args: calls.append("unfused"))
    monkeypatch.setattr(layer.mlp, "forward", lambda *args: None)
    meta = SimpleNamespace(is_decode=is_decode)
    layer(torch.zeros(rows), torch.zeros(rows, _BASE["hidden_size"]), None, meta)
    assert calls == (["gemv"] if taken else ["unfused"])


@gpu
@pytest.mark.gpu
def test_gpu_chained_gemvs_in_a_graph_wait_for_their_input():
    # Under PDL the second gemv may start while the first still runs (the first lets it launch at once):
    # it must read its input only after gdc_wait(). Replayed with new inputs each time, a read before the
    # wait would see the previous replay's (or a half-written) y.
    torch.manual_seed(0)
    x0 = torch.zeros(2, 1024, device="cuda", dtype=torch.bfloat16)
    w1 = (torch.randn(3072, 1024, device="cuda") / 32).to(torch.bfloat16)
    w2 = (torch.randn(4096, 3072, device="cuda") / 55).to(torch.bfloat16)
    norm_weight = torch.ones(3072, device="cuda", dtype=torch.bfloat16)

    def chain():
        y, _ = gemv(x0, w1)  # [2, 3072]
        z, _ = gemv(y, w2, norm_weight=norm_weight)  # [2, 4096]
        return z

    def reference():
        y_ref, _ = gemv_ref(x0, w1)
        return gemv_ref(y_ref, w2, norm_weight=norm_weight)[0]

    check_graph_replays(chain, x0, reference)
