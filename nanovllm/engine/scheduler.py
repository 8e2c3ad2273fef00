"""Continuous batching: each step, decide how many tokens each request computes.

There is no prefill or decode phase. Each step walks the running requests (oldest first), giving
each the tokens it still needs (1 when decoding, up to the remaining budget when prefilling), then
admits waiting requests while the token budget, `max_num_seqs` and the free KV blocks allow. A
prompt longer than the budget is prefilled in chunks over several steps. When blocks run out, a
running request is preempted: its blocks are freed and it goes back to the waiting queue, to be
recomputed later (its prefix blocks often survive in the prefix cache). Which one, and the queue's
order, follow the scheduling policy: under "fcfs" the youngest, back to the front of the queue; under
"priority" the lowest priority (largest value, then latest arrival), back in (priority, arrival) order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.request_queue import WaitingQueue, priority_key
from nanovllm.engine.sequence import PENDING_TOKEN, FinishReason, Sequence, SequenceStatus
from nanovllm.layers.pooler import pooled_positions

if TYPE_CHECKING:
    from nanovllm.structured.grammar import GrammarMatcher

logger = logging.getLogger("nanovllm")


@dataclass(slots=True)
class ScheduledBatch:
    """What one step computes: seqs[i] computes num_new_tokens[i] tokens from its num_computed_tokens."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    num_preempted: int = 0
    # samples[i]: seqs[i] reaches its last token this step, so the step samples its next one (an embedding
    # request never samples). Fixed when the batch is made (the counts move on once it is launched).
    samples: list[bool] = field(init=False)
    # scores[i]: the positions of seqs[i] whose logits score its prompt's next token (prompt_logprobs),
    # empty for most; None when no sequence of the batch scores any.
    scores: list[range] | None = field(init=False)
    # pools[i]: the positions of seqs[i] whose hidden states its embedding pools (layers/pooler.py), empty
    # for most; None when the batch has no embedding request.
    pools: list[range] | None = field(init=False)

    def __post_init__(self) -> None:
        self.samples = [
            s.num_computed_tokens + n == s.num_tokens and s.pooling_type is None
            for s, n in zip(self.seqs, self.num_new_tokens)
        ]
        self.scores = None
        if any(s.params.prompt_logprobs is not None for s in self.seqs):  # (rare: a cheap test first)
            scores = [s.prompt_rows_to_score(n) for s, n in zip(self.seqs, self.num_new_tokens)]
            self.scores = scores if any(scores) else None
        self.pools = None
        if any(s.pooling_type is not None for s in self.seqs):
            self.pools = [
                range(0)
                if s.pooling_type is None
                else pooled_positions(s.pooling_type, s.num_computed_tokens, n, s.num_tokens)
                for s, n in zip(self.seqs, self.num_new_tokens)
            ]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, config: Config, num_kvcache_blocks: int):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.eos_token_id = config.eos_token_id
        self.eos_token_ids = frozenset(config.eos_token_ids)
        self.block_manager = BlockManager(num_kvcache_blocks, config.block_size, config.enable_prefix_caching)
        self.policy = config.scheduling_policy
        self.waiting = WaitingQueue(config.scheduling_policy)
        self.running: list[Sequence] = []  # in admission order (fcfs: preemption takes from the end)
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.add(seq)

    def schedule(self, token_limit: int | None = None) -> ScheduledBatch:
        """The next step's batch, of at most max_num_batched_tokens tokens (and at most token_limit)."""
        budget = self.max_num_batched_tokens
        if token_limit is not None:
            budget = min(budget, token_limit)
        seqs: list[Sequence] = []
        num_new: list[int] = []
        preempted = 0
        bm = self.block_manager

        # 1. Running requests, oldest first.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending_tokens and self._reached_length_limit(seq):
                i += 1  # its pending token is its last: it finishes when that token comes back
                continue
            if seq.num_computed_tokens == seq.num_tokens:
                i += 1  # an embedding request whose last chunk is in flight: done when it comes back
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.can_append(seq, seq.num_computed_tokens + n):
                j = self._victim_index()
                victim = self.running.pop(j)
                if j < i:  # (priority) ahead of seq: it may be in this batch already; hand its tokens back
                    i -= 1
                    if victim in seqs:
                        k = seqs.index(victim)
                        del seqs[k]
                        budget += num_new[k]
                        # the blocks its tokens were to fill were registered, but this step won't write them
                        bm.forget_new_blocks(victim, victim.num_computed_tokens, num_new.pop(k))
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            else:
                bm.append_slots(seq, seq.num_computed_tokens + n)
                seqs.append(seq)
                num_new.append(n)
                budget -= n
                i += 1

        # 2. Waiting requests, in the queue's order (fcfs: arrival, preempted ones at the front; priority:
        # (priority, arrival)). Not after a preemption: the blocks just freed are for the running requests.
        # A waiting request never preempts a running one, whatever its priority (as vLLM's).
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.peek()
            cached = bm.find_cached_prefix(seq)
            num_cached = len(cached) * bm.block_size
            n = min(seq.num_tokens - num_cached, budget)
            if not bm.can_allocate(seq, cached, num_cached + n):
                break
            self.waiting.pop()
            bm.allocate(seq, cached, num_cached + n)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            num_new.append(n)
            budget -= n

        self.num_preemptions += preempted
        return ScheduledBatch(seqs, num_new, preempted)

    def update(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Sequence]:
        """Advance the batch and apply its sampled tokens at once (no step in flight): `sampled` has
        one entry per sequence, None for a prefill chunk that did not sample."""
        return self.resolve(self.advance(batch), [t for t in sampled if t is not None])

    def advance(self, batch: ScheduledBatch) -> list[Sequence]:
        """The batch is launched: count its tokens as computed, and give each sequence that reached
        its last token a pending token (PENDING_TOKEN) for the one the step samples. Returns those
        sequences in sampler-row order; `resolve` fills their tokens in when the step is done."""
        sampling = []
        for i, (seq, n, samples) in enumerate(zip(batch.seqs, batch.num_new_tokens, batch.samples)):
            seq.num_computed_tokens += n
            if batch.scores is not None and batch.scores[i]:
                seq.num_scored_prompt_tokens = batch.scores[i].stop
            if samples:
                seq.pending_row = len(sampling)
                seq.token_ids.append(PENDING_TOKEN)
                seq.num_pending_tokens += 1
                sampling.append(seq)
        return sampling

    def resolve(self, seqs: list[Sequence], tokens: list[int]) -> list[Sequence]:
        """A step's sampled tokens are back: each replaces its sequence's oldest pending token.
        Finishes requests that hit EOS, a stop token, max_tokens or max_model_len, or complete their
        structured output (advancing its matcher: the only place it moves). Returns the
        requests that got a token (not those finished meanwhile, e.g. aborted)."""
        updated = []
        for seq, token in zip(seqs, tokens):
            if seq.is_finished:
                continue
            pos = seq.num_known_tokens
            seq.token_ids[pos] = token
            seq.num_pending_tokens -= 1
            updated.append(seq)
            p, num_outputs = seq.params, pos + 1 - seq.num_prompt_tokens
            reason = None
            if num_outputs >= p.min_tokens:
                if not p.ignore_eos and token in self.eos_token_ids:
                    reason = FinishReason.STOP
                    if token != self.eos_token_id:  # generation_config's: vLLM's stop_token_ids
                        seq.stop_reason = token
                elif p.stop_token_ids and token in p.stop_token_ids:
                    seq.stop_reason, reason = token, FinishReason.STOP
            if reason is None and seq.matcher is not None:
                reason = _constraint_end(seq.matcher, token)
            if reason is None and (num_outputs >= p.max_tokens or pos + 1 >= self.max_model_len):
                reason = FinishReason.LENGTH
            if reason is not None:
                self.finish(seq, reason)
            else:
                self.block_manager.cache_resolved_block(seq, pos)
        return updated

    def _reached_length_limit(self, seq: Sequence) -> bool:
        return seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a request wherever it is (running or waiting) and free its blocks."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free_seq(seq)
        if seq.num_pending_tokens:  # tokens of a step in flight, never to be read back
            del seq.token_ids[-seq.num_pending_tokens :]
            seq.num_pending_tokens = 0
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _victim_index(self) -> int:
        """The running request to preempt: fcfs the youngest; priority the lowest priority (the largest
        value), the latest arrival among equals. Either way the request served first is the last to go."""
        if self.policy == "priority":
            return max(range(len(self.running)), key=lambda j: priority_key(self.running[j]))
        return len(self.running) - 1

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.requeue(seq)


def _constraint_end(matcher: GrammarMatcher, token: int) -> FinishReason | None:
    """Advance a structured output's matcher by its new token: STOP once the output is a whole match that
    no token can extend (its min_tokens notwithstanding: nothing else may follow), or if the token broke the
    constraint (the sampler's mask rules that out; reported, not raised, so the engine goes on)."""
    if not matcher.accept(token):
        logger.error("token %d breaks its request's structured output constraint: the request ends", token)
        return FinishReason.STOP
    return FinishReason.STOP if matcher.is_terminated else None
