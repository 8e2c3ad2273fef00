"""Test-wide setup. Without a GPU, Triton kernels run in the interpreter: that must be decided before
triton is first imported, i.e. before any nanovllm import, so it lives here at the root."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
