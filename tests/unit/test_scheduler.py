"""Scheduler: token budget, chunked prefill, mixed steps, preemption, finish reasons.

Unit tests drive the scheduler with `FakeRunner` (no model); the last tests run the tiny model to
check that preemption does not change what a request generates.
"""

from __future__ import annotations

import random

from nanovllm import LLM, SamplingParams
from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import PENDING_TOKEN, FinishReason, Sequence, SequenceStatus
from tests.unit.test_block_manager import CountingDict

EOS = 2  # the qwen3-tiny preset's eos_token_id


class FakeRunner:
    """Stands in for ModelRunner. It keeps a fake KV cache (slot -> a key naming the token, its
    position and everything before it), writes this step's tokens, then "attends": reads every slot
    of each scheduled sequence's context and fails the test if one holds the wrong thing, so a bad
    block table or prefix-cache hit cannot go unnoticed. The next token is a fixed function of all
    tokens before it, so a recomputed (preempted) request must produce the same tokens."""

    def __init__(self, block_size: int, vocab_size: int = 1000):
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.kv: dict[int, tuple[int, int]] = {}  # slot -> (prefix key, token id)
        self.eos_at: dict[str, int] = {}  # request_id -> its output length at which it emits EOS

    @staticmethod
    def prefix_keys(token_ids: list[int]) -> list[int]:
        keys, key = [], 0
        for t in token_ids:
            key = hash((key, t))
            keys.append(key)
        return keys

    def slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def next_token(self, seq: Sequence, key: int) -> int:
        if self.eos_at.get(seq.request_id) == seq.num_output_tokens + 1:
            return EOS
        return 3 + key % (self.vocab_size - 3)  # never EOS unless asked

    def run(self, batch: ScheduledBatch) -> list[int | None]:
        for seq, n in zip(batch.seqs, batch.num_new_tokens):  # store this step's K/V ...
            start = seq.num_computed_tokens
            keys = self.prefix_keys(seq.token_ids[: start + n])
            for pos in range(start, start + n):
                self.kv[self.slot(seq, pos)] = (keys[pos], seq.token_ids[pos])
        sampled: list[int | None] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):  # ... then attend over the cache
            end = seq.num_computed_tokens + n
            keys = self.prefix_keys(seq.token_ids[:end])
            for pos in range(end):
                expected = (keys[pos], seq.token_ids[pos])
                assert self.kv.get(self.slot(seq, pos)) == expected, f"{seq}: bad K/V at position {pos}"
            sampled.append(self.next_token(seq, keys[-1]) if end == seq.num_tokens else None)
        return sampled

    def check_prefix_cache(self, bm: BlockManager) -> None:
        """Between steps, every block in the prefix cache must hold the K/V of its tokens."""
        for block_id in bm.hash_to_block.values():
            tokens = bm.blocks[block_id].token_ids
            base = block_id * self.block_size
            written = [self.kv.get(base + j, (None, None))[1] for j in range(self.block_size)]
            assert written == list(tokens), f"block {block_id} is cached but not written"


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 16,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 256,
    **kwargs,
) -> Scheduler:
    config = Config(
        "qwen3-tiny",
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        **kwargs,
    )
    return Scheduler(config, num_blocks)


def make_seq(prompt_len: int, max_tokens: int = 8, seed: int = 0, priority: int = 0, **params) -> Sequence:
    rng = random.Random(seed)
    prompt = [rng.randrange(3, 1000) for _ in range(prompt_len)]
    return Sequence(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, **params), priority=priority)


def check_batch(sched: Scheduler, batch: ScheduledBatch) -> None:
    assert batch.num_tokens <= sched.max_num_batched_tokens
    assert len(batch.seqs) <= sched.max_num_seqs
    assert len(sched.running) <= sched.max_num_seqs
    assert len({s.seq_id for s in batch.seqs}) == len(batch.seqs)
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        assert seq.status is SequenceStatus.RUNNING
        assert 1 <= n <= seq.num_tokens - seq.num_computed_tokens
        assert len(seq.block_table) * sched.block_manager.block_size >= seq.num_computed_tokens + n


def step(sched: Scheduler, runner: FakeRunner) -> ScheduledBatch:
    batch = sched.schedule()
    if sched.num_unfinished:
        assert not batch.is_empty, "nothing scheduled while requests wait"
    check_batch(sched, batch)
    if not batch.is_empty:
        sched.update(batch, runner.run(batch))
    sched.block_manager.check_consistency()
    runner.check_prefix_cache(sched.block_manager)
    return batch


