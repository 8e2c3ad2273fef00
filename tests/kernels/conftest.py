"""Kernel tests run the Triton kernels in the interpreter on the CPU, and natively on a CUDA GPU.

TRITON_INTERPRET is read when a kernel is decorated, i.e. when nanovllm.kernels.* is first imported, so
it is set here, before the test modules import them (and only without CUDA: the GPU tests must compile).
"""

import itertools
import os
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")


def _fix_interpreter_for_numpy_2_4() -> None:
    # The triton 3.6 interpreter turns a scalar into a Python int with int(array_of_shape_1), which
    # NumPy >= 2.4 rejects, so loops with run-time bounds (`for n in range(start, end, BLOCK)`) fail.
    # Tests only: the GPU never uses the interpreter.
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_nanovllm_fixed", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._nanovllm_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_for_numpy_2_4()


@dataclass
class PagedInputs:
    """One batch of sequences with their KV already in a paged cache (tensors on `device`)."""

    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    keys: list[torch.Tensor]  # per sequence: [seq_len, num_kv_heads, head_dim], in logical order
    values: list[torch.Tensor]  # per sequence: [seq_len, num_kv_heads, head_dim]
    max_query_len: int
    max_seq_len: int
    scale: float

    @property
    def paged_args(self) -> tuple:
        """(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables), as the paged ops take them."""
        return self.q, self.k_cache, self.v_cache, self.cu_seqlens_q, self.seq_lens, self.block_tables

    @property
    def decode_args(self) -> tuple:
        """(q, k_cache, v_cache, seq_lens, block_tables, scale), as the decode ops take them."""
        return self.q, self.k_cache, self.v_cache, self.seq_lens, self.block_tables, self.scale


def build_paged_inputs(
    specs: list[tuple[int, int]],  # per sequence: (query tokens, seq_len including them)
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str = "cpu",
    seed: int = 0,
    table_fill: int = -1,
    spare_blocks: int = 3,
) -> PagedInputs:
    """Random q/K/V in a cache whose blocks are handed out in shuffled order.

    Everything not holding a real token is NaN (the spare blocks and the tail of each last block), and
    block-table entries past a sequence's last block hold `table_fill`: kernels must never touch either.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-seq_len // block_size) for _, seq_len in specs]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    max_blocks = max(blocks_per_seq, default=0) + 1
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    block_tables = torch.full((len(specs), max_blocks), table_fill, dtype=torch.int32)
    order = torch.randperm(num_blocks, generator=gen)
    keys, values = [], []
    next_block = 0
    for i, (_, seq_len) in enumerate(specs):
        n = blocks_per_seq[i]
        block_tables[i, :n] = order[next_block : next_block + n].int()
        next_block += n
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        pos = torch.arange(seq_len)
        slots = block_tables[i, pos // block_size].long() * block_size + pos % block_size
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = k
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = v
        keys.append(k.to(device))
        values.append(v.to(device))
    q_lens = [q_len for q_len, _ in specs]
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    cu_seqlens_q = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
    seq_lens = torch.tensor([seq_len for _, seq_len in specs], dtype=torch.int32)
    return PagedInputs(
        q=q.to(device),
        k_cache=k_cache.to(device),
        v_cache=v_cache.to(device),
        cu_seqlens_q=cu_seqlens_q.to(device),
        seq_lens=seq_lens.to(device),
        block_tables=block_tables.to(device),
        keys=keys,
        values=values,
        max_query_len=max(q_lens, default=0),
        max_seq_len=max((seq_len for _, seq_len in specs), default=0),
        scale=head_dim**-0.5,
    )


@pytest.fixture
def make_paged_inputs():
    return build_paged_inputs


def tolerance(dtype: torch.dtype) -> dict:
    return {
        torch.float64: dict(atol=1e-10, rtol=1e-10),
        torch.float32: dict(atol=1e-4, rtol=1e-4),
        torch.float16: dict(atol=3e-3, rtol=3e-3),
        torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    }[dtype]


@pytest.fixture
def tol():
    return tolerance
