"""Tool calling on the chat endpoint, as vLLM's server: `tools`, `tool_choice` (none, auto, required, named),
`parallel_tool_calls`, tool calls and results in the conversation. Parsing alone (no engine), the reply's
shapes (server/tools.py), then a real server started with `--enable-auto-tool-choice --tool-call-parser
hermes` through the official openai client. The tiny model's weights are random, so "auto" replies are
steered into a call (or not) by a regex constraint; named and required replies are constrained anyway."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from nanovllm.config import PRESET_DIR
from nanovllm.sampling_params import StructuredOutputsParams
from nanovllm.server.api_server import OpenAIServer, build_app
from nanovllm.server.protocol import RequestError, parse_chat_request, parse_tokenize_request
from nanovllm.server.tool_parsers import TOOL_PARSERS, tool_parser
from nanovllm.server.tools import ToolOutput, ToolRequest
from nanovllm.structured.grammar import constraint_regex
from tests.server.helpers import MODEL, _serve
from tests.server.test_protocol import _engineless_app, _post

MAX_LEN = 256
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
WEATHER_ARGS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_ARGS}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
TOOLS = [WEATHER, CLOCK]
NO_ARGS = {"type": "object", "properties": {}}


def _chat(**fields):
    return parse_chat_request({"messages": MESSAGES, **fields}, MAX_LEN)


def _param(**fields) -> str:
    with pytest.raises(RequestError) as e:
        _chat(**fields)
    return e.value.param


# ---- the request ------------------------------------------------------------------------------------


def test_tool_choice_sets_the_constraint():
    assert _chat().tools is None
    auto = _chat(tools=TOOLS)
    assert (auto.tools.choice, auto.params.structured_outputs) == ("auto", None)
    assert _chat(tools=TOOLS, tool_choice="none").tools.choice == "none"
    assert _chat(tools=TOOLS, tool_choice=None).tools.choice == "none"  # (explicit null: vLLM's "none")
    assert _chat(tool_choice="none").tools is None
    assert _chat(tools=[], tool_choice="required").tools is None  # (vLLM's: "none", as OpenAI's)
    untyped = _chat(tools=TOOLS, tool_choice={"function": {"name": "get_time"}})  # (vLLM fills in the type)
    assert untyped.tools.name == "get_time"

    named = _chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert (named.tools.choice, named.tools.name, named.structured_field) == ("named", "get_weather", "tools")
    assert named.params.structured_outputs == StructuredOutputsParams(json=WEATHER_ARGS)
    clock = _chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert clock.params.structured_outputs == StructuredOutputsParams(json=NO_ARGS)

    required = _chat(tools=TOOLS, tool_choice="required").params.structured_outputs.json
    assert required["type"] == "array" and required["minItems"] == 1 and "maxItems" not in required
    assert required["items"]["anyOf"] == [
        {
            "properties": {"name": {"type": "string", "enum": [name]}, "parameters": args},
            "required": ["name", "parameters"],
        }
        for name, args in (("get_weather", WEATHER_ARGS), ("get_time", NO_ARGS))
    ]
    one = _chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False).params.structured_outputs
    assert one.json["maxItems"] == 1
    # what the template gets: OpenAI's tool objects, without null keys or "strict"
    loose = {"type": "function", "function": {"name": "f", "description": None, "strict": True}}
    assert _chat(tools=[loose]).tools.tools == [{"type": "function", "function": {"name": "f"}}]


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tool_choice": "auto"}, "tool_choice"),  # no tools
        ({"tools": TOOLS, "tool_choice": "any"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tools": {"get_weather": WEATHER}}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "examples": []}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f"}, "cache": True}]}, "tools"),
        ({"tools": [CLOCK, CLOCK]}, "tools"),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        # a constrained choice and another constraint
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"tools": TOOLS, "tool_choice": "required", "use_beam_search": True, "n": 2}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),  # (OpenAI's deprecated form)
    ],
)
def test_bad_tool_requests_name_their_field(fields, param):
    assert _param(**fields) == param


def test_required_moves_each_tools_definitions_to_the_root():
    """A tool's `$ref`s point at its own root; under "required" its schema sits inside the array's, so its
    definitions move to the array's root (as vLLM's), and the constraint compiles."""
    place = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    trip = {"type": "object", "properties": {"to": {"$ref": "#/$defs/Place"}}, "$defs": {"Place": place}}
    tools = [
        {"type": "function", "function": {"name": "book", "parameters": trip}},
        {"type": "function", "function": {"name": "visit", "parameters": trip}},  # (the same definition)
    ]
    schema = _chat(tools=tools, tool_choice="required").params.structured_outputs.json
    assert schema["$defs"] == {"Place": place} and '"$defs":' not in json.dumps(schema["items"])
    assert trip["$defs"] == {"Place": place}  # (the request's own schema is left as it was)
    regex = constraint_regex(StructuredOutputsParams(json=schema))
    assert re.fullmatch(regex, '[{"name": "book", "parameters": {"to": {"city": "Oslo"}}}]')
    clash = {**trip, "$defs": {"Place": {"type": "string"}}}
    tools.append({"type": "function", "function": {"name": "go", "parameters": clash}})
    assert _param(tools=tools, tool_choice="required") == "tools"


def test_messages_carry_tool_calls_and_results():
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "-3"}]},
    ]
    req = parse_chat_request({"messages": messages, "tools": TOOLS}, MAX_LEN)
    assert req.messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                "id": "c1",
            }
        ],
    }
    assert req.messages[2] == {"role": "tool", "tool_call_id": "c1", "content": "-3"}

    def param(message: dict) -> str:
        with pytest.raises(RequestError) as e:
            parse_chat_request({"messages": [*MESSAGES, message]}, MAX_LEN)
        return e.value.param

    assert param({"role": "user", "content": "x", "tool_calls": [call]}) == "messages[1].tool_calls"
    bad_json = {"function": {"name": "f", "arguments": "{city"}}
    assert param({"role": "assistant", "tool_calls": [bad_json]}) == "messages[1].tool_calls[0]"
    not_object = {"function": {"name": "f", "arguments": "[1]"}}
    assert param({"role": "assistant", "tool_calls": [not_object]}) == "messages[1].tool_calls[0]"
    assert param({"role": "assistant", "tool_calls": "f()"}) == "messages[1].tool_calls"
    deep = {"function": {"name": "f", "arguments": "[" * 100_000}}  # (RecursionError, not a 500)
    assert param({"role": "assistant", "tool_calls": [deep]}) == "messages[1].tool_calls[0]"
    half = {"function": {"name": "f", "arguments": '{"a": "\\ud83d"}'}}  # (half an emoji, escaped)
    assert param({"role": "assistant", "tool_calls": [half]}) == "messages[1].tool_calls[0]"
    assert param({"role": "tool", "content": "1", "tool_call_id": 7}) == "messages[1].tool_call_id"
    assert param({"role": "assistant"}) == "messages[1].content"  # (no calls: content is required)


# ---- the reply --------------------------------------------------------------------------------------


def _request(choice: str, name: str | None = None, parallel: bool = True) -> ToolRequest:
    return ToolRequest(TOOLS, choice, name, parallel)


def _calls(message: dict) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]


def test_replies_as_openai_messages():
    args = '{"city": "Oslo", "unit": "c"}'
    message, reason = ToolOutput(_request("named", "get_weather"), None).message(args, "stop")
    assert (message["content"], _calls(message), reason) == (None, [("get_weather", args)], "stop")
    assert message["tool_calls"][0]["id"].startswith("chatcmpl-tool-")
    assert message["tool_calls"][0]["type"] == "function"

    two = '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Rome"}}]'
    message, reason = ToolOutput(_request("required"), None).message(two, "stop")
    assert (
        _calls(message) == [("get_time", "{}"), ("get_weather", '{"city": "Rome"}')]
        and reason == "tool_calls"
    )
    ids = [c["id"] for c in message["tool_calls"]]
    assert len(set(ids)) == 2
    _, reason = ToolOutput(_request("required"), None).message(two[:-1], "length")  # cut short
    assert reason == "length"

    hermes = 'Checking.<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    message, reason = ToolOutput(_request("auto"), tool_parser("hermes")).message(hermes * 2, "stop")
    assert (message["content"], _calls(message), reason) == (
        "Checking.",
        [("get_time", "{}")] * 2,
        "tool_calls",
    )
    message, _ = ToolOutput(_request("auto", parallel=False), tool_parser("hermes")).message(
        hermes * 2, "stop"
    )
    assert _calls(message) == [("get_time", "{}")]
    message, reason = ToolOutput(_request("auto"), tool_parser("hermes")).message("Sunny.", "stop")
    assert (message, reason) == ({"content": "Sunny."}, "stop")
    # "required" cut by a stop string before any call: no calls, so not "tool_calls"
    cut = '[{"name": "get_time", "para'
    message, reason = ToolOutput(_request("required"), None).message(cut, "stop")
    assert (message, reason) == ({"content": None}, "stop")  # (JSON for calls is no reply)
    deltas, reason = _streamed(ToolOutput(_request("required"), None), [cut], "stop")
    assert (deltas, reason) == ([{"content": ""}], "stop")
    # a named call with no arguments generated (a thinking model cut short): no call to show
    assert ToolOutput(_request("named", "get_time"), None).message(None, "length") == (
        {"content": None},
        "length",
    )
    # the mistral parser's ids: 9 letters and digits, which Mistral's templates demand back
    output = ToolOutput(_request("auto"), tool_parser("mistral"), TOOL_PARSERS["mistral"].call_id)
    message, _ = output.message('[TOOL_CALLS][{"name": "get_time", "arguments": {}}]', "stop")
    assert re.fullmatch("[A-Za-z0-9]{9}", message["tool_calls"][0]["id"])
    with pytest.raises(ValueError):
        ToolOutput(_request("auto"), None)


def test_the_servers_parser_reads_the_requests_tools():
    """qwen3_coder types its values from the request's schemas: the server hands each choice's parser them."""
    server = SimpleNamespace(tool_call_parser="qwen3_coder")
    days = {"type": "object", "properties": {"days": {"type": "integer"}}}
    tools = ToolRequest([{"type": "function", "function": {"name": "forecast", "parameters": days}}], "auto")
    output = OpenAIServer._tool_output(server, SimpleNamespace(tools=tools))
    xml = "<tool_call>\n<function=forecast>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
    message, reason = output.message(xml, "stop")
    assert (_calls(message), reason) == ([("forecast", '{"days": 3}')], "tool_calls")


def test_qwen3_coder_streams_a_parameter_at_a_time():
    """Through the server's reply shapes: the first delta (id, type, name, `{`) at `<function=...>`, then a
    delta per parameter as it closes, typed; joined, the non-streamed reply's arguments. Cut short by
    max_tokens inside a parameter: the call with the parameters before it, as the non-streamed reply."""
    server = SimpleNamespace(tool_call_parser="qwen3_coder")
    schema = {"type": "object", "properties": {"days": {"type": "integer"}, "city": {"type": "string"}}}
    forecast = {"type": "function", "function": {"name": "forecast", "parameters": schema}}
    request = SimpleNamespace(tools=ToolRequest([forecast], "auto"))
    xml = "Sure.<tool_call>\n<function=forecast>\n<parameter=days>\n3\n</parameter>\n"
    xml += "<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
    pieces = [xml[i : i + 7] for i in range(0, len(xml), 7)]
    message, reason = OpenAIServer._tool_output(server, request).message(xml, "stop")
    assert (message["content"], _calls(message), reason) == (
        "Sure.",
        [("forecast", '{"days": 3, "city": "Paris"}')],
        "tool_calls",
    )
    deltas, reason = _streamed(OpenAIServer._tool_output(server, request), pieces, "stop")
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    first = calls[0]
    assert (first["index"], first["type"]) == (0, "function")
    assert first["function"] == {"name": "forecast", "arguments": "{"}
    assert first["id"].startswith("chatcmpl-tool-") and reason == "tool_calls"
    assert [c["function"]["arguments"] for c in calls[1:]] == ['"days": 3', ', "city": "Paris"', "}"]
    assert "".join(d.get("content") or "" for d in deltas) == "Sure."

    cut = xml[: xml.index("Paris") + 3]  # (max_tokens, inside the city)
    message, whole_reason = OpenAIServer._tool_output(server, request).message(cut, "length")
    assert _calls(message) == [("forecast", '{"days": 3}')]
    deltas, reason = _streamed(OpenAIServer._tool_output(server, request), [cut[:60], cut[60:]], "length")
    joined = "".join(c["function"]["arguments"] for d in deltas for c in d.get("tool_calls", []))
    assert (joined, reason) == ('{"days": 3}', whole_reason)  # ("auto" with calls: "tool_calls", as hermes')


def _streamed(output: ToolOutput, pieces: list[str], reason: str) -> tuple[list[dict], str | None]:
    deltas = [output.delta(piece, i == len(pieces) - 1) for i, piece in enumerate(pieces)]
    return deltas, output.finish_reason(reason)


def test_replies_as_stream_deltas():
    deltas, reason = _streamed(ToolOutput(_request("named", "get_time"), None), ["{", "", "}"], "stop")
    first = {"index": 0, "type": "function", "function": {"name": "get_time", "arguments": "{"}}
    assert {k: v for k, v in deltas[0]["tool_calls"][0].items() if k != "id"} == first
    assert deltas[1:] == [{"tool_calls": [{"index": 0, "function": {"arguments": a}}]} for a in ("", "}")]
    assert reason == "stop"

    pieces = ["Let me ", "check.<tool", '_call>\n{"name": "get_time"', "}\n</tool_call>", "<tool_call>{"]
    pieces += ['"name": "get_weather", "arguments": {"city": "}"}}']  # (the last call left unclosed)
    deltas, reason = _streamed(ToolOutput(_request("auto"), tool_parser("hermes")), pieces, "stop")
    assert [d.get("content") for d in deltas] == ["Let me ", "check.", "", None, "", None]
    calls = [(d["tool_calls"], i) for i, d in enumerate(deltas) if "tool_calls" in d]
    assert [(c[0]["index"], c[0]["function"]["name"], i) for c, i in calls] == [
        (0, "get_time", 3),
        (1, "get_weather", 5),
    ]
    assert calls[1][0][0]["function"]["arguments"] == '{"city": "}"}' and reason == "tool_calls"
    deltas, _ = _streamed(ToolOutput(_request("auto", parallel=False), tool_parser("hermes")), pieces, "stop")
    assert sum(len(d.get("tool_calls", [])) for d in deltas) == 1

    deltas, reason = _streamed(
        ToolOutput(_request("auto"), tool_parser("hermes")), ["No ", "call."], "length"
    )
    assert (deltas, reason) == ([{"content": "No "}, {"content": "call."}], "length")

    pieces = ['[{"name": "get_time", "para', 'meters": {}}, {"name": "get_time", "parameters": {}}]']
    deltas, reason = _streamed(ToolOutput(_request("required"), None), pieces, "stop")
    assert deltas[0] == {"content": ""} and [c["index"] for c in deltas[1]["tool_calls"]] == [0, 1]
    assert reason == "tool_calls"


# ---- the template and the app without an engine -----------------------------------------------------


def test_the_preset_template_shows_tools_in_the_hermes_format():
    tok = AutoTokenizer.from_pretrained(PRESET_DIR / "tokenizer")
    call = {"type": "function", "function": {"name": "get_time", "arguments": {}}}
    conversation = [
        {"role": "system", "content": "Be brief."},
        *MESSAGES,
        {"role": "assistant", "content": "", "tool_calls": [call, call]},
        {"role": "tool", "content": "9:00"},
        {"role": "tool", "content": "9:01"},
    ]
    text = tok.apply_chat_template(conversation, tools=[CLOCK], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\n")
    assert (
        '<tools>\n{"type": "function", "function": {"name": "get_time", "description": "The time now"}}'
        "\n</tools>" in text
    )
    assert text.endswith(
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n9:00\n</tool_response>\n<tool_response>\n9:01\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text.count("Be brief.") == 1


def test_auto_needs_the_servers_parser_and_tokenize_shows_the_tools(tmp_path):
    app = _engineless_app(tmp_path, chat_template=True)
    r = _post(app, "/v1/chat/completions", {"messages": MESSAGES, "tools": TOOLS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert "--enable-auto-tool-choice" in r.json()["error"]["message"]
    # not "auto": the check passes, and the stopped engine answers 503
    assert (
        _post(
            app, "/v1/chat/completions", {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "none"}
        ).status_code
        == 503
    )

    tok = AutoTokenizer.from_pretrained(PRESET_DIR / "tokenizer")
    r = _post(app, "/tokenize", {"messages": MESSAGES, "tools": TOOLS})
    text = tok.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert "get_weather" in text and r.json()["tokens"] == tok.encode(text, add_special_tokens=False)
    assert parse_tokenize_request({"messages": MESSAGES}).tools is None
    with pytest.raises(RequestError) as e:
        parse_tokenize_request({"prompt": "x", "tools": TOOLS})
    assert e.value.param == "tools"


def test_an_unknown_parser_is_refused_before_anything_starts():
    with pytest.raises(ValueError, match="known parsers: hermes"):
        build_app(None, "m", tool_call_parser="qwen9")  # (before the config is read)


# ---- a real server --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    flags = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--max-model-len", "1024")
    yield from _serve(ckpt, tmp_path_factory, *flags)


def _create(client, **fields):
    fields = {
        "model": MODEL,
        "messages": MESSAGES,
        "tools": TOOLS,
        "temperature": 0,
        "max_tokens": 96,
    } | fields
    return client.chat.completions.create(**fields)


def _joined_stream(client, **fields) -> tuple[str, dict[int, dict], str]:
    """A streamed reply as (content, {index: call joined from its deltas}, finish_reason)."""
    content, calls, reason = "", {}, None
    for chunk in _create(client, stream=True, **fields):
        (choice,) = chunk.choices
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or delta.id
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
        reason = choice.finish_reason or reason
    return content, calls, reason


def test_named_tool_choice(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = _create(client, tool_choice=named)
    (choice,) = out.choices
    (call,) = choice.message.tool_calls
    args = json.loads(call.function.arguments)
    assert (
        call.function.name == "get_weather"
        and call.type == "function"
        and call.id.startswith("chatcmpl-tool-")
    )
    assert set(args) == {"city", "unit"} and len(args["city"]) <= 8 and args["unit"] in ("c", "f")
    assert choice.message.content is None and choice.finish_reason == "stop"

    content, calls, reason = _joined_stream(client, tool_choice=named)
    assert content == "" and reason == "stop"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [("get_weather", call.function.arguments)]
    assert calls[0]["id"].startswith("chatcmpl-tool-")


def test_required_tool_choice(client):
    out = _create(client, tool_choice="required", parallel_tool_calls=False)
    (choice,) = out.choices
    (call,) = choice.message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call.function.arguments), dict)
    assert choice.finish_reason == "tool_calls" and choice.message.content is None

    content, calls, reason = _joined_stream(client, tool_choice="required", parallel_tool_calls=False)
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (call.function.name, call.function.arguments)
    ]
    assert content == "" and reason == "tool_calls"


HERMES_CALL = (
    r'<tool_call>\n\{"name": "get_weather", '
    r'"arguments": \{"city": "(Paris|Rome)", "unit": "c"\}\}\n</tool_call>'
)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_finds_the_models_calls(client, stream):
    """The model is steered into writing text and a call in the Hermes format; the parser finds them."""
    steer = {"structured_outputs": {"regex": "Let me check[.]\n" + HERMES_CALL}}
    if stream:
        content, calls, reason = _joined_stream(client, extra_body=steer)
        calls = [(c["name"], json.loads(c["arguments"])) for c in calls.values()]
    else:
        (choice,) = _create(client, extra_body=steer).choices
        content, reason = choice.message.content, choice.finish_reason
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert content == "Let me check.\n" and reason == "tool_calls"
    assert calls in ([("get_weather", {"city": city, "unit": "c"})] for city in ("Paris", "Rome"))


@pytest.fixture(scope="module")
def coder_client(ckpt, tmp_path_factory):
    """A second server, reading calls in Qwen3-Coder's XML (started only for the tests that use it)."""
    flags = ("--enable-auto-tool-choice", "--tool-call-parser", "qwen3_coder", "--max-model-len", "1024")
    for url in _serve(ckpt, tmp_path_factory, *flags):
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