def run_all(sched: Scheduler, runner: FakeRunner, max_steps: int = 5000) -> list[ScheduledBatch]:
    batches = []
    while sched.num_unfinished:
        batches.append(step(sched, runner))
        assert len(batches) <= max_steps
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # no leak
    return batches


def chunks_of(seq: Sequence, batches: list[ScheduledBatch]) -> list[int]:
    """The number of tokens seq computed in each step it was scheduled in."""
    return [n for b in batches for s, n in zip(b.seqs, b.num_new_tokens) if s is seq]


# ---- the token budget ---------------------------------------------------------------------------


def test_budget_and_max_num_seqs_hold_every_step():
    sched = make_scheduler(max_num_seqs=4, max_num_batched_tokens=40)
    runner = FakeRunner(16)
    seqs = [make_seq(n, max_tokens=6, seed=i) for i, n in enumerate([5, 70, 1, 33, 16, 100, 2, 48, 9])]
    for s in seqs:
        sched.add(s)
    batches = run_all(sched, runner)  # check_batch asserts the limits at every step
    assert max(len(b.seqs) for b in batches) == 4  # the seq limit is reached, not just respected
    assert max(b.num_tokens for b in batches) == 40  # the token budget is filled
    assert all(s.finish_reason is FinishReason.LENGTH and s.num_output_tokens == 6 for s in seqs)


def test_a_long_prompt_is_prefilled_in_chunks():
    sched = make_scheduler(max_num_batched_tokens=16)
    seq = make_seq(50, max_tokens=3)
    sched.add(seq)
    batches = run_all(sched, FakeRunner(16))
    assert chunks_of(seq, batches) == [16, 16, 16, 2, 1, 1]
    assert seq.num_output_tokens == 3


