"""paged_attention_ref is causal attention aligned to the end of the context, read through block tables;
paged_prefill_attention (Triton) matches it for every way a batch can mix prefill, chunks and decode."""

import numpy as np
import pytest
import torch

from nanovllm.kernels import paged_attention
from nanovllm.kernels.paged_attention import paged_attention_ref, paged_prefill_attention, prefill_work_items

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def batch_specs(case: str, block_size: int) -> list[tuple[int, int]]:
    """(query tokens, seq_len) per sequence for each kind of batch the scheduler can build."""
    return {
        "prefill": [(37, 37), (64, 64), (5, 5)],
        # A later chunk of a chunked prefill: the cache already holds the earlier chunks.
        "chunked": [(40, 100), (17, 50)],
        # A prefix-cache hit: whole cached blocks, then the rest of the prompt.
        "prefix_cached": [(20, 20 + 2 * block_size), (9, 9 + block_size)],
        "decode": [(1, 45), (1, 1), (1, 130)],
        "mixed": [(1, 70), (33, 33), (1, 5), (20, 90)],
    }[case]


def dense_causal_attention(q, keys, values, cu_seqlens_q, scale):
    """The definition, one query row and head at a time, on contiguous per-sequence K/V."""
    out = torch.empty_like(q)
    num_heads, num_kv_heads = q.shape[1], keys[0].shape[1]
    for i, (k, v) in enumerate(zip(keys, values)):
        q_start, q_end = cu_seqlens_q[i].item(), cu_seqlens_q[i + 1].item()
        seq_len = k.shape[0]
        for j in range(q_end - q_start):
            pos = seq_len - (q_end - q_start) + j
            for h in range(num_heads):
                kv = h // (num_heads // num_kv_heads)
                probs = torch.softmax(k[: pos + 1, kv] @ q[q_start + j, h] * scale, dim=0)
                out[q_start + j, h] = probs @ v[: pos + 1, kv]
    return out


def run_both(inputs):
    args = inputs.paged_args
    ref = paged_attention_ref(*args, inputs.scale)
    out = paged_prefill_attention(*args, inputs.max_query_len, inputs.max_seq_len, inputs.scale)
    return out, ref


@pytest.mark.parametrize("case", ["prefill", "chunked", "decode", "mixed"])
@pytest.mark.parametrize("group", [1, 3])
def test_ref_matches_dense_attention(make_paged_inputs, tol, case, group):
    inputs = make_paged_inputs(
        batch_specs(case, 16),
        num_heads=2 * group,
        num_kv_heads=2,
        head_dim=8,
        block_size=16,
        dtype=torch.float64,
    )
    args = inputs.paged_args
    ref = paged_attention_ref(*args, inputs.scale)
    expected = dense_causal_attention(inputs.q, inputs.keys, inputs.values, inputs.cu_seqlens_q, inputs.scale)
    torch.testing.assert_close(ref, expected, **tol(torch.float64))


# Each batch kind in both dtypes, with block size, head_dim and GQA group varied across cases.
CASE_SHAPES = {
    "prefill": (16, 32, 2),
    "chunked": (32, 16, 4),
    "prefix_cached": (64, 64, 1),
    "decode": (32, 64, 2),
    "mixed": (16, 32, 4),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASE_SHAPES))
def test_prefill_kernel_matches_ref(make_paged_inputs, tol, case, dtype):
    block_size, head_dim, group = CASE_SHAPES[case]
    inputs = make_paged_inputs(
        batch_specs(case, block_size),
        num_heads=2 * group,
        num_kv_heads=2,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        seed=list(CASE_SHAPES).index(case),
    )
    out, ref = run_both(inputs)
    assert not ref.isnan().any()
    torch.testing.assert_close(out, ref, **tol(dtype))


