"""No leaks across rounds of work on one engine: after each round of mixed requests (prefix sharing,
sampling settings, stop strings, preemption, aborts) every KV block is free again, the block
manager's invariants hold, the engine holds no request, and on a GPU the allocated memory is back
to where it was."""

from __future__ import annotations

import gc
import random
import weakref

import pytest
import torch

from nanovllm import LLM, SamplingParams

NUM_ROUNDS = 5
# A small cache (512 tokens for up to 8 requests of up to ~230 tokens): rounds of mixed requests preempt.
TINY_ENGINE = dict(max_model_len=256, num_kvcache_blocks=32, max_num_seqs=8)
TWO_PROMPTS = [[5, 6, 7], list(range(3, 40))]
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, NEEDS_CUDA])]


def _round(llm: LLM, rng: random.Random, shared: list[int]) -> None:
    prompts, params = [], []
    for i in range(10):
        n = rng.randint(1, 150)
        prompt = [rng.randrange(3, 2048) for _ in range(n)]
        if i % 3 == 0:  # a shared prefix: prefix-cache hits, blocks with several owners
            prompt = shared + prompt[: rng.randint(0, 40)]
        prompts.append(prompt)
        params.append(
            SamplingParams(
                temperature=rng.choice([0.0, 0.7, 1.0]),
                top_p=rng.choice([1.0, 0.9]),
                top_k=rng.choice([-1, 20]),
                max_tokens=rng.randint(1, 40),
                ignore_eos=rng.random() < 0.5,
                stop=rng.choice([None, "a", ["b", "cd"]]),
                repetition_penalty=rng.choice([1.0, 1.2]),
                logprobs=rng.choice([None, 2]),
                seed=rng.choice([None, rng.randrange(1000)]),
            )
        )
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert len(outputs) == len(prompts) and all(o.finished for o in outputs)
    # Requests cancelled mid-flight: some waiting, some prefilled, some decoding.
    engine = llm.engine
    ids = [
        engine.add_request(p, SamplingParams(max_tokens=30, ignore_eos=True))
        for p in prompts[: rng.randint(2, 6)]
    ]
    for _ in range(rng.randint(1, 6)):
        engine.step()
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished():  # a step still in flight is read back (and discarded) by the next
        engine.step()


def _assert_clean(llm: LLM) -> None:
    engine = llm.engine
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_consistency()
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not engine.has_unfinished()
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting


def _run_rounds(device: str) -> list[int]:
    # Earlier tests' garbage in reference cycles would be freed whenever the collector next runs: mid-test,
    # it shows as memory dropping between rounds (2 x H200, after the kernel tests: 2.7 GB, then 0.3). Free it
    # first, so that only this engine's memory is measured.
    gc.collect()
    llm = LLM("qwen3-tiny", device=device, **TINY_ENGINE)
    rng = random.Random(0)
    shared = [rng.randrange(3, 2048) for _ in range(48)]
    allocated = []
    try:
        for _ in range(NUM_ROUNDS):
            _round(llm, rng, shared)
            _assert_clean(llm)
            if device == "cuda":
                torch.cuda.synchronize()
                allocated.append(torch.cuda.memory_allocated())
        assert llm.engine.scheduler.num_preemptions > 0, "the cache was meant to be small enough to preempt"
    finally:
        llm.shutdown()
    return allocated


def test_no_leak_across_rounds():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster than several fighting on a busy host
    try:
        _run_rounds("cpu")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.gpu
@NEEDS_CUDA
def test_no_gpu_memory_leak_across_rounds():
    allocated = _run_rounds("cuda")
    # The first rounds may allocate lazily (workspaces, kernel caches); after them, nothing may grow:
    # a leak grows with every round.
    assert allocated[2:] == [allocated[1]] * (NUM_ROUNDS - 2), allocated


@pytest.mark.parametrize("device", DEVICES)
def test_runner_is_freed_without_the_garbage_collector(device):
    """Dropping the engine frees its model runner and weights at once (no reference cycle). On a GPU this
    covers the CUDA graphs, where a cycle (the graphs holding a method of the runner) once kept them, and with
    them their memory pool, alive until the next collection; on the CPU (no graphs) the rest of the runner."""
    llm = LLM("qwen3-tiny", device=device, **TINY_ENGINE)
    llm.generate(TWO_PROMPTS, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    if device == "cuda":
        assert llm.engine.runner.cuda_graphs is not None
    gc.collect()
    gc.disable()
    try:
        runner = weakref.ref(llm.engine.runner)
        weights = [weakref.ref(p) for p in llm.engine.runner.model.parameters()]
        del llm
        assert runner() is None, [type(r).__name__ for r in gc.get_referrers(runner())]
        # (each weight's loader, a bound method of its layer, kept the weights in a cycle until load_weights
        # dropped the loaders: a dropped engine held its weights until the next collection)
        assert all(w() is None for w in weights)
    finally:
        gc.enable()


@pytest.mark.parametrize("device", DEVICES)
def test_shutdown_frees_the_engine_while_the_llm_is_still_held(device):
    """`shutdown()` releases the model, KV cache and graphs though the `LLM` is still referenced (as a
    notebook's kept traceback would hold it): on a GPU the allocated memory is back where it was before the
    engine, so the next one can have it. Using the engine after is a clear error; a second shutdown does
    nothing."""
    greedy = SamplingParams(temperature=0, max_tokens=4)
    if device == "cuda":  # a first engine on the same work makes what a process keeps (cuBLAS workspaces)
        with LLM("qwen3-tiny", device=device, **TINY_ENGINE) as first:
            first.generate(TWO_PROMPTS, greedy, use_tqdm=False)
        del first
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    llm = LLM("qwen3-tiny", device=device, **TINY_ENGINE)
    llm.generate(TWO_PROMPTS, greedy, use_tqdm=False)
    gc.disable()
    try:
        runner = weakref.ref(llm.engine.runner)
        weights = [weakref.ref(p) for p in llm.engine.runner.model.parameters()]
        llm.shutdown()
        assert runner() is None
        assert all(w() is None for w in weights)
        if device == "cuda":  # (2 x H200, while the loaders kept the weights: 0.4 MB more, the tiny model's)
            assert torch.cuda.memory_allocated() == before
    finally:
        gc.enable()
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([[5, 6, 7]], greedy, use_tqdm=False)
    with pytest.raises(RuntimeError, match="shut down"):
        llm.engine.step()
    llm.shutdown()
