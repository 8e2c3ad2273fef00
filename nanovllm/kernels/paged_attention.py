"""Causal attention over a paged KV cache, for any mix of prefill, chunked prefill and decode.

Inputs shared by the reference and the Triton kernel:
  q:            [num_tokens, num_heads, head_dim]  new query tokens of all sequences, concatenated
  k_cache:      [num_blocks, block_size, num_kv_heads, head_dim]  (v_cache the same)
  cu_seqlens_q: [num_seqs + 1] int  start of each sequence's queries in q
  seq_lens:     [num_seqs] int      context length of each sequence, cached prefix + new tokens
  block_tables: [num_seqs, max_blocks_per_seq] int  physical block of each logical block; entries past
                a sequence's last block are never read (they may hold anything, e.g. -1)

Query j of sequence i (q_len_i tokens) sits at position seq_lens[i] - q_len_i + j and sees keys at
positions 0..that position: the causal mask is aligned to the end of the context, which covers a plain
prefill (q_len == seq_len), a later chunk of a chunked prefill or a prefill after a prefix-cache hit
(q_len < seq_len), and decode (q_len == 1). GQA: query head h reads kv head h // (num_heads // num_kv_heads).

The Triton kernel's programs come from a work list of (sequence, query tile) items that the caller builds
on the host (`prefill_work_items`; the engine does it with the other step inputs), so the grid holds
exactly the tiles the batch has, whatever its mix of long prompts and single decode tokens, and a CUDA
graph can record it for a bounded number of items.
"""

import math

import numpy as np
import torch

from nanovllm.kernels.store_kvcache import check_kv_cache, check_triton_device

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

_INT_DTYPES = (torch.int32, torch.int64)


