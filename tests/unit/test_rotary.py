"""Our rope frequencies and rotation against transformers' own (modeling_rope_utils, LlamaRotaryEmbedding)."""

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from nanovllm.layers.rotary_embedding import (
    compute_inv_freq,
    get_rope,
    rope_length_limit,
    rope_parameters_from_config,
)

HEAD_DIM = 64
MAX_POSITION_EMBEDDINGS = 512

ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    },
    "yarn": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 128},
    "yarn_betas_untruncated": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 16,
        "beta_slow": 2,
        "truncate": False,
    },
    "yarn_mscale": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 64,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
    },
    "yarn_attention_factor": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 128,
        "attention_factor": 1.5,
    },
}


def llama_config(rope_parameters: dict, head_dim: int = HEAD_DIM, **kwargs) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rope_parameters=copy.deepcopy(rope_parameters),
        **kwargs,
    )


def transformers_inv_freq(config: LlamaConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)


@pytest.mark.parametrize("name", list(ROPE_PARAMETERS))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_inv_freq_matches_transformers(name: str, head_dim: int) -> None:
    config = llama_config(ROPE_PARAMETERS[name], head_dim=head_dim)
    expected_inv_freq, expected_scaling = transformers_inv_freq(config)
    inv_freq, scaling = compute_inv_freq(
        head_dim, rope_parameters_from_config(config), MAX_POSITION_EMBEDDINGS
    )
    assert inv_freq.dtype == torch.float32
    torch.testing.assert_close(inv_freq, expected_inv_freq, rtol=0, atol=0)
    assert scaling == pytest.approx(expected_scaling, rel=1e-12)


