"""Faults: a request aborted wherever it is, a forward that raises mid-step, Ctrl-C and SIGTERM with
tensor-parallel workers. After each, no KV block is held, the prefix cache is consistent and the
engine generates the same greedy tokens as before.

(A KV cache too small for one max-length request fails at start-up with a clear message:
tests/test_validation.py::test_kv_cache_too_small_for_one_request_fails_at_start_up. A real CUDA
out-of-memory error inside a step: tests/gpu/test_oom_gpu.py.)
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.sequence import FinishReason, Sequence, SequenceStatus

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 40
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
# 16 blocks x 16 = 256 tokens for requests that grow to 60-140 tokens: preemption. A 32-token budget:
# the 100-token prompt is prefilled in 4 steps.
ENGINE = dict(
    device="cpu", max_model_len=160, num_kvcache_blocks=16, max_num_seqs=4, max_num_batched_tokens=32
)


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    shared = [rng.randrange(3, 2048) for _ in range(24)]  # 1.5 blocks several prompts share
    rand = lambda n: [rng.randrange(3, 2048) for _ in range(n)]  # noqa: E731
    return [rand(20), rand(100), shared + rand(26), shared + rand(30), rand(50)]


SHORT, LONG = 0, 1
PROMPTS = _prompts()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster than two fighting on a busy host
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llm(one_thread):
    llm = LLM("qwen3-tiny", **ENGINE)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def expected(llm) -> list[list[int]]:
    """Each prompt's greedy tokens, generated alone."""
    return [llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]


@pytest.fixture
def engine(llm, expected) -> LLMEngine:
    """The module's engine, idle, with an empty prefix cache (so each test schedules the same way)."""
    engine = llm.engine
    assert not engine.has_unfinished()
    engine.scheduler.block_manager.reset_prefix_cache()
    return engine


def assert_healthy(llm: LLM, expected: list[list[int]]) -> None:
    """Nothing held or queued, the invariants hold, and greedy tokens are what they were."""
    engine = llm.engine
    bm = engine.scheduler.block_manager
    assert not engine.has_unfinished() and engine.requests == {}
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    bm.check_consistency()
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected


def assert_blocks_match_holders(engine: LLMEngine) -> None:
    """Each block's ref count is the number of running requests holding it; waiting ones hold none."""
    sched, bm = engine.scheduler, engine.scheduler.block_manager
    holders = Counter(b for s in sched.running for b in s.block_table)
    assert all(b.ref_count == holders[b.block_id] for b in bm.blocks)
    assert all(not s.block_table for s in sched.waiting)
    assert bm.num_free_blocks == bm.num_blocks - len(holders)
    bm.check_consistency()


def stage_of(seq: Sequence) -> str:
    if seq.status is SequenceStatus.WAITING:
        return "preempted" if seq.num_preemptions else "waiting"
    if seq.num_computed_tokens < seq.num_tokens - 1:
        return "prefilling"  # a prompt (or, after preemption, prompt + output) in chunks
    return "decoding"


def run_to_end(engine: LLMEngine, outputs: dict[str, list[int]]) -> None:
    for _ in range(10_000):
        if not engine.has_unfinished():
            return
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
    raise AssertionError("the engine did not finish its requests")