def test_prefill_work_items_cover_every_tile_longest_first():
    seq, tile = prefill_work_items(np.array([70, 1, 150, 0, 64]), 32)
    # by decreasing query length (150: 5 tiles, 70: 3, 64: 2, 1: 1, 0: none), each one's tiles last-first
    assert seq.tolist() == [2] * 5 + [0] * 3 + [4] * 2 + [1]
    assert tile.tolist() == [4, 3, 2, 1, 0, 2, 1, 0, 1, 0, 0]
    assert seq.dtype == tile.dtype == np.int32
    assert [a.size for a in prefill_work_items(np.array([0, 0]), 32)] == [0, 0]
    assert paged_attention.prefill_tile_tokens(16, 8) == 64  # Qwen3-0.6B: group 2 -> 64 tokens x 2 heads
    assert paged_attention.prefill_tile_tokens(14, 2) == 16  # group 7 pads to 8


def test_prefill_kernel_runs_a_given_work_list(make_paged_inputs, tol):
    # The engine passes the work list (built on the host with the step's inputs), padded with -1 items in
    # a CUDA graph; any order of the items gives the same output. Group 4: 32 query tokens per tile, so
    # these sequences have 1 to 5 tiles (a prompt, a later chunk, decodes, a prefix hit).
    inputs = make_paged_inputs(
        [(150, 150), (70, 130), (1, 45), (40, 72), (1, 1)],
        num_heads=8,
        num_kv_heads=2,
        head_dim=16,
        block_size=16,
        dtype=torch.float32,
        seed=7,
    )
    args = inputs.paged_args
    ref = paged_attention_ref(*args, inputs.scale)
    q_lens = np.diff(args[3].cpu().numpy())  # from cu_seqlens_q
    seq, tile = prefill_work_items(q_lens, paged_attention.prefill_tile_tokens(8, 2))
    order = np.random.default_rng(0).permutation(seq.size)
    seq = np.concatenate([seq[order], np.full(3, -1, np.int32)])  # shuffled, then three spare items
    tile = np.concatenate([tile[order], np.zeros(3, np.int32)])
    work = (torch.from_numpy(seq), torch.from_numpy(tile))
    out = paged_prefill_attention(*args, inputs.max_query_len, inputs.max_seq_len, inputs.scale, work=work)
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    with pytest.raises(ValueError, match="int32"):
        bad = (work[0].long(), work[1].long())
        paged_prefill_attention(*args, inputs.max_query_len, inputs.max_seq_len, inputs.scale, work=bad)


@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
def test_prefill_kernel_block_sizes(make_paged_inputs, tol, block_size):
    # Key tiles of 64 span several small blocks, or sit inside one large block.
    inputs = make_paged_inputs(
        [(30, 300), (45, 45)],
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        block_size=block_size,
        dtype=torch.float32,
    )
    out, ref = run_both(inputs)
    torch.testing.assert_close(out, ref, **tol(torch.float32))


@pytest.mark.parametrize("group", [1, 2, 3, 4, 8])
def test_prefill_kernel_gqa_groups(make_paged_inputs, tol, group):
    # Group 3 is padded to 4 query rows per token inside the kernel.
    inputs = make_paged_inputs(
        batch_specs("mixed", 16),
        num_heads=group,
        num_kv_heads=1,
        head_dim=16,
        block_size=16,
        dtype=torch.float32,
    )
    out, ref = run_both(inputs)
    torch.testing.assert_close(out, ref, **tol(torch.float32))


@pytest.mark.parametrize("head_dim", [16, 32, 64])
def test_prefill_kernel_head_dims(make_paged_inputs, tol, head_dim):
    inputs = make_paged_inputs(
        batch_specs("chunked", 32),
        num_heads=2,
        num_kv_heads=1,
        head_dim=head_dim,
        block_size=32,
        dtype=torch.float16,
    )
    out, ref = run_both(inputs)
    torch.testing.assert_close(out, ref, **tol(torch.float16))


