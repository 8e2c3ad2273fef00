"""use_beam_search in a request body (no engine): vLLM's to_beam_search_params, and the fields a beam
search cannot honour refused by name."""

from __future__ import annotations

import pytest

from nanovllm.sampling_params import BeamSearchParams
from nanovllm.server.protocol import RequestError, parse_chat_request, parse_completion_request

MAX_LEN = 256
MSGS = [{"role": "user", "content": "x"}]


def _complete(**body):
    return parse_completion_request({"prompt": "x", "use_beam_search": True, **body}, MAX_LEN)


def _chat(**body):
    return parse_chat_request(
        {"messages": MSGS, "use_beam_search": True, **body}, MAX_LEN, {"max_tokens": 32}
    )


def _param(fn, **body) -> str:
    with pytest.raises(RequestError) as e:
        fn(**body)
    assert e.value.status_code == 400 and e.value.param in e.value.message
    return e.value.param


def test_beam_search_params_as_vllm_builds_them():
    req = _complete(n=3, max_tokens=7, temperature=0, length_penalty=0.5, ignore_eos=True)
    assert req.beam_search == BeamSearchParams(3, 7, ignore_eos=True, temperature=0.0, length_penalty=0.5)
    assert req.params.n == 3
    # vLLM's defaults: a completion's 16 tokens, the temperature of the checkpoint's generation config or 1
    assert _complete().beam_search == BeamSearchParams(1, 16, temperature=1.0)
    req = parse_completion_request({"prompt": "x", "use_beam_search": True}, MAX_LEN, {"temperature": 0.6})
    assert req.beam_search.temperature == 0.6
    chat = _chat(n=2, include_stop_str_in_output=True)
    assert chat.beam_search == BeamSearchParams(2, 32, temperature=1.0, include_stop_str_in_output=True)
    assert chat.fill_max_tokens  # (lowered to what the prompt leaves, once it is known)
    assert _chat(max_completion_tokens=5).beam_search.max_tokens == 5


def test_without_beam_search_there_is_none():
    assert parse_completion_request({"prompt": "x", "use_beam_search": False}, MAX_LEN).beam_search is None
    assert parse_completion_request({"prompt": "x", "length_penalty": 1.0}, MAX_LEN).beam_search is None
    # length_penalty means nothing without the search: not silently ignored
    with pytest.raises(RequestError) as e:
        parse_completion_request({"prompt": "x", "length_penalty": 2.0}, MAX_LEN)
    assert e.value.param == "length_penalty"


def test_streaming_and_the_prompts_own_options_are_accepted():
    assert _complete(stream=True, stream_options={"include_usage": True}).stream
    assert _complete(echo=True, truncate_prompt_tokens=4).echo
    assert _chat(stream=True, add_generation_prompt=True, chat_template_kwargs={"a": 1}).stream


@pytest.mark.parametrize(
    "body",
    [
        {"stop": "x"},
        {"top_p": 0.9},
        {"seed": 0},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"logit_bias": {"5": 1}},
        {"top_k": 5},
        {"min_p": 0.1},
        {"repetition_penalty": 1.2},
        {"min_tokens": 2},
        {"stop_token_ids": [5]},
        {"skip_special_tokens": True},
        {"prompt_logprobs": 1},
        {"allowed_token_ids": [5]},
        {"bad_words": ["x"]},
        {"logprobs": 3},  # (n=1: a step keeps 2 alternatives)
    ],
)
def test_fields_a_beam_search_cannot_honour_are_400s(body):
    assert _param(_complete, **body) == next(iter(body))


def test_logprobs_up_to_the_alternatives_a_step_keeps():
    """As vLLM's: each beam's logprobs, with at most the 2n alternatives each step keeps."""
    assert _complete(n=3, logprobs=6).logprobs == 6
    assert _param(_complete, n=3, logprobs=7) == "logprobs"
    assert _chat(n=2, logprobs=True).logprobs == 0
    assert _chat(n=2, logprobs=True, top_logprobs=4).logprobs == 4
    assert _param(_chat, n=2, logprobs=True, top_logprobs=5) == "top_logprobs"
    assert _param(_complete, n=3, logprobs=1, echo=True) == "logprobs"  # (the search scores no prompt)
    _complete(n=3, echo=True)


def test_chat_fields_refused_and_neutral_values_accepted():
    assert _param(_chat, prompt_logprobs=1) == "prompt_logprobs"
    # a client that sends every field at its neutral value is served
    _complete(stop=[], top_p=1, presence_penalty=0, frequency_penalty=0, logit_bias={}, top_k=-1, min_p=0)
    _complete(repetition_penalty=1, min_tokens=0, stop_token_ids=[], skip_special_tokens=False, bad_words=[])
    _chat(logprobs=False, top_logprobs=0)


def test_bad_beam_settings_name_their_field():
    assert _param(_complete, n=11) == "n"  # the beam width: 2 * n logprobs per step, at most 20
    assert _param(_complete, length_penalty=float("inf")) == "length_penalty"
    assert _param(_complete, length_penalty="x") == "length_penalty"
    assert _param(_complete, use_beam_search="yes") == "use_beam_search"
    assert _param(_complete, temperature=-1) == "temperature"
    assert _param(_complete, echo=True, max_tokens=0) == "max_tokens"  # (the prompt alone: nothing to search)
