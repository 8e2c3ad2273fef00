"""The paged KV cache's bookkeeping: fixed-size blocks, ref counts, a free list, and prefix caching.

Prefix caching: a full block is keyed by a chained hash of (previous block's hash, its token ids).
A new request looks its prompt's full blocks up in order and shares every hit (ref count + 1).
Blocks whose ref count drops to zero go to the back of the free list but keep their hash, so a
later request can still hit them; allocation takes from the front, evicting the least recently
freed block and forgetting its hash.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict

import xxhash

from nanovllm.engine.sequence import Sequence
from nanovllm.layers.pooler import reads_every_token


def hash_blocks(prev_hash: int | None, token_ids: list[int], block_size: int) -> list[int]:
    """Chained hashes of the consecutive blocks of token_ids (a whole number of blocks): each block's
    hash is xxh3 of its token ids seeded with the previous block's hash (0 before the first, so a
    chain whose previous hash is 0 collides with a first block: a 2^-64 chance, and a hit re-checks
    the block's tokens anyway)."""
    if block_size < 1 or len(token_ids) % block_size:
        raise ValueError(f"{len(token_ids)} tokens are not a whole number of {block_size}-token blocks")
    data = memoryview(array("q", token_ids).tobytes())  # one conversion for all the blocks
    step = 8 * block_size
    hashes = []
    for offset in range(0, len(data), step):
        prev_hash = xxhash.xxh3_64_intdigest(data[offset : offset + step], seed=prev_hash or 0)
        hashes.append(prev_hash)
    return hashes


