"""Property tests: random arrivals (with random priorities under scheduling_policy "priority"), steps, aborts
and early finishes, driven through the scheduler and block manager by the fake runner of test_scheduler
(no model)."""

from __future__ import annotations

import functools
import random
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanovllm.config import Config
from nanovllm.engine.request_queue import priority_key
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import FinishReason, Sequence
from nanovllm.sampling_params import SamplingParams
from tests.unit.test_scheduler import EOS, FakeRunner, check_batch

BLOCK_SIZE = 16
MAX_MODEL_LEN = 128
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@functools.lru_cache
def config(
    max_num_seqs: int, max_num_batched_tokens: int, enable_prefix_caching: bool, scheduling_policy: str
) -> Config:
    return Config(
        "qwen3-tiny",
        block_size=BLOCK_SIZE,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_prefix_caching=enable_prefix_caching,
        scheduling_policy=scheduling_policy,
    )


engines = st.fixed_dictionaries(
    {
        "max_num_seqs": st.integers(1, 6),
        "extra_tokens": st.integers(0, 90),  # max_num_batched_tokens = max_num_seqs + this
        # at least one max-length request must fit (the model runner refuses smaller caches)
        "num_blocks": st.integers(MAX_MODEL_LEN // BLOCK_SIZE, 16),
        "enable_prefix_caching": st.booleans(),
        "scheduling_policy": st.sampled_from(("fcfs", "priority")),
    }
)
adds = st.tuples(
    st.just("add"),
    st.integers(0, 2),  # which prefix to start from (see Harness.prefixes)
    st.integers(0, 60),  # prompt length after the prefix (0: exactly the prefix)
    st.integers(1, 60),  # max_tokens (capped to fit max_model_len)
    st.integers(-2, 2),  # priority (0 under fcfs, as the engine requires)
)
ops = st.one_of(
    adds,
    adds,  # arrivals and steps twice as likely as aborts and early finishes
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 100)),
    st.tuples(st.just("finish"), st.integers(0, 100)),
)


