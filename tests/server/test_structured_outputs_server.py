"""Structured outputs on the server, as vLLM's: OpenAI's response_format (json_object, json_schema),
vLLM's structured_outputs object and its older guided_* fields; parsing alone (no engine), then on the real
server (conftest.py's tiny checkpoint and server) through the official openai client."""

from __future__ import annotations

import json
import re

import openai
import pytest

from nanovllm.sampling_params import StructuredOutputsParams
from nanovllm.server.protocol import RequestError, parse_chat_request, parse_completion_request
from tests.server.helpers import MODEL, _error

MAX_LEN = 256
MESSAGES = [{"role": "user", "content": "Give me a person."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "age"],
}
DATE = r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"


def _chat(**fields) -> StructuredOutputsParams | None:
    return parse_chat_request({"messages": MESSAGES, **fields}, MAX_LEN).params.structured_outputs


def _completion(**fields) -> StructuredOutputsParams | None:
    return parse_completion_request({"prompt": "x", **fields}, MAX_LEN).params.structured_outputs


def _param(fn, **fields) -> str:
    with pytest.raises(RequestError) as e:
        fn(**fields)
    return e.value.param


def test_every_way_of_asking_gives_the_same_params():
    schema_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    assert _chat(response_format=schema_format) == StructuredOutputsParams(json=PERSON)
    assert _completion(response_format=schema_format) == StructuredOutputsParams(json=PERSON)
    assert _chat(response_format={"type": "json_object"}) == StructuredOutputsParams(json_object=True)
    assert _chat(structured_outputs={"json": PERSON}) == StructuredOutputsParams(json=PERSON)
    assert _completion(structured_outputs={"regex": DATE, "json": None}) == StructuredOutputsParams(
        regex=DATE
    )
    assert _completion(guided_regex=DATE) == StructuredOutputsParams(regex=DATE)
    assert _completion(guided_choice=["a", "b"]) == StructuredOutputsParams(choice=["a", "b"])
    assert _chat(guided_json=PERSON, guided_whitespace_pattern=" ?") == StructuredOutputsParams(
        json=PERSON, whitespace_pattern=" ?"
    )
    # asking for nothing
    assert _chat(response_format={"type": "text"}) is None
    assert _chat(structured_outputs={"json": None, "json_object": False}) is None
    assert _chat() is None


def test_bad_requests_name_their_field():
    assert _param(_chat, response_format={"type": "json_schema"}) == "response_format"
    assert _param(_chat, response_format={"type": "json_schema", "json_schema": {"schema": {}, "x": 1}}) == (
        "response_format"
    )
    assert _param(_chat, response_format={"type": "xml"}) == "response_format"
    assert _param(_chat, structured_outputs={"regex": "a", "choice": ["b"]}) == "structured_outputs"
    assert _param(_chat, structured_outputs={"grammar": "root ::= 'a'"}) == "structured_outputs"
    assert _param(_chat, structured_outputs={"nonsense": 1}) == "structured_outputs"
    assert _param(_chat, structured_outputs="a|b") == "structured_outputs"
    assert _param(_completion, guided_choice=[]) == "guided_choice"
    # two places at once: the second is named
    assert _param(_chat, guided_regex="a", response_format={"type": "json_object"}) == "response_format"
    # a beam search cannot follow a constraint
    body = {"use_beam_search": True, "n": 2, "guided_regex": "a"}
    assert _param(_completion, **body) == "guided_regex"


def test_chat_json_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    out = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=64, response_format=fmt
    )
    choice = out.choices[0]
    if choice.finish_reason == "stop":
        person = json.loads(choice.message.content)
        assert set(person) == {"name", "age"} and len(person["name"]) <= 6 and 0 <= person["age"] <= 99
    else:
        assert choice.message.content.startswith('{"name":')


def test_completion_choice_regex_and_sampling(client):
    out = client.completions.create(
        model=MODEL, prompt="Pick:", max_tokens=16, n=3, temperature=1.0, seed=3,
        extra_body={"guided_choice": ["left", "right"]},
    )  # fmt: skip
    assert [c.text in ("left", "right") and c.finish_reason == "stop" for c in out.choices] == [True] * 3
    out = client.completions.create(
        model=MODEL,
        prompt="Date:",
        max_tokens=16,
        temperature=0,
        extra_body={"structured_outputs": {"regex": DATE}},
    )
    assert re.fullmatch(DATE, out.choices[0].text) and out.choices[0].finish_reason == "stop"


def test_streamed_json_object(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=48, stream=True,
        response_format={"type": "json_object"},
    )  # fmt: skip
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.startswith("{")
    if chunks[-1].choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_a_constraint_that_cannot_compile_is_a_400(client):
    for body in (
        {"guided_regex": "(?=x)y"},
        {"structured_outputs": {"json": {"type": "string", "format": "?"}}},
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body=body)
        assert _error(e)["param"] == next(iter(body))  # (the field the request used)
    out = client.completions.create(
        model=MODEL, prompt="x", max_tokens=4, extra_body={"guided_choice": ["ok"]}
    )
    assert out.choices[0].text == "ok"