CODER_CALL = (
    r"<tool_call>\n<function=get_weather>\n<parameter=city>\n(Paris|Rome)\n</parameter>\n"
    r"<parameter=unit>\nc\n</parameter>\n</function>\n</tool_call>"
)


def test_qwen3_coder_streams_each_parameter(coder_client):
    """A call in Qwen3-Coder's XML (steered by a regex) streams its name, then a piece per parameter, then
    `}`; joined, the non-streamed reply's arguments."""
    fields = {"extra_body": {"structured_outputs": {"regex": CODER_CALL}}, "tools": [WEATHER]}
    (call,) = _create(coder_client, **fields).choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["unit"] == "c"
    chunks = _create(coder_client, stream=True, **fields)
    deltas = [d for chunk in chunks for c in chunk.choices for d in c.delta.tool_calls or []]
    assert (deltas[0].function.name, deltas[0].function.arguments) == ("get_weather", "{")
    assert [d.function.arguments for d in deltas[2:]] == [', "unit": "c"', "}"]
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_arguments_stream_as_they_are_generated(client, choice):
    """A call's name goes out first, then its arguments in pieces as their tokens arrive; joined, they are
    the non-streamed reply's arguments character for character."""
    fields = {"extra_body": {"structured_outputs": {"regex": HERMES_CALL}}} if choice == "auto" else {}
    fields |= {"tool_choice": choice, "tools": [WEATHER], "parallel_tool_calls": False}
    (call,) = _create(client, **fields).choices[0].message.tool_calls
    chunks = _create(client, stream=True, **fields)
    deltas = [d for chunk in chunks for c in chunk.choices for d in c.delta.tool_calls or []]
    assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("chatcmpl-tool-")
    assert len(deltas) > 3 and all(d.function.name is None for d in deltas[1:])
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments


