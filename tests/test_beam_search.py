"""LLM.beam_search (vLLM's offline beam search) against a beam search written here on transformers' own
logits for the same weights: the same beams, scores and finish reasons, with and without EOS, for several
widths and length penalties; width 1 is greedy; bad settings raise; the engine is left clean."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch

from nanovllm import LLM, BeamSearchOutput, BeamSearchParams, SamplingParams
from tests.checkpoints import load_hf_model

SHORT_PROMPT = [7, 8]  # (short: the length penalty, which counts the prompt, reorders its beams)
TOKENS_PROMPT = list(range(100, 120))  # 20 tokens: a full 16-token block, which the prefix cache serves
TEXT_PROMPT = "Hello there, beams"
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def hf(ckpt):
    return load_hf_model(ckpt)


@pytest.fixture(scope="module")
def eos_token_id(hf):
    """A token the model finds likely after SHORT_PROMPT (its second best first token), made the EOS so
    that beams end early (the checkpoint's own EOS, 2, is too unlikely to come up in a few tokens)."""
    return int(_next_logprobs(hf, SHORT_PROMPT).topk(2).indices[1])


@pytest.fixture(scope="module")
def llm(ckpt, tmp_path_factory, eos_token_id):
    path = tmp_path_factory.mktemp("eos") / "ckpt"
    shutil.copytree(ckpt, path)
    for name in ("config.json", "generation_config.json"):
        if (path / name).exists():
            config = json.loads((path / name).read_text())
            config["eos_token_id"] = eos_token_id
            (path / name).write_text(json.dumps(config))
    llm = LLM(str(path), max_model_len=64)
    # (the tokenizer's EOS, 2, stays the main one; this one ends a beam as well: every EOS id does)
    assert llm.config.eos_token_ids == (2, eos_token_id)
    return llm


@torch.no_grad()
def _next_logprobs(hf, tokens: list[int]) -> torch.Tensor:
    # [vocab_size]: fp32 log-softmax over the full vocabulary at the last position
    return hf(torch.tensor([tokens])).logits[0, -1].float().log_softmax(-1)


def reference_beam_search(
    hf, prompt: list[int], params: BeamSearchParams, eos: tuple[int, ...]
) -> list[tuple]:
    """vLLM's algorithm, from scratch at temperature 0: each step extends each live beam by its 2 * width
    most likely tokens; those ending in EOS are complete, the best `width` others by score live on; the
    result is the best `width` of complete + live. Returns (tokens, cum_logprob, finish_reason) per beam."""
    width = params.beam_width

    def score(beam):
        tokens, cum, _ = beam
        length = len(tokens) - 1 if tokens[-1] in eos else len(tokens)
        return cum / length**params.length_penalty

    live, complete = [(list(prompt), 0.0, "length")], []
    for _ in range(params.max_tokens):
        candidates = []
        for tokens, cum, _ in live:
            top = _next_logprobs(hf, tokens).topk(2 * width)
            for token, logprob in zip(top.indices.tolist(), top.values.tolist()):
                if token in eos and not params.ignore_eos:
                    complete.append((tokens + [token], cum + logprob, "stop"))
                else:
                    candidates.append((tokens + [token], cum + logprob, "length"))
        live = sorted(candidates, key=score, reverse=True)[:width]
    return sorted(complete + live, key=score, reverse=True)[:width]


CASES = [  # (beam_width, ignore_eos, length_penalty)
    (1, False, 1.0),
    (2, False, 1.0),
    (4, False, 1.0),
    (1, True, 1.0),
    (4, True, 1.0),
    (4, False, 0.0),
    (2, False, 2.0),
    (4, True, -1.0),
]


@pytest.mark.parametrize("beam_width,ignore_eos,length_penalty", CASES)
def test_beams_match_a_reference_on_transformers_logits(llm, hf, beam_width, ignore_eos, length_penalty):
    params = BeamSearchParams(beam_width, MAX_TOKENS, ignore_eos=ignore_eos, length_penalty=length_penalty)
    outs = llm.beam_search([SHORT_PROMPT, {"prompt_token_ids": TOKENS_PROMPT}], params)
    for prompt, out in zip((SHORT_PROMPT, TOKENS_PROMPT), outs):
        assert isinstance(out, BeamSearchOutput)
        expected = reference_beam_search(hf, prompt, params, llm.config.eos_token_ids)
        assert [b.tokens for b in out.sequences] == [tokens for tokens, _, _ in expected]
        assert [b.cum_logprob for b in out.sequences] == pytest.approx([c for _, c, _ in expected], abs=1e-4)
        assert [b.finish_reason for b in out.sequences] == [reason for _, _, reason in expected]
        for beam in out.sequences:
            num_generated = len(beam.tokens) - len(prompt)
            assert beam.tokens[: len(prompt)] == prompt and 1 <= num_generated <= MAX_TOKENS
            assert [lp.token_id for lp in beam.logprobs] == beam.tokens[len(prompt) :]
            assert sum(lp.logprob for lp in beam.logprobs) == pytest.approx(beam.cum_logprob, abs=1e-5)
            assert all(len(lp.top_logprobs) == 2 * beam_width for lp in beam.logprobs)
            assert beam.stop_reason == (beam.tokens[-1] if beam.finish_reason == "stop" else None)
            shown = beam.tokens[:-1] if beam.finish_reason == "stop" else beam.tokens
            assert beam.text == llm.engine.decode(shown, skip_special_tokens=False)


def test_the_cases_cover_beams_ending_in_eos_and_a_reordering_length_penalty(hf, eos_token_id):
    """(So that the parity test above proves something about EOS and length_penalty.)"""
    runs = [
        reference_beam_search(
            hf, SHORT_PROMPT, BeamSearchParams(4, MAX_TOKENS, length_penalty=lp), (eos_token_id,)
        )
        for lp in (0.0, 1.0, 2.0)
    ]
    assert sum(reason == "stop" for _, _, reason in runs[0]) >= 2  # (ended at different lengths)
    assert len({tuple(tuple(tokens) for tokens, _, _ in run) for run in runs}) == 3


def test_width_one_is_greedy_generate(llm):
    (beam,) = llm.beam_search([TOKENS_PROMPT], BeamSearchParams(1, 6, ignore_eos=True))[0].sequences
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    (out,) = llm.generate([TOKENS_PROMPT], greedy, use_tqdm=False)
    assert beam.tokens == TOKENS_PROMPT + out.outputs[0].token_ids
    assert beam.cum_logprob == pytest.approx(out.outputs[0].cumulative_logprob, abs=1e-5)


def test_include_stop_str_in_output_shows_the_eos_text(llm):
    params = BeamSearchParams(4, MAX_TOKENS, include_stop_str_in_output=True)
    (out,) = llm.beam_search([SHORT_PROMPT], params)
    assert any(b.finish_reason == "stop" for b in out.sequences)
    for beam in out.sequences:
        assert beam.text == llm.engine.decode(beam.tokens, skip_special_tokens=False)


def test_a_text_prompt_is_encoded_as_generate_encodes_it(llm):
    (out,) = llm.beam_search(TEXT_PROMPT, BeamSearchParams(2, 2))
    prompt = llm.engine.encode_prompt(TEXT_PROMPT, SamplingParams())
    assert all(beam.tokens[: len(prompt)] == prompt for beam in out.sequences)
    assert all(beam.text.startswith(TEXT_PROMPT) for beam in out.sequences)


def test_concurrency_limit_gives_the_same_beams(llm):
    params = BeamSearchParams(2, 3)
    prompts = [TOKENS_PROMPT, TEXT_PROMPT, [7, 8, 9]]
    together = llm.beam_search(prompts, params)
    one_by_one = llm.beam_search(prompts, params, concurrency_limit=1)
    assert [[b.tokens for b in o.sequences] for o in together] == [
        [b.tokens for b in o.sequences] for o in one_by_one
    ]
    assert llm.beam_search([], params) == []


def test_steps_reuse_the_cached_prefix_and_leave_the_engine_clean(llm):
    engine, bm = llm.engine, llm.engine.scheduler.block_manager
    hits = bm.num_hit_tokens
    llm.beam_search([TOKENS_PROMPT + [5, 6, 7, 8, 9]], BeamSearchParams(4, MAX_TOKENS))
    assert bm.num_hit_tokens - hits >= 16 * 4 * (MAX_TOKENS - 1)  # each beam of each step after the first
    assert not engine.has_unfinished() and engine.requests == {}
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_consistency()


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(beam_width=0), "beam_width must be an int in [1, 10], got 0"),
        (dict(beam_width=11), "beam_width must be an int in [1, 10], got 11"),
        (dict(beam_width=2.0), "beam_width"),
        (dict(beam_width=True), "beam_width"),
        (dict(max_tokens=0), "max_tokens must be an int >= 1, got 0"),
        (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
        (dict(length_penalty=math.nan), "length_penalty must be a finite number"),
        (dict(length_penalty=math.inf), "length_penalty"),
        (dict(ignore_eos="yes"), "ignore_eos must be a bool"),
        (dict(include_stop_str_in_output=1), "include_stop_str_in_output must be a bool"),
    ],
)
def test_bad_params_raise(changes, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, **changes})


def test_bad_calls_raise_and_leave_the_engine_usable(llm):
    params = BeamSearchParams(2, 3)
    before = llm.beam_search([TOKENS_PROMPT], params)[0].sequences
    with pytest.raises(TypeError, match="params must be a BeamSearchParams, got SamplingParams"):
        llm.beam_search([TOKENS_PROMPT], SamplingParams())
    with pytest.raises(ValueError, match="concurrency_limit must be None or an int >= 1, got 0"):
        llm.beam_search([TOKENS_PROMPT], params, concurrency_limit=0)
    with pytest.raises(ValueError, match="prompt 1: .*exceeds max_model_len=64"):
        llm.beam_search([TOKENS_PROMPT, list(range(3, 65))], params)
    with pytest.raises(ValueError, match="prompt 0: prompt is empty"):
        llm.beam_search([[]], params)
    bm = llm.engine.scheduler.block_manager
    assert llm.engine.requests == {} and bm.num_free_blocks == bm.num_blocks
    after = llm.beam_search([TOKENS_PROMPT], params)[0].sequences
    assert [b.tokens for b in after] == [b.tokens for b in before]
