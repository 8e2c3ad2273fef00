"""Which decode batches run as two halves on two streams (engine/decode_step.py): a single GPU, a small
model; the weights' size from the real checkpoint shapes of the presets."""

from __future__ import annotations

import math

import pytest
import torch

from nanovllm.config import Config
from nanovllm.engine.decode_step import (
    TWO_STREAM_MAX_BATCH,
    TWO_STREAM_MAX_WEIGHT_BYTES,
    TWO_STREAM_MIN_BATCH,
    two_stream_sizes,
)
from nanovllm.models import get_model_class


def _weight_bytes(preset: str, element_size: int) -> int:
    hf = Config.from_kwargs(preset, max_model_len=2).hf_config
    shapes = get_model_class(hf).checkpoint_shapes(hf)
    return sum(math.prod(s) for s in shapes.values()) * element_size


def test_two_halves_only_on_one_gpu_for_a_small_model():
    small = TWO_STREAM_MAX_WEIGHT_BYTES
    default = range(TWO_STREAM_MIN_BATCH, TWO_STREAM_MAX_BATCH + 1)  # 16..112
    assert list(two_stream_sizes(True, 1, small)) == list(default)
    assert not two_stream_sizes(True, 1, small + 1)
    assert not two_stream_sizes(True, 2, 1)  # TP: the halves would share the peer all-reduce's buffers
    assert not two_stream_sizes(False, 1, 1)  # CPU: no streams


@pytest.mark.parametrize(
    ("preset", "dtype", "halves"),
    [
        ("qwen3-0.6b", torch.bfloat16, True),
        ("qwen3-0.6b", torch.float32, True),
        ("qwen3-8b", torch.bfloat16, False),
    ],
)
def test_presets(preset, dtype, halves):
    # Qwen3-8B at TP=1 lost 30% of its batch-64 decode throughput to the second pass over 16 GB of weights.
    weight_bytes = _weight_bytes(preset, torch.empty((), dtype=dtype).element_size())
    assert bool(two_stream_sizes(True, 1, weight_bytes)) == halves, weight_bytes