@pytest.mark.parametrize("max_position", [MAX_POSITION_EMBEDDINGS // 2, 4 * MAX_POSITION_EMBEDDINGS])
def test_dynamic_inv_freq_is_transformers_at_max_position(max_position: int) -> None:
    # Past the pretraining length: transformers' frequencies at seq_len = max_position; within it: unscaled.
    config = llama_config(ROPE_PARAMETERS["dynamic"])
    expected, _ = transformers_inv_freq(config, seq_len=max_position)
    inv_freq, scaling = compute_inv_freq(HEAD_DIM, rope_parameters_from_config(config), max_position)
    torch.testing.assert_close(inv_freq, expected, rtol=0, atol=0)
    assert scaling == 1.0
    unscaled, _ = compute_inv_freq(HEAD_DIM, ROPE_PARAMETERS["default"], max_position)
    assert torch.equal(inv_freq, unscaled) == (max_position <= MAX_POSITION_EMBEDDINGS)


def test_old_style_rope_scaling_is_read() -> None:
    # A transformers config built from pre-5.x keys: rope_theta plus rope_scaling with "type".
    config = LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rope_theta=500000.0,
        rope_scaling={"type": "linear", "factor": 4.0},
    )
    params = rope_parameters_from_config(config)
    assert params["rope_type"] == "linear" and params["rope_theta"] == 500000.0 and params["factor"] == 4.0
    assert "type" not in params
    torch.testing.assert_close(
        compute_inv_freq(64, params, MAX_POSITION_EMBEDDINGS)[0],
        transformers_inv_freq(config)[0],
        rtol=0,
        atol=0,
    )

    # A config object of an older transformers: no rope_parameters attribute at all.
    old = SimpleNamespace(
        rope_theta=1e6,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
    )
    assert rope_parameters_from_config(old) == {
        "rope_type": "yarn",
        "rope_theta": 1e6,
        "factor": 4.0,
        "original_max_position_embeddings": 128,
    }
    old_dynamic = SimpleNamespace(
        rope_theta=10000.0, rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=256
    )
    assert rope_parameters_from_config(old_dynamic) == {
        "rope_type": "dynamic",
        "rope_theta": 10000.0,
        "factor": 2.0,
        "original_max_position_embeddings": 256,
    }
    plain = SimpleNamespace(rope_theta=10000.0, rope_scaling=None, max_position_embeddings=256)
    assert rope_parameters_from_config(plain) == {"rope_type": "default", "rope_theta": 10000.0}


def transformers_rotation(
    config: LlamaConfig, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # transformers wants [batch, heads, seq, head_dim]; ours are [num_tokens, heads, head_dim].
    rotary = LlamaRotaryEmbedding(config)
    cos, sin = rotary(q, positions[None])
    q_out, k_out = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return q_out[0].transpose(0, 1), k_out[0].transpose(0, 1)


@pytest.mark.parametrize("name", list(ROPE_PARAMETERS))
def test_rotation_matches_transformers(name: str) -> None:
    config = llama_config(ROPE_PARAMETERS[name])
    # Dynamic scales past the pretraining length: give it a longer table and make the batch reach its end, so
    # transformers (which rescales from the longest position seen) uses the same frequencies as our table.
    max_position = 2 * MAX_POSITION_EMBEDDINGS if name == "dynamic" else MAX_POSITION_EMBEDDINGS
    generator = torch.Generator().manual_seed(0)
    # Positions well past original_max_position_embeddings (128 or 64) for llama3/yarn, up to the table's end.
    positions = torch.cat(
        (
            torch.tensor([0, 1, 127, 128, 129, max_position - 1]),
            torch.randint(0, max_position, (7,), generator=generator),
        )
    )
    q = torch.randn(len(positions), 4, HEAD_DIM, generator=generator)
    k = torch.randn(len(positions), 2, HEAD_DIM, generator=generator)

    rope = get_rope(HEAD_DIM, max_position, rope_parameters_from_config(config))
    q_out, k_out = rope(positions, q, k)
    q_expected, k_expected = transformers_rotation(config, positions, q, k)
    tol = 1e-5 if name == "dynamic" else 1e-6  # transformers' run-time dynamic base is computed in fp32
    torch.testing.assert_close(q_out, q_expected, rtol=tol, atol=tol)
    torch.testing.assert_close(k_out, k_expected, rtol=tol, atol=tol)

    # The flattened [num_tokens, heads * head_dim] layout gives the same result.
    q_flat, k_flat = rope(positions, q.flatten(1), k.flatten(1))
    assert torch.equal(q_flat, q_out.flatten(1)) and torch.equal(k_flat, k_out.flatten(1))


def test_partial_rotary_rotates_leading_dims_only() -> None:
    params = ROPE_PARAMETERS["default"]
    positions = torch.tensor([0, 3, 200, 511])
    q, k = torch.randn(4, 4, 128), torch.randn(4, 2, 128)
    q_out, k_out = get_rope(128, 512, params, rotary_dim=64)(positions, q, k)
    q_rot, k_rot = get_rope(64, 512, params)(positions, q[..., :64], k[..., :64])
    assert torch.equal(q_out[..., :64], q_rot) and torch.equal(k_out[..., :64], k_rot)
    assert torch.equal(q_out[..., 64:], q[..., 64:]) and torch.equal(k_out[..., 64:], k[..., 64:])
    # partial_rotary_factor in the parameters picks the same rotary_dim.
    assert get_rope(128, 512, {**params, "partial_rotary_factor": 0.5}).rotary_dim == 64


def test_get_rope_shares_one_instance_per_config() -> None:
    params = ROPE_PARAMETERS["llama3"]
    rope = get_rope(HEAD_DIM, 1024, params)
    assert get_rope(HEAD_DIM, 1024, copy.deepcopy(params)) is rope
    assert get_rope(HEAD_DIM, 2048, params) is not rope
    assert get_rope(HEAD_DIM, 1024, {**params, "factor": 4.0}) is not rope
    assert rope.cos_sin_cache.shape == (1024, HEAD_DIM) and rope.cos_sin_cache.dtype == torch.float32


def test_unsupported_rope_type_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="rope_type must be one of"):
        get_rope(HEAD_DIM, 128, {"rope_type": "longrope", "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="'factor'"):
        compute_inv_freq(HEAD_DIM, {"rope_type": "linear", "rope_theta": 10000.0}, 128)


@pytest.mark.parametrize(
    "max_position_embeddings, rope_scaling, max_len",
    [
        # Qwen2.5 / Qwen3 with YaRN as their model cards say: original 32768 x 4
        (32768, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 131072),
        (40960, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 131072),
        (4096, {"type": "linear", "factor": 4.0}, 16384),  # linear-scaled Llama 2: 4096 x 4
        # never below max_position_embeddings (vLLM would take 32768 x 1): what ran before still runs
        (40960, {"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 32768}, 40960),
        # llama3 configs state the extended length already; dynamic is exact only up to it; no scaling
        (131072, {"rope_type": "llama3", **ROPE_PARAMETERS["llama3"]}, 131072),
        (4096, {"type": "dynamic", "factor": 2.0}, 4096),
        (4096, None, 4096),
    ],
)
def test_rope_length_limit_is_vllms_derived_max_len(max_position_embeddings, rope_scaling, max_len) -> None:
    config = SimpleNamespace(
        rope_theta=10000.0, rope_scaling=rope_scaling, max_position_embeddings=max_position_embeddings
    )
    assert rope_length_limit(config, max_position_embeddings).max_len == max_len
