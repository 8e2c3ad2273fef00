"""Which decode batches run as two halves on two streams (engine/decode_step.py): on a single GPU, for a small
model; the weights' size as the engine counts it, on the real shapes of the presets (meta tensors)."""

from __future__ import annotations

import math

import pytest
import torch

from nanovllm.config import Config
from nanovllm.engine.decode_step import (
    TWO_STREAM_MAX_BATCH,
    TWO_STREAM_MAX_WEIGHT_BYTES,
    TWO_STREAM_MIN_BATCH,
    model_weight_bytes,
    two_stream_sizes,
)
from nanovllm.models import get_model_class

ON = TWO_STREAM_MAX_BATCH >= TWO_STREAM_MIN_BATCH  # (NANOVLLM_TWO_STREAM_MAX_BATCH below 16 turns it off)


def test_two_halves_only_on_one_gpu_for_a_small_model():
    small = TWO_STREAM_MAX_WEIGHT_BYTES
    default = range(TWO_STREAM_MIN_BATCH, TWO_STREAM_MAX_BATCH + 1)  # 16..128
    assert list(two_stream_sizes(cuda=True, tp_size=1, weight_bytes=small)) == list(default)
    assert not two_stream_sizes(cuda=True, tp_size=1, weight_bytes=small + 1)
    assert not two_stream_sizes(cuda=True, tp_size=2, weight_bytes=1)  # TP: the halves would share buffers
    assert not two_stream_sizes(cuda=False, tp_size=1, weight_bytes=1)  # CPU: no streams


@pytest.mark.parametrize(
    ("preset", "dtype", "halves"),
    [
        ("qwen3-0.6b", torch.bfloat16, True),
        ("qwen3-0.6b", torch.float32, True),
        ("qwen3-8b", torch.bfloat16, False),  # TP=1 lost 30% at batch 64 to a second pass over 16 GB
    ],
)
def test_presets(preset, dtype, halves):
    hf = Config.from_kwargs(preset, max_model_len=2).hf_config
    model_cls = get_model_class(hf)
    with torch.device("meta"):
        model = model_cls(hf, 2).to(dtype)
    weight_bytes = model_weight_bytes(model)
    # the checkpoint's tensors, the tied LM head once
    element_size = torch.empty((), dtype=dtype).element_size()
    assert weight_bytes == sum(math.prod(s) for s in model_cls.checkpoint_shapes(hf).values()) * element_size
    assert bool(two_stream_sizes(cuda=True, tp_size=1, weight_bytes=weight_bytes)) == (halves and ON)