def hash_block(prev_hash: int | None, token_ids: list[int] | tuple[int, ...]) -> int:
    """One block's chained hash (what hash_blocks computes for each block)."""
    return hash_blocks(prev_hash, list(token_ids), len(token_ids))[0]


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set while the block is registered in the prefix cache
        self.token_ids: tuple[int, ...] | None = None  # the tokens behind `hash`, re-checked on a hit


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, least recently freed first. Cached ones keep their hash here.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.num_uncached = 0  # blocks dropped from the prefix cache so far (a lookup holds until it moves)
        self.num_queried_tokens = 0  # prefix-cache statistics
        self.num_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -------------------------------------------------------------------------

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids that already hold the K/V of seq's leading full blocks. The block holding the
        last known token is never taken, so that token is always computed and yields logits; nor is a
        block with prompt positions still to score (prompt_logprobs), nor any for an embedding that pools
        every position (MEAN) or the first (CLS)."""
        self._update_hashes(seq, seq.num_tokens)
        if not self.enable_prefix_caching:
            return []
        max_blocks = min((seq.num_tokens - 1) // self.block_size, len(seq.block_hashes))
        if seq.params.prompt_logprobs is not None:  # positions still to score must be computed
            max_blocks = min(max_blocks, seq.num_scored_prompt_tokens // self.block_size)
        if seq.pooling_type is not None and reads_every_token(seq.pooling_type):
            max_blocks = 0  # (an embedding pooling every position, or the first: each must be computed)
        # The last lookup's hits still hold if no block has left the cache since (a registered block keeps
        # its hash and tokens until then): only the blocks after them are looked up, for new registrations.
        last = seq.prefix_hits
        hits = list(last[1][:max_blocks]) if last is not None and last[0] == self.num_uncached else []
        for i in range(len(hits), max_blocks):
            block_id = self.hash_to_block.get(seq.block_hashes[i])
            if block_id is None:
                break
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            if self.blocks[block_id].token_ids != tokens:  # a hash collision: treat as a miss
                break
            hits.append(block_id)
        seq.prefix_hits = (self.num_uncached, tuple(hits))
        return hits

    def can_allocate(self, seq: Sequence, cached_blocks: list[int], num_tokens: int) -> bool:
        """Could seq get blocks for its first num_tokens tokens, reusing cached_blocks?"""
        num_new = self.blocks_needed(num_tokens) - len(cached_blocks)
        if num_new > self.num_free_blocks:  # (short of blocks however many hits are free: no need to count)
            return False
        reclaimed = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        return num_new <= self.num_free_blocks - reclaimed

    def allocate(self, seq: Sequence, cached_blocks: list[int], num_tokens: int) -> None:
        """Admit seq: share cached_blocks, then add fresh blocks to cover num_tokens tokens."""
        if seq.block_table:
            raise RuntimeError(f"{seq} already has blocks")
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        seq.block_table = list(cached_blocks)
        seq.num_computed_tokens = len(cached_blocks) * self.block_size
        # (as vLLM counts: a request that cannot read the cache, an embedding pooling every row, asks nothing)
        if seq.pooling_type is None or not reads_every_token(seq.pooling_type):
            self.num_queried_tokens += seq.num_tokens
            self.num_hit_tokens += seq.num_computed_tokens
        self.append_slots(seq, num_tokens)

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's block table to hold num_tokens tokens; register blocks that become full."""
        num_new = self.blocks_needed(num_tokens) - len(seq.block_table)
        if num_new > 0:
            seq.block_table.extend(self._take_free_blocks(num_new))
        self._cache_full_blocks(seq, num_tokens)

    def free_seq(self, seq: Sequence) -> None:
        # Tail blocks first, so a shared prefix outlives the request-specific suffix in the LRU.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed twice")
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0

    def forget_new_blocks(self, seq: Sequence, start: int, num_new_tokens: int) -> None:
        """Drop from the prefix cache the blocks that seq's scheduled step (its tokens from `start`)
        was to fill, after that step failed: they were registered when scheduled, but their K/V was
        never written."""
        bs = self.block_size
        for block_id in seq.block_table[start // bs : (start + num_new_tokens) // bs]:
            self._uncache(self.blocks[block_id])

    def reset_prefix_cache(self) -> None:
        """Forget the cached prefixes of free blocks (blocks in use keep theirs), so that a repeated
        workload computes its prompts again (benchmarks)."""
        for block_id in self.free:
            self._uncache(self.blocks[block_id])

    # ---- internals ----------------------------------------------------------------------------

    def _take_free_blocks(self, n: int) -> list[int]:
        """The n least recently freed blocks, each with ref count 1 and out of the prefix cache."""
        if n > len(self.free):
            raise RuntimeError("out of KV blocks: the scheduler must check before allocating")
        block_ids = [self.free.popitem(last=False)[0] for _ in range(n)]
        for block_id in block_ids:
            block = self.blocks[block_id]
            self._uncache(block)  # (evicted)
            block.ref_count = 1
        return block_ids

    def _uncache(self, block: Block) -> None:
        """Drop block from the prefix cache, if it is there."""
        if block.hash is None:
            return
        if self.hash_to_block.get(block.hash) == block.block_id:
            del self.hash_to_block[block.hash]
        block.hash = block.token_ids = None
        self.num_uncached += 1

    def _update_hashes(self, seq: Sequence, num_tokens: int) -> None:
        """Extend seq.block_hashes over the full blocks among its first num_tokens tokens (known
        ones only: a block holding a token still pending on the GPU is hashed once it is known)."""
        bs, hashes = self.block_size, seq.block_hashes
        first, end = len(hashes), min(num_tokens, seq.num_known_tokens) // bs
        if end > first:
            prev = hashes[-1] if hashes else None
            hashes.extend(hash_blocks(prev, seq.token_ids[first * bs : end * bs], bs))

    def _cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Register seq's blocks that are full once its first num_tokens tokens are computed.
        Their K/V is written by the forward this step schedules, which runs before any later
        step can read them, so registering now is safe."""
        if not self.enable_prefix_caching:
            return
        self._update_hashes(seq, num_tokens)
        # Blocks full before this step were registered when they filled (or were prefix hits).
        self._register(seq, seq.num_computed_tokens // self.block_size, num_tokens // self.block_size)

    def cache_resolved_block(self, seq: Sequence, position: int) -> None:
        """The token at `position` was pending when its block was scheduled full: register that
        block now that its hash can be computed (its K/V is written by a step already queued)."""
        if not self.enable_prefix_caching or (position + 1) % self.block_size:
            return
        self._update_hashes(seq, seq.num_computed_tokens)
        block = position // self.block_size
        if position < seq.num_computed_tokens:
            self._register(seq, block, block + 1)

    def _register(self, seq: Sequence, first: int, end: int) -> None:
        """Put seq's blocks [first, end) into the prefix cache, those whose hash is known."""
        bs = self.block_size
        for i in range(first, min(end, len(seq.block_hashes))):
            h = seq.block_hashes[i]
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None or h in self.hash_to_block:
                continue  # already registered (by this or another sequence)
            block.hash = h
            block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            self.hash_to_block[h] = block.block_id

    def check_consistency(self) -> None:
        """Invariants a bug could break (used by tests): free list == blocks with ref 0, every
        cached hash maps to a block carrying that hash."""
        free_ids = {b.block_id for b in self.blocks if b.ref_count == 0}
        if free_ids != set(self.free):
            raise AssertionError("free list and ref counts disagree")
        for h, block_id in self.hash_to_block.items():
            block = self.blocks[block_id]
            if block.hash != h or block.token_ids is None:
                raise AssertionError(f"hash {h} maps to block {block_id} that does not carry it")
