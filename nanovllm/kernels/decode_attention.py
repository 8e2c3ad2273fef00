"""Decode attention: one new query token per sequence over the paged KV cache (flash-decoding).

Decode is memory-bound: each step reads every cached key and value once. One program per (sequence,
kv head) leaves the GPU idle for small batches with long contexts, so each sequence's keys are also cut
into up to `num_splits` ranges handled by separate programs; each writes a partial output plus its
log-sum-exp. With one split (contexts too short to cut) the split kernel writes the normalized output
itself. With 2..DECODE_MAX_SELF_COMBINE splits the programs of a sequence combine themselves: the last to
finish, counted by an atomic, reads every partial and writes the output. Only with more splits (batches
of a few sequences) does a second small kernel, the reduce pass, combine them.

From DECODE_BY_LENGTH_ITEMS_PER_SM (sequence, kv head) pairs per SM the ranges are cut by length, decided
in the kernel from the step's lengths: with fewer pairs than program slots on the GPU, every sequence gets
pieces of about (all keys / slots) keys, so that the programs fill the GPU once; with more, only the
sequences 1/8 longer than the mean are cut in two (with equal lengths one program per pair is fastest; with
spread ones the longest would otherwise finish last).

The grid is (num_kv_heads, batch, num_splits) and never depends on the actual sequence lengths, which
each program reads from `seq_lens` itself; so one launch can be captured in a CUDA graph and replayed
with other lengths. A sequence with seq_len 0 (CUDA-graph padding) gets an all-zero output.
"""

import math

import torch

from nanovllm.kernels.backend import check_pdl, device_num_sms, gdc_launch_dependents, gdc_wait
from nanovllm.kernels.paged_attention import (
    check_kernel_args,
    check_paged_args,
    dot_precision,
    paged_attention_ref,
)
from nanovllm.kernels.store_kvcache import check_triton_device

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def decode_attention_ref(
    q: torch.Tensor,  # [batch, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    seq_lens: torch.Tensor,  # [batch] int, context length including the new token
    block_tables: torch.Tensor,  # [batch, max_blocks_per_seq] int
    scale: float,
) -> torch.Tensor:  # [batch, num_heads, head_dim]
    """Plain-PyTorch decode attention: paged attention with one query per sequence."""
    batch = q.shape[0]
    cu_seqlens_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device)  # [batch + 1]
    return paged_attention_ref(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale)


# Launch shapes for an H100, chosen by reasoning, not measurement (benchmarks/kernels.py sweeps a few
# alternatives; change them here). A 64-key tile of K or V at head_dim 128 in bf16 is 16 KB, fetched with
# 16-byte cp.async copies. Compiled for sm_90 (bf16, head_dim 128): 128 registers/thread, exactly the most
# that lets 4 programs of 4 warps share an SM's 64K registers (a test keeps it so), and 38 KB of shared
# memory. Triton's pipeliner issues the next tile's K/V right after the current tile's math (the block-table
# gather one tile earlier still; num_stages > 3 changes nothing here), so one program does not overlap its
# own loads and math: the latency is hidden across programs instead, and 4 programs x 32 KB in flight per
# SM is several times what HBM needs (~3 TB/s x ~1 us / 132 SMs).
DECODE_BLOCK_N = 64
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 3
# 4 programs of 128 threads per SM need <= 128 registers a thread. The one-split variant compiles to 128 by
# itself; the self-combining ones are capped at this (the two-split variant not cut by length took 168, 3
# programs per SM; capped, every variant fits in 128 without spills, whereas capping the one-split variant
# makes ptxas spill 8 bytes; sm_90, checked on the CPU by tests/kernels/test_decode_attention.py).
DECODE_MAX_REGISTERS = 128
# tl.dot needs >= 16 rows, and a group of query heads is usually 1-8: pad it to 16 rows. The padded
# tensor-core dot is nearly free, whereas a broadcast-multiply-sum would put group * 2 FMAs per cached
# element on the CUDA cores (~20% of the H100's fp32 rate at 3 TB/s for group 2, most of it for group 8)
# plus cross-lane reductions, competing with the load instructions that set the pace here.
DECODE_MIN_ROWS = 16
DECODE_MIN_BATCH_P2 = 64  # the by-length split kernel's smallest batch block (see the launch)
# num_splits heuristic: below DECODE_BY_LENGTH_ITEMS_PER_SM (sequence, kv head) pairs per SM, aim for
# DECODE_PROGRAMS_PER_SM programs per SM, giving no split fewer than DECODE_MIN_KEYS_PER_SPLIT keys of the
# longest sequence (e.g. 8 x 16, spread: 28.5 us with 5 splits vs 57.2 with one). From there on the kernel
# cuts by length (the module docstring) into at most enough pieces for two programs per slot on average,
# 2..DECODE_BY_LENGTH_MAX_SPLITS. Measurements and what was tried: docs/kernels.md, docs/performance.md
# ("Session 27": the default workload 70.6-70.9% -> 72.0-72.1% of the H200 floor in an in-process A/B).
DECODE_PROGRAMS_PER_SM = 4
DECODE_BY_LENGTH_ITEMS_PER_SM = 1.75
DECODE_MIN_KEYS_PER_SPLIT = 64  # H100: 256 left batch-1 x 1k-context decode latency-bound (86 us)
DECODE_MAX_SPLITS = 64
DECODE_MAX_SELF_COMBINE = 8  # up to this many splits combine themselves; more use the reduce pass
DECODE_BY_LENGTH_MAX_SPLITS = 4  # 8 measured no better (session 27)
DECODE_CPU_NUM_SMS = 132  # (an H100's) what the defaults and the by-length cut assume off CUDA


