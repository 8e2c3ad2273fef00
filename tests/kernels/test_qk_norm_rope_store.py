"""qk_norm_rope_store (one Triton kernel: per-head q/k RMSNorm, rope, K/V into the paged cache) against its
reference, the unfused torch ops in a row; and an engine whose attention takes the Triton path (kernels in
the interpreter) against the torch path, token for token."""

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.kernels.qk_norm_rope_store import qk_norm_rope_store, qk_norm_rope_store_ref
from nanovllm.layers import attention as attention_module
from nanovllm.layers.rotary_embedding import get_rope
from tests.checkpoints import build_checkpoint, mixed_prompts

ROPE_PARAMETERS = {"rope_type": "default", "rope_theta": 10000.0}
MAX_POSITION = 4096
# q and K go through the same roundings as the reference; only the fp32 order of the variance sum differs.
TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_case(
    num_tokens: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    qk_norm: bool,
    rotary_dim: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    token_stride_pad: int = 0,
    input_norm: bool = False,
    qkv_bias: bool = False,
) -> dict:
    """Arguments of qk_norm_rope_store: qkv as the projection makes it, random positions, distinct random
    slots with every third token padding (-1), and a NaN-filled cache (untouched slots must stay NaN).
    input_norm: also the layer input whose folded RMSNorm the kernel finishes (hidden 1,100: two chunks of
    the kernel's sum, the last partial), rows of very different scales, which qkv's rows carry too (as the
    matmul of that input makes them); qkv_bias: and the bias."""
    gen = torch.Generator().manual_seed(seed)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    # token_stride_pad > 0: qkv is a column slice of a wider tensor (strided tokens).
    qkv = torch.randn(num_tokens, width + token_stride_pad, generator=gen).to(dtype)[:, :width]
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen)
    positions[-1:] = MAX_POSITION - 1
    num_blocks = -(-2 * num_tokens // block_size) + 1
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::3] = -1
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    weights = {}
    if input_norm:
        scales = torch.linspace(0.05, 30.0, num_tokens)[:, None]
        weights["norm_src"] = (torch.randn(num_tokens, 1100, generator=gen) * scales).to(dtype).to(device)
        qkv = (qkv.float() * scales).to(dtype)
        if qkv_bias:
            weights["qkv_bias"] = torch.randn(width, generator=gen).to(dtype).to(device)
    if qk_norm:
        weights |= {
            "q_norm_weight": (1 + 0.1 * torch.randn(head_dim, generator=gen)).to(dtype).to(device),
            "k_norm_weight": (1 + 0.1 * torch.randn(head_dim, generator=gen)).to(dtype).to(device),
            "eps": 1e-6,
        }
    return dict(
        qkv=qkv.to(device),
        positions=positions.to(device),
        cos_sin_cache=get_rope(head_dim, MAX_POSITION, ROPE_PARAMETERS, rotary_dim).cos_sin_cache.to(device),
        k_cache=torch.full(cache_shape, float("nan"), dtype=dtype, device=device),
        v_cache=torch.full(cache_shape, float("nan"), dtype=dtype, device=device),
        slot_mapping=slots.to(device),
        num_heads=num_heads,
        **weights,
    )


def check_fused_matches_ref(case: dict) -> None:
    ref = {**case, "k_cache": case["k_cache"].clone(), "v_cache": case["v_cache"].clone()}
    qkv_before = case["qkv"].clone()
    q = qk_norm_rope_store(**case)
    q_expected = qk_norm_rope_store_ref(**ref)
    assert torch.equal(case["qkv"], qkv_before)  # the projection output is only read
    assert q.shape == q_expected.shape and q.is_contiguous() and q.dtype == q_expected.dtype
    tol = TOLERANCE[case["qkv"].dtype]
    torch.testing.assert_close(q, q_expected, **tol)
    # The whole cache: K close, V copied exactly (close when scaled by the input norm), and NaN (never
    # written) in the same places.
    torch.testing.assert_close(case["k_cache"], ref["k_cache"], equal_nan=True, **tol)
    v_tol = tol if "norm_src" in case else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(case["v_cache"], ref["v_cache"], equal_nan=True, **v_tol)


# ---------------------------------------------------------------- CPU: Triton interpreter vs reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [16, 64, 256])
@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk_norm", "no_norm"])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 2, 64), (6, 2, 128), (3, 3, 64)])
def test_fused_matches_ref(num_heads, num_kv_heads, head_dim, qk_norm, block_size, dtype):
    check_fused_matches_ref(make_case(19, num_heads, num_kv_heads, head_dim, block_size, dtype, qk_norm))


@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk_norm", "no_norm"])
@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(64, 32), (128, 64), (64, 16)])
def test_fused_partial_rotary(head_dim, rotary_dim, qk_norm):
    case = make_case(9, 4, 2, head_dim, 16, torch.float32, qk_norm, rotary_dim=rotary_dim, seed=1)
    check_fused_matches_ref(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("qkv_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk_norm", "no_norm"])
