"""decode_attention (split-KV Triton kernel; splits that combine themselves, or a reduce pass) matches
decode_attention_ref for any number of splits, including splits left empty, and its launch does not depend
on the sequence lengths."""

import math

import pytest
import torch

from nanovllm.kernels import decode_attention as decode_attention_module
from nanovllm.kernels.backend import tl, triton
from nanovllm.kernels.decode_attention import (
    DECODE_BLOCK_N,
    DECODE_BY_LENGTH_MAX_SPLITS,
    DECODE_MAX_REGISTERS,
    DECODE_MAX_SELF_COMBINE,
    DECODE_MIN_BATCH_P2,
    DECODE_MIN_KEYS_PER_SPLIT,
    DECODE_MIN_ROWS,
    DECODE_NUM_STAGES,
    DECODE_NUM_WARPS,
    DECODE_PROGRAMS_PER_SM,
    _combine_splits,
    _decode_split_kernel,
    decode_attention,
    decode_attention_ref,
    default_num_splits,
    default_split_by_length,
)
from nanovllm.kernels.paged_attention import paged_attention_ref, paged_prefill_attention
from tests.sm90 import compile_sm90

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DECODE_SPECS = [(1, 45), (1, 1), (1, 130), (1, 64), (1, 200)]


def run_both(inputs, num_splits):
    args = inputs.decode_args
    ref = decode_attention_ref(*args)
    out = decode_attention(*args, max_seq_len=inputs.max_seq_len, num_splits=num_splits)
    return out, ref


# (block_size, head_dim, group) varied across the dtype x num_splits grid; None = the default heuristic.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "num_splits,block_size,head_dim,group", [(1, 16, 32, 2), (3, 32, 64, 1), (None, 64, 16, 4)]
)
def test_decode_matches_ref(make_paged_inputs, tol, dtype, num_splits, block_size, head_dim, group):
    inputs = make_paged_inputs(
        DECODE_SPECS,
        num_heads=2 * group,
        num_kv_heads=2,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        seed=block_size,
    )
    out, ref = run_both(inputs, num_splits)
    assert not ref.isnan().any()
    torch.testing.assert_close(out, ref, **tol(dtype))


@pytest.mark.parametrize("block_size", [16, 32, 64, 256])
def test_decode_block_sizes(make_paged_inputs, tol, block_size):
    inputs = make_paged_inputs(
        DECODE_SPECS, num_heads=2, num_kv_heads=1, head_dim=16, block_size=block_size, dtype=torch.float32
    )
    out, ref = run_both(inputs, num_splits=2)
    torch.testing.assert_close(out, ref, **tol(torch.float32))


@pytest.mark.parametrize("group", [1, 2, 3, 4, 8])
def test_decode_gqa_groups(make_paged_inputs, tol, group):
    inputs = make_paged_inputs(
        DECODE_SPECS, num_heads=2 * group, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float16
    )
    out, ref = run_both(inputs, num_splits=2)
    torch.testing.assert_close(out, ref, **tol(torch.float16))


@pytest.mark.parametrize(
    "num_splits", [DECODE_MAX_SELF_COMBINE, DECODE_MAX_SELF_COMBINE + 1]
)  # + reduce pass
def test_decode_with_more_splits_than_key_tiles(make_paged_inputs, tol, num_splits):
    # Up to 9 splits of sequences with 1..200 keys: most splits are empty and must weigh nothing.
    inputs = make_paged_inputs(
        DECODE_SPECS, num_heads=2, num_kv_heads=1, head_dim=16, block_size=16, dtype=torch.float32
    )
    out, ref = run_both(inputs, num_splits=num_splits)
    torch.testing.assert_close(out, ref, **tol(torch.float32))


def test_decode_ignores_garbage_past_the_context(make_paged_inputs, tol):
    # Block-table entries past each sequence point far outside the cache; unused cache rows are NaN.
    inputs = make_paged_inputs(
        DECODE_SPECS,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        block_size=16,
        dtype=torch.float32,
        table_fill=1_000_000,
    )
    out, ref = run_both(inputs, num_splits=3)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, **tol(torch.float32))


