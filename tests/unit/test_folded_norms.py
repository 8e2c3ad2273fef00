"""The decoder's RMSNorms folded into the matmuls after them (docs/model.md): the identity each consumer
relies on, checked op by op in fp32 against the unfused norm + linear, and the loaded model's weights."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nanovllm import LLM
from nanovllm.kernels.activation import silu_and_mul_torch
from nanovllm.kernels.decode_linear import decode_linear_ref
from nanovllm.kernels.rmsnorm import rms_norm_torch, rms_scale_torch
from nanovllm.layers.linear import linear
from tests.checkpoints import build_checkpoint

EPS = 1e-6


def case(rows: int = 5, k: int = 48, n: int = 40, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # the residual stream: rows of very different scales, which the norm evens out
    x = torch.randn(rows, k, generator=gen) * torch.linspace(0.05, 30.0, rows)[:, None]
    w = 1 + 0.3 * torch.randn(k, generator=gen)  # the norm's weight
    weight = torch.randn(n, k, generator=gen) / k**0.5
    bias = torch.randn(n, generator=gen)
    return x, w, weight, bias


def folded(weight: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return weight * w  # W[:, i] * w[i]


def test_scale_after_the_matmul_is_the_norm_before_it():
    x, w, weight, bias = case()
    want = F.linear(rms_norm_torch(x, w, EPS), weight, bias)
    got = rms_scale_torch(F.linear(x, folded(weight, w)), x, EPS, bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_silu_and_mul_finishes_a_folded_gate_up():
    x, w, weight, bias = case(n=64)
    want = silu_and_mul_torch(F.linear(rms_norm_torch(x, w, EPS), weight, bias))
    got = silu_and_mul_torch(F.linear(x, folded(weight, w)), norm_src=x, eps=EPS, bias=bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("silu_mul", [False, True])
def test_decode_linear_reference_with_the_norm_and_the_residual(silu_mul):
    x, w, weight, bias = case(n=64)
    y = F.linear(rms_norm_torch(x, w, EPS), weight, bias)
    y = silu_and_mul_torch(y) if silu_mul else y
    residual = torch.randn_like(y)
    got = decode_linear_ref(
        x, folded(weight, w), bias, silu_mul=silu_mul, rms_norm_eps=EPS, residual=residual
    )
    torch.testing.assert_close(got, residual + y, rtol=1e-5, atol=1e-5)


def test_linear_adds_the_residual_in_the_matmul():
    x, _, weight, bias = case()
    residual = torch.randn(x.shape[0], weight.shape[0])
    # (residual may be overwritten: each call gets a copy)
    want = residual + F.linear(x, weight, bias)
    torch.testing.assert_close(linear(x, weight, bias, residual.clone()), want)
    torch.testing.assert_close(linear(x, weight, None, residual.clone()), residual + F.linear(x, weight))


def test_a_layer_whose_norms_were_not_folded_refuses_to_run():
    from nanovllm.models.decoder import DecoderLayer, DecoderOptions
    from tests.checkpoints import _BASE, ARCHS

    config_cls, _, extra = ARCHS["qwen3"]
    layer = DecoderLayer(config_cls(**{**_BASE, **extra}), DecoderOptions(qk_norm=True), 64)
    positions, hidden = torch.zeros(2, dtype=torch.long), torch.zeros(2, _BASE["hidden_size"])
    with pytest.raises(RuntimeError, match="fold_norm_weights"):
        layer(positions, hidden, None, SimpleNamespace(is_decode=False))


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])  # qwen2: biases on q/k/v, finished with the norm
def test_loaded_model_holds_the_folded_weights(tmp_path, arch):
    from safetensors.torch import load_file

    ckpt = build_checkpoint(tmp_path / arch, arch, tokenizer=False)
    raw = load_file(str(ckpt / "model.safetensors"))
    llm = LLM(str(ckpt), device="cpu", num_kvcache_blocks=16, max_model_len=64)
    try:
        ours = dict(llm.engine.runner.model.named_parameters())
        for i in range(2):
            p = f"model.layers.{i}."
            qkv = torch.cat([raw[p + f"self_attn.{name}_proj.weight"] for name in "qkv"])
            gate_up = torch.cat([raw[p + f"mlp.{name}_proj.weight"] for name in ("gate", "up")])
            w1, w2 = raw[p + "input_layernorm.weight"], raw[p + "post_attention_layernorm.weight"]
            assert not torch.equal(w1, torch.ones_like(w1))  # the test checkpoint's norms are not ones
            torch.testing.assert_close(ours[p + "self_attn.qkv_proj.weight"], folded(qkv, w1), rtol=0, atol=0)
            torch.testing.assert_close(
                ours[p + "mlp.gate_up_proj.weight"], folded(gate_up, w2), rtol=0, atol=0
            )
            for norm in ("input_layernorm", "post_attention_layernorm"):
                assert bool((ours[p + f"{norm}.weight"] == 1).all())
        # the final norm feeds the (possibly tied) LM head: not folded
        assert torch.equal(ours["model.norm.weight"], raw["model.norm.weight"])
    finally:
        llm.shutdown()
