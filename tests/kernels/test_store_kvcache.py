"""store_kvcache (Triton) writes the same cache as store_kvcache_ref, which writes what the layout says."""

import pytest
import torch

from nanovllm.kernels.store_kvcache import store_kvcache, store_kvcache_ref

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _random_store_case(num_tokens, num_blocks, block_size, num_kv_heads, head_dim, dtype, slot_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    # Distinct random slots anywhere in the cache, with every third token a -1 padding slot.
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::3] = -1
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    return key, value, k_cache, v_cache, slots.to(slot_dtype)


def test_ref_writes_each_token_at_its_slot():
    key, value, k_cache, v_cache, slots = _random_store_case(20, 6, 8, 2, 16, torch.float32, torch.int64, 0)
    store_kvcache_ref(key, value, k_cache, v_cache, slots)
    written = set()
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        written.add(slot)
        block, offset = divmod(slot, 8)
        assert torch.equal(k_cache[block, offset], key[t])
        assert torch.equal(v_cache[block, offset], value[t])
    untouched = torch.tensor([s not in written for s in range(6 * 8)])
    assert k_cache.view(48, -1)[untouched].isnan().all()
    assert v_cache.view(48, -1)[untouched].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("block_size,num_kv_heads,head_dim", [(16, 2, 32), (64, 1, 64), (256, 3, 16)])
def test_store_matches_ref(dtype, slot_dtype, block_size, num_kv_heads, head_dim):
    case = _random_store_case(37, 3, block_size, num_kv_heads, head_dim, dtype, slot_dtype, seed=block_size)
    key, value, k_cache, v_cache, slots = case
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kvcache_ref(key, value, k_ref, v_ref, slots)
    store_kvcache(key, value, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)


def test_store_from_fused_qkv_view():
    # key/value are usually slices of one projection output: strided in tokens, contiguous in head_dim.
    num_heads, num_kv_heads, head_dim = 4, 2, 16
    qkv = torch.randn(10, (num_heads + 2 * num_kv_heads) * head_dim)
    _, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    key, value = k.view(10, num_kv_heads, head_dim), v.view(10, num_kv_heads, head_dim)
    slots = torch.tensor([5, -1, 0, 17, 3, 9, -1, 30, 31, 12], dtype=torch.int32)
    k_cache, v_cache = torch.zeros(4, 8, num_kv_heads, head_dim), torch.zeros(4, 8, num_kv_heads, head_dim)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kvcache_ref(key, value, k_ref, v_ref, slots)
    store_kvcache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_store_nothing_when_all_padding():
    key = torch.randn(3, 1, 16)
    k_cache, v_cache = torch.zeros(2, 4, 1, 16), torch.zeros(2, 4, 1, 16)
    store_kvcache(key, key, k_cache, v_cache, torch.full((3,), -1, dtype=torch.int64))
    assert not k_cache.any() and not v_cache.any()


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(key=torch.randn(4, 3, 16)), "key and value"),
        (dict(slot_mapping=torch.zeros(4, dtype=torch.float32)), "slot_mapping"),
        (dict(slot_mapping=torch.zeros(5, dtype=torch.int32)), "slot_mapping"),
        (dict(v_cache=torch.zeros(2, 8, 2, 32)), "k_cache and v_cache"),
        (dict(value=torch.randn(4, 2, 16, dtype=torch.float16)), "dtype"),
    ],
)
def test_store_rejects_bad_arguments(change, match):
    args = dict(
        key=torch.randn(4, 2, 16),
        value=torch.randn(4, 2, 16),
        k_cache=torch.zeros(2, 8, 2, 16),
        v_cache=torch.zeros(2, 8, 2, 16),
        slot_mapping=torch.zeros(4, dtype=torch.int32),
    )
    args.update(change)
    for op in (store_kvcache, store_kvcache_ref):
        with pytest.raises(ValueError, match=match):
            op(**args)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 256])
def test_store_matches_ref_gpu(dtype, block_size):
    num_blocks = 2 * 4000 // block_size
    case = _random_store_case(4000, num_blocks, block_size, 8, 128, dtype, torch.int64, seed=1)
    key, value, k_cache, v_cache, slots = (t.cuda() for t in case)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kvcache_ref(key, value, k_ref, v_ref, slots)
    store_kvcache(key, value, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)