def test_every_long_prompt_is_chunked_not_only_the_first():
    sched = make_scheduler(max_num_seqs=4, max_num_batched_tokens=32)
    seqs = [make_seq(80, max_tokens=4, seed=i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batches = run_all(sched, FakeRunner(16))
    for s in seqs:
        prefill = chunks_of(s, batches)[:-3]  # the last 3 are decode steps (3 tokens after the first)
        assert sum(prefill) == 80
        assert len(prefill) >= 3 and max(prefill) <= 32, prefill
    # The second and third prompts start while the first is still decoding: chunks fill the budget.
    assert all(b.num_tokens == 32 for b in batches[:7])


def test_decode_and_a_prefill_chunk_share_a_step():
    sched = make_scheduler(max_num_batched_tokens=32)
    runner = FakeRunner(16)
    short = make_seq(4, max_tokens=20)
    sched.add(short)
    step(sched, runner)  # prefill; short now decodes
    long = make_seq(100, max_tokens=2, seed=1)
    sched.add(long)
    batch = step(sched, runner)
    assert batch.seqs == [short, long]
    assert batch.num_new_tokens == [1, 31]  # one decode token + the rest of the budget as a chunk
    batch = step(sched, runner)
    assert batch.num_new_tokens == [1, 31]
    assert long.num_computed_tokens == 62 and long.num_output_tokens == 0


def test_running_requests_are_served_before_waiting_ones():
    sched = make_scheduler(max_num_batched_tokens=16)
    runner = FakeRunner(16)
    first = make_seq(40, max_tokens=2)
    sched.add(first)
    step(sched, runner)
    sched.add(make_seq(10, seed=1))
    batch = step(sched, runner)  # first's chunk takes the whole budget: the newcomer waits
    assert batch.seqs == [first] and batch.num_new_tokens == [16]
    assert len(sched.waiting) == 1


# ---- preemption ---------------------------------------------------------------------------------


def test_preemption_takes_the_youngest_and_requeues_it_first():
    # 6 blocks of 16 tokens; three 30-token prompts take 2 blocks each, the cache is full.
    sched = make_scheduler(num_blocks=6, max_model_len=96, max_num_batched_tokens=96)
    runner = FakeRunner(16)
    a, b, c = (make_seq(30, max_tokens=40, seed=i) for i in range(3))
    late = make_seq(5, seed=3)
    for s in (a, b, c, late):
        sched.add(s)
    batch = step(sched, runner)
    assert batch.seqs == [a, b, c]  # late does not fit
    assert list(sched.waiting) == [late]
    for _ in range(2):  # positions 30 and 31 still fit in 2 blocks
        assert step(sched, runner).num_preempted == 0
    batch = step(sched, runner)  # position 32 needs a third block for a and b: c must go
    assert batch.num_preempted == 1 and sched.num_preemptions == 1
    assert batch.seqs == [a, b]
    assert sched.running == [a, b]
    assert list(sched.waiting) == [c, late]  # at the front, ahead of the one that never ran
    assert c.status is SequenceStatus.WAITING and c.num_preemptions == 1
    assert c.block_table == [] and c.num_computed_tokens == 0
    assert c.num_output_tokens == 3  # its generated tokens are kept, to be recomputed
    sched.block_manager.check_consistency()
    run_all(sched, runner)
    assert all(s.num_output_tokens == s.params.max_tokens for s in (a, b, c, late))


def test_a_blocked_waiting_request_is_not_looked_up_again_in_the_prefix_cache():
    """The head of the queue, short of blocks, is tried every step: its prefix-cache hits are kept from the
    last try (no block left the cache since), so a step looks up only the block after them."""
    sched = make_scheduler(num_blocks=8, max_model_len=128, max_num_batched_tokens=128)
    runner = FakeRunner(16)
    a = make_seq(70, max_tokens=8)  # 5 blocks, its decode stays in them: 3 blocks free
    w = Sequence(a.token_ids[:64] + make_seq(60, seed=1).token_ids, SamplingParams(max_tokens=4))
    sched.add(a)
    step(sched, runner)
    sched.add(w)  # a's 4 full blocks are hits, but its other 4 blocks do not fit
    bm = sched.block_manager
    lookups = []
    while a.status is SequenceStatus.RUNNING:
        bm.hash_to_block = counting = CountingDict(bm.hash_to_block)
        batch = step(sched, runner)
        lookups.append(counting.num_gets)
        assert batch.seqs == [a]
    assert lookups[0] == 5 and lookups[1:] == [1] * (len(lookups) - 1)  # 4 hits + a miss, then the miss
    run_all(sched, runner)
    assert w.num_cached_tokens == 64 and w.num_output_tokens == 4


def test_the_youngest_preempts_itself_when_it_is_the_one_short_of_blocks():
    sched = make_scheduler(num_blocks=4, max_model_len=64, max_num_batched_tokens=64)
    runner = FakeRunner(16)
    old, young = make_seq(20, max_tokens=40), make_seq(30, max_tokens=30, seed=1)
    sched.add(old)
    sched.add(young)
    for _ in range(3):  # young fills its 2 blocks; old has room left in its second block
        assert step(sched, runner).num_preempted == 0
    batch = step(sched, runner)  # young needs a third block: the only victim left is itself
    assert batch.num_preempted == 1 and batch.seqs == [old]
    assert young.num_preemptions == 1 and list(sched.waiting) == [young]
    run_all(sched, runner)
    assert old.num_preemptions == 0  # the oldest running request is never the victim
    assert old.num_output_tokens == 40 and young.num_output_tokens == 30


# ---- scheduling policies (vLLM's scheduling_policy) ----------------------------------------------


def test_priority_policy_admits_by_priority_then_arrival():
    sched = make_scheduler(max_num_seqs=2, scheduling_policy="priority")
    seqs = [make_seq(5, max_tokens=2, seed=i, priority=p) for i, p in enumerate([1, 0, 1, -1, 0])]
    for s in seqs:
        sched.add(s)
    assert list(sched.waiting) == [seqs[i] for i in (3, 1, 4, 0, 2)]  # lower first; equal: earlier first
    runner, admitted = FakeRunner(16), []
    while sched.num_unfinished:
        admitted += [s for s in step(sched, runner).seqs if s not in admitted]
    assert admitted == [seqs[i] for i in (3, 1, 4, 0, 2)]


def test_fcfs_keeps_arrival_order_and_is_the_default():
    sched = make_scheduler(max_num_seqs=2)
    assert sched.policy == "fcfs"
    seqs = [make_seq(5, max_tokens=2, seed=i) for i in range(4)]
    for s in seqs:
        sched.add(s)
    assert list(sched.waiting) == seqs


def _preemption_setup(policy: str, priorities: tuple[int, int, int]):
    """6 blocks of 16 tokens: a (20-token prompt, admitted a step earlier) and b, c (30 tokens) take 2
    blocks each. At position 32 b and c need a third block; a still has room in its second one."""
    sched = make_scheduler(
        num_blocks=6, max_model_len=96, max_num_batched_tokens=96, scheduling_policy=policy
    )
    a = make_seq(20, max_tokens=40, seed=0, priority=priorities[0])
    b, c = (make_seq(30, max_tokens=40, seed=i, priority=p) for i, p in zip((1, 2), priorities[1:]))
    runner = FakeRunner(16)
    sched.add(a)
    step(sched, runner)  # a is admitted first whatever its priority: it runs first, oldest
    sched.add(b)
    sched.add(c)
    assert step(sched, runner).seqs == [a, b, c]
    for _ in range(2):  # positions 30 and 31 of b and c
        assert step(sched, runner).num_preempted == 0
    return sched, runner, (a, b, c)


def test_preemption_takes_the_youngest_under_fcfs():
    sched, runner, (a, b, c) = _preemption_setup("fcfs", (0, 0, 0))
    batch = step(sched, runner)
    assert batch.num_preempted == 1 and batch.seqs == [a, b] and list(sched.waiting) == [c]
    run_all(sched, runner)


def test_preemption_takes_the_lowest_priority_under_priority():
    # a has the largest value (the lowest priority): it goes, though it is the oldest and was already
    # scheduled in this step (a decode that needed no block), which gives its token back to the budget.
    sched, runner, (a, b, c) = _preemption_setup("priority", (2, 0, 1))
    batch = step(sched, runner)
    assert batch.num_preempted == 1 and batch.seqs == [b, c] and batch.num_new_tokens == [1, 1]
    assert sched.running == [b, c] and list(sched.waiting) == [a]
    assert a.status is SequenceStatus.WAITING and a.block_table == [] and a.num_preemptions == 1
    run_all(sched, runner)
    assert all(s.num_output_tokens == 40 for s in (a, b, c))


def test_equal_priorities_preempt_the_latest_arrival():
    sched, runner, (a, b, c) = _preemption_setup("priority", (1, 1, 1))
    batch = step(sched, runner)
    assert batch.num_preempted == 1 and batch.seqs == [a, b] and list(sched.waiting) == [c]


def test_a_preempted_request_requeues_by_its_priority():
    sched, runner, (a, b, c) = _preemption_setup("priority", (2, 0, 1))
    early = make_seq(5, seed=5, priority=3)
    urgent = make_seq(5, seed=6, priority=-1)
    sched.add(early)
    sched.add(urgent)
    step(sched, runner)  # a is preempted: back in the queue between urgent and early
    assert list(sched.waiting) == [urgent, a, early]


def test_a_waiting_request_never_preempts_a_running_one():
    """As vLLM's: priority orders the queue and picks victims, but admission only uses free blocks."""
    sched = make_scheduler(
        num_blocks=8, max_model_len=128, max_num_batched_tokens=128, scheduling_policy="priority"
    )
    runner = FakeRunner(16)
    low = make_seq(100, max_tokens=20, priority=5)  # 7 blocks, 8 with its outputs
    sched.add(low)
    step(sched, runner)
    urgent = make_seq(40, max_tokens=2, seed=1, priority=-5)
    sched.add(urgent)
    while low.status is SequenceStatus.RUNNING:
        assert step(sched, runner).seqs == [low] and list(sched.waiting) == [urgent]
    assert low.num_preemptions == 0
    run_all(sched, runner)


def _outputs(sched: Scheduler, runner: FakeRunner, seqs: list[Sequence]) -> list[list[int]]:
    for s in seqs:
        sched.add(s)
    run_all(sched, runner)
    return [s.output_token_ids for s in seqs]


def test_preempted_requests_produce_the_same_tokens():
    def workload():
        return [make_seq(n, max_tokens=m, seed=i) for i, (n, m) in enumerate([(40, 50), (17, 60), (64, 30)])]

    roomy = make_scheduler(num_blocks=64, max_model_len=128)
    expected = _outputs(roomy, FakeRunner(16), workload())
    assert roomy.num_preemptions == 0
    tight = make_scheduler(num_blocks=8, max_model_len=128)
    assert _outputs(tight, FakeRunner(16), workload()) == expected
    assert tight.num_preemptions > 0


# ---- prefix caching through the scheduler -------------------------------------------------------


def test_num_cached_tokens_is_set_at_first_admission():
    sched = make_scheduler(num_blocks=32)
    runner = FakeRunner(16)
    first = make_seq(40, max_tokens=2)
    sched.add(first)
    run_all(sched, runner)
    second = Sequence(first.prompt_token_ids, SamplingParams(temperature=0, max_tokens=2))
    sched.add(second)
    batch = step(sched, runner)
    assert second.num_cached_tokens == 32  # two full blocks of 16
    assert batch.num_new_tokens == [8]
    run_all(sched, runner)
    assert second.output_token_ids == first.output_token_ids
    exact = Sequence(first.prompt_token_ids[:32], SamplingParams(temperature=0, max_tokens=2))
    sched.add(exact)
    batch = step(sched, runner)
    assert exact.num_cached_tokens == 16  # a fully cached prompt still computes its last block
    assert batch.num_new_tokens == [16]
    run_all(sched, runner)


def test_same_prefix_admitted_in_the_same_step_shares_blocks():
    sched = make_scheduler(num_blocks=32)
    runner = FakeRunner(16)
    a = make_seq(40, max_tokens=3)
    b = Sequence(a.prompt_token_ids[:35] + [7, 8], SamplingParams(temperature=0, max_tokens=3))
    sched.add(a)
    sched.add(b)
    batch = step(sched, runner)  # a registers its blocks when scheduled; b hits them at once
    assert batch.num_new_tokens == [40, 5]
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached_tokens == 32
    run_all(sched, runner)  # the fake runner checks that b read a's K/V


# ---- finishing ----------------------------------------------------------------------------------


def test_finish_reasons():
    sched = make_scheduler()
    runner = FakeRunner(16)
    length = make_seq(5, max_tokens=4)
    eos = make_seq(5, max_tokens=10, seed=1)
    eos_ignored = make_seq(5, max_tokens=4, seed=2, ignore_eos=True)
    eos_too_early = make_seq(5, max_tokens=10, seed=3, min_tokens=3)
    for s, at in [(eos, 3), (eos_ignored, 2), (eos_too_early, 2)]:
        runner.eos_at[s.request_id] = at
    probe = make_seq(5, max_tokens=2, seed=4)
    sched.add(probe)
    run_all(sched, runner)
    stop_id = make_seq(5, max_tokens=10, seed=4, stop_token_ids=[probe.output_token_ids[1]])
    for s in (length, eos, eos_ignored, eos_too_early, stop_id):
        sched.add(s)
    run_all(sched, runner)
    assert (length.finish_reason, length.num_output_tokens) == (FinishReason.LENGTH, 4)
    assert (eos.finish_reason, eos.output_token_ids[-1], eos.num_output_tokens) == (FinishReason.STOP, EOS, 3)
    assert eos.stop_reason is None
    assert (eos_ignored.finish_reason, eos_ignored.num_output_tokens) == (FinishReason.LENGTH, 4)
    assert EOS in eos_ignored.output_token_ids
    # EOS before min_tokens does not end the request (the real sampler would not even pick it).
    assert eos_too_early.finish_reason is FinishReason.LENGTH and eos_too_early.num_output_tokens == 10
    assert stop_id.finish_reason is FinishReason.STOP and stop_id.num_output_tokens == 2
    assert stop_id.stop_reason == probe.output_token_ids[1]
    assert all(s.is_finished for s in (length, eos, eos_ignored, eos_too_early, stop_id))


def test_max_model_len_ends_a_request():
    sched = make_scheduler(max_model_len=32)
    seq = make_seq(28, max_tokens=100)  # the engine would refuse this; the scheduler still caps it
    sched.add(seq)
    run_all(sched, FakeRunner(16))
    assert seq.finish_reason is FinishReason.LENGTH and seq.num_tokens == 32


def test_abort_frees_blocks_wherever_the_request_is():
    sched = make_scheduler(num_blocks=8, max_num_batched_tokens=16)
    runner = FakeRunner(16)
    running, waiting = make_seq(40, max_tokens=5), make_seq(10, seed=1)
    sched.add(running)
    sched.add(waiting)
    step(sched, runner)
    assert running.status is SequenceStatus.RUNNING and waiting.status is SequenceStatus.WAITING
    assert sched.block_manager.num_free_blocks < 8
    sched.finish(running, FinishReason.ABORT)
    sched.finish(waiting, FinishReason.ABORT)
    sched.finish(waiting, FinishReason.ABORT)  # twice is harmless
    assert sched.num_unfinished == 0
    assert running.finish_reason is waiting.finish_reason is FinishReason.ABORT
    assert sched.block_manager.num_free_blocks == 8
    sched.block_manager.check_consistency()
    assert sched.schedule().is_empty


# ---- end to end: preemption does not change what the tiny model generates ------------------------


def test_preemption_keeps_greedy_and_seeded_tokens(ckpt):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 2048) for _ in range(n)] for n in (40, 25, 33, 47, 20, 38)]
    params = [
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        if i % 2 == 0
        else SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=16, ignore_eos=True)
        for i in range(len(prompts))
    ]
    # The same prompt greedy and with another seed: shows the seeded rows really sample.
    prompts += [prompts[1], prompts[1]]
    params += [
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True),
    ]

    def generate(**engine_args):
        llm = LLM(str(ckpt), max_model_len=128, block_size=16, **engine_args)
        outs = llm.generate(prompts, params, use_tqdm=False)
        bm = llm.engine.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks
        bm.check_consistency()
        return [o.outputs[0].token_ids for o in outs], llm.engine.scheduler.num_preemptions

    expected, num_preemptions = generate()
    assert num_preemptions == 0
    # 8 blocks = 128 tokens: room for two of these requests at a time.
    got, num_preemptions = generate(num_kvcache_blocks=8, max_num_batched_tokens=64, max_num_seqs=8)
    assert num_preemptions > 0
    assert got == expected
    assert all(len(t) == 16 for t in got)
    assert len({tuple(expected[1]), tuple(expected[6]), tuple(expected[7])}) == 3


