"""Request parsing and validation (no engine), and the app's answers that need no engine."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import pytest
from transformers import AutoTokenizer

import nanovllm
from nanovllm.config import PRESET_DIR, Config
from nanovllm.sampling_params import derive_seed
from nanovllm.server.api_server import build_app
from nanovllm.server.metrics import Metrics
from nanovllm.server.protocol import (
    RequestError,
    parse_chat_request,
    parse_completion_request,
)

MAX_LEN = 256


def _err(fn, body) -> RequestError:
    with pytest.raises(RequestError) as e:
        fn(body, MAX_LEN)
    return e.value


def test_completion_defaults_and_fields():
    req = parse_completion_request({"model": "m", "prompt": "hi"}, MAX_LEN)
    assert req.prompts == ["hi"] and req.params.n == 1 and not req.stream and req.logprobs is None
    assert req.params.max_tokens == 16 and req.params.temperature == 1.0 and not req.fill_max_tokens
    body = {
        "prompt": [1, 2],
        "max_tokens": 5,
        "temperature": 0.5,  # (not greedy: that resets top_p, top_k and min_p, as vLLM)
        "top_p": 0.5,
        "seed": 3,
        "stop": "x",
        "presence_penalty": 1,
        "frequency_penalty": -1,
        "logprobs": 2,
        "top_k": 4,
        "min_p": 0.1,
        "repetition_penalty": 1.2,
        "ignore_eos": True,
        "min_tokens": 2,
        "stop_token_ids": [7],
        "skip_special_tokens": False,
        "include_stop_str_in_output": True,
    }
    p = parse_completion_request(body, MAX_LEN).params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop, p.logprobs) == (5, 0.5, 0.5, 3, ["x"], 2)
    assert (p.presence_penalty, p.frequency_penalty, p.top_k, p.min_p) == (1, -1, 4, 0.1)
    assert (p.repetition_penalty, p.ignore_eos, p.min_tokens, p.stop_token_ids) == (1.2, True, 2, [7])
    assert (p.skip_special_tokens, p.include_stop_str_in_output) == (False, True)


@pytest.mark.parametrize(
    "prompt, expected",
    [("a", ["a"]), ([1, 2], [[1, 2]]), (["a", "b"], ["a", "b"]), ([[1], [2, 3]], [[1], [2, 3]])],
)
def test_prompt_forms(prompt, expected):
    assert parse_completion_request({"prompt": prompt}, MAX_LEN).prompts == expected


@pytest.mark.parametrize("prompt", [None, [], [[]], [1, "a"], 5, {"a": 1}, [True, 1]])
def test_bad_prompts(prompt):
    assert _err(parse_completion_request, {"prompt": prompt}).param == "prompt"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"echo": "yes"}, "echo"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "s"}, "suffix"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": [1]}, "logit_bias"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"bad_words": "word"}, "bad_words"),
        ({"whatever": 1}, "whatever"),
        ({"n": 2, "best_of": 1}, "best_of"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"n": 1000}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": {"every_chunk": True}}, "stream_options.every_chunk"),
        (
            {"stream": True, "stream_options": {"continuous_usage_stats": 1}},
            "stream_options.continuous_usage_stats",
        ),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"seed": 1.5}, "seed"),
        ({"seed": 2**63}, "seed"),  # vLLM's protocol: a seed is a 64-bit signed int
        ({"seed": -(2**63) - 1}, "seed"),
        ({"temperature": float("inf")}, "temperature"),  # JSON's Infinity, which Python's json reads
        ({"temperature": 10**400}, "temperature"),  # an integer too large for a float: not finite either
        ({"repetition_penalty": 10**400}, "repetition_penalty"),
    ],
)
def test_completion_rejects(extra, param):
    e = _err(parse_completion_request, {"prompt": "x", **extra})
    assert e.param == param and e.status_code == 400 and param.split(".")[-1] in e.message


def test_max_tokens_past_the_context_names_the_field():
    """vLLM's TokenizeParams: an output limit larger than the whole context is the limit's fault, whatever
    the prompt."""
    e = _err(parse_completion_request, {"prompt": "x", "max_tokens": MAX_LEN + 1})
    assert e.param == "max_tokens" and f"max_model_len={MAX_LEN}" in e.message
    msgs = [{"role": "user", "content": "x"}]
    e = _err(parse_chat_request, {"messages": msgs, "max_completion_tokens": MAX_LEN + 1})
    assert e.param == "max_completion_tokens" and e.message.startswith("max_completion_tokens")
    assert parse_chat_request({"messages": msgs, "max_tokens": MAX_LEN}, MAX_LEN).params.max_tokens == MAX_LEN


def test_missing_sampling_fields_take_the_generation_config_defaults():
    # vLLM's server fills what a request leaves out from the checkpoint's generation_config.json (Qwen3:
    # temperature 0.6, top_k 20, top_p 0.95); what the request gives wins. A chat request's missing
    # max_tokens is its max_new_tokens (at most what the prompt leaves: fill); completions keep OpenAI's 16.
    defaults = {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "max_tokens": 7}
    chat = parse_chat_request({"messages": [{"role": "user", "content": "x"}]}, MAX_LEN, defaults)
    assert (chat.params.temperature, chat.params.top_k, chat.params.top_p) == (0.6, 20, 0.95)
    assert chat.fill_max_tokens and chat.params.max_tokens == 7
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 9}
    given = parse_chat_request(body, MAX_LEN, defaults)
    assert given.params.max_tokens == 9 and not given.fill_max_tokens  # a default, not a cap
    body = {"prompt": "x", "temperature": 0.5, "top_k": -1}
    req = parse_completion_request(body, MAX_LEN, defaults)
    assert (req.params.temperature, req.params.top_k, req.params.top_p, req.params.max_tokens) == (
        0.5,
        -1,
        0.95,
        16,
    )
    assert parse_completion_request({"prompt": "x"}, MAX_LEN).params.temperature == 1.0  # no file: vLLM's


def test_max_tokens_cap_lowers_what_a_request_gives():
    # generation_config=<folder> (vLLM's override_max_tokens): its max_new_tokens caps every request's
    msgs, defaults = [{"role": "user", "content": "x"}], {"max_tokens": 7}
    chat = lambda n: parse_chat_request({"messages": msgs, "max_tokens": n}, MAX_LEN, defaults, 7)  # noqa: E731
    assert chat(9).params.max_tokens == 7 and chat(5).params.max_tokens == 5
    assert parse_completion_request({"prompt": "x"}, MAX_LEN, defaults, 7).params.max_tokens == 7  # 16 -> 7
    # what no prompt can hold is still the request's mistake, and a min_tokens above the cap is min_tokens'
    assert _err_cap({"prompt": "x", "max_tokens": MAX_LEN + 1}).param == "max_tokens"
    assert _err_cap({"prompt": "x", "max_tokens": 9, "min_tokens": 8}).param == "min_tokens"


def _err_cap(body) -> RequestError:
    with pytest.raises(RequestError) as e:
        parse_completion_request(body, MAX_LEN, {"max_tokens": 7}, 7)
    return e.value


def test_config_max_tokens_cap_is_a_generation_config_folders_max_new_tokens(tmp_path):
    shutil.copy(PRESET_DIR / "qwen3-tiny.json", tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    data.pop("_comment", None)
    (tmp_path / "config.json").write_text(json.dumps(data))
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7, "temperature": 0.5}))
    auto = Config(str(tmp_path), device="cpu")
    assert auto.default_sampling_params["max_tokens"] == 7 and auto.max_tokens_cap is None  # a default only
    folder = Config(str(tmp_path), device="cpu", generation_config=str(tmp_path))
    assert folder.max_tokens_cap == 7
    assert Config(str(tmp_path), device="cpu", generation_config="vllm").max_tokens_cap is None


def test_stream_options():
    def parse(options):
        req = parse_completion_request({"prompt": "x", "stream": True, "stream_options": options}, MAX_LEN)
        return req.include_usage, req.continuous_usage

    assert parse({"include_usage": True}) == (True, False)
    assert parse({"include_usage": True, "continuous_usage_stats": True}) == (True, True)
    assert parse({"continuous_usage_stats": True}) == (False, False)  # vLLM's: only with include_usage
    assert parse({"include_usage": None, "continuous_usage_stats": False}) == (False, False)
    # An empty object asks for nothing: vLLM accepts it without stream too (some clients always send it).
    req = parse_completion_request({"prompt": "x", "stream_options": {}}, MAX_LEN)
    assert (req.stream, req.include_usage, req.continuous_usage) == (False, False, False)


def test_echo_and_prompt_logprobs():
    req = parse_completion_request({"prompt": "x", "echo": True}, MAX_LEN)
    assert req.echo and req.params.prompt_logprobs is None  # echo alone needs no scoring
    req = parse_completion_request({"prompt": "x", "echo": True, "logprobs": 2}, MAX_LEN)
    assert req.params.prompt_logprobs == 2 and req.prompt_logprobs is None  # scored for echo, not shown
    req = parse_completion_request(
        {"prompt": "x", "echo": True, "logprobs": 1, "prompt_logprobs": 4}, MAX_LEN
    )
    assert (req.params.prompt_logprobs, req.prompt_logprobs) == (4, 4)
    req = parse_completion_request({"prompt": "x", "n": 3, "seed": 1, "prompt_logprobs": 0}, MAX_LEN)
    # choice 0 scores the prompt, for every choice of it (the server shares them)
    assert [req.params.choice(i).prompt_logprobs for i in range(3)] == [0, None, None]
    assert parse_completion_request({"prompt": "x", "echo": True, "max_tokens": 0}, MAX_LEN).prompt_only
    assert _err(parse_completion_request, {"prompt": "x", "max_tokens": 0}).param == "max_tokens"  # no echo
    chat = parse_chat_request({"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 2}, MAX_LEN)
    assert chat.prompt_logprobs == chat.params.prompt_logprobs == 2


def test_neutral_values_accepted():
    parse_completion_request(
        {"prompt": "x", "echo": False, "best_of": 1, "suffix": None, "logit_bias": {}, "user": "u"}, MAX_LEN
    )
    # vLLM's extra fields at their defaults (a client built for vLLM may send them all)
    parse_completion_request({"prompt": "x", "add_special_tokens": True, "use_beam_search": False}, MAX_LEN)
    msgs = [{"role": "user", "content": "x"}]
    parse_chat_request(
        {"messages": msgs, "echo": False, "add_special_tokens": False, "use_beam_search": False}, MAX_LEN
    )
    body = {"prompt": "x", "add_special_tokens": False}
    assert _err(parse_completion_request, body).param == "add_special_tokens"
    assert (
        _err(parse_chat_request, {"messages": msgs, "add_special_tokens": True}).param == "add_special_tokens"
    )
    parse_chat_request(
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [],
            "tool_choice": "none",
            "response_format": {"type": "text"},
            "logit_bias": None,
            "parallel_tool_calls": None,
        },
        MAX_LEN,
    )


def test_chat_fields():
    msgs = [
        {"role": "system", "content": "s"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            "name": "bob",
        },
    ]
    req = parse_chat_request({"messages": msgs, "logprobs": True, "top_logprobs": 3}, MAX_LEN)
    assert req.messages[1] == {"role": "user", "content": "a\nb", "name": "bob"}  # (vLLM's join)
    assert req.logprobs == 3 and req.params.logprobs == 3
    assert req.fill_max_tokens and req.params.max_tokens == MAX_LEN
    assert parse_chat_request({"messages": msgs, "logprobs": True}, MAX_LEN).logprobs == 0
    assert parse_chat_request({"messages": msgs, "max_completion_tokens": 7}, MAX_LEN).params.max_tokens == 7
    e = _err(parse_chat_request, {"messages": msgs, "max_completion_tokens": -1})
    assert e.param == "max_completion_tokens" and e.message.startswith("max_completion_tokens")
    e = _err(parse_chat_request, {"messages": msgs, "logprobs": True, "top_logprobs": 30})
    assert e.param == "top_logprobs" and e.message.startswith("top_logprobs")
    # top_logprobs 0 asks for nothing: accepted without logprobs, as vLLM's check_logprobs does
    for off in ({}, {"logprobs": False}):
        assert parse_chat_request({"messages": msgs, "top_logprobs": 0, **off}, MAX_LEN).logprobs is None


@pytest.mark.parametrize(
    "messages, param",
    [
        (None, "messages"),
        ([], "messages"),
        (["hi"], "messages[0]"),
        ([{"role": "bot", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0]"),
        ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls"),
    ],
)
def test_bad_messages(messages, param):
    assert _err(parse_chat_request, {"messages": messages}).param == param


def test_a_reply_dumped_by_the_openai_client_goes_back_in():
    # `messages.append(reply.model_dump())` (openai-python) carries the fields it does not use as None: they
    # are left out, not rejected.
    reply = {"role": "assistant", "content": "4", "refusal": None, "annotations": None, "audio": None,
             "function_call": None, "tool_calls": None}  # fmt: skip
    req = parse_chat_request({"messages": [{"role": "user", "content": "2+2?"}, reply]}, MAX_LEN)
    assert req.messages[1] == {"role": "assistant", "content": "4"}


def test_chat_rejects():
    msgs = [{"role": "user", "content": "x"}]
    for extra, param in [
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"logprobs": 1}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"echo": True}, "echo"),
    ]:
        assert _err(parse_chat_request, {"messages": msgs, **extra}).param == param


def test_chat_template_fields():
    msgs = [{"role": "user", "content": "x"}]
    assert parse_chat_request({"messages": msgs}, MAX_LEN).chat_options == dict(
        add_generation_prompt=True, continue_final_message=False, chat_template_kwargs=None
    )
    body = {
        "messages": msgs,
        "add_generation_prompt": False,
        "continue_final_message": True,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    options = parse_chat_request(body, MAX_LEN).chat_options
    assert options == dict(
        add_generation_prompt=False,
        continue_final_message=True,
        chat_template_kwargs={"enable_thinking": False},
    )
    for extra, param in [
        ({"add_generation_prompt": "yes"}, "add_generation_prompt"),
        ({"continue_final_message": 1}, "continue_final_message"),
        ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
        ({"chat_template": "{{ messages }}"}, "chat_template"),  # a client may not swap the template
    ]:
        assert _err(parse_chat_request, {"messages": msgs, **extra}).param == param


def test_per_choice_seeds():
    req = parse_completion_request({"prompt": "x", "seed": 5, "n": 4}, MAX_LEN)
    seeds = [req.params.choice(i).seed for i in range(4)]
    assert seeds[0] == 5 and len(set(seeds)) == 4
    assert seeds == [req.params.choice(i).seed for i in range(4)] and derive_seed(5, 1) == seeds[1]
    unseeded = parse_completion_request({"prompt": "x", "n": 2}, MAX_LEN)
    assert unseeded.params.choice(1).seed is None


def test_metrics_render():
    m = Metrics('my "model"')
    m.ttft.observe(0.05)
    m.observe_finished("length", 1.0, 0.5, 6)
    text = m.render({"num_running": 2, "kv_cache_usage": 0.25})
    assert 'nanovllm:num_requests_running{model_name="my \\"model\\""} 2' in text
    assert 'nanovllm:time_to_first_token_seconds_bucket{model_name="my \\"model\\"",le="0.06"} 1' in text
    assert 'nanovllm:time_to_first_token_seconds_bucket{model_name="my \\"model\\"",le="0.04"} 0' in text
    assert 'nanovllm:time_per_output_token_seconds_sum{model_name="my \\"model\\""} 0.1' in text
    assert 'finished_reason="length"} 1' in text


def test_metrics_count_a_beam_search_choice_as_a_request():
    """Its tokens add to the engine's (which skips the search's steps); no TTFT or TPOT (not streamed)."""
    m = Metrics("m")
    m.observe_search_choice("stop", 2.0, 5, 4)
    text = m.render({"num_prompt_tokens": 10, "num_generated_tokens": 3})
    assert 'nanovllm:prompt_tokens_total{model_name="m"} 15' in text
    assert 'nanovllm:generation_tokens_total{model_name="m"} 7' in text
    assert 'finished_reason="stop"} 1' in text
    assert 'nanovllm:e2e_request_latency_seconds_count{model_name="m"} 1' in text
    assert 'nanovllm:time_per_output_token_seconds_count{model_name="m"} 0' in text


# ---- the app without a running engine -------------------------------------------------------------


def _engineless_app(path, chat_template: bool, tokenizer: bool = True):
    """The app for the tiny preset (with or without its chat template or tokenizer); its engine is never
    started."""
    shutil.copy(PRESET_DIR / "qwen3-tiny.json", path / "config.json")
    data = json.loads((path / "config.json").read_text())
    data.pop("_comment", None)
    (path / "config.json").write_text(json.dumps(data))
    for f in PRESET_DIR.joinpath("tokenizer").iterdir() if tokenizer else ():
        shutil.copy(f, path / f.name)
    if tokenizer and not chat_template:
        tok_config = json.loads((path / "tokenizer_config.json").read_text())
        tok_config.pop("chat_template")
        (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return build_app(Config(str(path), device="cpu"), "m")


@pytest.fixture(scope="module")
def app_without_template(tmp_path_factory):
    return _engineless_app(tmp_path_factory.mktemp("no-template"), chat_template=False)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return _engineless_app(tmp_path_factory.mktemp("tokenize"), chat_template=True)


def _post(app, url, body):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(url, json=body)

    return asyncio.run(go())


def test_no_chat_template_is_a_400(app_without_template):
    r = _post(
        app_without_template,
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]


def test_bad_words_without_a_tokenizer_is_a_400(tmp_path):
    app = _engineless_app(tmp_path, chat_template=False, tokenizer=False)
    r = _post(app, "/v1/completions", {"prompt": [1, 2, 3], "bad_words": ["x"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "bad_words"


def test_priority_is_parsed_for_both_endpoints():
    assert parse_completion_request({"prompt": "hi"}, MAX_LEN).priority == 0
    assert parse_completion_request({"prompt": "hi", "priority": -3}, MAX_LEN).priority == -3
    assert (
        parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "priority": 2}, MAX_LEN).priority
        == 2
    )
    for bad in (1.5, "1", True):
        e = _err(parse_completion_request, {"prompt": "hi", "priority": bad})
        assert e.param == "priority" and e.status_code == 400


def test_priority_under_fcfs_is_a_400_naming_it(tmp_path):
    """As vLLM's server: a priority other than 0 needs --scheduling-policy priority. (The engine is not
    started: a request that passes the check gets the 503 of a stopped engine.)"""
    app = _engineless_app(tmp_path, chat_template=False)
    r = _post(app, "/v1/completions", {"prompt": "hi", "priority": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
    assert "scheduling_policy" in r.json()["error"]["message"]
    assert _post(app, "/v1/completions", {"prompt": "hi", "priority": 0}).status_code == 503


def test_stopped_engine_is_a_503(app_without_template):
    r = _post(app_without_template, "/v1/completions", {"model": "m", "prompt": "hi"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    assert _post(app_without_template, "/v1/completions", {"model": "x", "prompt": "hi"}).status_code == 404


def test_tokenize_a_prompt_or_a_conversation_and_detokenize(app):
    tok = AutoTokenizer.from_pretrained(PRESET_DIR / "tokenizer")
    r = _post(app, "/tokenize", {"model": "m", "prompt": "def main():", "return_token_strs": True})
    ids = tok.encode("def main():")
    assert r.status_code == 200
    assert r.json() == {
        "count": len(ids),
        "max_model_len": app.state.server.max_model_len,
        "tokens": ids,
        "token_strs": tok.convert_ids_to_tokens(ids),
    }
    msgs = [{"role": "user", "content": "hi"}]
    r = _post(app, "/tokenize", {"messages": msgs, "chat_template_kwargs": {"enable_thinking": False}})
    no_thinking = dict(tokenize=False, add_generation_prompt=True, enable_thinking=False)
    rendered = tok.apply_chat_template(msgs, **no_thinking)
    assert "<think>" in rendered  # the preset's template has Qwen3's enable_thinking switch
    assert r.json()["tokens"] == tok.encode(rendered, add_special_tokens=False)
    assert r.json()["token_strs"] is None
    r = _post(app, "/tokenize", {"messages": msgs, "add_generation_prompt": False})
    assert r.json()["tokens"] == tok.encode(tok.apply_chat_template(msgs, tokenize=False))
    r = _post(app, "/detokenize", {"model": "m", "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": "def main():"}


USER = [{"role": "user", "content": "b"}]
BOTH = {"add_generation_prompt": True, "continue_final_message": True}


@pytest.mark.parametrize(
    "url, body, param",
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
        ("/tokenize", {"prompt": ["a"]}, "prompt"),
        ("/tokenize", {"prompt": "a", "add_generation_prompt": False}, "add_generation_prompt"),
        ("/tokenize", {"prompt": "a", "add_special_tokens": "no"}, "add_special_tokens"),
        ("/tokenize", {"prompt": "a", "truncate": 3}, "truncate"),
        ("/tokenize", {"messages": USER, "continue_final_message": True}, "continue_final_message"),
        ("/tokenize", {"messages": [], "chat_template_kwargs": {"x": 1}}, "messages"),
        ("/tokenize", {"messages": USER, "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
        ("/tokenize", {"messages": USER, "add_generation_prompt": False, "chat_template_kwargs": BOTH},
         "continue_final_message"),  # the kwargs win
        ("/detokenize", {"tokens": "abc"}, "tokens"),
        ("/detokenize", {"tokens": [1, 10**6]}, "tokens"),
        ("/detokenize", {"tokens": [1, True]}, "tokens"),
    ],
)  # fmt: skip
def test_tokenize_and_detokenize_reject(app, url, body, param):
    r = _post(app, url, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.json()


def test_version(app):
    r = asyncio.run(_get(app, "/version"))
    assert r.status_code == 200 and r.json() == {"version": nanovllm.__version__}


async def _get(app, url):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(url)


def test_tokenize_names_an_unknown_model(app):
    assert _post(app, "/tokenize", {"model": "x", "prompt": "a"}).status_code == 404
    assert _post(app, "/detokenize", {"model": "x", "tokens": [1]}).status_code == 404