def test_prefill_kernel_ignores_garbage_past_the_context(make_paged_inputs, tol):
    # Block-table entries past each sequence point far outside the cache; unused cache rows are NaN.
    inputs = make_paged_inputs(
        [(13, 77), (1, 16), (50, 50)],
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        block_size=16,
        dtype=torch.float32,
        table_fill=1_000_000,
    )
    out, ref = run_both(inputs)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, **tol(torch.float32))


def test_prefill_kernel_writes_into_out(make_paged_inputs, tol):
    inputs = make_paged_inputs(
        [(7, 20), (3, 3)], num_heads=2, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32
    )
    args = inputs.paged_args
    out = torch.full_like(inputs.q, float("nan"))
    result = paged_prefill_attention(*args, inputs.max_query_len, inputs.max_seq_len, inputs.scale, out=out)
    assert result is out
    torch.testing.assert_close(out, paged_attention_ref(*args, inputs.scale), **tol(torch.float32))


def test_prefill_kernel_reads_strided_q(make_paged_inputs, tol):
    # q usually comes out of a fused qkv projection: strided over tokens and heads, contiguous in head_dim.
    inputs = make_paged_inputs(
        [(9, 40), (20, 20)], num_heads=4, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32
    )
    q_view = torch.cat([inputs.q, torch.randn_like(inputs.q)], dim=1)[:, ::2]  # [num_tokens, 4, 16], strided
    _, *rest = inputs.paged_args
    out = paged_prefill_attention(q_view, *rest, inputs.max_query_len, inputs.max_seq_len, inputs.scale)
    torch.testing.assert_close(out, paged_attention_ref(q_view, *rest, inputs.scale), **tol(torch.float32))


def test_ops_reject_bad_arguments(make_paged_inputs):
    inputs = make_paged_inputs(
        [(3, 3)], num_heads=4, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32
    )
    good = dict(
        q=inputs.q,
        k_cache=inputs.k_cache,
        v_cache=inputs.v_cache,
        cu_seqlens_q=inputs.cu_seqlens_q,
        seq_lens=inputs.seq_lens,
        block_tables=inputs.block_tables,
        scale=inputs.scale,
    )
    bad = [
        (dict(q=inputs.q[:, :3]), "multiple of num_kv_heads"),
        (dict(q=inputs.q.half()), "dtype"),
        (dict(cu_seqlens_q=inputs.cu_seqlens_q[:1]), "cu_seqlens_q"),
        (dict(seq_lens=inputs.seq_lens.float()), "seq_lens"),
        (dict(block_tables=inputs.block_tables[0]), "block_tables"),
        (dict(seq_lens=torch.tensor([2], dtype=torch.int32)), "seq_len 2 must be >= its 3 query tokens"),
    ]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            paged_attention_ref(**{**good, **change})
    for change, match in bad[:5]:
        with pytest.raises(ValueError, match=match):
            paged_prefill_attention(**{**good, **change}, max_query_len=3, max_seq_len=3)
    odd = make_paged_inputs(
        [(3, 3)], num_heads=1, num_kv_heads=1, head_dim=24, block_size=16, dtype=torch.float32
    )
    with pytest.raises(ValueError, match="power of two"):
        paged_prefill_attention(*odd.paged_args, 3, 3, 1.0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize(
    "specs",
    [
        [(1024, 1024), (4096, 4096), (300, 300)],  # plain prefill
        [(512, 4096), (1000, 1500), (1, 4000)] + [(1, 100 + 37 * i) for i in range(61)],  # chunks + decode
    ],
    ids=["prefill", "mixed"],
)
def test_prefill_kernel_matches_ref_gpu(make_paged_inputs, tol, dtype, block_size, specs):
    inputs = make_paged_inputs(
        specs, num_heads=16, num_kv_heads=8, head_dim=128, block_size=block_size, dtype=dtype, device="cuda"
    )
    out, ref = run_both(inputs)
    torch.testing.assert_close(out, ref, **tol(dtype))
