"""Penalized rows' token ids: SamplingStaging's per-sequence mirror (grown by the new tokens only, bounded,
right through overlapped scheduling, preemption and aborts) and the padded rows SamplingBatch.build makes
from it, with a pending token filled in from the previous step's sampled ids."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from nanovllm.config import Config
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import FinishReason, Sequence
from nanovllm.layers.sampling_batch import SamplingBatch, SamplingRequest, SamplingStaging
from nanovllm.sampling_params import SamplingParams

CPU = torch.device("cpu")
VOCAB = 50


class CountingList(list):
    """A token list that counts the elements read through slices (what a mirror update copies)."""

    num_read = 0

    def __getitem__(self, key):
        item = super().__getitem__(key)
        if isinstance(key, slice):
            self.num_read += len(item)
        return item


def test_mirror_copies_only_new_tokens():
    staging = SamplingStaging(max_rows=4, device=CPU)
    token_ids = CountingList(range(100))
    for n in range(100, 400):
        token_ids.append(n % VOCAB)
        known = staging.known_tokens(token_ids, n)  # (the last token is pending)
        assert known.dtype == np.int64 and known.tolist() == list(token_ids)[:n]
    assert token_ids.num_read == 399  # each id copied once: the first 100, then one a step


def test_mirror_cache_is_bounded_and_keyed_by_the_list_itself():
    staging = SamplingStaging(max_rows=2, device=CPU)
    lists = [[i] * 5 for i in range(3)]
    for ids in lists:
        assert staging.known_tokens(ids, 5).tolist() == ids
    assert len(staging._known) == 2  # the least recently used (lists[0]) was evicted
    assert staging.known_tokens(lists[0], 5).tolist() == lists[0]  # ... and is rebuilt
    assert len(staging._known) == 2
    other = [7] * 5  # equal length, other ids: never served another list's mirror
    assert staging.known_tokens(other, 5).tolist() == other


def _rows(requests, prev_tokens=None):
    return SamplingBatch.build(requests, VOCAB, CPU, prev_tokens=prev_tokens)


@pytest.mark.parametrize("seed", range(5))
def test_padded_rows_equal_the_list_built_ones(seed):
    """for_sequence through the staging's mirror (int64 views, a pending token filled in from the previous
    step's sampled ids) pads exactly the rows that full Python lists of the same tokens give."""
    rng = random.Random(seed)
    staging = SamplingStaging(max_rows=8, device=CPU)
    kinds = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(frequency_penalty=0.5, presence_penalty=0.2),
        SamplingParams(repetition_penalty=0.9, presence_penalty=-0.4, temperature=0.7, seed=1),
        SamplingParams(temperature=0.5),  # no penalties: sends nothing
        SamplingParams(presence_penalty=1.0, bad_words_token_ids=[[4]]),
    ]
    seqs = []
    for _ in range(6):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))]
        seqs.append((prompt + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 30))], len(prompt)))
    prev = torch.tensor([rng.randrange(VOCAB) for _ in range(4)])  # the previous step's sampled ids
    for step in range(4):  # the mirrors grow between steps
        params = [rng.choice(kinds) for _ in seqs]
        pending = [rng.choice([None, rng.randrange(len(prev))]) for _ in seqs]
        mirrored = [
            SamplingRequest.for_sequence(
                p, ids + ([-1] if src is not None else []), n, (0,), int(src is not None), src, staging
            )
            for p, (ids, n), src in zip(params, seqs, pending)
        ]
        full = [
            SamplingRequest(p, ids[:n], ids[n:] + ([int(prev[src])] if src is not None else []), (0,))
            for p, (ids, n), src in zip(params, seqs, pending)
        ]
        a, b = _rows(full), _rows(mirrored, prev)
        assert [r.num_output_tokens for r in full] == [r.num_output_tokens for r in mirrored]
        for name in ("prompt_token_ids", "output_token_ids", "banned_rows", "banned_token_ids"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y), (step, name)
        for ids, _ in seqs:
            ids += [rng.randrange(VOCAB) for _ in range(rng.randint(1, 3))]


def test_a_pending_output_token_needs_the_previous_step():
    row = SamplingRequest.for_sequence(SamplingParams(frequency_penalty=1.0), [1, 2, -1], 1, (), 1, 3)
    assert list(row.output_token_ids) == [2] and row.pending_src == 3 and row.num_output_tokens == 2
    with pytest.raises(RuntimeError, match="pending output tokens"):
        _rows([row])  # no sampled ids to fill it from
    with pytest.raises(RuntimeError, match="pending output tokens"):
        _rows([row], torch.arange(3))  # row 3 of 3
    assert _rows([row], torch.arange(4)).output_token_ids.tolist() == [[2, 3]]


def test_mirror_follows_the_overlapped_scheduler_through_preemption_and_aborts():
    """The engine's overlapped loop over the real scheduler (a small cache: preemption; shared prefixes:
    prefix hits; random aborts, some with a token in flight): every step, each penalized row's known ids
    equal the sequence's, its pending token names the right row of the previous step's tokens, and the
    cache stays within max_rows."""
    rng = random.Random(0)
    config = Config("qwen3-tiny", block_size=16, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64)
    scheduler = Scheduler(config, num_kvcache_blocks=10)
    staging = SamplingStaging(max_rows=4, device=CPU)
    shared = [rng.randrange(3, VOCAB) for _ in range(32)]
    seqs = []
    for i in range(16):
        prompt = shared[: rng.choice([0, 16, 32])] + [
            rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 40))
        ]
        params = SamplingParams(
            repetition_penalty=1.1,
            frequency_penalty=0.3 * (i % 2),
            max_tokens=rng.randint(5, 40),
            ignore_eos=True,
        )
        seqs.append(Sequence(prompt, params))
        scheduler.add(seqs[-1])
    inflight, num_pending_rows, num_aborts = None, 0, 0
    while scheduler.num_unfinished or inflight:
        batch = scheduler.schedule()
        for seq, samples in zip(batch.seqs, batch.samples):
            if not samples:
                continue
            row = SamplingRequest.for_sequence(
                seq.params,
                seq.token_ids,
                seq.num_prompt_tokens,
                (),
                seq.num_pending_tokens,
                seq.pending_row,
                staging,
            )
            known = seq.token_ids[: seq.num_known_tokens]
            assert list(row.prompt_token_ids) + list(row.output_token_ids) == known
            if seq.num_pending_tokens:
                assert inflight[0][row.pending_src] is seq  # its token is that row of the step in flight
                num_pending_rows += 1
            assert len(staging._known) <= staging.max_rows
        sampling = scheduler.advance(batch)
        tokens = [rng.randrange(3, VOCAB) for _ in sampling]
        if inflight is not None:
            scheduler.resolve(*inflight)
        inflight = (sampling, tokens) if sampling else None
        if scheduler.running and rng.random() < 0.05:
            scheduler.finish(rng.choice(scheduler.running), FinishReason.ABORT)
            num_aborts += 1
    assert scheduler.num_preemptions > 0 and num_aborts > 0 and num_pending_rows > 0
    assert scheduler.block_manager.hit_rate > 0
    for seq in seqs:  # finished ones keep their known tokens (an abort drops only the pending one)
        assert -1 not in seq.token_ids
