"""Embeddings: which hidden states a request pools, and how its vector is finished (docs/embeddings.md).

An embedding request is a prompt that never samples. Each step its prompt chunk runs like any other; the rows
of the final hidden states (after the model's last norm) that its pooling type reads are summed on the device
into one float32 row per request (`pool_hidden`), copied back behind the step, and added up on the host across
chunks. When the whole prompt is computed, `finish_embedding` turns the sum into the vector: the mean for
MEAN (over the prompt's tokens), cut to the request's dimensions, L2-normalized.

    LAST  the last prompt token's hidden state (decoder embedding models: Qwen3-Embedding, e5-mistral)
    MEAN  the mean over every prompt token
    CLS   the first prompt token's

LAST needs only the final chunk's last row, so it works with the prefix cache (the block with the last token
is never taken from it). MEAN and CLS read rows the cache would skip: their requests compute every token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

POOLING_TYPES = ("LAST", "MEAN", "CLS")
_POOLER_CONFIG_KEYS = ("pooling_type", "normalize", "use_activation")  # vLLM's pooler_config keys used here
# sentence-transformers' Pooling flags (1_Pooling/config.json) for the types here
_SENTENCE_TRANSFORMERS_MODES = {
    "pooling_mode_lasttoken": "LAST",
    "pooling_mode_mean_tokens": "MEAN",
    "pooling_mode_cls_token": "CLS",
}


@dataclass(frozen=True)
class PoolerConfig:
    """How a model's embeddings are made: the pooling type and whether they are L2-normalized by default."""

    pooling_type: str = "LAST"
    normalize: bool = True


def pooler_config(model_path: Path | None, override: dict | None) -> PoolerConfig:
    """The model's pooler: vLLM's `pooler_config` engine argument (`override`: "pooling_type", "normalize"
    / "use_activation"), over the checkpoint's sentence-transformers files (modules.json and its Pooling
    module's config.json) where it has them, over LAST + normalize (decoder embedding models' choice)."""
    found = _sentence_transformers_pooler(model_path) if model_path is not None else {}
    if override is not None:
        if not isinstance(override, dict):
            raise ValueError(f"pooler_config must be a dict, got {override!r}")
        unknown = sorted(set(override) - set(_POOLER_CONFIG_KEYS))
        if unknown:
            known = ", ".join(_POOLER_CONFIG_KEYS)
            raise ValueError(f"pooler_config: unknown key(s) {unknown}; known: {known}")
        override = dict(override)
        if "use_activation" in override:  # (normalize's newer name: one setting)
            use_activation = override.pop("use_activation")
            if override.setdefault("normalize", use_activation) != use_activation:
                raise ValueError(
                    f"pooler_config: normalize={override['normalize']!r} and "
                    f"use_activation={use_activation!r} disagree (they are one setting: give one)"
                )
        found.update(override)
    pooling_type = found.get("pooling_type", "LAST")
    if not isinstance(pooling_type, str) or pooling_type.upper() not in POOLING_TYPES:
        raise ValueError(f"pooling_type must be one of {POOLING_TYPES}, got {pooling_type!r}")
    normalize = found.get("normalize", True)
    if not isinstance(normalize, bool):
        raise ValueError(f"pooler_config's normalize must be a bool, got {normalize!r}")
    return PoolerConfig(pooling_type.upper(), normalize)


def _sentence_transformers_pooler(model_path: Path) -> dict:
    """{"pooling_type", "normalize"} from a sentence-transformers checkpoint's modules.json (none: {}).
    Modules that would change the vector after the pooling (Dense projections, ...) are refused, as is a
    pooling mode that is not one of POOLING_TYPES, rather than giving a vector that is not the model's."""
    modules_file = model_path / "modules.json"
    if not modules_file.exists():
        return {}
    found: dict = {"normalize": False}
    for module in json.loads(modules_file.read_text()):
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        if kind == "Normalize":
            found["normalize"] = True
        elif kind == "Pooling":
            settings = json.loads((model_path / module.get("path", "") / "config.json").read_text())
            modes = [name for name, on in settings.items() if name.startswith("pooling_mode_") and on]
            if len(modes) != 1 or modes[0] not in _SENTENCE_TRANSFORMERS_MODES:
                raise ValueError(
                    f"{model_path}: sentence-transformers pooling {modes} is not supported (one of "
                    f"{sorted(_SENTENCE_TRANSFORMERS_MODES)}); pooler_config={{'pooling_type': ...}} "
                    "overrides it"
                )
            if settings.get("include_prompt", True) is False:
                raise ValueError(f"{model_path}: a Pooling module with include_prompt false is not supported")
            found["pooling_type"] = _SENTENCE_TRANSFORMERS_MODES[modes[0]]
        else:
            raise ValueError(
                f"{model_path}: the sentence-transformers module {module.get('type')!r} is not supported"
            )
    return found


def pooled_positions(pooling_type: str, start: int, num_new: int, num_tokens: int) -> range:
    """The positions, among a step's num_new tokens from `start`, whose hidden states a request of
    `num_tokens` prompt tokens pools."""
    end = start + num_new
    if pooling_type == "MEAN":
        return range(start, end)
    if pooling_type == "CLS":
        return range(0, 1) if start == 0 and num_new else range(0)
    return range(num_tokens - 1, num_tokens) if end == num_tokens else range(0)  # LAST


def reads_every_token(pooling_type: str) -> bool:
    """Whether the pooling reads rows the prefix cache would skip (its requests compute every token)."""
    return pooling_type != "LAST"


def pool_hidden(
    hidden: torch.Tensor,  # [num_tokens, hidden_size]
    rows: torch.Tensor,  # [R] int64: rows of `hidden` to pool
    slots: torch.Tensor,  # [R] int64: the request (0..num_slots-1) each row is added to
    num_slots: int,
) -> torch.Tensor:  # [num_slots, hidden_size] float32
    """The sum of each request's pooled rows, in float32 (a chunk's part of a mean, or its one row)."""
    out = torch.zeros(num_slots, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    return out.index_add_(0, slots, hidden.index_select(0, rows).float())


def finish_embedding(
    total: torch.Tensor,  # [hidden_size] float32: the sum of every pooled row
    num_tokens: int,  # the prompt's (MEAN pooled each of them once: its requests skip the prefix cache)
    pooling_type: str,
    dimensions: int | None,
    normalize: bool,
) -> torch.Tensor:  # [dimensions or hidden_size] float32
    """The embedding: the mean for MEAN, the first `dimensions` values (Matryoshka), L2-normalized."""
    vector = total / num_tokens if pooling_type == "MEAN" else total
    if dimensions is not None:
        vector = vector[:dimensions]
    if normalize:
        vector = torch.nn.functional.normalize(vector, p=2, dim=-1)
    return vector