# 1: the split kernel writes the output itself; 3: the splits combine themselves; 9: the reduce pass
@pytest.mark.parametrize("num_splits", [1, 3, DECODE_MAX_SELF_COMBINE + 1])
def test_decode_zero_length_padding_rows_give_zeros(make_paged_inputs, tol, num_splits):
    # CUDA-graph padding: extra batch rows with seq_len 0 must not read anything or disturb real rows.
    inputs = make_paged_inputs(
        [(1, 40), (1, 70)], num_heads=2, num_kv_heads=1, head_dim=16, block_size=16, dtype=torch.float32
    )
    args = inputs.decode_args
    ref = decode_attention_ref(*args)
    padded_q = torch.cat([inputs.q, torch.randn(2, 2, 16)])
    padded_lens = torch.cat([inputs.seq_lens, torch.zeros(2, dtype=torch.int32)])
    padded_tables = torch.cat([inputs.block_tables, torch.full_like(inputs.block_tables, -1)])
    cache = (inputs.k_cache, inputs.v_cache)
    out = decode_attention(
        padded_q, *cache, padded_lens, padded_tables, inputs.scale, 70, num_splits=num_splits
    )
    torch.testing.assert_close(out[:2], ref, **tol(torch.float32))
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))
    # the torch reference (the CPU path's, and eager steps padded as a graph pads them) agrees
    cu = torch.arange(5, dtype=torch.int32)
    torch.testing.assert_close(
        paged_attention_ref(padded_q, *cache, cu, padded_lens, padded_tables, inputs.scale),
        out,
        **tol(torch.float32),
    )


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_same_launch_for_other_lengths(make_paged_inputs, tol, num_splits):
    # What a CUDA graph replay does: same tensors and num_splits, new seq_lens/block tables in place.
    inputs = make_paged_inputs(
        [(1, 150), (1, 90)], num_heads=2, num_kv_heads=1, head_dim=16, block_size=16, dtype=torch.float32
    )
    out = torch.empty_like(inputs.q)
    for seq_lens in ([150, 90], [3, 17], [129, 1]):
        inputs.seq_lens.copy_(torch.tensor(seq_lens, dtype=torch.int32))
        args = inputs.decode_args
        decode_attention(*args, max_seq_len=256, num_splits=num_splits, out=out)
        torch.testing.assert_close(out, decode_attention_ref(*args), **tol(torch.float32))


def test_decode_kernel_matches_prefill_kernel_on_decode_batch(make_paged_inputs, tol):
    inputs = make_paged_inputs(
        DECODE_SPECS, num_heads=4, num_kv_heads=2, head_dim=32, block_size=32, dtype=torch.float32
    )
    args = (inputs.q, inputs.k_cache, inputs.v_cache)
    out = decode_attention(*args, inputs.seq_lens, inputs.block_tables, inputs.scale, inputs.max_seq_len)
    prefill_out = paged_prefill_attention(
        *args, inputs.cu_seqlens_q, inputs.seq_lens, inputs.block_tables, 1, inputs.max_seq_len, inputs.scale
    )
    torch.testing.assert_close(out, prefill_out, **tol(torch.float32))


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_reads_strided_q(make_paged_inputs, tol, num_splits):
    inputs = make_paged_inputs(
        DECODE_SPECS, num_heads=4, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32
    )
    q_view = torch.cat([inputs.q, torch.randn_like(inputs.q)], dim=1)[:, ::2]  # [batch, 4, 16], strided
    _, *rest = inputs.decode_args
    out = decode_attention(q_view, *rest, max_seq_len=inputs.max_seq_len, num_splits=num_splits)
    torch.testing.assert_close(out, decode_attention_ref(q_view, *rest), **tol(torch.float32))


