"""Rotary position embedding: the frequency rules of each rope type, and the shared cos/sin table.

The inverse frequencies reproduce transformers' rope init functions (`modeling_rope_utils`) operation for
operation in fp32, so the table equals the cos/sin transformers computes for the same config.
"""

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nanovllm.kernels.rope import apply_rope

# ---------------------------------------------------------------- inverse frequencies per rope type
# Each takes the rotated dim, the rope parameters and the table length; returns (inv_freq [dim // 2] fp32,
# attention_scaling: the factor transformers multiplies cos and sin by).


def _default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))


def _default(dim: int, params: dict, max_position: int) -> tuple[torch.Tensor, float]:
    return _default_inv_freq(dim, params["rope_theta"]), 1.0


def _linear(dim: int, params: dict, max_position: int) -> tuple[torch.Tensor, float]:
    # Dividing positions by `factor` is the same as dividing the frequencies by it.
    return _default_inv_freq(dim, params["rope_theta"]) / params["factor"], 1.0


def _dynamic(dim: int, params: dict, max_position: int) -> tuple[torch.Tensor, float]:
    # Dynamic NTK: transformers recomputes the base from the current sequence length whenever it grows
    # past the pretraining length. With a KV cache, keys keep the rotation they were cached with, so the
    # angles cannot change from step to step; we fix the table at what transformers computes for
    # seq_len = max_position when that exceeds the pretraining length, else the unscaled frequencies. The
    # engine refuses max_model_len past the pretraining length (`_dynamic_limit`), so it always runs the
    # unscaled ones. "original_max_position_embeddings" here is the config's max_position_embeddings, the
    # length transformers scales against.
    theta = params["rope_theta"]
    original_max_position = _required(params, "original_max_position_embeddings")
    if max_position > original_max_position:
        factor = params["factor"]
        theta = theta * ((factor * max_position / original_max_position) - (factor - 1)) ** (dim / (dim - 2))
    return _default_inv_freq(dim, theta), 1.0