# ---- aborts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["waiting", "prefilling", "decoding", "preempted"])
def test_abort_at_every_stage(llm, engine, expected, stage):
    """All five prompts at once: the 100-token one is prefilled in chunks, the rest queue, and as
    they grow the small cache forces preemptions. The first request seen at `stage` is aborted."""
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    outputs: dict[str, list[int]] = {}
    victim = None
    for _ in range(500):
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        at_stage = [
            rid
            for rid in ids
            if rid in engine.requests
            and stage_of(engine.requests[rid].seq) == stage
            and (stage != "decoding" or engine.requests[rid].seq.num_output_tokens >= 3)
        ]
        if at_stage:
            victim = at_stage[0]
            break
    assert victim is not None, f"no request reached {stage!r}"
    seq = engine.requests[victim].seq
    if stage == "prefilling":
        assert seq.block_table and 0 < seq.num_computed_tokens < seq.num_prompt_tokens
    engine.abort(victim)
    assert seq.is_finished and seq.finish_reason is FinishReason.ABORT and not seq.block_table
    assert victim not in engine.requests
    assert_blocks_match_holders(engine)
    engine.abort(victim)  # a second abort is a no-op

    run_to_end(engine, outputs)
    assert set(outputs) == set(ids) - {victim}
    for i, rid in enumerate(ids):
        if rid != victim:
            assert outputs[rid] == expected[i], f"prompt {i} changed after aborting a {stage} request"
    assert_healthy(llm, expected)


