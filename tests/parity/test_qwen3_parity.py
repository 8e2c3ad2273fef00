"""Our Qwen3 vs transformers' on the same tiny random checkpoint (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import AttentionMetadata
from tests.checkpoints import build_checkpoint, hf_greedy, load_hf_model, mixed_prompts

MAX_TOKENS = 10
PROMPT_LENS = [3, 200, 17, 64, 1, 120, 33, 48]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="module")
def hf(ckpt):
    return load_hf_model(ckpt)


@pytest.fixture(scope="module")
def prompts():
    return mixed_prompts(PROMPT_LENS)


@pytest.fixture(scope="module")
def expected(hf, prompts):
    return [hf_greedy(hf, p, MAX_TOKENS) for p in prompts]


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _tokens(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_prefill_logits_match(ckpt, hf, prompts):
    llm = LLM(str(ckpt), max_model_len=512)
    runner = llm.engine.runner
    seqs = [Sequence(p, GREEDY) for p in prompts[:4]]
    for s in seqs:  # lay each sequence on fresh blocks
        llm.engine.scheduler.block_manager.allocate(s, [], s.num_tokens)
    inp = runner.prepare(ScheduledBatch(seqs, [s.num_tokens for s in seqs]))
    meta = AttentionMetadata(
        inp.slot_mapping,
        inp.cu_seqlens_q,
        inp.seq_lens,
        inp.block_tables,
        inp.max_query_len,
        inp.max_seq_len,
        False,
    )
    with torch.no_grad():
        logits = runner.model.compute_logits(runner.model(inp.input_ids, inp.positions, meta))
    start = 0
    for p in prompts[:4]:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        torch.testing.assert_close(logits[start : start + len(p)], ref, rtol=1e-4, atol=1e-4)
        start += len(p)


def test_greedy_default(ckpt, prompts, expected):
    assert _tokens(LLM(str(ckpt)), prompts) == expected


def test_greedy_chunked_prefill(ckpt, prompts, expected):
    llm = LLM(str(ckpt), max_num_batched_tokens=32, max_num_seqs=4)
    assert _tokens(llm, prompts) == expected


@pytest.mark.parametrize("block_size", [16, 256])
def test_greedy_block_sizes(ckpt, prompts, expected, block_size):
    assert _tokens(LLM(str(ckpt), block_size=block_size), prompts) == expected


def test_greedy_under_preemption(ckpt, prompts, expected):
    llm = LLM(str(ckpt), max_model_len=256, num_kvcache_blocks=20, block_size=16)
    assert _tokens(llm, prompts) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_consistency()


def test_greedy_with_prefix_cache_hits(ckpt, prompts, expected):
    llm = LLM(str(ckpt))
    first = llm.generate(prompts, GREEDY, use_tqdm=False)
    second = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first] == expected
    assert [o.outputs[0].token_ids for o in second] == expected
    long_prompts = [o for o in second if len(o.prompt_token_ids) > 16]
    assert all(o.num_cached_tokens > 0 for o in long_prompts)
    for o in second:  # the last prompt token is always computed
        assert o.num_cached_tokens <= len(o.prompt_token_ids) - 1
    assert llm.engine.scheduler.block_manager.hit_rate > 0


def test_greedy_decode_in_two_halves(ckpt, prompts, expected):
    """Decode batches padded and cut in two halves (a GPU's graphs run them on two streams; here one after the
    other): each half's rows, lengths and block tables must still give transformers' tokens. (Split counts
    and the split counters are CUDA-only: tests/gpu/test_engine_gpu.py.)"""
    llm = LLM(str(ckpt))
    step = llm.engine.runner.decode  # engine/decode_step.py
    step.two_stream_sizes = range(2, 257)  # (a single GPU's default for a small model: 16..128)
    cuts = []
    forward = step.forward
    step.forward = lambda t, parts, *a: (
        cuts.append((t["seq_lens"].tolist(), [p[:2] for p in parts])) or forward(t, parts, *a)
    )
    for n in (8, 7, 3):  # padded (as a graph replay pads) to 8, 8 and 4 sequences
        cuts.clear()
        assert _tokens(llm, prompts[:n]) == expected[:n]
        size = 8 if n > 4 else 4
        assert cuts and all(c == [(0, size // 2), (size // 2, size)] for _, c in cuts)
        assert all(lens[n:] == [0] * (size - n) for lens, _ in cuts)  # padding rows: length 0