def _llama3(dim: int, params: dict, max_position: int) -> tuple[torch.Tensor, float]:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, and the band between them smoothly
    # interpolated.
    inv_freq = _default_inv_freq(dim, params["rope_theta"])
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    original_max_position = _required(params, "original_max_position_embeddings")
    low_freq_wavelen = original_max_position / low_freq_factor
    high_freq_wavelen = original_max_position / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, params: dict, max_position: int) -> tuple[torch.Tensor, float]:
    # YaRN: interpolate (divide by `factor`) the low frequencies, extrapolate (keep) the high ones, with a
    # linear ramp between, and scale cos/sin by an attention factor that grows with log(factor).
    theta = params["rope_theta"]
    factor = params["factor"]
    original_max_position = _required(params, "original_max_position_embeddings")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        # The dim whose wavelength fits `num_rotations` times into the pretraining length.
        return (dim * math.log(original_max_position / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp

    pos_freqs = theta ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (
        inv_freq_interpolation * (1 - extrapolation_weight) + inv_freq_extrapolation * extrapolation_weight
    )
    return inv_freq, attention_factor


_ROPE_TYPES = {"default": _default, "linear": _linear, "dynamic": _dynamic, "llama3": _llama3, "yarn": _yarn}


def _required(params: dict, key: str) -> Any:
    if params.get(key) is None:
        raise ValueError(f"rope_parameters for rope_type {params['rope_type']!r} need {key!r}, got {params}")
    return params[key]


def _rotary_dim(head_dim: int, rope_parameters: dict) -> int:
    return int(head_dim * rope_parameters.get("partial_rotary_factor", 1.0))


def _inv_freq(rotary_dim: int, rope_parameters: dict, max_position: int) -> tuple[torch.Tensor, float]:
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"rope_type must be one of {sorted(_ROPE_TYPES)}, got {rope_type!r}")
    params = {"rope_theta": 10000.0, **rope_parameters, "rope_type": rope_type}
    if rope_type != "default" and params.get("factor") is None:
        raise ValueError(f"rope_parameters for rope_type {rope_type!r} need 'factor', got {rope_parameters}")
    inv_freq, attention_scaling = _ROPE_TYPES[rope_type](rotary_dim, params, max_position)
    return inv_freq, float(attention_scaling)


def compute_inv_freq(head_dim: int, rope_parameters: dict, max_position: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim // 2] fp32, attention_scaling) for `rope_parameters` (transformers 5.x style),
    with rotary_dim = int(head_dim * partial_rotary_factor). Equal to transformers' rope init functions; for
    "dynamic", to theirs at seq_len = max_position (see `_dynamic`)."""
    return _inv_freq(_rotary_dim(head_dim, rope_parameters), rope_parameters, max_position)


def rope_parameters_from_config(hf_config: Any) -> dict:
    """The rope parameters of a transformers config as one flat dict: `config.rope_parameters` (5.x), or
    `config.rope_theta` + `config.rope_scaling` (older configs, "type" or "rope_type" key)."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    if any(isinstance(value, dict) for value in params.values()):
        raise ValueError(f"per-layer-type rope parameters are not supported, got {params}")
    params = dict(params)
    rope_type = params.pop("type", None)
    params["rope_type"] = params.get("rope_type") or rope_type or "default"
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(hf_config, "rope_theta", None) or 10000.0
    partial_rotary_factor = getattr(hf_config, "partial_rotary_factor", None)
    if partial_rotary_factor is not None:
        params.setdefault("partial_rotary_factor", partial_rotary_factor)

    max_position_embeddings = getattr(hf_config, "max_position_embeddings", None)
    if params["rope_type"] == "dynamic":
        # transformers scales dynamic NTK relative to max_position_embeddings itself.
        params["original_max_position_embeddings"] = max_position_embeddings
    elif params["rope_type"] in ("llama3", "yarn"):
        # As transformers: a top-level original_max_position_embeddings (Phi-3 style) wins, then the one
        # in the rope dict, then max_position_embeddings.
        original = getattr(hf_config, "original_max_position_embeddings", None)
        if original is not None:
            params["original_max_position_embeddings"] = original
        elif params.get("original_max_position_embeddings") is None:
            params["original_max_position_embeddings"] = max_position_embeddings
        if params["rope_type"] == "yarn" and params.get("factor") is None:
            params["factor"] = max_position_embeddings / params["original_max_position_embeddings"]
    return params


# ---------------------------------------------------------------- the longest length the rope allows


@dataclass(frozen=True)
class RopeLengthLimit:
    max_len: int  # the longest max_model_len the engine accepts for this config
    reason: str  # how max_len was derived, for the error that refuses more


def rope_length_limit(hf_config: Any, max_position_embeddings: int) -> RopeLengthLimit:
    """The longest max_model_len for `hf_config`'s rope, as vLLM derives it (`_get_and_verify_max_len`):
    linear scales max_position_embeddings by `factor`, yarn scales original_max_position_embeddings by it,
    llama3 and unscaled rope stay at max_position_embeddings (llama3 configs already state the extended
    length). Linear and yarn frequencies do not depend on the position, so the table is exact that far.
    Never below max_position_embeddings (a yarn config whose original x factor is smaller keeps the length
    it always had here, where vLLM would lower it). vLLM also scales `dynamic` by `factor`; we do not
    (see `_dynamic_limit`)."""
    params = rope_parameters_from_config(hf_config)
    rope_type = params["rope_type"]
    if rope_type == "linear":
        factor = _required(params, "factor")
        return RopeLengthLimit(
            max(max_position_embeddings, int(max_position_embeddings * factor)),
            f"max_position_embeddings={max_position_embeddings} x factor={factor} (rope_type 'linear')",
        )
    if rope_type == "yarn":
        factor, original = params["factor"], _required(params, "original_max_position_embeddings")
        return RopeLengthLimit(
            max(max_position_embeddings, int(original * factor)),
            f"original_max_position_embeddings={original} x factor={factor}, or max_position_embeddings="
            f"{max_position_embeddings} if more (rope_type 'yarn')",
        )
    if rope_type == "dynamic":
        return _dynamic_limit(params, max_position_embeddings)
    scaling = "no rope scaling" if rope_type == "default" else f"rope_type {rope_type!r} does not extend it"
    return RopeLengthLimit(
        max_position_embeddings, f"max_position_embeddings={max_position_embeddings} ({scaling})"
    )


def _dynamic_limit(params: dict, max_position_embeddings: int) -> RopeLengthLimit:
    # transformers' dynamic NTK recomputes the base from the current sequence length on every forward past
    # max_position_embeddings, so a token's angles depend on how long the sequence was when it was computed;
    # keys already rotated in the KV cache cannot follow. vLLM allows max_position_embeddings x factor with
    # one fixed table (its base formula reduces to the unscaled base), which differs from transformers past
    # max_position_embeddings; we stay exact and refuse instead.
    return RopeLengthLimit(
        max_position_embeddings,
        f"max_position_embeddings={max_position_embeddings}: rope_type 'dynamic' (dynamic NTK, "
        f"factor={params.get('factor')}) rescales its frequencies from the growing sequence length past it, "
        "which keys already rotated in the KV cache cannot follow, so the engine could not match "
        "transformers there (vLLM allows max_position_embeddings x factor and differs from transformers "
        "past max_position_embeddings)",
    )


# ---------------------------------------------------------------- the layer


class RotaryEmbedding(nn.Module):
    """Applies rope to q and k from one precomputed table, shared by every attention layer (see get_rope)."""

    def __init__(self, head_dim: int, max_position: int, rope_parameters: dict, rotary_dim: int) -> None:
        super().__init__()
        if rotary_dim % 2 != 0 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        inv_freq, self.attention_scaling = _inv_freq(rotary_dim, rope_parameters, max_position)
        # freqs: [max_position, rotary_dim // 2], one fp32 product per entry, as transformers'
        # inv_freq @ position_ids
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        # cos_sin_cache: [max_position, rotary_dim] fp32, each row cat(cos, sin). A plain attribute, not a
        # buffer: this one instance is shared by all layers (and by every model in the process), so
        # model.to(dtype) must not round it; forward moves it to the tensors' device on first use.
        self.cos_sin_cache = torch.cat(
            (freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling), dim=-1
        )

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [num_tokens] int64; q: [num_tokens, num_heads, head_dim]; k: [num_tokens,
        num_kv_heads, head_dim] (or both flattened to [num_tokens, heads * head_dim]). Returns new rotated
        q and k of the same shapes."""
        q_shape, k_shape = q.shape, k.shape
        q_out, k_out = apply_rope(
            q.view(q.shape[0], -1, self.head_dim),
            k.view(k.shape[0], -1, self.head_dim),
            self.cos_sin_cache_on(q.device),
            positions,
        )
        return q_out.view(q_shape), k_out.view(k_shape)

    def cos_sin_cache_on(self, device: torch.device) -> torch.Tensor:
        """The table [max_position, rotary_dim] fp32 on `device`, for ops that apply rope themselves."""
        if self.cos_sin_cache.device != device:
            # First forward on this device, which comes before any CUDA graph capture (warm-up runs first).
            self.cos_sin_cache = self.cos_sin_cache.to(device)
        return self.cos_sin_cache

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, max_position={self.max_position}"


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((key, _freeze(v)) for key, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


@functools.cache
def _get_rope_cached(
    head_dim: int, max_position: int, frozen_parameters: tuple, rotary_dim: int
) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, max_position, dict(frozen_parameters), rotary_dim)


def get_rope(
    head_dim: int, max_position: int, rope_parameters: dict, rotary_dim: int | None = None
) -> RotaryEmbedding:
    """The RotaryEmbedding for this config, one instance per distinct set of arguments, so all layers share a
    table. rotary_dim defaults to int(head_dim * partial_rotary_factor); an explicit rotary_dim wins."""
    if rotary_dim is None:
        rotary_dim = _rotary_dim(head_dim, rope_parameters)
    return _get_rope_cached(head_dim, max_position, _freeze(rope_parameters), rotary_dim)