def test_auto_without_a_call_is_text(client):
    (choice,) = _create(client, extra_body={"guided_choice": ["Sunny.", "Rainy."]}).choices
    assert choice.message.content in ("Sunny.", "Rainy.") and not choice.message.tool_calls
    assert choice.finish_reason == "stop"
    content, calls, reason = _joined_stream(client, extra_body={"guided_choice": ["Sunny.", "Rainy."]})
    assert (content, calls, reason) == (choice.message.content, {}, "stop")


def test_stream_chunks_are_shaped_as_openai_s(client):
    """Each choice's call: id, type and name on its first delta only, the arguments over its deltas; the
    finish reason on the choice's last chunk, nothing of the choice after it."""
    chunks = list(_create(client, stream=True, n=2, tool_choice="required", parallel_tool_calls=False))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        calls = [d for choice in mine for d in choice.delta.tool_calls or []]
        first, rest = calls[0], calls[1:]
        assert first.index == 0 and first.type == "function" and first.id.startswith("chatcmpl-tool-")
        assert first.function.name in ("get_weather", "get_time")
        assert all(d.index == 0 and d.id is d.type is d.function.name is None for d in rest)
        assert isinstance(json.loads("".join(d.function.arguments for d in calls)), dict)
        assert [choice.finish_reason for choice in mine] == [None] * (len(mine) - 1) + ["tool_calls"]
        assert mine[0].delta.role == "assistant"
    ids = [d.id for c in chunks for choice in c.choices for d in choice.delta.tool_calls or [] if d.id]
    assert len(set(ids)) == 2  # (each choice its own call)


def test_a_conversation_with_calls_and_results(client, server):
    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "9:00"},
    ]
    out = _create(client, messages=messages, tool_choice="none", max_tokens=4)
    assert out.choices[0].message.tool_calls is None
    tok = AutoTokenizer.from_pretrained(PRESET_DIR / "tokenizer")
    rendered = tok.apply_chat_template(
        [
            *messages[:1],
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{**call, "function": {"name": "get_time", "arguments": {}}}],
            },
            messages[2],
        ],
        tools=TOOLS,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>' in rendered
    ids = httpx.post(server + "/tokenize", json={"messages": messages, "tools": TOOLS}).json()["tokens"]
    assert ids == tok.encode(rendered, add_special_tokens=False) and out.usage.prompt_tokens == len(ids)
    with pytest.raises(openai.BadRequestError) as e:
        _create(client, messages=[*MESSAGES, {"role": "assistant", "tool_calls": [{"function": {}}]}])
    assert e.value.body["param"] == "messages[1].tool_calls[0]"
