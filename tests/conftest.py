"""Test-wide setup. Without a GPU, Triton kernels run in the interpreter: that must be decided before
triton is first imported, i.e. before any nanovllm import, so it lives here at the root."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """The tiny random Qwen3 checkpoint (seed 0, 256 positions, the preset tokenizer) that engine-level tests
    share read-only, built once per run. A module that needs other weights defines its own `ckpt`."""
    from tests.checkpoints import build_checkpoint  # (transformers: imported when a test first asks)

    return build_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3", max_position_embeddings=256)


@pytest.fixture(scope="session")
def think_ckpt(tmp_path_factory):
    """A tiny random Qwen3 whose tokenizer has Qwen3's think tags (reasoning parsers), built once per run."""
    from tests.checkpoints import build_think_checkpoint

    return build_think_checkpoint(tmp_path_factory.mktemp("qwen3-think"))
