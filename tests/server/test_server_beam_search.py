"""use_beam_search on the real server (conftest.py's tiny checkpoint and server): the choices are
the beams `LLM.beam_search` finds on the same checkpoint and prompt, best first; streaming as vLLM
streams it; the fields a search cannot honour are 400s; an ordinary request runs beside a search."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from nanovllm import LLM, BeamSearchParams
from nanovllm.beam_search import shown_tokens
from tests.server.helpers import EOS, MODEL, _error, _metric, _metrics, _wait_until_idle

PROMPT = [11, 12, 13, 14, 15]
MESSAGES = [{"role": "user", "content": "Tell me about beams."}]
WIDTH, MAX_TOKENS = 3, 6
BEAM = {"use_beam_search": True}


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(str(ckpt), max_model_len=256, kernel_backend="torch")


def _offline(llm, prompt_ids: list[int], width=WIDTH, max_tokens=MAX_TOKENS, **params) -> list[list[int]]:
    """The generated tokens of each offline beam, best first, as the server counts them (a final EOS only
    with include_stop_str_in_output), and its finish and stop reasons."""
    params = BeamSearchParams(width, max_tokens, **params)
    (out,) = llm.beam_search([prompt_ids], params)
    return [
        (shown_tokens(b, params)[len(prompt_ids) :], b.finish_reason, b.stop_reason) for b in out.sequences
    ]


def _expected(llm, prompt_ids: list[int], *args, **params) -> list[tuple]:
    """(text, finish_reason, stop_reason) of each offline beam, best first (special tokens shown)."""
    decode = llm.get_tokenizer().decode
    beams = _offline(llm, prompt_ids, *args, **params)
    return [(decode(tokens, skip_special_tokens=False), *reasons) for tokens, *reasons in beams]


def test_completion_choices_are_the_offline_beams(client, llm):
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, n=WIDTH, max_tokens=MAX_TOKENS, temperature=0, extra_body=BEAM
    )
    assert [(c.text, c.finish_reason, c.stop_reason) for c in out.choices] == _expected(
        llm, PROMPT, temperature=0.0
    )
    assert [c.index for c in out.choices] == list(range(WIDTH))
    assert out.usage.prompt_tokens == len(PROMPT) and out.usage.completion_tokens == WIDTH * MAX_TOKENS
    # a length penalty and ignore_eos reach the search
    body = {**BEAM, "length_penalty": -1.0, "ignore_eos": True}
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, n=WIDTH, max_tokens=MAX_TOKENS, temperature=0, extra_body=body
    )
    expected = _expected(llm, PROMPT, temperature=0.0, length_penalty=-1.0, ignore_eos=True)
    assert [(c.text, c.finish_reason, c.stop_reason) for c in out.choices] == expected


def test_beams_that_end_in_eos(client, llm, eos_prompt):
    """A beam that draws EOS is complete ("stop", the EOS id as stop_reason); as vLLM's server, its EOS is
    in neither its text nor the usage, unless include_stop_str_in_output."""
    for include in (False, True):
        # (length_penalty < 0 favours short beams: the one that ends at once ranks first)
        body = {**BEAM, "include_stop_str_in_output": include, "length_penalty": -1.0}
        out = client.completions.create(
            model=MODEL, prompt=eos_prompt, n=4, max_tokens=3, temperature=0, extra_body=body
        )
        settings = dict(temperature=0.0, length_penalty=-1.0, include_stop_str_in_output=include)
        expected = _expected(llm, eos_prompt, 4, 3, **settings)
        assert [(c.text, c.finish_reason, c.stop_reason) for c in out.choices] == expected
        assert (out.choices[0].finish_reason, out.choices[0].stop_reason) == ("stop", EOS)
        assert (out.choices[0].text == "") is not include  # (the EOS's own text, or nothing)
        num_tokens = sum(len(tokens) for tokens, _, _ in _offline(llm, eos_prompt, 4, 3, **settings))
        assert out.usage.completion_tokens == num_tokens


def test_chat_choices_are_the_offline_beams_and_stream_alike(server, client, llm):
    ids = httpx.post(server + "/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    kw = dict(model=MODEL, messages=MESSAGES, n=WIDTH, max_tokens=MAX_TOKENS, temperature=0, extra_body=BEAM)
    out = client.chat.completions.create(**kw)
    expected = _expected(llm, ids, temperature=0.0)
    assert [(c.message.content, c.finish_reason, c.stop_reason) for c in out.choices] == expected
    assert all(c.message.role == "assistant" for c in out.choices)
    assert out.usage.prompt_tokens == len(ids)
    # streamed (vLLM's: the search runs whole, then each choice's text comes as one chunk)
    texts, reasons, usage = [""] * WIDTH, [None] * WIDTH, None
    for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
        usage = chunk.usage or usage
    assert list(zip(texts, reasons)) == [(text, reason) for text, reason, _ in expected]
    assert usage == out.usage


def test_logprobs_are_each_beams_steps(client, llm):
    """As vLLM's: each choice's logprobs are its beam's, per shown token, with the step's best alternatives
    (at most 2n), for completions and chat alike."""
    params = BeamSearchParams(WIDTH, MAX_TOKENS, temperature=0.0)
    (offline,) = llm.beam_search([PROMPT], params)
    kw = dict(model=MODEL, n=WIDTH, max_tokens=MAX_TOKENS, temperature=0, extra_body=BEAM)
    out = client.completions.create(prompt=PROMPT, logprobs=2 * WIDTH, **kw)
    for choice, beam in zip(out.choices, offline.sequences):
        shown = shown_tokens(beam, params)[len(PROMPT) :]
        expected = [lp.logprob for lp in beam.logprobs[: len(shown)]]
        assert choice.logprobs.token_logprobs == pytest.approx(expected, abs=1e-4)
        assert all(len(top) <= 2 * WIDTH for top in choice.logprobs.top_logprobs)
    chat = client.chat.completions.create(messages=MESSAGES, logprobs=True, top_logprobs=2, **kw)
    assert sum(len(c.logprobs.content) for c in chat.choices) == chat.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 for c in chat.choices for entry in c.logprobs.content)


def test_completion_stream_is_the_response_in_one_event(client):
    kw = dict(model=MODEL, prompt=[PROMPT, PROMPT[:3]], n=2, max_tokens=4, temperature=0, extra_body=BEAM)
    out = client.completions.create(**kw)
    assert len(out.choices) == 4  # (n beams per prompt, prompt by prompt)
    chunks = list(client.completions.create(**kw, stream=True))
    assert len(chunks) == 1 and [c.text for c in chunks[0].choices] == [c.text for c in out.choices]
    assert chunks[0].usage == out.usage


@pytest.mark.parametrize(
    "body, param",
    [
        ({**BEAM, "top_p": 0.5}, "top_p"),
        ({**BEAM, "stop": ["x"]}, "stop"),
        ({**BEAM, "logprobs": 3}, "logprobs"),  # (n=1: a step keeps 2 alternatives)
        ({**BEAM, "seed": 1}, "seed"),
        ({**BEAM, "n": 11}, "n"),  # the beam width: at most 10
        ({**BEAM, "max_tokens": 300}, "max_tokens"),
        ({"length_penalty": 0.5}, "length_penalty"),  # without the search it means nothing
    ],
)
def test_refused_fields_are_400s_naming_them(client, body, param):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **body}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            **{k: body.pop(k) for k in ("model", "prompt", "max_tokens")}, extra_body=body
        )
    assert _error(e)["param"] == param and param in _error(e)["message"]


def test_an_ordinary_request_runs_beside_a_search(server, client):
    """A long search (many steps, each a round trip to the engine) leaves the event loop and the engine
    free: a request sent once the search runs is answered before the search ends. (16 prompts x 4 beams:
    each step is a batch of 64, so the search lasts long enough for /metrics to show it running.)"""
    finished = {}
    prompts = [[11 + k, 12, 13, 14, 15] for k in range(16)]

    def search():
        body = {"model": MODEL, "prompt": prompts, "n": 4, "max_tokens": 240, "temperature": 0, **BEAM}
        body["ignore_eos"] = True
        r = httpx.post(server + "/v1/completions", json=body, timeout=120)
        finished["search"] = time.monotonic()
        finished["choices"] = r.json()["choices"]

    thread = threading.Thread(target=search)
    thread.start()
    deadline = time.monotonic() + 30
    while _metric(_metrics(server), "num_requests_running") == 0:  # (the search's steps are running)
        assert time.monotonic() < deadline and "search" not in finished, finished
        time.sleep(0.01)
    plain = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=3, extra_body={"ignore_eos": True}
    )
    plain_done = time.monotonic()
    thread.join()
    assert plain.usage.completion_tokens == 3
    assert len(finished["choices"]) == 64 and all(c["finish_reason"] == "length" for c in finished["choices"])
    assert plain_done < finished["search"], json.dumps(finished)[:300]
    _wait_until_idle(server)


def test_metrics_count_the_search_as_the_request_the_client_sent(server, client):
    """/metrics sees one request per choice, as for an ordinary request with n choices, with the choices'
    prompt and generated tokens; the search's one-token steps count nowhere."""
    counted = ("prompt_tokens_total", "generation_tokens_total", "e2e_request_latency_seconds_count")
    finished = 'finished_reason="length"'

    def snapshot() -> list[float]:
        samples = _wait_until_idle(server)
        return [_metric(samples, name) for name in counted] + [
            _metric(samples, "request_success_total", finished),
            _metric(samples, "time_per_output_token_seconds_count"),
        ]

    before = snapshot()
    body = {**BEAM, "ignore_eos": True}  # (every beam runs max_tokens steps: "length")
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, n=WIDTH, max_tokens=MAX_TOKENS, temperature=0, extra_body=body
    )
    after = snapshot()
    assert len(out.choices) == WIDTH
    expected = [WIDTH * len(PROMPT), WIDTH * MAX_TOKENS, WIDTH, WIDTH, 0]
    assert [b - a for a, b in zip(before, after)] == expected