def default_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """How many key ranges to cut each sequence into, at most; a pure function of these ints.

    From DECODE_BY_LENGTH_ITEMS_PER_SM (sequence, kv head) pairs per SM (cut by length:
    `default_split_by_length`), room for two programs per SM slot on average, 2..DECODE_BY_LENGTH_MAX_SPLITS;
    below, enough (sequence, kv head, split) programs to give every SM DECODE_PROGRAMS_PER_SM of them.
    Never more splits than leave DECODE_MIN_KEYS_PER_SPLIT keys of the longest sequence to each. For CUDA
    graphs, pass the same max_seq_len (e.g. the model's max length) at capture and replay.
    """
    work_items = max(1, batch * num_kv_heads)
    slots = DECODE_PROGRAMS_PER_SM * num_sms
    if work_items >= DECODE_BY_LENGTH_ITEMS_PER_SM * num_sms:
        wanted = max(2, min(-(-2 * slots // work_items), DECODE_BY_LENGTH_MAX_SPLITS))
    else:
        wanted = -(-slots // work_items)
    useful = max_seq_len // DECODE_MIN_KEYS_PER_SPLIT
    return max(1, min(wanted, useful, DECODE_MAX_SPLITS))


if HAS_TRITON:
    # Per-step arguments (split count, block-table width) are not specialized on: a value that happens
    # to be 1 or a multiple of 16 would otherwise compile a new variant mid-run (~1 s). (BATCH_P2 and
    # MAX_PIECES are compiled in: eager steps compile one variant per power of two of the batch (by length)
    # and of the split count; CUDA graphs compile theirs at capture.)
    @triton.jit(do_not_specialize=["num_splits", "num_slots", "stride_bt"])
    def _decode_split_kernel(
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        seq_lens_ptr,
        block_tables_ptr,
        partial_out_ptr,  # [batch, num_heads, num_splits, HEAD_DIM] fp32
        partial_lse_ptr,  # [batch, num_heads, num_splits] fp32, log2 domain
        out_ptr,  # [batch, num_heads, HEAD_DIM]: written here unless a reduce pass follows
        counters_ptr,  # (SELF_COMBINE) [>= batch * num_kv_heads] int32, 0 between calls
        scale_log2,  # softmax scale * log2(e): scores live in the log2 domain so exp2 can be used
        num_splits,
        num_slots,  # (BY_LENGTH) programs that run at once on the GPU: DECODE_PROGRAMS_PER_SM x SMs
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_bt,
        stride_ob,
        stride_oh,
        ONE_SPLIT: tl.constexpr,  # num_splits == 1: normalize and store the output, no reduce pass
        GROUP: tl.constexpr,  # query heads per kv head
        BLOCK_H: tl.constexpr,  # GROUP padded to >= 16 rows for tl.dot
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,  # KV-cache block size
        DOT_PRECISION: tl.constexpr,
        USE_PDL: tl.constexpr,  # launched with programmatic dependent launch: wait for the K/V store
        SELF_COMBINE: tl.constexpr,  # 2..DECODE_MAX_SELF_COMBINE splits: they combine themselves
        BY_LENGTH: tl.constexpr,  # (SELF_COMBINE) cut a sequence into pieces by its length (see below)
        BATCH_P2: tl.constexpr,  # (BY_LENGTH) the batch rounded up to a power of two
        MAX_PIECES: tl.constexpr,  # (SELF_COMBINE) num_splits rounded up to a power of two
    ):
        if USE_PDL:
            gdc_launch_dependents()
        # kv heads vary fastest: the programs of one sequence's heads run side by side and read
        # neighbouring bytes of each cached token row (0.5-1.5% faster on an H200 than sequences fastest).
        kv_head = tl.program_id(0)
        seq = tl.program_id(1)
        split = tl.program_id(2)
        num_kv_heads = tl.num_programs(0)
        num_heads = num_kv_heads * GROUP
        seq_len = tl.load(seq_lens_ptr + seq)
        pieces = num_splits
        if BY_LENGTH:
            # Cut by length, from the step's lengths (CUDA-graph padding rows have length 0 and are not
            # counted); every program of a sequence decides alike (the same exact integer sums). With
            # fewer (sequence, kv head) pairs than program slots on the GPU, every sequence is cut into
            # pieces of about (all keys / slots) keys, so that the programs fill the GPU once; with more,
            # only a sequence 1/8 longer than the mean is cut in two: with equal lengths one program per
            # pair is fastest, with spread ones the longest would otherwise finish last. A sequence gets at
            # most one piece per two key tiles (pieces are whole tiles, so its last may hold a single key).
            offs_b = tl.arange(0, BATCH_P2)
            lens = tl.load(seq_lens_ptr + offs_b, mask=offs_b < tl.num_programs(1), other=0)  # [BATCH_P2]
            total = tl.maximum(tl.sum(lens.to(tl.int64), axis=0), 1)
            num_live = tl.sum((lens > 0).to(tl.int64), axis=0)
            keys = seq_len.to(tl.int64)
            pair_keys = total * num_kv_heads
            # keys * slots / pair_keys, rounded down if the lengths are about equal (as many programs as
            # slots at most: a second, partial round of equal pieces would take as long as the first), else
            # to the nearest: the pieces of spread sequences fill the slots as the shorter ones end
            spread = tl.max(lens, axis=0).to(tl.int64) * num_live * 8 > total * 9
            fill = (2 * keys * num_slots + tl.where(spread, pair_keys, 0)) // (2 * pair_keys)
            longer = tl.where(keys * num_live * 8 > total * 9, 2, 1)
            wanted = tl.where(num_live * num_kv_heads < num_slots, fill, longer)
            most = tl.minimum(tl.maximum(seq_len // (2 * BLOCK_N), 1), num_splits)
            pieces = tl.minimum(tl.maximum(wanted, 1), most).to(tl.int32)
        # This split's key range, from the actual length: tile-aligned, so short sequences leave the last
        # splits empty. Those return at once, except split 0, which always runs: for an empty sequence (a
        # padded row of a CUDA graph) it writes a zero output (or, for the reduce pass, a zero partial with
        # lse = -inf). The combine and the reduce pass read only the splits that got keys.
        keys_per_split, num_pieces = _split_keys(seq_len, pieces, BLOCK_N)
        if split >= num_pieces:
            return
        start = split * keys_per_split
        end = tl.minimum(start + keys_per_split, seq_len)
        if USE_PDL:
            # Only now: the lengths are the step's inputs, which no kernel writes, so the cut above runs under
            # the tail of the kernel before; q and this step's K/V come from it.
            gdc_wait()

        rows = tl.arange(0, BLOCK_H)  # [BLOCK_H]
        row_valid = rows < GROUP  # [BLOCK_H]
        heads = kv_head * GROUP + rows  # [BLOCK_H]
        offs_d = tl.arange(0, HEAD_DIM)  # [HEAD_DIM]
        q_offs = seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptr + q_offs, mask=row_valid[:, None], other=0.0)  # [BLOCK_H, HEAD_DIM]

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max of log2-scaled scores
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)  # running sum of exp2(score - m_i)
        acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)  # running sum of p @ v
        k_head_ptr = k_cache_ptr + kv_head * stride_kh
        v_head_ptr = v_cache_ptr + kv_head * stride_kh
        block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
        for start_n in range(start, end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
            key_valid = offs_n < end  # [BLOCK_N]
            # Never read past the sequence: block-table entries there and cache rows may be garbage/NaN,
            # and other=0 keeps a NaN value row from leaking through 0 * NaN in p @ v.
            block_ids = tl.load(block_table_ptr + offs_n // BLOCK_SIZE, mask=key_valid, other=0)
            row_offs = block_ids.to(tl.int64) * stride_kb + (offs_n % BLOCK_SIZE) * stride_kt  # [BLOCK_N]
            kv_offs = row_offs[:, None] + offs_d[None, :]  # [BLOCK_N, HEAD_DIM]
            k = tl.load(k_head_ptr + kv_offs, mask=key_valid[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
            v = tl.load(v_head_ptr + kv_offs, mask=key_valid[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]

            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_H, BLOCK_N]
            s = tl.where(key_valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key start_n is always valid
            alpha = tl.exp2(m_i - m_new)  # [BLOCK_H]
            p = tl.exp2(s - m_new[:, None])  # [BLOCK_H, BLOCK_N]
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        # A non-empty split has l_i >= 1 (its maximum contributes exp2(0)), so max(l_i, 1) changes
        # nothing there, and turns an empty split (m_i = -inf, l_i = 0) into out = 0, lse = -inf.
        l_safe = tl.maximum(l_i, 1.0)
        out = acc / l_safe[:, None]  # [BLOCK_H, HEAD_DIM]
        out_ptrs = out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        # The whole sequence in this program (one split, or the only self-combining split that got keys):
        # the output is final. (The reduce pass reads split 0's partial even when it is the only one.)
        if ONE_SPLIT or (SELF_COMBINE and num_pieces == 1):
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
        else:  # partials for the reduce pass, or, with SELF_COMBINE, for the last split to finish
            lse = m_i + tl.log2(l_safe)  # [BLOCK_H]
            first_row = (seq.to(tl.int64) * num_heads + heads) * num_splits  # [BLOCK_H]
            tl.store(partial_lse_ptr + first_row + split, lse, mask=row_valid)
            partial_ptrs = partial_out_ptr + (first_row + split)[:, None] * HEAD_DIM + offs_d[None, :]
            tl.store(partial_ptrs, out, mask=row_valid[:, None])
            if SELF_COMBINE:
                _combine_splits(
                    counters_ptr + seq * num_kv_heads + kv_head,
                    num_pieces,
                    partial_lse_ptr + first_row,
                    partial_out_ptr + first_row[:, None] * HEAD_DIM + offs_d[None, :],
                    out_ptrs,
                    row_valid,
                    MAX_PIECES,
                    HEAD_DIM,
                )

    @triton.jit
    def _split_keys(seq_len, pieces, BLOCK_N: tl.constexpr):
        """(keys per split, splits that got keys) of a sequence cut into `pieces` tile-aligned ranges: the
        split kernel's cut, which the combine and the reduce pass read back. An empty sequence (a padded row)
        still counts one split: split 0 always writes."""
        keys_per_split = tl.maximum(tl.cdiv(tl.cdiv(seq_len, pieces), BLOCK_N) * BLOCK_N, BLOCK_N)
        return keys_per_split, tl.maximum(tl.cdiv(seq_len, keys_per_split), 1)

    @triton.jit
    def _combine_splits(
        counter_ptr,
        num_pieces,
        lse_ptrs,  # [BLOCK_H] each row's split-0 lse; split i's is at + i
        part_ptrs,  # [BLOCK_H, HEAD_DIM] each row's split-0 partial output; split i's is at + i * HEAD_DIM
        out_ptrs,  # [BLOCK_H, HEAD_DIM]
        row_valid,  # [BLOCK_H]
        MAX_PIECES: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        """Of a sequence's pieces, the last to get here combines them all, as the reduce pass would.
        Each counts itself in once its partials are stored (the barrier orders every thread's stores
        before the count, which releases them); the one that counts last reads them all (acquired;
        volatile loads, past this SM's L1), writes the output and resets the count for the next call.
        Whichever piece combines, the sum is the same: taken from memory, in split order (compiled,
        w0 * o0 + w1 * o1 is one fma, which rounds differently with the terms swapped, so an order that
        followed the finishing order would make a run's tokens depend on timing)."""
        tl.debug_barrier()
        if tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == num_pieces - 1:
            tl.store(counter_ptr, 0)
            # Online over the splits: a running maximum (split 0's first: it has keys, so it is finite),
            # the weighted sum of the partial outputs and the sum of the weights, both relative to it.
            max_lse = tl.load(lse_ptrs, mask=row_valid, other=0.0, volatile=True)  # [BLOCK_H]
            acc = tl.load(part_ptrs, mask=row_valid[:, None], other=0.0, volatile=True)  # [BLOCK_H, HEAD_DIM]
            weight_sum = tl.full(max_lse.shape, 1.0, tl.float32)  # [BLOCK_H]
            for i in tl.static_range(1, MAX_PIECES):  # unrolled: every load is issued at once
                has_keys = row_valid & (i < num_pieces)  # [BLOCK_H]
                lse = tl.load(lse_ptrs + i, mask=has_keys, other=float("-inf"), volatile=True)  # [BLOCK_H]
                part = tl.load(
                    part_ptrs + i * HEAD_DIM, mask=has_keys[:, None], other=0.0, volatile=True
                )  # [BLOCK_H, HEAD_DIM]
                new_max = tl.maximum(max_lse, lse)  # [BLOCK_H]
                keep, weight = tl.exp2(max_lse - new_max), tl.exp2(lse - new_max)  # [BLOCK_H]
                acc = acc * keep[:, None] + weight[:, None] * part
                weight_sum = weight_sum * keep + weight
                max_lse = new_max
            out = acc / weight_sum[:, None]  # [BLOCK_H, HEAD_DIM]
            tl.store(out_ptrs, out.to(out_ptrs.dtype.element_ty), mask=row_valid[:, None])

    # (SPLITS_P2 still compiles one variant per power of two; CUDA graphs fix num_splits per padded
    # batch size, so those variants are all compiled at capture.)
    @triton.jit(do_not_specialize=["num_splits"])
    def _decode_reduce_kernel(
        partial_out_ptr,  # [batch, num_heads, num_splits, HEAD_DIM] fp32
        partial_lse_ptr,  # [batch, num_heads, num_splits] fp32, log2 domain
        seq_lens_ptr,
        out_ptr,
        num_splits,
        stride_ob,
        stride_oh,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,  # the split kernel's key tile: splits are cut as it cuts them
        SPLITS_P2: tl.constexpr,  # num_splits rounded up to a power of two
        USE_PDL: tl.constexpr,
    ):
        if USE_PDL:
            gdc_launch_dependents()
        # One program per (sequence, query head): weigh each split's output by its share of the total
        # softmax mass, exp2(lse_s - max_lse), and renormalize.
        seq = tl.program_id(0)
        head = tl.program_id(1)
        first_row = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits
        offs_s = tl.arange(0, SPLITS_P2)  # [SPLITS_P2]
        offs_d = tl.arange(0, HEAD_DIM)  # [HEAD_DIM]
        # Only the splits that got keys wrote partials (and split 0, always).
        seq_len = tl.load(seq_lens_ptr + seq)
        _, num_written = _split_keys(seq_len, num_splits, BLOCK_N)
        split_valid = offs_s < num_written
        if USE_PDL:
            gdc_wait()  # the partials come from the split kernel (the lengths are the step's inputs)
        lse = tl.load(partial_lse_ptr + first_row + offs_s, mask=split_valid, other=float("-inf"))
        max_lse = tl.max(lse, 0)
        max_lse = tl.where(max_lse == float("-inf"), 0.0, max_lse)  # all splits empty: weights all 0
        weights = tl.exp2(lse - max_lse)  # [SPLITS_P2]
        partial = tl.load(
            partial_out_ptr + (first_row + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=split_valid[:, None],
            other=0.0,
        )  # [SPLITS_P2, HEAD_DIM]
        # The split holding the maximum has weight 1, so the sum is >= 1 unless every split is empty.
        out = tl.sum(weights[:, None] * partial, 0) / tl.maximum(tl.sum(weights, 0), 1.0)  # [HEAD_DIM]
        tl.store(
            out_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh + offs_d,
            out.to(out_ptr.dtype.element_ty),
        )


def default_split_by_length(batch: int, num_kv_heads: int, num_sms: int) -> bool:
    """Whether the splits cut the sequences by length (see the module docstring): from
    DECODE_BY_LENGTH_ITEMS_PER_SM (sequence, kv head) pairs per SM. For CUDA graphs, pass the padded batch
    at capture and in eager steps alike, as for default_num_splits."""
    return batch * num_kv_heads >= DECODE_BY_LENGTH_ITEMS_PER_SM * num_sms


def _check_counters(counters: torch.Tensor | None, needed: int, device: torch.device) -> torch.Tensor:
    """The self-combining splits' arrival counts: a fresh zeroed buffer, or the caller's, checked."""
    if counters is None:
        return torch.zeros(needed, dtype=torch.int32, device=device)
    if (
        counters.dtype != torch.int32
        or counters.device != device
        or counters.numel() < needed
        or counters.stride(0) != 1
    ):
        raise ValueError(
            f"counters must be contiguous int32 on {device} with >= {needed} elements, got {counters.dtype} "
            f"on {counters.device} with {counters.numel()} (stride {counters.stride(0)})"
        )
    return counters


def decode_attention(
    q: torch.Tensor,  # [batch, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    seq_lens: torch.Tensor,  # [batch] int, context length including the new token
    block_tables: torch.Tensor,  # [batch, max_blocks_per_seq] int
    scale: float,
    max_seq_len: int,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,  # [batch, num_heads, head_dim]
    counters: torch.Tensor | None = None,  # [>= batch * num_kv_heads] int32, zeros (left so)
    split_by_length: bool | None = None,
) -> torch.Tensor:  # [batch, num_heads, head_dim]
    """Split-KV decode attention; the new token is the last of its sequence's seq_lens[i] positions.

    max_seq_len only feeds the default num_splits (any seq_lens value up to the block table's capacity
    is handled correctly). The grid depends on (batch, num_kv_heads, num_splits) only.
    2..DECODE_MAX_SELF_COMBINE splits combine themselves through `counters` (a zeroed buffer the caller
    keeps, as the model runner does; None: one is made per call); with split_by_length (default:
    `default_split_by_length` of this batch) the kernel cuts each sequence into up to num_splits pieces by
    the step's lengths (the module docstring). Both are read only with 2..DECODE_MAX_SELF_COMBINE splits:
    one split cuts nothing, and more are for batches too small to cut by length.
    """
    check_paged_args(q, k_cache, v_cache, seq_lens, block_tables)
    check_triton_device(q, "decode_attention")
    check_kernel_args(q, k_cache, out)
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_sms = device_num_sms(q.device.index or 0) if q.device.type == "cuda" else DECODE_CPU_NUM_SMS
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, max_seq_len, num_sms)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out

    group = num_heads // num_kv_heads
    use_pdl = check_pdl(q)
    one_split = num_splits == 1  # (contexts too short to cut) the split kernel writes `out` itself
    self_combine = 2 <= num_splits <= DECODE_MAX_SELF_COMBINE  # the split kernel combines them itself
    if self_combine:
        counters = _check_counters(counters, batch * num_kv_heads, q.device)
        if split_by_length is None:
            split_by_length = default_split_by_length(batch, num_kv_heads, num_sms)
    by_length = self_combine and bool(split_by_length)
    if one_split:  # no partials: `out` stands in for their pointers (unread with ONE_SPLIT)
        partial_out = partial_lse = out
    else:
        # partial_out: [batch, num_heads, num_splits, head_dim]; partial_lse: [batch, num_heads, num_splits]
        partial_out = torch.empty(
            batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device
        )
        partial_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(num_kv_heads, batch, num_splits)](
        q,
        k_cache,
        v_cache,
        seq_lens,
        block_tables,
        partial_out,
        partial_lse,
        out,
        counters if self_combine else seq_lens,  # (unread unless SELF_COMBINE)
        scale * math.log2(math.e),
        num_splits,
        DECODE_PROGRAMS_PER_SM * num_sms,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        ONE_SPLIT=one_split,
        GROUP=group,
        BLOCK_H=max(DECODE_MIN_ROWS, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_N=DECODE_BLOCK_N,
        BLOCK_SIZE=block_size,
        DOT_PRECISION=dot_precision(q.dtype),
        USE_PDL=use_pdl,
        SELF_COMBINE=self_combine,
        BY_LENGTH=by_length,
        # (one variant per power of two of the batch, by length only: CUDA graphs compile theirs at capture;
        # from 64: at 16 and 32 the uncapped kernel took 168 registers, 3 programs per SM instead of 4)
        BATCH_P2=max(triton.next_power_of_2(batch), DECODE_MIN_BATCH_P2) if by_length else 1,
        MAX_PIECES=triton.next_power_of_2(num_splits) if self_combine else 1,
        num_warps=DECODE_NUM_WARPS,
        num_stages=DECODE_NUM_STAGES,
        maxnreg=DECODE_MAX_REGISTERS if self_combine else None,
        launch_pdl=use_pdl,
    )
    if one_split or self_combine:
        return out
    _decode_reduce_kernel[(batch, num_heads)](
        partial_out,
        partial_lse,
        seq_lens,
        out,
        num_splits,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_N=DECODE_BLOCK_N,
        SPLITS_P2=triton.next_power_of_2(num_splits),
        USE_PDL=use_pdl,
        num_warps=1 if head_dim <= 64 else 2,
        launch_pdl=use_pdl,
    )
    return out