def test_pending_tokens_advance_and_resolve():
    """Overlapped scheduling: advance() gives each sampling sequence a pending token; the next
    schedule computes it (or skips a sequence whose pending token is its last); resolve() fills it
    in, registers the block it completed, and finish() drops the pending tokens it never resolved."""
    sched = make_scheduler(num_blocks=16, block_size=16)
    a, b = make_seq(7, max_tokens=1), make_seq(15, max_tokens=5, seed=1)
    for seq in (a, b):
        sched.add(seq)
    first = sched.schedule()
    assert sched.advance(first) == [a, b]
    assert a.token_ids[-1] == b.token_ids[-1] == PENDING_TOKEN and a.num_known_tokens == 7
    second = sched.schedule()  # a's pending token is its last (max_tokens=1): not scheduled again
    assert second.seqs == [b] and second.num_new_tokens == [1]
    assert b.num_tokens == 16 and not b.block_hashes  # block 0 holds the pending token: not hashed
    assert sched.advance(second) == [b] and b.num_pending_tokens == 2
    assert sched.resolve([a, b], [11, 12]) == [a, b]
    assert a.is_finished and a.finish_reason is FinishReason.LENGTH and a.output_token_ids == [11]
    assert b.token_ids[15:] == [12, PENDING_TOKEN] and b.output_token_ids == [12]
    bm = sched.block_manager
    assert len(b.block_hashes) == 1 and bm.hash_to_block[b.block_hashes[0]] == b.block_table[0]
    sched.finish(b, FinishReason.ABORT)  # with its second token still on the device
    assert b.token_ids[15:] == [12] and b.num_pending_tokens == 0
    assert sched.resolve([b], [13]) == []  # a finished sequence ignores its late token
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_consistency()


