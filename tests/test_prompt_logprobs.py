"""SamplingParams.prompt_logprobs: every prompt token's logprob (and top alternatives) given the tokens
before it, against transformers' logits on the same weights; through chunked prefill, the prefix cache,
preemption, n samples and mixed batches."""

from __future__ import annotations

import pytest
import torch

from nanovllm import LLM, SamplingParams
from tests.checkpoints import load_hf_model

NUM_TOP = 3
PROMPT = list(range(100, 150))  # 50 tokens: three full 16-token blocks and a partial one
SHORT = [3, 4, 5]
SCORED = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=NUM_TOP)
PLAIN = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(ckpt):
    """transformers' log_softmax over each prompt's logits: row t - 1 scores token t."""
    hf = load_hf_model(ckpt)
    with torch.no_grad():
        return {tuple(p): hf(torch.tensor([p])).logits[0].float().log_softmax(-1) for p in (PROMPT, SHORT)}


@pytest.fixture(scope="module")
def llm(ckpt):
    # 32-token steps: PROMPT is prefilled in two chunks
    return LLM(str(ckpt), max_model_len=128, max_num_batched_tokens=32, max_num_seqs=4)


def _check_against(reference, prompt, prompt_logprobs, num_top=NUM_TOP):
    ref = reference[tuple(prompt)]
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for t in range(1, len(prompt)):
        lp = prompt_logprobs[t]
        assert lp.token_id == prompt[t]
        assert lp.logprob == pytest.approx(ref[t - 1, prompt[t]].item(), abs=1e-4)
        top = ref[t - 1].topk(num_top)
        assert list(lp.top_logprobs) == top.indices.tolist()  # best first
        assert list(lp.top_logprobs.values()) == pytest.approx(top.values.tolist(), abs=1e-4)
        row, own = ref[t - 1], ref[t - 1, prompt[t]]  # (a near tie may go either way: 1e-4)
        assert int((row >= own + 1e-4).sum()) <= lp.rank <= int((row >= own - 1e-4).sum())


def test_prompt_logprobs_match_transformers_through_chunked_prefill(llm, reference):
    outs = llm.generate([PROMPT, SHORT], SCORED, use_tqdm=False)
    for prompt, out in zip((PROMPT, SHORT), outs):
        _check_against(reference, prompt, out.prompt_logprobs)
    plain = llm.generate([PROMPT, SHORT], PLAIN, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    assert all(o.prompt_logprobs is None for o in plain)


def test_zero_alternatives_and_a_one_token_prompt(llm, reference):
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0)
    long, single = llm.generate([PROMPT, [7]], params, use_tqdm=False)
    _check_against(reference, PROMPT, long.prompt_logprobs, num_top=0)
    assert single.prompt_logprobs == [None]


def test_a_batch_mixing_zero_and_some_alternatives(llm, reference):
    """One step scores rows with prompt_logprobs=0 and =NUM_TOP: each gets its own number of alternatives."""
    zero = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0)
    outs = llm.generate([SHORT, PROMPT, SHORT], [SCORED, zero, zero], use_tqdm=False)
    _check_against(reference, SHORT, outs[0].prompt_logprobs)
    _check_against(reference, PROMPT, outs[1].prompt_logprobs, num_top=0)
    _check_against(reference, SHORT, outs[2].prompt_logprobs, num_top=0)


def test_cached_prefix_is_recomputed_to_be_scored_and_still_shared_after(llm, reference):
    prompt = list(range(200, 250))
    bm = llm.engine.scheduler.block_manager
    llm.generate([prompt], PLAIN, use_tqdm=False)  # its three full blocks are now cached
    hits = bm.num_hit_tokens
    (scored,) = llm.generate([prompt], SCORED, use_tqdm=False)
    assert scored.num_cached_tokens == 0 and bm.num_hit_tokens == hits  # every position computed
    assert len(scored.prompt_logprobs) == len(prompt)
    (again,) = llm.generate([prompt], PLAIN, use_tqdm=False)
    assert again.num_cached_tokens == 48  # the cache still serves requests that do not score
    fresh = LLM(str(llm.engine.config.model_path), max_model_len=128, enable_prefix_caching=False)
    (alone,) = fresh.generate([prompt], SCORED, use_tqdm=False)
    for a, b in zip(scored.prompt_logprobs[1:], alone.prompt_logprobs[1:]):  # (chunked differently)
        assert (a.token_id, list(a.top_logprobs)) == (b.token_id, list(b.top_logprobs))
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
    fresh.shutdown()


def test_n_samples_score_the_prompt_once(llm, reference):
    prompt = list(range(300, 350))  # not seen before
    params = SamplingParams(temperature=1.0, max_tokens=4, seed=3, n=3, prompt_logprobs=NUM_TOP)
    bm = llm.engine.scheduler.block_manager
    hits = bm.num_hit_tokens
    (out,) = llm.generate([prompt], params, use_tqdm=False)
    assert len(out.outputs) == 3 and len(out.prompt_logprobs) == len(prompt)
    assert params.choice(1).prompt_logprobs is None and params.choice(0).prompt_logprobs == NUM_TOP
    assert bm.num_hit_tokens - hits == 2 * 48  # samples 1 and 2 take the cached blocks: they score nothing


def test_prompt_logprobs_stay_raw_under_logit_bias_and_allowed_token_ids(llm, reference):
    steered = SamplingParams(
        temperature=0, max_tokens=2, prompt_logprobs=NUM_TOP, logit_bias={7: 50.0}, allowed_token_ids=[7, 8]
    )
    (out,) = llm.generate([PROMPT], steered, use_tqdm=False)
    assert set(out.outputs[0].token_ids) <= {7, 8}
    _check_against(reference, PROMPT, out.prompt_logprobs)  # the model's, not the steered sampler's


def test_preempted_requests_score_each_prompt_token_once(ckpt, reference):
    # 10 blocks of 16 tokens: four 50-token prompts generating 40 tokens each cannot all stay
    small = LLM(
        str(ckpt), max_model_len=128, num_kvcache_blocks=10, max_num_seqs=4, max_num_batched_tokens=64
    )
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=NUM_TOP)
    outs = small.generate([PROMPT] * 4, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    for out in outs:
        _check_against(reference, PROMPT, out.prompt_logprobs)
    small.shutdown()


def test_streamed_engine_output_carries_the_prompt_logprobs(llm, reference):
    engine = llm.engine
    engine.add_request(PROMPT, SCORED, request_id="streamed", incremental=True)
    first = None
    while engine.has_unfinished():
        for out in engine.step():
            first = first or out
    _check_against(reference, PROMPT, first.prompt_logprobs)  # complete from the first output on


@pytest.mark.parametrize("bad", [-1, 21, 1.5, "3"])
def test_invalid_prompt_logprobs_raise(bad):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=bad)