def test_fused_finishes_the_folded_input_norm(qk_norm, qkv_bias, dtype):
    case = make_case(13, 4, 2, 64, 16, dtype, qk_norm, seed=6, input_norm=True, qkv_bias=qkv_bias)
    check_fused_matches_ref(case)
    # the two norms' eps kept apart: large ones, so that mixing them up shows
    check_fused_matches_ref({**case, "norm_src_eps": 30.0, "eps": 0.01})


def test_ref_finishes_the_folded_input_norm_first():
    from nanovllm.kernels.rmsnorm import rms_scale_torch

    case = make_case(7, 4, 2, 64, 16, torch.float32, True, seed=7, input_norm=True, qkv_bias=True)
    plain = {k: v for k, v in case.items() if k not in ("norm_src", "qkv_bias")}
    plain["qkv"] = rms_scale_torch(case["qkv"], case["norm_src"], 1e-6, case["qkv_bias"])
    case["eps"] = 0.5  # the q/k norms' eps: not the input norm's (norm_src_eps, default 1e-6)
    plain["eps"] = 0.5
    plain["k_cache"], plain["v_cache"] = case["k_cache"].clone(), case["v_cache"].clone()
    assert torch.equal(qk_norm_rope_store_ref(**case), qk_norm_rope_store_ref(**plain))
    assert torch.equal(case["v_cache"].nan_to_num(), plain["v_cache"].nan_to_num())


@pytest.mark.parametrize("num_tokens", [0, 1, 2])
def test_fused_tiny_batches(num_tokens):
    check_fused_matches_ref(make_case(num_tokens, 4, 2, 64, 16, torch.float16, True, seed=2))


def test_fused_strided_qkv_and_int32_indices():
    case = make_case(11, 4, 2, 64, 32, torch.float32, True, seed=3, token_stride_pad=24)
    assert not case["qkv"].is_contiguous()
    case["positions"], case["slot_mapping"] = case["positions"].int(), case["slot_mapping"].int()
    check_fused_matches_ref(case)


def test_fused_stores_nothing_for_padding():
    case = make_case(5, 4, 2, 64, 16, torch.float32, True, seed=4)
    case["slot_mapping"] = torch.full((5,), -1, dtype=torch.int64)
    check_fused_matches_ref(case)
    assert case["k_cache"].isnan().all() and case["v_cache"].isnan().all()


def test_ref_is_the_unfused_ops():
    # Spelled out once more, op by op, as the decoder layer ran them before the fusion.
    from nanovllm.kernels.rmsnorm import rms_norm_torch
    from nanovllm.kernels.rope import apply_rope_torch
    from nanovllm.kernels.store_kvcache import store_kvcache_ref

    case = make_case(7, 4, 2, 64, 16, torch.float16, True, seed=5)
    k_cache, v_cache = case["k_cache"].clone(), case["v_cache"].clone()
    q_out = qk_norm_rope_store_ref(**case)
    q, k, v = case["qkv"].split([4 * 64, 2 * 64, 2 * 64], dim=-1)
    q = rms_norm_torch(q.view(7, 4, 64), case["q_norm_weight"], 1e-6)
    k = rms_norm_torch(k.view(7, 2, 64), case["k_norm_weight"], 1e-6)
    q, k = apply_rope_torch(q, k, case["cos_sin_cache"], case["positions"])
    store_kvcache_ref(k, v.view(7, 2, 64), k_cache, v_cache, case["slot_mapping"])
    assert torch.equal(q_out, q)
    assert torch.equal(case["k_cache"].nan_to_num(), k_cache.nan_to_num())
    assert torch.equal(case["v_cache"].nan_to_num(), v_cache.nan_to_num())


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(qkv=torch.randn(4, 500)), "qkv must be"),
        (dict(qkv=torch.randn(4, 512, dtype=torch.float16)), "dtype"),
        (dict(qkv=torch.randn(512, 4).t()), "contiguous in its last"),
        (dict(num_heads=0), "num_heads"),
        (dict(positions=torch.zeros(3, dtype=torch.int64)), "positions"),
        (dict(positions=torch.zeros(4)), "positions"),
        (dict(slot_mapping=torch.zeros(4, dtype=torch.float32)), "slot_mapping"),
        (dict(cos_sin_cache=torch.zeros(16, 65)), "cos_sin_cache"),
        (dict(cos_sin_cache=torch.zeros(16, 130)), "cos_sin_cache"),
        (dict(q_norm_weight=torch.ones(64)), "given together"),
        (dict(q_norm_weight=torch.ones(32), k_norm_weight=torch.ones(64)), "q_norm_weight must be"),
        (dict(v_cache=torch.zeros(2, 8, 2, 32)), "k_cache and v_cache"),
        (dict(norm_src=torch.randn(3, 64)), "norm_src must be"),
        (dict(norm_src=torch.randn(64, 4).t()), "norm_src must be"),
        (dict(qkv_bias=torch.randn(512)), "qkv_bias is taken only"),
        (dict(norm_src=torch.randn(4, 64), qkv_bias=torch.randn(500)), "qkv_bias is taken only"),
    ],
)
def test_rejects_bad_arguments(change, match):
    args = dict(
        qkv=torch.randn(4, (4 + 2 * 2) * 64),
        positions=torch.zeros(4, dtype=torch.int64),
        cos_sin_cache=torch.zeros(16, 64),
        k_cache=torch.zeros(2, 8, 2, 64),
        v_cache=torch.zeros(2, 8, 2, 64),
        slot_mapping=torch.zeros(4, dtype=torch.int64),
        num_heads=4,
    )
    args.update(change)
    for op in (qk_norm_rope_store, qk_norm_rope_store_ref):
        with pytest.raises(ValueError, match=match):
            op(**args)