def test_abort_mid_prefill_keeps_the_written_blocks_cached(llm, engine, expected):
    """Blocks a chunk wrote before the abort hold valid K/V: a later request may reuse them."""
    rid = engine.add_request(PROMPTS[LONG], GREEDY)
    engine.step()
    engine.step()  # 64 of 100 prompt tokens computed: 4 full blocks
    assert engine.requests[rid].seq.num_computed_tokens == 64
    engine.abort(rid)
    again = llm.generate([PROMPTS[LONG]], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 64 and again.outputs[0].token_ids == expected[LONG]
    assert_healthy(llm, expected)


# ---- a forward that raises ----------------------------------------------------------------------


def _fail_once(fn, call: int):
    """fn, except that its call-th call raises."""
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == call:
            raise RuntimeError("injected fault")
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("where", ["execute", "mid-forward"])
def test_forward_that_raises_fails_its_step_and_the_engine_recovers(
    llm, engine, expected, where, monkeypatch
):
    """Step 1 prefills SHORT (20 tokens) and 12 tokens of LONG; step 2 would decode SHORT and
    prefill LONG up to 43 (filling LONG's first two blocks) but raises, either before the forward
    or in the last layer, after the layers before it wrote their K/V. The step's two requests fail
    with the error; the request that was waiting is untouched; LONG's blocks of the failed step
    are not served from the prefix cache; SHORT's block written in step 1 is."""
    runner = engine.runner
    if where == "execute":
        monkeypatch.setattr(runner, "execute", _fail_once(runner.execute, call=2))
    else:
        mlp = runner.model.model.layers[-1].mlp
        monkeypatch.setattr(mlp, "forward", _fail_once(mlp.forward, call=2))
    short, long, waiting = (engine.add_request(PROMPTS[i], GREEDY) for i in (SHORT, LONG, 4))
    engine.step()
    with pytest.raises(RuntimeError, match="injected fault"):
        engine.step()
    for rid in (short, long):
        assert rid not in engine.requests  # failed: the caller got the error, the engine dropped them
    assert list(engine.requests) == [waiting]
    assert engine.requests[waiting].seq.status is SequenceStatus.WAITING
    assert_blocks_match_holders(engine)

    outputs: dict[str, list[int]] = {}
    run_to_end(engine, outputs)
    assert outputs == {waiting: expected[4]}
    again = llm.generate([PROMPTS[SHORT], PROMPTS[LONG]], GREEDY, use_tqdm=False)
    assert [o.num_cached_tokens for o in again] == [16, 0]
    assert [o.outputs[0].token_ids for o in again] == [expected[SHORT], expected[LONG]]
    assert_healthy(llm, expected)


def test_generate_after_a_failed_generate(llm, engine, expected, monkeypatch):
    """The offline API: generate raises the step's error, queues nothing more, and the next call works."""
    monkeypatch.setattr(engine.runner, "execute", _fail_once(engine.runner.execute, call=3))
    with pytest.raises(RuntimeError, match="injected fault"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert not engine.has_unfinished() and engine.requests == {}
    assert_healthy(llm, expected)


# ---- signals with tensor-parallel workers -------------------------------------------------------

_TP_LOOP = textwrap.dedent(
    """
    from nanovllm import LLM, SamplingParams

    if __name__ == "__main__":
        llm = LLM("qwen3-tiny", device="cpu", tensor_parallel_size=2, max_model_len=256,
                  num_kvcache_blocks=64, max_num_seqs=8, max_num_batched_tokens=64)
        params = SamplingParams(max_tokens=30, ignore_eos=True)
        for i in range(1_000_000):
            llm.generate([[5, 6, 7 + i % 100] * 30] * 6, params, use_tqdm=False)
            if i == 0:
                print("generating", flush=True)
    """
)


def _children(pid: int) -> set[int]:
    """Every process pid started (from any of its threads)."""
    kids = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids.update(int(k) for k in (task / "children").read_text().split())
    return kids


def _gone(pid: int) -> bool:
    """True once pid has exited (a zombie counts: it runs nothing, whoever reaps it)."""
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def _readline(proc: subprocess.Popen, timeout_s: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    return proc.stdout.readline() if ready else ""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_to_the_driver_leaves_no_worker_behind(sig):
    """A TP=2 engine generates in a loop; the driver gets Ctrl-C (SIGINT) or SIGTERM mid-generation.
    SIGINT: KeyboardInterrupt stops the workers at once (they may wait in a collective the driver
    left). SIGTERM kills the driver outright: the workers notice (pipe EOF, closed sockets, parent
    watch) and exit. Either way the driver exits and every process it started is gone in seconds."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _TP_LOOP],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # our own process group: cleaned up below whatever happens
    )
    try:
        line = _readline(proc, timeout_s=120)
        assert line.strip() == "generating", proc.stderr.read()[-3000:] if proc.poll() is not None else line
        children = _children(proc.pid)
        assert children, "no worker process"
        time.sleep(0.3)  # into the next generate call, mid-step
        sent = time.monotonic()
        proc.send_signal(sig)
        rc = proc.wait(timeout=20)
        exited_s = time.monotonic() - sent
        assert rc == -sig, (rc, proc.stderr.read()[-3000:])
        deadline = time.monotonic() + 5
        while not all(_gone(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_gone(p) for p in children), f"{[p for p in children if not _gone(p)]} outlived the driver"
        assert exited_s < 8, f"the driver took {exited_s:.1f} s to exit"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


class _Recorder:
    """A stand-in for the NCCL backend or the peer all-reduce that records the calls it gets."""

    def __init__(self, name: str, calls: list[str]):
        self.name, self.calls = name, calls

    def abort(self) -> None:
        self.calls.append(f"{self.name} abort")

    def close(self) -> None:  # the peer all-reduce's: it waits for the device
        self.calls.append(f"{self.name} close")


@pytest.mark.parametrize("release_group", [True, False], ids=["shutdown", "interpreter exit"])
def test_rank0_aborts_nccl_before_its_peer_buffer_waits_for_the_device(release_group):
    """Ctrl-C mid-step kills the workers while rank 0 may have an NCCL collective queued with them: closing
    the peer all-reduce synchronizes the device, which only NCCL's abort lets finish. At exit (no abort: it
    could hang there) the buffer is closed only when every worker left politely."""
    from nanovllm.engine.tp_executor import WorkerSet
    from nanovllm.utils.distributed import TensorParallelGroup

    calls: list[str] = []
    workers = WorkerSet()  # no processes: every worker has left
    group = TensorParallelGroup(0, 2, _Recorder("nccl", calls), _Recorder("peer", calls))
    workers.group = group
    workers.shutdown(release_group=release_group)
    if release_group:
        assert calls.index("nccl abort") < calls.index("peer close"), calls
    else:
        assert calls == ["peer close"]
    assert group.peer_all_reduce is None and workers.group is None
