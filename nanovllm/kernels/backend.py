"""The one switch that picks Triton kernels or their torch references.

Ops in `nanovllm/kernels/` ask `use_triton(x)`; the model runner (and the GPU tests that compare the two
paths) scope the choice with `kernel_backend(...)`. Triton is optional: on a CPU-only install without it,
every op runs its torch reference.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the kernels below still get defined, as plain functions that are never launched
    triton = SimpleNamespace(jit=lambda fn=None, **options: fn if fn is not None else (lambda f: f))
    tl = SimpleNamespace(constexpr=None)
    HAS_TRITON = False

KERNEL_BACKENDS = ("auto", "triton", "torch")

# "auto": Triton for CUDA tensors when it imports, else torch. "triton": the same, but a CUDA tensor without
# Triton is an error rather than a silent fallback. "torch": always the torch reference.
_active_backend: ContextVar[str] = ContextVar("nanovllm_kernel_backend", default="auto")


@contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    """Run the enclosed code with `name` ("auto" | "triton" | "torch") as the kernel backend."""
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"kernel backend must be one of {KERNEL_BACKENDS}, got {name!r}")
    token = _active_backend.set(name)
    try:
        yield
    finally:
        _active_backend.reset(token)


def use_triton(x: torch.Tensor) -> bool:
    """True when an op on `x` should launch its Triton kernel rather than run its torch reference."""
    backend = _active_backend.get()
    if backend == "torch" or not x.is_cuda:
        return False
    if not HAS_TRITON:
        if backend == "triton":
            raise RuntimeError("kernel backend 'triton' was requested but triton is not installed")
        return False
    return True