# ---------------------------------------------------------------- engine: Triton attention path on the CPU


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3", "llama"])  # with and without q/k norm
def test_engine_triton_attention_path_equals_torch_path(tmp_path, monkeypatch, arch):
    """The layers' Triton path (fused kernel, Triton prefill and decode attention, all in the interpreter)
    gives the torch path's greedy tokens on a tiny fp32 model, prefill and decode steps both."""
    ckpt = build_checkpoint(tmp_path, arch)
    prompts = mixed_prompts([5, 40, 17])
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    def tokens(llm):
        return [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]

    expected = tokens(LLM(str(ckpt), max_model_len=128, block_size=16, kernel_backend="torch"))
    launches = []
    fused = attention_module.qk_norm_rope_store
    monkeypatch.setattr(attention_module, "use_triton", lambda x: True)
    monkeypatch.setattr(
        attention_module, "qk_norm_rope_store", lambda *a, **k: launches.append(1) or fused(*a, **k)
    )
    got = tokens(LLM(str(ckpt), max_model_len=128, block_size=16, kernel_backend="triton"))
    assert launches, "the fused kernel never ran"
    assert got == expected


# ---------------------------------------------------------------- GPU: the compiled kernel at real sizes


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk_norm", "no_norm"])
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(16, 8, 128), (32, 8, 128), (14, 2, 64)])
@pytest.mark.parametrize("num_tokens", [1, 256, 16384])
def test_fused_matches_ref_gpu(num_tokens, num_heads, num_kv_heads, head_dim, block_size, qk_norm):
    case = make_case(num_tokens, num_heads, num_kv_heads, head_dim, block_size, torch.bfloat16, qk_norm,
                     device="cuda")  # fmt: skip
    check_fused_matches_ref(case)


@pytest.mark.gpu
@needs_cuda
def test_fused_partial_rotary_and_fp16_gpu():
    check_fused_matches_ref(make_case(300, 32, 4, 128, 32, torch.float16, True, rotary_dim=64, device="cuda"))
    check_fused_matches_ref(make_case(300, 16, 8, 128, 16, torch.float32, True, device="cuda"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk_norm", "no_norm"])
@pytest.mark.parametrize("num_tokens", [1, 256, 16384])
def test_fused_finishes_the_folded_input_norm_gpu(num_tokens, qk_norm):
    case = make_case(num_tokens, 16, 8, 128, 16, torch.bfloat16, qk_norm, device="cuda", input_norm=True,
                     qkv_bias=not qk_norm)  # fmt: skip
    check_fused_matches_ref(case)


@pytest.mark.gpu
@needs_cuda
def test_fused_in_cuda_graph_gpu():
    # Captured once, replayed with other positions and slots (padding included): the decode-step use.
    case = make_case(64, 16, 8, 128, 16, torch.bfloat16, True, device="cuda")
    qk_norm_rope_store(**case)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q = qk_norm_rope_store(**case)
    for seed in (1, 2):
        new = make_case(64, 16, 8, 128, 16, torch.bfloat16, True, device="cuda", seed=seed)
        for name in ("qkv", "positions", "slot_mapping"):
            case[name].copy_(new[name])
        case["k_cache"].fill_(float("nan"))
        case["v_cache"].fill_(float("nan"))
        graph.replay()
        ref = {**case, "k_cache": torch.full_like(case["k_cache"], float("nan"))}
        ref["v_cache"] = torch.full_like(case["v_cache"], float("nan"))
        tol = TOLERANCE[torch.bfloat16]
        torch.testing.assert_close(q, qk_norm_rope_store_ref(**ref), **tol)
        torch.testing.assert_close(case["k_cache"], ref["k_cache"], equal_nan=True, **tol)
        torch.testing.assert_close(case["v_cache"], ref["v_cache"], rtol=0, atol=0, equal_nan=True)