def paged_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int
    seq_lens: torch.Tensor,  # [num_seqs] int
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], dtype of q
    """Plain-PyTorch paged attention (fp32 math; fp64 stays fp64); the CPU runtime path."""
    check_paged_args(q, k_cache, v_cache, seq_lens, block_tables, cu_seqlens_q)
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    q_starts = cu_seqlens_q.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = q_starts[i], q_starts[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        if seq_len == 0:  # a padding row of a decode batch (slot -1): zeros, as the decode kernel gives
            out[q_start:q_end] = 0
            continue
        if not q_len <= seq_len <= block_tables.shape[1] * block_size:
            raise ValueError(
                f"sequence {i}: seq_len {seq_len} must be >= its {q_len} query tokens and fit its "
                f"block table ({block_tables.shape[1]} blocks of {block_size})"
            )
        # Gather this sequence's keys/values in logical order through its block table.
        blocks = block_tables[i, : _cdiv(seq_len, block_size)].long()  # [num_seq_blocks]
        k = k_cache[blocks].flatten(0, 1)[:seq_len].to(compute_dtype)  # [seq_len, num_kv_heads, head_dim]
        v = v_cache[blocks].flatten(0, 1)[:seq_len].to(compute_dtype)  # [seq_len, num_kv_heads, head_dim]
        qi = q[q_start:q_end].to(compute_dtype).view(q_len, num_kv_heads, group, head_dim)
        scores = torch.einsum("qhgd,khd->hgqk", qi, k) * scale  # [num_kv_heads, group, q_len, seq_len]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)  # [q_len]
        k_pos = torch.arange(seq_len, device=q.device)  # [seq_len]
        scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
        probs = scores.softmax(dim=-1)  # [num_kv_heads, group, q_len, seq_len]
        o = torch.einsum("hgqk,khd->qhgd", probs, v)  # [q_len, num_kv_heads, group, head_dim]
        out[q_start:q_end] = o.reshape(q_len, num_heads, head_dim).to(q.dtype)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Tile shapes for an H100. BLOCK_M rows = query tokens x query heads of one kv group (so every K/V tile is
# loaded once per group); BLOCK_N keys per inner step. Measured on an H100 (Qwen3-0.6B heads, bf16, sweep of
# BLOCK_M 64/128 x BLOCK_N 32/64/128 x 4/8 warps x 2-4 stages, 2026-11-27): 128 x 32 with 8 warps was best
# or within 5% of best on 16 x 1024, 4 x 4096 and 64 x 256 causal prefills (264 / 342 / 139 TFLOP/s; the
# earlier 128 x 64 gave 229 / 330 / 114; torch's FA2 varlen 210 / 305 / 100).
PREFILL_BLOCK_M = 128
PREFILL_BLOCK_N = 32
PREFILL_NUM_STAGES = 3
MAX_GRID_Y = 65535  # CUDA limit on the grid's second axis (the work items)


def prefill_tile_tokens(num_heads: int, num_kv_heads: int) -> int:
    """Query tokens per program of the prefill kernel: BLOCK_M rows = tokens x the kv group (padded)."""
    return max(1, PREFILL_BLOCK_M // triton_next_power_of_2(num_heads // num_kv_heads))


def max_work_items(num_tokens: int, num_seqs: int, tile_tokens: int) -> int:
    """The most work items (query tiles) a batch of up to num_tokens tokens over up to num_seqs sequences
    can have: every full tile, plus one partial tile per sequence."""
    return num_tokens // tile_tokens + num_seqs


def prefill_work_items(q_lens: np.ndarray, tile_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """The prefill kernel's work list: (sequence, query tile) of every tile the batch has, as two int32
    arrays [num_items]. Longest first, because a causal tile's work grows with its index and the GPU starts
    programs in grid order: sequences by decreasing query length, each one's tiles last-first. Each
    sequence's tiles stay side by side, so the programs that read the same K/V run close together (H100,
    bf16, Qwen3-0.6B heads, 2026-11-27, against tiles-first-to-last: 1 x 16384 348-372 -> 400-405 TFLOP/s,
    4 x 4096 341-343 -> 363-364; with each sequence's tiles scattered instead, 64 x 256 fell 140 -> 125).
    """
    q_lens = np.asarray(q_lens, dtype=np.int64)  # [num_seqs]
    order = np.argsort(-q_lens, kind="stable")  # [num_seqs]
    tiles = -(-q_lens[order] // tile_tokens)  # [num_seqs] in that order
    ends = np.cumsum(tiles)  # [num_seqs]
    seq = np.repeat(order, tiles).astype(np.int32)  # [num_items]
    tile = (np.repeat(ends, tiles) - np.arange(ends[-1] if len(ends) else 0) - 1).astype(np.int32)
    return seq, tile


def triton_next_power_of_2(n: int) -> int:  # (triton.next_power_of_2, without needing triton)
    return 1 << max(0, n - 1).bit_length()


def _prefill_num_warps(head_dim: int) -> int:
    return 8 if head_dim >= 64 else 4


if HAS_TRITON:

    @triton.jit
    def _attend_key_tile(
        acc,  # [BLOCK_M, HEAD_DIM] fp32, running sum of p @ v
        m_i,  # [BLOCK_M] fp32, running row max of the log2-scaled scores
        l_i,  # [BLOCK_M] fp32, running row sum of exp2(score - m_i)
        q,  # [BLOCK_M, HEAD_DIM]
        q_pos,  # [BLOCK_M] absolute position of each query row
        start_n,  # first key position of this tile
        seq_len,
        k_head_ptr,  # k_cache + kv_head * stride_kh
        v_head_ptr,  # v_cache + kv_head * stride_kh
        block_table_ptr,  # block_tables + seq * stride_bt
        stride_kb,
        stride_kt,
        scale_log2,  # softmax scale * log2(e): scores live in the log2 domain so exp2 can be used
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        ON_DIAGONAL: tl.constexpr,  # tile may hold keys after some query: mask causally and by seq_len
    ):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        offs_d = tl.arange(0, HEAD_DIM)  # [HEAD_DIM]
        # Each key's physical row: its block from the block table, then its offset inside the block.
        # Off the diagonal every key is < seq_len, so nothing needs masking.
        if ON_DIAGONAL:
            key_valid = offs_n < seq_len  # [BLOCK_N]
            block_ids = tl.load(block_table_ptr + offs_n // BLOCK_SIZE, mask=key_valid, other=0)
        else:
            block_ids = tl.load(block_table_ptr + offs_n // BLOCK_SIZE)
        row_offs = block_ids.to(tl.int64) * stride_kb + (offs_n % BLOCK_SIZE) * stride_kt  # [BLOCK_N]
        kv_offs = row_offs[:, None] + offs_d[None, :]  # [BLOCK_N, HEAD_DIM]
        if ON_DIAGONAL:
            # other=0 matters: unused cache memory may hold NaN, and 0 * NaN would leak through p @ v.
            k = tl.load(k_head_ptr + kv_offs, mask=key_valid[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
            v = tl.load(v_head_ptr + kv_offs, mask=key_valid[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
        else:
            k = tl.load(k_head_ptr + kv_offs)  # [BLOCK_N, HEAD_DIM]
            v = tl.load(v_head_ptr + kv_offs)  # [BLOCK_N, HEAD_DIM]

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        if ON_DIAGONAL:
            s = tl.where(offs_n[None, :] <= q_pos[:, None], s, float("-inf"))
        # Online softmax: every row sees at least one key in the first tile it meets (tiles start at or
        # before the row's own position), so m_new is finite and exp2(m_i - m_new) never sees -inf - -inf.
        m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]
        alpha = tl.exp2(m_i - m_new)  # [BLOCK_M] rescales what was accumulated so far
        p = tl.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        return acc, m_new, l_i

    # The block-table width changes every step: not specialized on (see decode_attention.py).
    @triton.jit(do_not_specialize=["stride_bt"])
    def _paged_prefill_kernel(
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        out_ptr,
        cu_seqlens_q_ptr,
        seq_lens_ptr,
        block_tables_ptr,
        work_seq_ptr,  # [num_items] int32: sequence of each work item; -1: padding (a graph's spare items)
        work_tile_ptr,  # [num_items] int32: its query tile
        scale_log2,
        stride_qt,
        stride_qh,
        stride_ot,
        stride_oh,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_bt,
        GROUP: tl.constexpr,  # query heads per kv head
        GROUP_P2: tl.constexpr,  # GROUP rounded up to a power of two (padding rows are masked)
        BLOCK_Q: tl.constexpr,  # query tokens per program; BLOCK_Q * GROUP_P2 = BLOCK_M rows
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,  # KV-cache block size
        DOT_PRECISION: tl.constexpr,
    ):
        # Program (kv_head, item): BLOCK_Q query tokens of one sequence x the GROUP query heads that share
        # kv_head, for work item (sequence, query tile). Row r of the tile is token r // GROUP_P2, head
        # r % GROUP_P2 of the group. kv_head is the fast axis, so items start in work-list order.
        kv_head = tl.program_id(0)
        item = tl.program_id(1)
        seq = tl.load(work_seq_ptr + item)
        if seq < 0:
            return
        tile = tl.load(work_tile_ptr + item)
        q_start = tl.load(cu_seqlens_q_ptr + seq)
        q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
        if tile * BLOCK_Q >= q_len:
            return  # (never, for a work list built from these lengths)
        seq_len = tl.load(seq_lens_ptr + seq)
        num_cached = seq_len - q_len  # keys before this sequence's first new token

        BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P2
        rows = tl.arange(0, BLOCK_M)  # [BLOCK_M]
        token = tile * BLOCK_Q + rows // GROUP_P2  # [BLOCK_M] query index within the sequence
        head_in_group = rows % GROUP_P2  # [BLOCK_M]
        row_valid = (token < q_len) & (head_in_group < GROUP)  # [BLOCK_M]
        q_pos = num_cached + token  # [BLOCK_M]
        q_row = (q_start + token).to(tl.int64)  # [BLOCK_M] row in q and out
        q_head = kv_head * GROUP + head_in_group  # [BLOCK_M]
        offs_d = tl.arange(0, HEAD_DIM)  # [HEAD_DIM]
        q_offs = (q_row * stride_qt + q_head * stride_qh)[:, None] + offs_d[None, :]
        q = tl.load(q_ptr + q_offs, mask=row_valid[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        k_head_ptr = k_cache_ptr + kv_head * stride_kh
        v_head_ptr = v_cache_ptr + kv_head * stride_kh
        block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt

        # Keys before the tile's first query position are visible to every row: no mask needed.
        first_pos = num_cached + tile * BLOCK_Q
        full_end = (first_pos // BLOCK_N) * BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _attend_key_tile(
                acc, m_i, l_i, q, q_pos, start_n, seq_len, k_head_ptr, v_head_ptr, block_table_ptr,
                stride_kb, stride_kt, scale_log2,
                HEAD_DIM, BLOCK_N, BLOCK_SIZE, DOT_PRECISION, False,
            )  # fmt: skip
        # Tiles crossing the diagonal, up to the tile's last query; tiles wholly above it are skipped.
        keys_end = tl.minimum(first_pos + BLOCK_Q, seq_len)
        for start_n in range(full_end, keys_end, BLOCK_N):
            acc, m_i, l_i = _attend_key_tile(
                acc, m_i, l_i, q, q_pos, start_n, seq_len, k_head_ptr, v_head_ptr, block_table_ptr,
                stride_kb, stride_kt, scale_log2,
                HEAD_DIM, BLOCK_N, BLOCK_SIZE, DOT_PRECISION, True,
            )  # fmt: skip

        out = acc / l_i[:, None]  # [BLOCK_M, HEAD_DIM]
        out_offs = (q_row * stride_ot + q_head * stride_oh)[:, None] + offs_d[None, :]
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def paged_prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int
    seq_lens: torch.Tensor,  # [num_seqs] int
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    work: tuple[torch.Tensor, torch.Tensor] | None = None,  # ([num_items], [num_items]) int32
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """FlashAttention over the paged cache for variable-length queries (see the module docstring).

    work: the (sequence, query tile) items to run, from `prefill_work_items(q_lens,
    prefill_tile_tokens(num_heads, num_kv_heads))` on the device, optionally padded with sequence -1
    (skipped). Without it they are built here from cu_seqlens_q, which waits for the device. max_query_len
    (0: nothing to do) and max_seq_len are accepted for symmetry with decode_attention. fp32 inputs use
    exact fp32 dot products.
    """
    check_paged_args(q, k_cache, v_cache, seq_lens, block_tables, cu_seqlens_q)
    check_triton_device(q, "paged_prefill_attention")
    check_kernel_args(q, k_cache, out)
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0 or max_query_len <= 0:
        return out

    group = num_heads // num_kv_heads
    group_p2 = triton.next_power_of_2(group)
    block_q = prefill_tile_tokens(num_heads, num_kv_heads)
    if work is None:
        cu = cu_seqlens_q.to("cpu", torch.int64).numpy()
        work = tuple(torch.from_numpy(a).to(q.device) for a in prefill_work_items(np.diff(cu), block_q))
    work_seq, work_tile = work
    if not (
        work_seq.shape == work_tile.shape
        and work_seq.dim() == 1
        and work_seq.dtype == work_tile.dtype == torch.int32
    ):
        raise ValueError(
            f"work must be two [num_items] int32 tensors, got {tuple(work_seq.shape)} {work_seq.dtype} and "
            f"{tuple(work_tile.shape)} {work_tile.dtype}"
        )
    if not 0 < work_seq.numel() <= MAX_GRID_Y:
        raise ValueError(f"the work list must hold 1 to {MAX_GRID_Y} items, got {work_seq.numel()}")
    grid = (num_kv_heads, work_seq.numel())
    _paged_prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        cu_seqlens_q,
        seq_lens,
        block_tables,
        work_seq,
        work_tile,
        scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        GROUP_P2=group_p2,
        BLOCK_Q=block_q,
        HEAD_DIM=head_dim,
        BLOCK_N=PREFILL_BLOCK_N,
        BLOCK_SIZE=block_size,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=_prefill_num_warps(head_dim),
        num_stages=PREFILL_NUM_STAGES,
    )
    return out


def dot_precision(dtype: torch.dtype) -> str:
    # tl.dot would round fp32 inputs to TF32 on the GPU by default; keep fp32 exact (bf16/fp16 ignore it).
    return "ieee" if dtype == torch.float32 else "tf32"


def check_paged_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
) -> None:
    """Shape/dtype checks shared by the paged attention ops (no device syncs)."""
    check_kv_cache(k_cache, v_cache)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if q.dim() != 3 or q.shape[2] != head_dim:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim={head_dim}], got {tuple(q.shape)}")
    if q.shape[1] % num_kv_heads != 0:
        raise ValueError(f"num_heads ({q.shape[1]}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(
            f"q, k_cache, v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if seq_lens.dim() != 1 or seq_lens.dtype not in _INT_DTYPES:
        raise ValueError(
            f"seq_lens must be [num_seqs] int32/int64, got {tuple(seq_lens.shape)} {seq_lens.dtype}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or block_tables.dtype not in _INT_DTYPES:
        raise ValueError(
            f"block_tables must be [num_seqs={num_seqs}, max_blocks_per_seq] int32/int64, "
            f"got {tuple(block_tables.shape)} {block_tables.dtype}"
        )
    if cu_seqlens_q is not None and (
        cu_seqlens_q.shape != (num_seqs + 1,) or cu_seqlens_q.dtype not in _INT_DTYPES
    ):
        raise ValueError(
            f"cu_seqlens_q must be [num_seqs + 1 = {num_seqs + 1}] int32/int64, "
            f"got {tuple(cu_seqlens_q.shape)} {cu_seqlens_q.dtype}"
        )


def check_kernel_args(q: torch.Tensor, k_cache: torch.Tensor, out: torch.Tensor | None) -> None:
    """Extra limits of the Triton kernels."""
    head_dim = q.shape[2]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16 for the Triton kernels, got {head_dim}")
    if q.stride(2) != 1:
        raise ValueError("q must be contiguous in head_dim (stride 1 in the last dimension)")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1):
        raise ValueError(
            f"out must be {tuple(q.shape)} {q.dtype} with stride 1 in head_dim, "
            f"got {tuple(out.shape)} {out.dtype}"
        )
