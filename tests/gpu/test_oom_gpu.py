"""A real CUDA out-of-memory error inside a step (run by scripts/gpu_suite.py on the device machine).

The step's requests fail with torch.cuda.OutOfMemoryError; afterwards no KV block is held, the prefix
cache is consistent, the allocated memory is back where it was, and the same prompts give the same
greedy tokens. float32, so that the recomputed tokens can be compared exactly (see test_engine_gpu).
"""

from __future__ import annotations

import gc
import random

import pytest
import torch

from nanovllm import LLM, SamplingParams

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
MARGIN_BYTES = 64 << 20  # left free by the hog: far less than a 9,000-token prefill step needs
CHUNK_BYTES = 256 << 20


@pytest.fixture(scope="module")
def llm():
    llm = LLM("qwen3-0.6b", dtype="float32", max_model_len=4096, num_kvcache_blocks=1024)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 10000) for _ in range(1500)] for _ in range(6)]  # one 9,000-token step


@pytest.fixture(scope="module")
def reference(llm, prompts) -> list[list[int]]:
    llm.engine.scheduler.block_manager.reset_prefix_cache()
    return _tokens(llm, prompts)


def _tokens(llm: LLM, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def _allocated() -> int:
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _hog_memory() -> list[torch.Tensor]:
    """Take all of the memory a new tensor could get but MARGIN_BYTES: the driver's free memory *and* the
    caching allocator's free blocks (an engine's earlier steps can leave those in segments that
    `empty_cache` cannot release, and the step would allocate from them). Chunks halve on each failure
    down to 1 MB; then the smallest chunks are given back, up to MARGIN_BYTES."""
    torch.cuda.empty_cache()
    hog, size = [], CHUNK_BYTES
    while size >= 1 << 20:
        try:
            hog.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
        except torch.cuda.OutOfMemoryError:
            size //= 2
    freed = 0
    while hog and freed + hog[-1].numel() <= MARGIN_BYTES:
        freed += hog.pop().numel()
    return hog


@pytest.mark.parametrize("how", ["memory taken before the step", "a layer allocating too much"])
def test_cuda_oom_inside_a_step_fails_the_step_and_the_engine_recovers(llm, prompts, reference, how):
    engine = llm.engine
    bm = engine.scheduler.block_manager
    baseline = _allocated()
    bm.reset_prefix_cache()  # so the next call prefills every prompt in one big step
    layer = llm.engine.runner.model.model.layers[0].mlp
    hog: list[torch.Tensor] = []
    try:
        if how == "memory taken before the step":
            hog = _hog_memory()
        else:
            forward = layer.forward

            def allocate_too_much(*args):
                del layer.forward  # once
                total = torch.cuda.get_device_properties(0).total_memory
                torch.empty(2 * total, dtype=torch.uint8, device="cuda")  # raises OutOfMemoryError
                return forward(*args)

            layer.forward = allocate_too_much
        with pytest.raises(torch.cuda.OutOfMemoryError):
            llm.generate(prompts, GREEDY, use_tqdm=False)
    finally:
        layer.__dict__.pop("forward", None)
        del hog
        torch.cuda.empty_cache()

    assert not engine.has_unfinished() and engine.requests == {}
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_consistency()
    assert _allocated() == baseline, "the failed step left tensors behind"
    assert _tokens(llm, prompts) == reference
    assert bm.num_free_blocks == bm.num_blocks
    assert _allocated() == baseline