def pieces_with_keys(
    seq_lens: list[int], num_kv_heads: int, num_sms: int, num_splits: int, by_length: bool
) -> list[int]:
    """How many splits of each sequence get keys, by the kernel's documented rule (module docstring)."""
    slots, block_n = DECODE_PROGRAMS_PER_SM * num_sms, DECODE_BLOCK_N
    total, num_live = max(sum(seq_lens), 1), sum(n > 0 for n in seq_lens)
    pair_keys = total * num_kv_heads
    spread = max(seq_lens) * num_live * 8 > total * 9
    pieces = []
    for n in seq_lens:
        wanted = num_splits
        if by_length and num_live * num_kv_heads < slots:  # fill the slots once: n * slots / pair_keys
            wanted = (2 * n * slots + (pair_keys if spread else 0)) // (2 * pair_keys)  # (rounded if spread)
        elif by_length:  # only the sequences 1/8 longer than the mean, in two
            wanted = 2 if n * num_live * 8 > total * 9 else 1
        wanted = min(max(wanted, 1), max(n // (2 * block_n), 1) if by_length else num_splits, num_splits)
        keys_per_split = max(math.ceil(math.ceil(n / wanted) / block_n) * block_n, block_n)
        pieces.append(max(math.ceil(n / keys_per_split), 1))
    return pieces


# By length with 1 SM (4 program slots, fewer than the 14 (sequence, kv head) pairs: the longer sequences in
# two) and 8 or 132 (more: every sequence in pieces that fill the slots).
@pytest.mark.parametrize(
    "num_sms,num_splits,by_length",
    [(132, 2, False), (132, 8, False), (1, 2, True), (1, 4, True), (8, 4, True), (132, 8, True)],
)
def test_splits_combine_themselves_and_reset_the_counts(
    make_paged_inputs, tol, monkeypatch, num_sms, num_splits, by_length
):
    # 2..8 splits: the last of a sequence's splits to finish combines them all and resets the count. The
    # inputs hold padding rows of length 0, equal lengths and spread ones, and lengths that tell the rules
    # apart (768 x 6 on 8 SMs: 2.67 pieces, rounded down; 330 among 300s: not 1/8 above the mean).
    monkeypatch.setattr(decode_attention_module, "DECODE_CPU_NUM_SMS", num_sms)
    inputs = make_paged_inputs(
        [(1, 768)] * 7, num_heads=4, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32
    )
    args = inputs.decode_args
    out = torch.empty_like(inputs.q)
    kwargs = dict(num_splits=num_splits, out=out, split_by_length=by_length)
    cut = set()
    for seq_lens in (
        [45, 200, 1, 130, 390, 64, 133],
        [150] * 7,
        [0, 390, 7, 390, 2, 129, 0],
        [0, 0] + [150] * 5,
        [768] * 6 + [0],
        [300] * 6 + [330],
    ):
        inputs.seq_lens.copy_(torch.tensor(seq_lens, dtype=torch.int32))
        pieces = pieces_with_keys(seq_lens, 2, num_sms, num_splits, by_length)
        # A probe: counts starting at 1000 never reach "last", so each pair ends at 1000 + its splits with
        # keys (the pairs not cut never count): the kernel's own cut, read back.
        probe = torch.full((14,), 1000, dtype=torch.int32)  # [batch * kv heads]
        decode_attention(*args, 800, counters=probe, **kwargs)
        assert probe.tolist() == [1000 + p if p > 1 else 1000 for p in pieces for _ in range(2)]
        cut.update(i for i, p in enumerate(pieces) if p > 1)
        counters = torch.zeros(14, dtype=torch.int32)
        decode_attention(*args, 800, counters=counters, **kwargs)
        live = [i for i, n in enumerate(seq_lens) if n > 0]  # (the reference takes no empty rows)
        ref = decode_attention_ref(*(a[live] if i in (0, 3, 4) else a for i, a in enumerate(args)))
        torch.testing.assert_close(out[live], ref, **tol(torch.float32))
        assert not out[[i for i, n in enumerate(seq_lens) if n == 0]].any()
        assert not counters.any()  # every count back to 0 for the next call
    assert cut  # (each case combines some sequence's splits)


def test_the_by_length_rule():
    lens = [45, 200, 1, 130, 390, 64, 133]  # mean 138: 200 and 390 are 1/8 longer, 200 too short to cut
    assert pieces_with_keys(lens, 2, 1, 4, True) == [1, 1, 1, 1, 2, 1, 1]
    # 32 slots for 14 pairs, spread lengths: 390 * 32 / (963 * 2) = 6.5 pieces, at most 390 // 128 = 3
    assert pieces_with_keys(lens, 2, 8, 8, True) == [1, 1, 1, 1, 3, 1, 1]
    # equal lengths: 768 * 32 / (3840 * 2) = 3.2 pieces each, rounded down; 768 * 32 / (4608 * 2) = 2.67
    assert pieces_with_keys([768] * 5, 2, 8, 8, True) == [3] * 5
    assert pieces_with_keys([768] * 6 + [0], 2, 8, 4, True) == [2] * 6 + [1]
    assert pieces_with_keys([150] * 7, 2, 1, 8, True) == [1] * 7  # equal lengths, more pairs than slots
    assert pieces_with_keys([300] * 6 + [330], 2, 1, 8, True) == [1] * 7  # 330 < 9/8 of the mean 304
    assert pieces_with_keys([150] * 7, 2, 1, 8, False) == [3] * 7  # not by length: 3 tiles, 3 splits


def test_self_combining_splits_reject_a_bad_counter_buffer(make_paged_inputs):
    inputs = make_paged_inputs(
        [(1, 3), (1, 5)], num_heads=2, num_kv_heads=1, head_dim=16, block_size=16, dtype=torch.float32
    )
    too_small, wide, strided = (
        torch.zeros(n, dtype=d) for n, d in ((1, torch.int32), (4, torch.int64), (8, torch.int32))
    )
    for bad in (too_small, wide, strided[::2]):
        with pytest.raises(ValueError, match="counters must be contiguous int32"):
            decode_attention(*inputs.decode_args, 8, num_splits=2, counters=bad)


def test_default_num_splits():
    num_sms = 132
    # From 1.75 (sequence, kv head) pairs per SM: cut by length, into up to enough pieces for two programs
    # per slot on average (2..4), however large the batch.
    for batch, heads in ((512, 8), (256, 8), (165, 2), (42, 8), (64, 8), (64, 4), (58, 4)):  # 58 x 4: 1.76
        pairs = batch * heads
        wanted = max(
            2, min(math.ceil(2 * DECODE_PROGRAMS_PER_SM * num_sms / pairs), DECODE_BY_LENGTH_MAX_SPLITS)
        )
        assert default_num_splits(batch, heads, 1024, num_sms) == wanted
        assert default_split_by_length(batch, heads, num_sms)
    assert default_num_splits(256, 8, 1024, num_sms) == 2 and default_num_splits(64, 8, 1024, num_sms) == 3
    assert default_num_splits(57, 4, 1024, num_sms) == 3  # 228 pairs: 1.73 per SM, 4 programs per SM
    assert not default_split_by_length(57, 4, num_sms)
    assert default_num_splits(256, 8, 2 * DECODE_MIN_KEYS_PER_SPLIT - 1, num_sms) == 1  # too short to cut
    # Small batch, long context: split (up to the cap), but keep DECODE_MIN_KEYS_PER_SPLIT keys per split.
    assert default_num_splits(1, 8, 4096, num_sms) == min(66, 4096 // DECODE_MIN_KEYS_PER_SPLIT, 64)
    assert default_num_splits(16, 8, 1024, num_sms) == min(5, 1024 // DECODE_MIN_KEYS_PER_SPLIT)
    # Short contexts are never split below the minimum split length.
    assert default_num_splits(1, 8, DECODE_MIN_KEYS_PER_SPLIT - 1, num_sms) == 1
    for batch in (1, 2, 8, 64, 512):
        for max_seq_len in (1, 255, 512, 4096, 40960):
            splits = default_num_splits(batch, 8, max_seq_len, num_sms)
            assert 1 <= splits <= max(1, max_seq_len // DECODE_MIN_KEYS_PER_SPLIT)


def test_decode_rejects_bad_arguments(make_paged_inputs):
    inputs = make_paged_inputs(
        [(1, 3)], num_heads=2, num_kv_heads=1, head_dim=16, block_size=16, dtype=torch.float32
    )
    args = (*inputs.decode_args, 3)
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(*args, num_splits=0)
    with pytest.raises(ValueError, match="out must be"):
        decode_attention(*args, out=torch.empty(1, 2, 8))
    with pytest.raises(ValueError, match="seq_lens"):
        q, k_cache, v_cache, seq_lens, block_tables, scale = inputs.decode_args
        decode_attention(q, k_cache, v_cache, seq_lens[:, None], block_tables, scale, 3)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("num_splits", [None, 1, 2, 7])
def test_decode_matches_ref_gpu(make_paged_inputs, tol, dtype, block_size, num_splits):
    gen = torch.Generator().manual_seed(block_size)
    seq_lens = torch.randint(1, 4097, (64,), generator=gen).tolist()
    inputs = make_paged_inputs(
        [(1, n) for n in seq_lens],
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        block_size=block_size,
        dtype=dtype,
        device="cuda",
    )
    out, ref = run_both(inputs, num_splits)
    torch.testing.assert_close(out, ref, **tol(dtype))


@pytest.mark.gpu
@needs_cuda
# 8 sequences: every split mode (9: the reduce pass); 72 x 8 kv heads: more pairs than an H100's or H200's
# 528 program slots, so the default cuts only the longer sequences, in two.
@pytest.mark.parametrize(
    "batch,num_splits,split_by_length",
    [(8, None, None), (8, 2, False), (8, 2, True), (8, 4, True), (8, 8, False), (8, 9, False),
     (72, None, None)],
)  # fmt: skip
def test_decode_in_cuda_graph_gpu(make_paged_inputs, tol, batch, num_splits, split_by_length):
    max_len = 4000 if batch == 8 else 1500
    inputs = make_paged_inputs(
        [(1, max_len)] * batch,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        block_size=16,
        dtype=torch.bfloat16,
        device="cuda",
    )
    args = inputs.decode_args
    out = torch.empty_like(inputs.q)
    counters = torch.zeros(batch * 8, dtype=torch.int32, device="cuda")  # (read with 2..8 splits only)
    kwargs = dict(max_seq_len=4096, out=out, num_splits=num_splits, split_by_length=split_by_length)
    decode_attention(*args, counters=counters, **kwargs)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(*args, counters=counters, **kwargs)
    gen = torch.Generator().manual_seed(batch)
    spread = torch.randint(0, max_len + 1, (batch,), generator=gen).tolist()  # with a few 0s at 72
    if batch == 8:
        spread = [1, 17, 300, 4000, 2048, 16, 15, 999]
    for lens in ([max_len] * batch, spread):
        inputs.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        live = [i for i, n in enumerate(lens) if n > 0]  # (the reference takes no empty rows)
        ref = decode_attention_ref(*(a[live] if i in (0, 3, 4) else a for i, a in enumerate(args)))
        torch.testing.assert_close(out[live], ref, **tol(torch.bfloat16))
        assert not out[[i for i, n in enumerate(lens) if n == 0]].any()
        assert not counters.any()  # (every count back to 0 after each replay)


@triton.jit
def _combine_as_split_kernel(
    lse_ptr, part_ptr, counter_ptr, out_ptr, num_pieces, MAX_PIECES: tl.constexpr, HEAD_DIM: tl.constexpr
):
    # One program of 16 heads arriving at the combine: the partials of num_pieces splits are stored
    # (lse [16, MAX_PIECES], part [16, MAX_PIECES, HEAD_DIM] fp32).
    heads, offs_d = tl.arange(0, 16), tl.arange(0, HEAD_DIM)
    first = heads * MAX_PIECES  # [16] each head's split 0
    part_ptrs = part_ptr + first[:, None] * HEAD_DIM + offs_d[None, :]
    out_ptrs = out_ptr + heads[:, None] * HEAD_DIM + offs_d[None, :]
    valid = heads < 16  # [16], all
    _combine_splits(
        counter_ptr, num_pieces, lse_ptr + first, part_ptrs, out_ptrs, valid, MAX_PIECES, HEAD_DIM
    )


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
@pytest.mark.parametrize("max_pieces,num_pieces", [(2, 2), (4, 3), (8, 8)])
def test_only_the_last_split_combines_all_in_split_order(device, max_pieces, num_pieces):
    # Every split counts itself in; only the one that counts last (count num_pieces - 1 before it) combines,
    # reading every partial from memory in split order: the same bits whichever program finishes last.
    # (Summed in finishing order, a run's tokens depended on timing: compiled, w0 * o0 + w1 * o1 is one fma,
    # which rounds differently with its terms swapped.) The splits past num_pieces got no keys: unread.
    gen = torch.Generator(device=device).manual_seed(0)
    lse = torch.randn(16, max_pieces, device=device, generator=gen) * 4  # [heads, split] log2 domain
    part = torch.randn(16, max_pieces, 128, device=device, generator=gen)  # [heads, split, HEAD_DIM]
    lse[:, num_pieces:], part[:, num_pieces:] = float("nan"), float("nan")
    for arrived in range(num_pieces):
        counter = torch.full((1,), arrived, dtype=torch.int32, device=device)
        out = torch.zeros(16, 128, device=device)
        _combine_as_split_kernel[(1,)](
            lse, part, counter, out, num_pieces, MAX_PIECES=max_pieces, HEAD_DIM=128
        )
        last = arrived == num_pieces - 1
        assert counter.item() == (0 if last else arrived + 1)  # reset by the last for the next call
        if not last:
            assert not out.any()
    w = torch.softmax(lse[:, :num_pieces] * math.log(2), dim=1)  # [heads, split]
    torch.testing.assert_close(out, (w[:, :, None] * part[:, :num_pieces]).sum(1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- registers (an H100 build, any machine)


# Compiled for sm_90 outside the interpreter, with the 16-divisible pointers and strides a real launch
# specializes on: the registers a thread of the split kernel uses (cuobjdump -res-usage).
def _split_kernel_usage(one_split: bool, max_pieces: int, batch_p2: int, group: int, by_length: bool):
    # as the engine launches it: KV blocks of 16, a group of 2 (Qwen3-0.6B) or 4 (Qwen3-8B) query heads;
    # max_pieces 0: the splits leave partials to the reduce pass
    self_combine = max_pieces > 1
    constants = dict(ONE_SPLIT=one_split, GROUP=group, BLOCK_H=DECODE_MIN_ROWS, HEAD_DIM=128,
                     BLOCK_N=DECODE_BLOCK_N, BLOCK_SIZE=16, DOT_PRECISION="tf32", USE_PDL=True,
                     SELF_COMBINE=self_combine, BY_LENGTH=by_length, BATCH_P2=batch_p2,
                     MAX_PIECES=max(max_pieces, 1))  # fmt: skip
    types = {"seq_lens_ptr": "*i32", "block_tables_ptr": "*i32", "counters_ptr": "*i32",
             "partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32", "scale_log2": "fp32"}  # fmt: skip
    options = dict(num_warps=DECODE_NUM_WARPS, num_stages=DECODE_NUM_STAGES)
    if self_combine:  # (capped at launch: uncapped, two splits not by length took 168)
        options["maxnreg"] = DECODE_MAX_REGISTERS
    return compile_sm90(_decode_split_kernel, constants, types, **options)


@pytest.mark.slow
@pytest.mark.parametrize(
    "one_split,max_pieces,batch_p2,group,by_length",
    [(True, 0, 1, 2, False), (True, 0, 1, 4, False), (False, 0, 1, 2, False),
     (False, 2, DECODE_MIN_BATCH_P2, 2, True), (False, 4, DECODE_MIN_BATCH_P2, 4, True),
     (False, 2, 256, 2, True), (False, 4, 512, 4, True), (False, 2, 1024, 2, True),
     (False, 2, 1, 2, False), (False, 8, 1, 2, False), (False, 8, 1, 4, False)],
)  # fmt: skip
def test_split_kernel_keeps_four_programs_per_sm(one_split, max_pieces, batch_p2, group, by_length):
    # Decode attention keeps its loads in flight across 4 programs of 128 threads per SM (DECODE_NUM_WARPS),
    # which needs <= 128 registers a thread. (Session 14 fused the q/k norm, rope and K/V store into this
    # kernel: its first version took 168 in the split variants, 3 programs per SM, and lost ~3% of the
    # default workload's throughput on an H100; docs/performance.md. Session 15 found the by-length variant
    # at 168 for batches of 16 and 32 (BATCH_P2 below 64), hence DECODE_MIN_BATCH_P2.
    # Session 17 capped the two-split variant not cut by length at DECODE_MAX_REGISTERS (it took 168);
    # session 27 capped every self-combining variant.)
    usage = _split_kernel_usage(one_split, max_pieces, batch_p2, group, by_length)
    assert usage["registers"] <= 128 and usage["stack"] == 0, usage
