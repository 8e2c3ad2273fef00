"""BlockManager: ref counts, the chained prefix-cache hash, LRU eviction of freed blocks, statistics."""

from __future__ import annotations

import pytest

from nanovllm.engine import block_manager as bm_module
from nanovllm.engine.block_manager import BlockManager, hash_block, hash_blocks
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

BS = 4  # tokens per block: small so that a few tokens make several blocks


def seq_of(tokens) -> Sequence:
    return Sequence(list(tokens), SamplingParams())


def admit(bm: BlockManager, seq: Sequence) -> list[int]:
    """Admit seq with all its tokens computed, as a scheduler step followed by update would.
    Returns the prefix-cache hits."""
    cached = bm.find_cached_prefix(seq)
    assert bm.can_allocate(seq, cached, seq.num_tokens)
    bm.allocate(seq, cached, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.check_consistency()
    return cached


def release(bm: BlockManager, seq: Sequence) -> None:
    bm.free_seq(seq)
    bm.check_consistency()


def ref_counts(bm: BlockManager, seq: Sequence) -> list[int]:
    return [bm.blocks[b].ref_count for b in seq.block_table]


# ---- allocation and ref counts ------------------------------------------------------------------


def test_allocate_and_free_return_every_block():
    bm = BlockManager(8, BS)
    seq = seq_of(range(10))  # 10 tokens -> 3 blocks, the last one partial
    assert admit(bm, seq) == []
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert ref_counts(bm, seq) == [1, 1, 1]
    assert bm.num_free_blocks == 5
    release(bm, seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert bm.num_free_blocks == bm.num_blocks == 8
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_append_slots_grows_the_table_one_block_at_a_time():
    bm = BlockManager(8, BS)
    seq = seq_of(range(4))
    admit(bm, seq)
    assert len(seq.block_table) == 1
    for token in range(100, 109):  # decode: one token per step
        seq.token_ids.append(token)
        assert bm.can_append(seq, seq.num_tokens)
        bm.append_slots(seq, seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens
        assert len(seq.block_table) == bm.blocks_needed(seq.num_tokens)
        bm.check_consistency()
    assert len(seq.block_table) == 4  # 13 tokens
    # Blocks registered as they filled during decode: a request continuing the text hits them.
    follower = seq_of(seq.token_ids + [7])
    assert admit(bm, follower) == seq.block_table[:3]
    release(bm, seq)
    release(bm, follower)
    assert bm.num_free_blocks == 8


def test_shared_prefix_is_ref_counted():
    bm = BlockManager(8, BS)
    a = seq_of(range(10))  # blocks [0..3], [4..7], [8, 9]
    b = seq_of(list(range(8)) + [50, 51, 52])  # same first two blocks
    admit(bm, a)
    hits = admit(bm, b)
    assert hits == a.block_table[:2] == b.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert ref_counts(bm, a) == [2, 2, 1]
    assert bm.num_free_blocks == 8 - 4
    release(bm, a)
    assert ref_counts(bm, b) == [1, 1, 1]  # b still holds the shared blocks
    assert all(blk not in bm.free for blk in b.block_table)
    release(bm, b)
    assert bm.num_free_blocks == 8


def test_out_of_blocks_is_refused_not_overdrawn():
    bm = BlockManager(3, BS)
    big = seq_of(range(13))  # 4 blocks > 3
    assert not bm.can_allocate(big, bm.find_cached_prefix(big), big.num_tokens)
    small = seq_of(range(100, 112))  # exactly 3 blocks
    admit(bm, small)
    assert bm.num_free_blocks == 0
    small.token_ids.append(1)
    assert not bm.can_append(small, small.num_tokens)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.append_slots(small, small.num_tokens)


def test_double_free_is_detected():
    bm = BlockManager(4, BS)
    a = seq_of(range(6))
    admit(bm, a)
    alias = seq_of(range(6))
    alias.block_table = list(a.block_table)  # a bug that hands the same blocks to two sequences
    bm.free_seq(a)
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free_seq(alias)


def test_allocate_twice_is_refused():
    bm = BlockManager(4, BS)
    a = seq_of(range(6))
    admit(bm, a)
    with pytest.raises(RuntimeError, match="already has blocks"):
        bm.allocate(a, [], a.num_tokens)


# ---- the chained hash ---------------------------------------------------------------------------


def test_hash_is_chained_on_the_previous_block():
    block = [5, 6, 7, 8]
    assert hash_block(None, block) == hash_block(None, list(block))
    assert hash_block(None, block) != hash_block(hash_block(None, [1, 2, 3, 4]), block)
    assert hash_block(1, block) != hash_block(2, block)
    assert hash_block(None, block) != hash_block(None, [5, 6, 7, 9])
    # All blocks of a prompt at once (what the block manager does) = one block at a time.
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    first = hash_block(None, tokens[:4])
    assert hash_blocks(None, tokens, 4) == [
        first,
        hash_block(first, tokens[4:8]),
        hash_block(hash_block(first, tokens[4:8]), tokens[8:]),
    ]


def test_same_block_after_a_different_prefix_is_a_miss():
    bm = BlockManager(8, BS)
    a = seq_of([1, 2, 3, 4, 10, 11, 12, 13, 99])
    b = seq_of([1, 2, 3, 5, 10, 11, 12, 13, 99])  # second block identical, first differs
    admit(bm, a)
    assert admit(bm, b) == []
    assert a.block_hashes[0] != b.block_hashes[0]
    assert a.block_hashes[1] != b.block_hashes[1]
    assert set(a.block_table).isdisjoint(b.block_table)


def test_block_hashes_cover_only_full_blocks():
    bm = BlockManager(8, BS)
    seq = seq_of(range(11))
    bm.find_cached_prefix(seq)
    assert len(seq.block_hashes) == 2  # 11 tokens = 2 full blocks + 3 tokens


def test_token_ids_are_rechecked_on_a_hash_collision(monkeypatch):
    # every block collides
    monkeypatch.setattr(bm_module, "hash_blocks", lambda prev, tokens, bs: [42] * (len(tokens) // bs))
    bm = BlockManager(8, BS)
    a = seq_of([1, 2, 3, 4, 9])
    admit(bm, a)
    assert bm.hash_to_block == {42: a.block_table[0]}
    impostor = seq_of([5, 6, 7, 8, 9])  # same hash, other tokens: must not get a's K/V
    assert admit(bm, impostor) == []
    assert impostor.num_computed_tokens == impostor.num_tokens
    assert impostor.block_table[0] != a.block_table[0]
    twin = seq_of([1, 2, 3, 4, 9])  # same hash, same tokens: a genuine hit
    assert admit(bm, twin) == a.block_table[:1]
    for s in (a, impostor, twin):
        release(bm, s)
    assert bm.num_free_blocks == 8


def test_no_prefix_caching_means_no_hits():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = seq_of(range(9))
    admit(bm, a)
    release(bm, a)
    assert bm.hash_to_block == {}
    b = seq_of(range(9))
    assert admit(bm, b) == []
    assert bm.num_hit_tokens == 0 and bm.hit_rate == 0.0


# ---- the last prompt token is always computed --------------------------------------------------


@pytest.mark.parametrize("num_tokens", [4, 8, 12, 13])
def test_fully_cached_prompt_still_computes_its_last_token(num_tokens):
    bm = BlockManager(8, BS)
    first = seq_of(range(num_tokens))
    admit(bm, first)
    release(bm, first)
    again = seq_of(range(num_tokens))
    hits = bm.find_cached_prefix(again)
    # Every full block is cached, but the block holding the last token is never taken.
    assert len(hits) == (num_tokens - 1) // BS
    assert len(hits) * BS < num_tokens
    bm.allocate(again, hits, again.num_tokens)
    assert again.num_computed_tokens <= num_tokens - 1  # >= 1 token left to compute, for logits


# ---- eviction -----------------------------------------------------------------------------------


def test_freed_blocks_stay_cached_until_their_space_is_needed():
    bm = BlockManager(6, BS)
    a = seq_of(range(13))  # 3 full blocks + 1 token
    admit(bm, a)
    blocks = list(a.block_table)
    release(bm, a)
    assert bm.num_free_blocks == 6  # free for allocation ...
    again = seq_of(range(13))
    assert admit(bm, again) == blocks[:3]  # ... yet still a prefix-cache hit
    assert ref_counts(bm, again)[:3] == [1, 1, 1]
    assert all(b not in bm.free for b in blocks[:3])  # a hit block leaves the free list
    release(bm, again)


def test_eviction_takes_the_least_recently_freed_block_first():
    bm = BlockManager(6, BS)
    a, b = seq_of(range(12)), seq_of(range(100, 112))  # 3 full blocks each: the cache is full
    admit(bm, a)
    admit(bm, b)
    assert a.block_table == [0, 1, 2] and b.block_table == [3, 4, 5]
    release(bm, a)  # a's blocks are the least recently freed
    release(bm, b)
    # Tail blocks go to the free list first, so within a request the suffix is evicted before the
    # prefix; across requests, a's blocks go before b's.
    assert list(bm.free) == [2, 1, 0, 5, 4, 3]
    a_blocks, b_blocks = [0, 1, 2], [3, 4, 5]
    # a probe continuing each prompt by one token would hit all 3 of its blocks
    probe = lambda tokens: len(bm.find_cached_prefix(seq_of(tokens + [0])))  # noqa: E731
    assert probe(list(range(12))) == 3 and probe(list(range(100, 112))) == 3

    taker = seq_of(range(500, 504))  # one new block: evicts a's tail block
    admit(bm, taker)
    assert taker.block_table == [a_blocks[2]]
    assert probe(list(range(12))) == 2  # a's prefix survives its tail
    assert probe(list(range(100, 112))) == 3  # b untouched

    taker2 = seq_of(range(600, 608))  # two more: a's remaining blocks, prefix last
    admit(bm, taker2)
    assert taker2.block_table == [a_blocks[1], a_blocks[0]]
    assert probe(list(range(12))) == 0
    assert probe(list(range(100, 112))) == 3  # b's blocks were freed later: still cached

    taker3 = seq_of(range(700, 704))
    admit(bm, taker3)
    assert taker3.block_table == [b_blocks[2]]
    assert probe(list(range(100, 112))) == 2
    for s in (taker, taker2, taker3):
        release(bm, s)
    assert bm.num_free_blocks == 6


def test_a_block_in_use_by_a_hit_cannot_be_evicted():
    bm = BlockManager(4, BS)
    a = seq_of(range(9))  # 2 full blocks + 1
    admit(bm, a)
    release(bm, a)
    b = seq_of(range(9))
    hits = admit(bm, b)
    assert len(hits) == 2
    # b holds a's prefix blocks: a request needing every free block cannot take them.
    c = seq_of(range(100, 109))  # needs 3 blocks; only 4 - 3 = 1 is free
    assert not bm.can_allocate(c, bm.find_cached_prefix(c), c.num_tokens)
    release(bm, b)
    assert bm.can_allocate(c, bm.find_cached_prefix(c), c.num_tokens)


def test_can_allocate_counts_cached_free_blocks_once():
    bm = BlockManager(4, BS)
    a = seq_of(range(13))  # 3 full blocks + 1 token: all 4 blocks
    admit(bm, a)
    release(bm, a)
    same = seq_of(range(13))  # 3 hits (free, cached) + 1 fresh block = exactly the cache
    hits = bm.find_cached_prefix(same)
    assert len(hits) == 3 and bm.can_allocate(same, hits, same.num_tokens)
    longer = seq_of(list(range(12)) + [1, 2, 3, 4, 5])  # 3 hits + 2 fresh > 4 blocks
    hits = bm.find_cached_prefix(longer)
    assert len(hits) == 3 and not bm.can_allocate(longer, hits, longer.num_tokens)
    admit(bm, same)
    assert bm.num_free_blocks == 0
    release(bm, same)


# ---- statistics ---------------------------------------------------------------------------------


def test_hit_rate_counts_queried_and_hit_tokens():
    bm = BlockManager(16, BS)
    assert bm.hit_rate == 0.0
    a = seq_of(range(10))
    admit(bm, a)
    assert (bm.num_queried_tokens, bm.num_hit_tokens) == (10, 0)
    b = seq_of(list(range(8)) + [70, 71])
    admit(bm, b)
    assert b.num_computed_tokens == 10
    assert (bm.num_queried_tokens, bm.num_hit_tokens) == (20, 8)
    assert bm.hit_rate == pytest.approx(8 / 20)
    for s in (a, b):
        release(bm, s)
    assert bm.num_free_blocks == 16


class CountingDict(dict):
    """hash_to_block that counts its lookups."""

    num_gets = 0

    def get(self, key, default=None):
        self.num_gets += 1
        return super().get(key, default)


def test_a_repeated_lookup_resumes_after_its_hits_until_a_block_leaves_the_cache():
    bm = BlockManager(8, BS)
    bm.hash_to_block = CountingDict(bm.hash_to_block)
    admit(bm, a := seq_of(range(17)))  # 4 full blocks, cached
    waiting = seq_of(list(range(24)) + [99])  # a's 4 blocks, then 2 more full blocks
    hits = bm.find_cached_prefix(waiting)
    assert hits == a.block_table[:4]
    before = bm.hash_to_block.num_gets
    assert bm.find_cached_prefix(waiting) == hits  # nothing changed: only the block after the hits
    assert bm.hash_to_block.num_gets == before + 1
    # A block registered meanwhile extends the hits; a block evicted meanwhile (b takes a's free blocks,
    # least recently freed first: a's tail) shortens them; each time as a fresh lookup finds them.
    admit(bm, b := seq_of(range(21)))  # a's 4 blocks + its 5th (tokens 16..19), registered
    fresh = bm.find_cached_prefix(seq_of(waiting.token_ids))
    assert bm.find_cached_prefix(waiting) == b.block_table[:5] == fresh
    a_blocks = a.block_table[:4]
    release(bm, a)
    release(bm, b)
    admit(bm, seq_of(range(100, 116)))  # 4 blocks: the 3 uncached free ones, then b's 5th (evicted)
    fresh = bm.find_cached_prefix(seq_of(waiting.token_ids))
    assert fresh == a_blocks and bm.find_cached_prefix(waiting) == fresh