class Harness:
    def __init__(self, engine: dict, seed: int):
        cfg = config(
            engine["max_num_seqs"],
            engine["max_num_seqs"] + engine["extra_tokens"],
            engine["enable_prefix_caching"],
            engine["scheduling_policy"],
        )
        self.sched = Scheduler(cfg, engine["num_blocks"])
        self.bm = self.sched.block_manager
        self.runner = FakeRunner(BLOCK_SIZE)
        rng = random.Random(seed)
        shared = [rng.randrange(3, 1000) for _ in range(48)]
        # a one-token prefix; 3 blocks; the first block of those, then other tokens
        self.prefixes = [[7], shared, shared[:16] + [rng.randrange(3, 1000) for _ in range(20)]]
        self.rng = rng
        self.seqs: list[Sequence] = []
        self.num_steps = 0

    def unfinished(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    def apply(self, op: tuple) -> None:
        kind = op[0]
        if kind == "add":
            _, prefix, prompt_len, max_tokens, priority = op
            prompt = (self.prefixes[prefix] + [self.rng.randrange(3, 1000) for _ in range(prompt_len)])[
                : MAX_MODEL_LEN - 1
            ]
            max_tokens = min(max_tokens, MAX_MODEL_LEN - len(prompt))  # as the engine validates
            priority = priority if self.sched.policy == "priority" else 0
            seq = Sequence(prompt, SamplingParams(temperature=0, max_tokens=max_tokens), priority=priority)
            self.seqs.append(seq)
            self.sched.add(seq)
        elif kind == "step":
            for _ in range(op[1]):
                self.step()
        elif self.unfinished():
            seq = self.unfinished()[op[1] % len(self.unfinished())]
            if kind == "abort":
                self.sched.finish(seq, FinishReason.ABORT)
            else:  # the model picks EOS as this request's next token
                self.runner.eos_at[seq.request_id] = seq.num_output_tokens + 1
        self.check()

    def step(self) -> None:
        batch = self.sched.schedule()
        if self.sched.num_unfinished:
            assert not batch.is_empty, "requests wait but nothing was scheduled"
        check_batch(self.sched, batch)  # token budget, max_num_seqs, block tables cover the tokens
        if not batch.is_empty:
            self.sched.update(batch, self.runner.run(batch))  # the runner checks every K/V read
        self.num_steps += 1

    def check(self) -> None:
        """No leak, no double free: each block's ref count is the number of requests holding it."""
        self.bm.check_consistency()
        self.runner.check_prefix_cache(self.bm)
        holders = Counter(b for s in self.sched.running for b in s.block_table)
        assert all(b.ref_count == holders[b.block_id] for b in self.bm.blocks)
        assert all(not s.block_table for s in self.sched.waiting)
        assert all(not s.block_table for s in self.seqs if s.is_finished)
        assert self.bm.num_free_blocks == self.bm.num_blocks - len(holders)
        if self.sched.policy == "priority":  # the queue stays in admission order: (priority, arrival)
            keys = [priority_key(s) for s in self.sched.waiting]
            assert keys == sorted(keys)

    def drain(self) -> None:
        """No more arrivals: every request must finish. Each step the oldest running request (fcfs; under
        priority the one served first) computes >= 1 token and is never preempted, so the steps are
        bounded by the tokens left. (While requests keep arriving, priority can starve low priorities by
        design, as vLLM's; without arrivals they all finish.)"""
        bound = sum(s.num_prompt_tokens + s.params.max_tokens for s in self.unfinished())
        start = self.num_steps
        while self.sched.num_unfinished:
            self.step()
            self.check()
            assert self.num_steps - start <= bound, "a request is starving"
        assert self.bm.num_free_blocks == self.bm.num_blocks

    def expected_output(self, seq: Sequence) -> list[int]:
        """What the fake model generates for seq's prompt when run alone, one token at a time."""
        tokens = list(seq.prompt_token_ids)
        for _ in range(seq.num_output_tokens):
            tokens.append(3 + FakeRunner.prefix_keys(tokens)[-1] % (self.runner.vocab_size - 3))
        return tokens[seq.num_prompt_tokens :]


@SETTINGS
@given(engine=engines, program=st.lists(ops, min_size=20, max_size=80), seed=st.integers(0, 2**16))
def test_random_programs_keep_blocks_consistent_and_finish(engine, program, seed):
    h = Harness(engine, seed)
    for op in program:
        h.apply(op)
    h.drain()
    for seq in h.seqs:
        assert seq.is_finished
        if seq.finish_reason is FinishReason.LENGTH:
            assert seq.num_output_tokens == seq.params.max_tokens
            # Chunking, batching, preemption and prefix hits never change what a request generates.
            assert seq.output_token_ids == h.expected_output(seq)
        elif seq.finish_reason is FinishReason.STOP:
            assert seq.output_token_ids[-1] == EOS
            assert seq.output_token_ids[:-1] == h.expected_output(seq)[:-1]


@SETTINGS
@given(engine=engines, program=st.lists(ops, min_size=20, max_size=80), seed=st.integers(0, 2**16))
def test_aborting_everything_frees_everything(engine, program, seed):
    h = Harness(engine, seed)
    for op in program:
        h.apply(op)
    for seq in h.unfinished():
        h.sched.finish(seq, FinishReason.ABORT)
        h.check()
    assert h.sched.num_unfinished == 0
    assert h.bm.num_free_blocks == h.bm.num_blocks
    assert h.sched.schedule().is_empty


@SETTINGS
@given(
    engine=engines,
    requests=st.lists(adds, min_size=2, max_size=12),
    seed=st.integers(0, 2**16),
)
def test_a_burst_of_requests_all_finish_within_the_token_bound(engine, requests, seed):
    h = Harness(engine, seed)
    for op in requests:
        h.apply(op)
    h.drain()
    assert all(s.finish_reason is FinishReason.LENGTH for s in h.seqs)
    assert all(s.output_token_ids == h.expected_output(s) for s in h.seqs)