def test_prompt_logprobs_rows_cover_each_prompt_token_once_through_preemption():
    # A 60-token prompt in 32-token chunks, preempted after its first chunk: the recompute may reuse the
    # cached blocks of positions already scored, never one with positions still to score.
    sched = make_scheduler(max_num_batched_tokens=32)
    runner = FakeRunner(16)
    first = make_seq(60, max_tokens=2)
    sched.add(first)
    run_all(sched, runner)  # caches the prompt's three full blocks
    seq = make_seq(60, max_tokens=2, prompt_logprobs=1)  # the same prompt
    sched.add(seq)
    scored = []
    batch = step(sched, runner)
    assert seq.num_cached_tokens == 0 and batch.scores == [range(0, 32)]
    scored += batch.scores[0]
    sched.running.remove(seq)
    sched._preempt(seq)
    assert seq.num_scored_prompt_tokens == 32
    hits = sched.block_manager.num_hit_tokens
    batch = step(sched, runner)  # readmitted: the two scored blocks come from the cache, not the third
    assert sched.block_manager.num_hit_tokens - hits == 32 and batch.scores == [range(32, 59)]
    scored += batch.scores[0]
    while sched.num_unfinished:
        assert step(sched, runner).scores is None
    assert scored == list(range(59))  # position p scores prompt token p + 1; none twice
    plain = make_seq(5, max_tokens=1)
    assert ScheduledBatch([plain], [5]).scores is None
