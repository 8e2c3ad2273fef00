"""The one switch that picks Triton kernels or their torch references.

Ops in `nanovllm/kernels/` ask `use_triton(x)`; the model runner (and the GPU tests that compare the two
paths) scope the choice with `kernel_backend(...)`. Triton is optional: on a CPU-only install without it,
every op runs its torch reference.
"""

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import SimpleNamespace

import torch

from nanovllm.utils.env import env_int

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the kernels below still get defined, as plain functions that are never launched
    triton = SimpleNamespace(jit=lambda fn=None, **options: fn if fn is not None else (lambda f: f))
    tl = SimpleNamespace(constexpr=None)
    HAS_TRITON = False
try:  # (a Triton without grid dependency control still runs every kernel, without PDL)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_PDL = True
except ImportError:
    gdc_launch_dependents = gdc_wait = None
    HAS_PDL = False

# Programmatic dependent launch (Hopper and later): a kernel launched with it may start while the kernel
# before it still runs, and calls gdc_wait() before it reads anything that kernel wrote. NANOVLLM_PDL=0
# turns it off (to measure what it buys); the interpreter never uses it.
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"  # (Triton reads it when a kernel is decorated)
PDL_ENABLED = HAS_PDL and env_int("NANOVLLM_PDL", 1, maximum=1) == 1 and not INTERPRETER

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


@functools.cache
def _device_has_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


@functools.cache
def device_num_sms(device_index: int) -> int:
    """The CUDA device's SM count (grids are sized by it)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def hopper_or_later(x: torch.Tensor) -> bool:
    """True for a CUDA tensor on a GPU of compute capability 9 or later (kernels tuned for an H100 ask)."""
    return x.is_cuda and _device_has_pdl(x.device.index or 0)


def check_pdl(x: torch.Tensor) -> bool:
    """True when a kernel on `x` should be launched with programmatic dependent launch. Such a kernel
    must call gdc_wait() in every program before it reads or writes memory that earlier kernels use. Before
    it, a program may read only what no kernel of the step writes: weights, tables such as rope's cos/sin,
    and the step's inputs (positions, cache slots, lengths, block tables), which are copied in before the
    step's first kernel, a launch without PDL that every later kernel starts after."""
    return PDL_ENABLED and x.is_cuda and _device_has_pdl(x.device.index or 0)
