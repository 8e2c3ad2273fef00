"""Tool-call parsers: what each format's outputs give whole, and that a stream cut anywhere gives the same
content and calls (each call's pieces, its name first, joined), with content sent as soon as it cannot be
the start of a marker and the JSON formats' arguments as soon as they are generated."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanovllm.server.tool_parsers import (
    TOOL_PARSERS,
    CallDelta,
    RequiredCallsParser,
    ToolCall,
    ToolParser,
    tool_parser,
)

PARSERS = {**TOOL_PARSERS, "required": RequiredCallsParser}
# the request's tools, for the one format whose values are typed from their schemas
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "temp": {"type": "number"},
                "metric": {"type": "boolean"},
                "where": {"type": "object"},
                "hours": {"type": "array", "items": {"type": "integer"}},
                "note": {"type": ["string", "null"]},
                "any": {},
            },
        },
    },
}
TOOLS = {"qwen3_coder": [WEATHER_TOOL, {"type": "function", "function": {"name": "f"}}]}


def _call(name: str, **arguments) -> ToolCall:
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _whole(index: int, call: ToolCall) -> CallDelta:
    """A call sent in one piece."""
    return CallDelta(index, call.name, call.arguments)


def _joined(deltas: list[CallDelta]) -> list[ToolCall]:
    """Streamed pieces of calls -> the calls, as a client joins them; each call's pieces come in a row, its
    name on the first."""
    calls: list[list[str]] = []
    for delta in deltas:
        if delta.name is not None:
            assert delta.index == len(calls)
            calls.append([delta.name, delta.arguments])
        else:
            assert delta.index == len(calls) - 1
            calls[-1][1] += delta.arguments
    return [ToolCall(name, arguments) for name, arguments in calls]


def _stream(name: str, pieces: list[str]) -> tuple[str, list[ToolCall]]:
    parser = PARSERS[name](TOOLS.get(name))
    content, deltas = "", []
    for piece in pieces:
        sent, more = parser.feed(piece)
        content, deltas = content + sent, deltas + more
    sent, more = parser.flush()
    return content + sent, _joined(deltas + more)


def _extract(name: str, text: str) -> tuple[str | None, list[ToolCall]]:
    return PARSERS[name](TOOLS.get(name)).extract(text)


def _check_stream(name: str, text: str, pieces: list[str]) -> None:
    assert "".join(pieces) == text
    content, calls = _extract(name, text)
    assert _stream(name, pieces) == (content or "", calls)


# ---- hermes -------------------------------------------------------------------------------------------

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'
NOT_AN_OBJECT = '<tool_call>{"name": "f", "arguments": "a=1"}</tool_call>'
HERMES = [
    (WEATHER, None, [_call("get_weather", city="Paris")]),
    (WEATHER + "\n" + TIME, None, [_call("get_weather", city="Paris"), _call("get_time", tz="CET")]),
    (  # content before the calls is kept; text between and after them is dropped
        "Let me check.\n" + WEATHER + " and then " + TIME + "\nDone.",
        "Let me check.\n",
        [_call("get_weather", city="Paris"), _call("get_time", tz="CET")],
    ),
    ("The weather in Paris is sunny.", "The weather in Paris is sunny.", []),
    ("", None, []),
    (  # malformed JSON in the only call, before its arguments: all content
        'Hi <tool_call>{"name": "f", "argum: {"a": 1}}</tool_call>',
        'Hi <tool_call>{"name": "f", "argum: {"a": 1}}</tool_call>',
        [],
    ),
    (  # ... after them: the call was decided at its arguments' `{` (and may have been sent): it stays
        'Hi <tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>' + TIME,
        "Hi ",
        [_call("f", a=1)],
    ),
    (  # a malformed call after a good one: the good one stays, the rest is dropped
        "x" + WEATHER + '<tool_call>{"name": "g", </tool_call>' + TIME,
        "x",
        [_call("get_weather", city="Paris")],
    ),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),  # no name
    ('<tool_call>{"name": 3}</tool_call>', '<tool_call>{"name": 3}</tool_call>', []),
    (NOT_AN_OBJECT, NOT_AN_OBJECT, []),  # arguments that are not an object
    ('<tool_call>{"name": "now"}</tool_call>', None, [_call("now")]),  # no arguments: {}
    (  # "parameters" is not hermes' key: not read as {} (losing them), not a call
        '<tool_call>{"name": "f", "parameters": {"a": 1}}</tool_call>',
        '<tool_call>{"name": "f", "parameters": {"a": 1}}</tool_call>',
        [],
    ),
    (  # the arguments are the model's own JSON text, escapes and spacing as written
        '<tool_call>{"name": "find", "arguments": {"city":"Zürich",\n "q": "\\u00e9t\\u00e9 🌍"}}'
        "</tool_call>",
        None,
        [ToolCall("find", '{"city":"Zürich",\n "q": "\\u00e9t\\u00e9 🌍"}')],
    ),
    (  # the arguments after another key: the call is read whole, its arguments' text all the same
        '<tool_call>{"id": 7, "arguments": {"a":[1]}, "name": "f"}</tool_call>',
        None,
        [ToolCall("f", '{"a":[1]}')],
    ),
    (  # braces, brackets, quotes and the markers inside strings, and nested objects
        '<tool_call>{"name": "run", "arguments": {"code": "if (a) { b[\\"}\\"]; } </tool_call> <tool_call>",'
        ' "opts": {"deep": {"list": [1, {"k": "]"}]}}}}</tool_call>',
        None,
        [
            _call(
                "run",
                code='if (a) { b["}"]; } </tool_call> <tool_call>',
                opts={"deep": {"list": [1, {"k": "]"}]}},
            )
        ],
    ),
    (  # generation stopped at EOS right after the JSON of the last call
        "ok " + WEATHER + '\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n',
        "ok ",
        [_call("get_weather", city="Paris"), _call("get_time", tz="CET")],
    ),
    (  # cut short (max_tokens) in its arguments: the call as far as it was written
        'a<tool_call>{"name": "f", "arguments": {"x"',
        "a",
        [ToolCall("f", '{"x"')],
    ),
    (  # ... before them: not decided, so no call
        'a<tool_call>{"name": "f", "argu',
        'a<tool_call>{"name": "f", "argu',
        [],
    ),
    # a call followed by something else than </tool_call> is the last
    ('<tool_call>{"name": "f"} trailing' + TIME, None, [_call("f")]),
    ('<tool_call>{"name": "f"}</tool_', None, [_call("f")]),
    ("Use <tool_ call", "Use <tool_ call", []),
    ("<tool_call>", "<tool_call>", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), HERMES)
def test_hermes_extract(text, content, calls):
    assert tool_parser("hermes").extract(text) == (content, calls)


def test_hermes_streams_arguments_as_they_are_generated():
    parser = tool_parser("hermes")
    assert parser.feed("Checking <tool") == ("Checking ", [])  # the marker may be arriving: held
    assert parser.feed('_call>\n{"name": "get_weather", "argu') == ("", [])  # not decided yet
    assert parser.feed('ments": {"ci') == ("", [CallDelta(0, "get_weather", '{"ci')])
    assert parser.feed('ty": "Pa') == ("", [CallDelta(0, None, 'ty": "Pa')])
    assert parser.feed('ris"}}\n</tool') == ("", [CallDelta(0, None, 'ris"}')])  # not the call's `}`
    assert parser.feed("_call>\n" + TIME[:-1]) == ("", [_whole(1, _call("get_time", tz="CET"))])
    assert parser.feed("> bye") == ("", [])  # after a call: dropped
    assert parser.flush() == ("", [])


def test_hermes_stream_releases_content_that_is_not_a_marker():
    parser = tool_parser("hermes")
    assert parser.feed("a <tool") == ("a ", [])
    assert parser.feed("box> <") == ("<toolbox> ", [])
    assert parser.feed("b") == ("<b", [])
    assert parser.flush() == ("", [])
    parser = tool_parser("hermes")
    assert parser.feed("ends with <tool_ca") == ("ends with ", [])
    assert parser.flush() == ("<tool_ca", [])


def test_hermes_stream_holds_a_first_call_until_it_is_decided():
    parser = tool_parser("hermes")
    assert parser.feed('Hi <tool_call>{"name": "f",') == ("Hi ", [])
    assert parser.feed(' "arguments": 7}') == ('<tool_call>{"name": "f", "arguments": 7}', [])  # not a call
    assert parser.feed(" more") == (" more", [])
    assert parser.flush() == ("", [])
    parser = tool_parser("hermes")
    assert parser.feed('<tool_call>{"name": "f"') == ("", [])  # no arguments: decided at its `}`
    assert parser.feed("}") == ("", [_whole(0, _call("f"))])
    assert parser.feed("\n") == ("", [])
    assert parser.flush() == ("", [])


# ---- llama3_json --------------------------------------------------------------------------------------

LLAMA = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [_call("get_weather", city="Paris")]),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [_call("get_weather", city="Paris")]),
    (
        '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {"y": [2, "}"]}}',
        None,
        [_call("a", x=1), _call("b", y=[2, "}"])],
    ),
    (' \n {"name": "a", "parameters": {}}', None, [_call("a")]),
    ("The answer is 42.", "The answer is 42.", []),
    ('Sure: {"name": "a", "parameters": {}}', 'Sure: {"name": "a", "parameters": {}}', []),  # not first
    ('{"answer": 42}', '{"answer": 42}', []),  # JSON, but not a call
    ('{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),  # arguments are required here
    (  # two arguments keys: no call when read whole ...
        '{"arguments": {}, "name": "a", "parameters": {}}',
        '{"arguments": {}, "name": "a", "parameters": {}}',
        [],
    ),
    # ... but a call decided at its head stays, the last one
    ('{"name": "a", "parameters": {}, "arguments": {}}; {"name": "b", "parameters": {}}', None, [_call("a")]),
    ('{"name": "a", "parameters": {"x": 1}', None, [_call("a", x=1)]),  # cut short after the arguments
    ('{"name": "a", "parameters": {}}; {"name": "b", "par', None, [_call("a")]),  # the good one stays
    ('{"name": "a", "parameters": {}} and some text', None, [_call("a")]),
    (
        '{"name": "q", "parameters": {"text": "naïve ☕ — \\"quoted\\""}}',
        None,
        [_call("q", text='naïve ☕ — "quoted"')],
    ),
    ("<|python_tag|>print(1)", "<|python_tag|>print(1)", []),
    ("  ", "  ", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), LLAMA)
def test_llama3_json_extract(text, content, calls):
    assert tool_parser("llama3_json").extract(text) == (content, calls)


def test_llama3_json_stream_decides_at_the_first_character():
    parser = tool_parser("llama3_json")
    assert parser.feed("  \n") == ("", [])  # whitespace alone decides nothing
    assert parser.feed("H") == ("  \nH", [])
    assert parser.feed("ello") == ("ello", [])
    parser = tool_parser("llama3_json")
    assert parser.feed("<|python") == ("", [])
    assert parser.feed('_tag|>{"name": "a", "parameters": {}}') == ("", [_whole(0, _call("a"))])
    assert parser.feed("; ") == ("", [])
    assert parser.feed('{"name": "b", "parameters": {"k"') == ("", [CallDelta(1, "b", '{"k"')])
    assert parser.feed(': "v"}}') == ("", [CallDelta(1, None, ': "v"}')])
    assert parser.flush() == ("", [])
    parser = tool_parser("llama3_json")
    assert parser.feed('{"answer": ') == ("", [])
    assert parser.feed("42}") == ('{"answer": 42}', [])


# ---- mistral ------------------------------------------------------------------------------------------

MISTRAL = [
    (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        None,
        [_call("get_weather", city="Paris")],
    ),
    (
        'Let me look.[TOOL_CALLS] [{"name": "a", "arguments": {"x": "]}"}}, {"name": "b"}]',
        "Let me look.",
        [_call("a", x="]}"), _call("b")],
    ),
    ("No tools needed.", "No tools needed.", []),
    (  # the element is not closed after its arguments: the call stays, the last
        'Hi[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}], {"name": "b"}',
        "Hi",
        [_call("a", x=1)],
    ),
    (  # ... one that is no call is content, less the marker
        'Hi[TOOL_CALLS][{"name": "a", "arguments": 1]',
        'Hi[{"name": "a", "arguments": 1]',
        [],
    ),
    ("[TOOL_CALLS]", None, []),
    ('[TOOL_CALLS][{"name": "a", "arguments": {"city": "東京"}}', None, [_call("a", city="東京")]),  # no `]`
    ('[TOOL_CALLS][{"name": "a"}, {"name": 1}, {"name": "c"}]', None, [_call("a")]),
    ('[TOOL_CALLS]{"name": "a", "arguments": {}}', '{"name": "a", "arguments": {}}', []),  # not an array
    ("[TOOL_CALLS][] [TOOL_CALLS]x", "[] x", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), MISTRAL)
def test_mistral_extract(text, content, calls):
    assert tool_parser("mistral").extract(text) == (content, calls)


def test_mistral_keeps_special_tokens_and_streams_elements():
    assert tool_parser("mistral").skip_special_tokens is False
    assert tool_parser("hermes").skip_special_tokens is False  # (Hermes 2 Pro, 3: <tool_call> is special)
    assert tool_parser("llama3_json").skip_special_tokens is True
    assert tool_parser("qwen3_coder").skip_special_tokens is True  # (<tool_call> is not special in Qwen's)
    parser = tool_parser("mistral")
    assert parser.feed("Sure[TOOL") == ("Sure", [])
    assert parser.feed('_CALLS][{"name": "a", "arguments": {"x": 1}}') == ("", [_whole(0, _call("a", x=1))])
    assert parser.feed(', {"name": "b"}]') == ("", [_whole(1, _call("b"))])
    assert parser.flush() == ("", [])


# ---- tool_choice "required" ---------------------------------------------------------------------------

REQUIRED = [
    ('[{"name": "a", "parameters": {"x": 1}}]', [_call("a", x=1)]),
    (
        '[\n  {"name": "a", "parameters": {"s": "\\"}]\\\\"}},'
        '\n  {"name": "b", "parameters": {"é": ["{"]}}\n]',
        [_call("a", s='"}]\\'), _call("b", é=["{"])],
    ),
    (  # cut short: the last call as far as it was written
        '[{"name": "a", "parameters": {}}, {"name": "b", "parameters": {"x": ',
        [_call("a"), ToolCall("b", '{"x": ')],
    ),
    ('[{"name": "a", "parameters": {}}, {"name": "b", "para', [_call("a")]),  # ... not decided: no call
    ('{"name": "a", "parameters": {}}', []),
    ("[]", []),
    ("", []),
]


@pytest.mark.parametrize(("text", "calls"), REQUIRED)
def test_required_extract(text, calls):
    assert RequiredCallsParser().extract(text) == (None, calls)


def test_required_streams_each_elements_arguments():
    parser = RequiredCallsParser()
    assert parser.feed('[{"name": "a", "parameters": {"x": "}"') == ("", [CallDelta(0, "a", '{"x": "}"')])
    assert parser.feed("}") == ("", [CallDelta(0, None, "}")])  # closes the parameters
    assert parser.feed("}") == ("", [])  # ... this the element: not arguments
    assert parser.feed(', {"name": "b", "parameters": {"y": "\\') == ("", [CallDelta(1, "b", '{"y": "\\')])
    assert parser.feed('""}}]') == ("", [CallDelta(1, None, '""}')])  # (the escape spanned pieces)
    assert parser.flush() == ("", [])


# ---- qwen3_coder --------------------------------------------------------------------------------------


def _xml(name: str, **params: str) -> str:
    """A call as Qwen3-Coder writes it."""
    body = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


XML_WEATHER = _xml("get_weather", city="Paris", days="3")
XML_TIME = _xml("get_time", tz="CET")
QWEN3_CODER = [
    (XML_WEATHER, None, [_call("get_weather", city="Paris", days=3)]),
    (  # content before the calls is kept; text between and after them is dropped
        "Let me check.\n" + XML_WEATHER + "\n and " + XML_TIME + "\nDone.",
        "Let me check.\n",
        [_call("get_weather", city="Paris", days=3), _call("get_time", tz="CET")],
    ),
    ("No call here.", "No call here.", []),
    ("", None, []),
    (  # values are raw text: one newline either side is layout, the rest is kept (markers included)
        _xml("f", code='\n  if a < b: print("{}")\n  </tool_call> <tool_call>\n'),
        None,
        [_call("f", code='\n  if a < b: print("{}")\n  </tool_call> <tool_call>\n')],
    ),
    ("<tool_call><function=f><parameter=x>1</parameter></function></tool_call>", None, [_call("f", x="1")]),
    ("<tool_call>\n<function=now>\n</function>\n</tool_call>", None, [_call("now")]),  # no parameters
    (  # a function not in the tools: still a call, its values strings
        _xml("unknown_fn", days="3", flag="true", nothing="null"),
        None,
        [_call("unknown_fn", days="3", flag="true", nothing="null")],
    ),
    (  # generation stopped right after the last call's </function>
        "ok " + XML_TIME + "\n<tool_call>\n<function=get_weather>\n</function>\n",
        "ok ",
        [_call("get_time", tz="CET"), _call("get_weather")],
    ),
    (  # ... or before it (max_tokens): decided at its <function=...>, it keeps its complete parameters
        "a<tool_call>\n<function=get_time>\n<parameter=tz>\nCET\n</parameter>\n",
        "a",
        [_call("get_time", tz="CET")],
    ),
    (  # ... a parameter cut short is not one of them
        "<tool_call>\n<function=get_weather>\n<parameter=days>\n3\n</parameter>\n<parameter=city>\nPar",
        None,
        [_call("get_weather", days=3)],
    ),
    (
        XML_TIME + "<tool_call>\n<function=f>\n<parameter=x>\n1",
        None,
        [_call("get_time", tz="CET"), _call("f")],
    ),
    (  # cut inside the function's name: not decided, no call
        XML_TIME + "<tool_call>\n<function=get_wea",
        None,
        [_call("get_time", tz="CET")],
    ),
    ("a<tool_call>\n<function=get_wea", "a<tool_call>\n<function=get_wea", []),
    (  # a key given twice ends the call before it (its first value may have been sent); it is the last
        _xml("get_weather", days="3", city="Paris").replace(
            "</function>", "<parameter=days>\n4\n</parameter>"
        )
        + XML_TIME,
        None,
        [_call("get_weather", days=3, city="Paris")],
    ),
    ('<tool_call>\n{"name": "f"}\n</tool_call>', '<tool_call>\n{"name": "f"}\n</tool_call>', []),
    ("<tool_call><function=>x</function></tool_call>", "<tool_call><function=>x</function></tool_call>", []),
    (  # something other than a parameter in the body: the call ends before it, the last
        "<tool_call><function=f><parameter=a>1</parameter> text </function></tool_call>" + XML_TIME,
        None,
        [_call("f", a="1")],
    ),
    (  # ... a key that is no name, too
        "<tool_call><function=f><parameter=a>1</parameter><parameter=b\nc>2</parameter></function>",
        None,
        [_call("f", a="1")],
    ),
    (  # two functions in one <tool_call>: not the format; the first is the last call
        XML_TIME + "<tool_call><function=f></function><function=g></function></tool_call>" + XML_TIME,
        None,
        [_call("get_time", tz="CET"), _call("f")],
    ),
    ("<tool_call><function=f></function></tool_", None, [_call("f")]),
    (  # a value holding `</function>`: read to its own `</parameter>`
        "<tool_call><function=f><parameter=a></function></tool_call></parameter></function></tool_call>",
        None,
        [_call("f", a="</function></tool_call>")],
    ),
    ("<tool_call><function=a\nb></function>", "<tool_call><function=a\nb></function>", []),
    ("Use <tool_ call", "Use <tool_ call", []),
    ("<tool_call>", "<tool_call>", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), QWEN3_CODER)
def test_qwen3_coder_extract(text, content, calls):
    assert tool_parser("qwen3_coder", TOOLS["qwen3_coder"]).extract(text) == (content, calls)


@pytest.mark.parametrize(
    ("param", "text", "value"),
    [
        ("city", "3", "3"),  # a string stays a string
        ("city", "null", "null"),  # ... "null" too: the schema does not allow null
        ("days", "42", 42),
        ("days", " -7 ", -7),
        ("days", "4.5", "4.5"),  # not an integer: the text
        ("days", "three", "three"),
        ("temp", "21.5", 21.5),
        ("temp", "-3", -3),
        ("temp", "1e3", 1000.0),
        ("temp", "NaN", "NaN"),  # not a JSON number
        ("metric", "True", True),
        ("metric", "false", False),
        ("metric", "yes", "yes"),
        ("where", '{"lat": 48.8, "tags": ["a"]}', {"lat": 48.8, "tags": ["a"]}),
        ("where", "[1]", "[1]"),  # JSON, but not an object
        ("where", "{lat: 1}", "{lat: 1}"),
        ("hours", "[9, 12]", [9, 12]),
        ("note", "null", None),  # the schema allows null
        ("note", "NULL", None),
        ("note", "nothing", "nothing"),
        ("any", "3", "3"),  # no type: the text
        ("extra", "3", "3"),  # a parameter the schema does not name: the text
    ],
)
def test_qwen3_coder_types_values_from_the_schema(param, text, value):
    parser = tool_parser("qwen3_coder", [WEATHER_TOOL])
    _, calls = parser.extract(_xml("get_weather", **{param: text}))
    assert calls == [ToolCall("get_weather", json.dumps({param: value}, ensure_ascii=False))]


def test_qwen3_coder_reads_values_as_strings_without_tools():
    assert tool_parser("qwen3_coder").extract(XML_WEATHER) == (
        None,
        [_call("get_weather", city="Paris", days="3")],
    )


def test_qwen3_coder_streams_a_parameter_at_a_time():
    parser = tool_parser("qwen3_coder", [WEATHER_TOOL])
    assert parser.feed("Checking <tool") == ("Checking ", [])
    assert parser.feed("_call>\n<function=get_wea") == ("", [])  # not decided: may be no call
    assert parser.feed("ther>\n<parameter=city>\nPar") == ("", [CallDelta(0, "get_weather", "{")])
    assert parser.feed("is\n</parameter>\n<parameter=days>\n3") == (
        "",
        [CallDelta(0, None, '"city": "Paris"')],
    )
    assert parser.feed("\n</param") == ("", [])  # (the value may yet go on: 3 or 30)
    assert parser.feed("eter>\n") == ("", [CallDelta(0, None, ', "days": 3')])
    assert parser.feed("<parameter=metric>\ntrue\n</parameter>\n</function>") == (
        "",
        [CallDelta(0, None, ', "metric": true}')],
    )
    assert parser.feed("\n</tool_call>\n" + XML_TIME[:-1]) == ("", [_whole(1, _call("get_time", tz="CET"))])
    assert parser.feed("> bye") == ("", [])  # after a call: dropped
    assert parser.flush() == ("", [])
    # generation ended after </function>, and inside a parameter (max_tokens): closed after the last whole one
    parser = tool_parser("qwen3_coder")
    assert parser.feed(XML_TIME[: -len("\n</tool_call>")]) == ("", [_whole(0, _call("get_time", tz="CET"))])
    assert parser.flush() == ("", [])
    parser = tool_parser("qwen3_coder")
    cut = XML_WEATHER.index("\n</parameter>\n</function>")  # (in the value of days)
    assert parser.feed(XML_WEATHER[:cut]) == ("", [CallDelta(0, "get_weather", '{"city": "Paris"')])
    assert parser.flush() == ("", [CallDelta(0, None, "}")])
    parser = tool_parser("qwen3_coder")  # no parameters
    assert parser.feed("<tool_call><function=now>") == ("", [CallDelta(0, "now", "{")])
    assert parser.feed("</function>") == ("", [CallDelta(0, None, "}")])
    parser = tool_parser("qwen3_coder", [WEATHER_TOOL])  # a key given twice: the call ends before it
    assert parser.feed(_xml("get_weather", days="3")[: -len("</function>\n</tool_call>")]) == (
        "",
        [CallDelta(0, "get_weather", '{"days": 3')],
    )
    assert parser.feed("<parameter=days>") == ("", [CallDelta(0, None, "}")])
    assert parser.feed("\n4\n</parameter>" + XML_TIME) == ("", [])
    assert parser.flush() == ("", [])


# ---- pythonic -----------------------------------------------------------------------------------------

PYTHONIC = [
    (
        '[get_weather(city="Paris", days=3), get_time()]',
        None,
        [_call("get_weather", city="Paris", days=3), _call("get_time")],
    ),
    (  # nested literals; Python's True/None become JSON's
        " [f(a=[1, {'k': None, 'l': [True, -2.5]}], b='naïve \\'☕\\'', c={})]\n",
        None,
        [_call("f", a=[1, {"k": None, "l": [True, -2.5]}], b="naïve '☕'", c={})],
    ),
    ('<|python_start|>[f(s="]), g(")]<|python_end|>', None, [_call("f", s="]), g(")]),  # Llama 4's tags
    ("The answer is 42.", "The answer is 42.", []),
    ("Sure: [f(a=1)]", "Sure: [f(a=1)]", []),  # not the whole output
    ("[f(a=1)] and more", "[f(a=1)] and more", []),
    ("[f(a=1), g(b=2)", "[f(a=1), g(b=2)", []),  # cut short
    ("[1, 2, 3]", "[1, 2, 3]", []),  # a list, but not of calls
    ("[]", "[]", []),
    ("[f(a=1), g(2)]", "[f(a=1), g(2)]", []),  # a positional argument: no call at all
    ("[f(a=x)]", "[f(a=x)]", []),  # not a literal
    ("[f(a=__import__('os').getcwd())]", "[f(a=__import__('os').getcwd())]", []),  # never run
    ("[f(a=(1, 2))]", "[f(a=(1, 2))]", []),  # a tuple has no JSON form
    ("[f(a=1e999)]", "[f(a=1e999)]", []),
    ("[f(**{'a': 1})]", "[f(**{'a': 1})]", []),
    ("[f(a=1, a=2)]", "[f(a=1, a=2)]", []),
    ("[os.remove(path='x')]", "[os.remove(path='x')]", []),
    ("<|python_start|>hi", "<|python_start|>hi", []),
    ("  ", "  ", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), PYTHONIC)
def test_pythonic_extract(text, content, calls):
    assert tool_parser("pythonic").extract(text) == (content, calls)


def test_pythonic_stream_holds_a_list_to_the_end_and_sends_text_at_once():
    parser = tool_parser("pythonic")
    assert parser.feed(" <|python_") == ("", [])
    assert parser.feed("start|>[f(a=1)]") == ("", [])  # a list: held to the end
    assert parser.flush() == ("", [_whole(0, _call("f", a=1))])
    parser = tool_parser("pythonic")
    assert parser.feed("\n") == ("", [])
    assert parser.feed("Hi [f(a=1)]") == ("\nHi [f(a=1)]", [])
    assert parser.flush() == ("", [])
    assert tool_parser("pythonic").skip_special_tokens


# ---- every parser: the stream agrees with extract -----------------------------------------------------

EXAMPLES = {
    "hermes": [text for text, _, _ in HERMES],
    "llama3_json": [text for text, _, _ in LLAMA],
    "mistral": [text for text, _, _ in MISTRAL],
    "qwen3_coder": [text for text, _, _ in QWEN3_CODER],
    "pythonic": [text for text, _, _ in PYTHONIC],
    "required": [text for text, _ in REQUIRED],
}
_SHARED_FRAGMENTS = [" ", "\n", "hi", "é", "🌍", "{", "}", "[", "]", '"', "\\", ",", ";", ":", "<", ">", "/"]
_CALL_OBJECTS = [
    '{"name": "f", "arguments": {"a": 1}}',
    '{"name": "g", "parameters": {"s": "}{]["}}',
    '{"name": "h"}',
    '{"name": "k", "arguments": {"q": "\\"</tool_call>"}}',
    '{"name": "f", "arguments": {"a": 1}',
    '{"name": "x"',
    '{"nam',
    '{"arguments": {"b": [2]}, "name": "g"}',  # (not the head's order: read whole)
    '{"name": "f", "arguments": {"a": 1}, "name": "g"}',  # (decided at the head, then broken)
    '{"name": "f", "arguments": {"a": 1}, "id": 3}',
]
FRAGMENTS = {
    "hermes": ["<tool_call>", "</tool_call>", "<tool_", "</tool", "_call>", *_CALL_OBJECTS],
    "llama3_json": ["<|python_tag|>", "<|python", "; ", *_CALL_OBJECTS],
    "mistral": ["[TOOL_CALLS]", "[TOOL_", "CALLS]", "[", ", ", "]", *_CALL_OBJECTS],
    "required": ["[", ", ", "]", *_CALL_OBJECTS],
    "pythonic": [
        "<|python_start|>",
        "<|python",
        "<|python_end|>",
        "f(",
        "get_time()",
        "a=",
        "=1",
        "(",
        ")",
        "'",
    ],
    "qwen3_coder": [
        "<tool_call>",
        "</tool_call>",
        "<function=get_weather>",
        "<function=f>",
        "</function>",
        "<parameter=days>",
        "<parameter=city>",
        "<parameter=note>",
        "</parameter>",
        "</param",
        "<param",
        "<function",
        "3",
        "null",
        "true",
        '{"a": 1}',
    ],
}


_STRINGS = st.text('{}[]"\\:,<>/ aé🌍', max_size=6)  # JSON's structural characters, escapes, unicode
_VALUES = st.one_of(
    st.none(),
    st.integers(-5, 5),
    _STRINGS,
    st.lists(_STRINGS, max_size=2),
    st.dictionaries(_STRINGS, _STRINGS, max_size=2),
)
_ARGS_KEY = {"hermes": ["arguments"], "llama3_json": ["parameters", "arguments"], "mistral": ["arguments"]}


@st.composite
def _call_object(draw, name: str) -> str:
    """One call's JSON as the format writes it; now and then not quite (a wrong key, arguments that are
    not an object, another key before or after them, the arguments first)."""
    obj = {"name": draw(st.sampled_from(["f", "get_weather", "ü"]))}
    if draw(st.integers(0, 9)) > 0:
        key = draw(st.sampled_from(_ARGS_KEY.get(name, ["parameters"])))
        obj[key] = draw(st.dictionaries(_STRINGS, _VALUES, max_size=3))
    else:
        obj[draw(st.sampled_from(["arguments", "parameters"]))] = draw(_VALUES)
    if draw(st.integers(0, 4)) == 0:
        extra = {draw(st.sampled_from(["id", "name", "arguments"])): draw(_VALUES)}
        obj = {**extra, **obj} if draw(st.booleans()) else {**obj, **extra}
    if draw(st.integers(0, 4)) == 0:
        obj = dict(reversed(obj.items()))
    return json.dumps(obj, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1])))


_XML_VALUES = st.one_of(
    st.sampled_from(["3", "-2.5", "true", "null", '{"k": [1]}', "[1, 2]", "", "\n", "</tool_call>", "<"]),
    st.text('<>/\n {}"aé🌍', max_size=8),
)


@st.composite
def _xml_call(draw) -> str:
    """One call in Qwen3-Coder's XML, with the layout's newlines or none; now and then not quite."""
    nl = draw(st.sampled_from(["\n", ""]))
    name = draw(st.sampled_from(["get_weather", "f", "ü x", ""]))
    keys = draw(st.lists(st.sampled_from(["city", "days", "temp", "metric", "where", "hours", "note", "z"])))
    body = "".join(f"<parameter={key}>{nl}{draw(_XML_VALUES)}{nl}</parameter>{nl}" for key in keys)
    return f"<tool_call>{nl}<function={name}>{nl}{body}</function>{nl}</tool_call>"


@st.composite
def _python_call(draw) -> str:
    """One call as Python, keyword arguments with literal values; now and then not quite (a positional
    argument, a value that is not a literal)."""
    name = draw(st.sampled_from(["f", "get_weather", "ü"]))
    arguments = draw(st.dictionaries(st.sampled_from(["city", "days", "a"]), _VALUES, max_size=3))
    parts = [f"{key}={value!r}" for key, value in arguments.items()]
    if draw(st.integers(0, 9)) == 0:
        parts.insert(0, draw(st.sampled_from(["1", "x", "a=y", "b=(1,)"])))
    return f"{name}({', '.join(parts)})"


@st.composite
def _output(draw, name: str) -> str:
    """A whole output in the format, perhaps cut short at any character (as max_tokens would)."""
    objs = draw(st.lists(_call_object(name), min_size=1, max_size=3))
    content = draw(st.sampled_from(["", "Sure. ", "a <tool_ b", "[TOOL_ x"]))
    tail = draw(st.sampled_from(["", "\n", " bye", "\n<tool_call>"]))
    if name == "hermes":
        sep = draw(st.sampled_from(["", "\n", " x "]))
        text = content + sep.join(f"<tool_call>\n{obj}\n</tool_call>" for obj in objs) + tail
    elif name == "llama3_json":
        text = draw(st.sampled_from(["", " ", "<|python_tag|>"])) + "; ".join(objs) + tail
    elif name == "mistral":
        text = content + "[TOOL_CALLS]" + "[" + ", ".join(objs) + "]" + tail
    elif name == "qwen3_coder":
        sep = draw(st.sampled_from(["", "\n", " x "]))
        text = content + sep.join(draw(st.lists(_xml_call(), min_size=1, max_size=3))) + tail
    elif name == "pythonic":
        calls = ", ".join(draw(st.lists(_python_call(), min_size=1, max_size=3)))
        start = draw(st.sampled_from(["", " ", "<|python_start|>"]))
        text = start + "[" + calls + "]" + draw(st.sampled_from(["", "<|python_end|>", " ", " bye"]))
    else:
        text = "[" + ",\n".join(objs) + "]"
    return text[: draw(st.integers(0, len(text)))] if draw(st.booleans()) else text


def _texts(name: str):
    built = st.lists(st.sampled_from(FRAGMENTS[name] + _SHARED_FRAGMENTS), max_size=12).map("".join)
    return st.one_of(st.sampled_from(EXAMPLES[name]), built, _output(name), _output(name))


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_streaming_every_example_one_character_at_a_time(name):
    for text in EXAMPLES[name]:
        _check_stream(name, text, list(text))
        _check_stream(name, text, [text])


@pytest.mark.parametrize("name", list(EXAMPLES))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_streaming_agrees_with_extract_however_the_text_is_cut(name, data):
    text = data.draw(_texts(name), label="text")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8), label="cuts"))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    _check_stream(name, text, pieces)
    _check_stream(name, text, list(text))


@pytest.mark.parametrize(
    ("name", "before", "after"),
    [
        ("hermes", 'Sure.<tool_call>\n{"name": "f", "arguments": ', "}\n</tool_call>"),
        ("llama3_json", '<|python_tag|>{"name": "f",\n "parameters":', "}"),
        ("mistral", 'Sure.[TOOL_CALLS][{"name": "f", "arguments": ', "}]"),
        ("required", '[{"name": "f", "parameters": ', "}]"),
    ],
)
@settings(max_examples=50, deadline=None)
@given(value=_STRINGS.map(lambda text: text * 20), ascii_only=st.booleans())
def test_arguments_stream_as_they_are_generated(name, before, after, value, ascii_only):
    """Fed a character at a time, a call whose arguments hold a long value has sent, after each character,
    exactly the arguments written so far: its name once its arguments open, then every character of them
    (escapes and the format's markers inside strings included) up to their closing brace, and nothing
    after it."""
    arguments = json.dumps({"code": value, "more": [1, {"k": value}]}, ensure_ascii=ascii_only)
    text = before + arguments + after
    parser = PARSERS[name](TOOLS.get(name))
    deltas: list[CallDelta] = []
    for end in range(1, len(text) + 1):
        deltas += parser.feed(text[end - 1])[1]
        written = text[len(before) : min(end, len(before) + len(arguments))]
        assert _joined(deltas) == ([ToolCall("f", written)] if written else [])
    deltas += parser.flush()[1]
    assert _joined(deltas) == [ToolCall("f", arguments)] == _extract(name, text)[1]


_WEATHER_KEYS = list(WEATHER_TOOL["function"]["parameters"]["properties"])


@settings(max_examples=50, deadline=None)
@given(values=st.dictionaries(st.sampled_from(_WEATHER_KEYS), _XML_VALUES, max_size=6))
def test_qwen3_coder_sends_each_parameter_before_the_call_closes(values):
    """Fed a character at a time, a call with several parameters has sent, after each character, what the
    text so far gives as a finished reply less its `}` (until `</function>` is read): nothing until its
    `<function=...>` is read, then its name and `{`, then each parameter once its `</parameter>` is read,
    typed from the schema, and so a piece per parameter."""
    text = _xml("get_weather", **values)
    parser = tool_parser("qwen3_coder", [WEATHER_TOOL])
    deltas: list[CallDelta] = []
    for end in range(1, len(text) + 1):
        deltas += parser.feed(text[end - 1])[1]
        calls = _extract("qwen3_coder", text[:end])[1]
        if calls and "</function>" not in text[:end]:  # (no value here holds it)
            calls = [ToolCall(calls[0].name, calls[0].arguments[:-1])]
        assert _joined(deltas) == calls
    deltas += parser.flush()[1]
    assert len(deltas) == len(values) + 2  # `{`, a piece per parameter, `}`
    assert _joined(deltas) == _extract("qwen3_coder", text)[1]


@pytest.mark.parametrize(
    ("name", "marker"),
    [("hermes", "<tool_call>"), ("mistral", "[TOOL_CALLS]"), ("qwen3_coder", "<tool_call>")],
)
@settings(max_examples=100, deadline=None)
@given(text=st.text(st.sampled_from("<>_[]TOOLCAStool_cal x\n"), max_size=30))
def test_stream_holds_back_only_a_possible_marker_start(name, marker, text):
    """Before any marker, what has been sent after each piece is the text less its longest tail that is a
    proper prefix of the marker."""
    if marker in text:
        return
    parser = PARSERS[name](TOOLS.get(name))
    sent = ""
    for end in range(1, len(text) + 1):
        sent += parser.feed(text[end - 1])[0]
        held = max((n for n in range(len(marker)) if text[:end].endswith(marker[:n])), default=0)
        assert sent == text[: end - held]
    assert sent + parser.flush()[0] == text


# ---- the registry -------------------------------------------------------------------------------------


def test_registry_names_and_fresh_instances():
    assert sorted(TOOL_PARSERS) == ["hermes", "llama3_json", "mistral", "pythonic", "qwen3_coder"]
    first, second = tool_parser("hermes"), tool_parser("hermes")
    assert first is not second and isinstance(first, ToolParser)
    assert first.feed("<tool_call>") == ("", []) and second.feed("plain") == ("plain", [])


def test_unknown_parser_names_the_known_ones():
    with pytest.raises(
        ValueError,
        match="unknown tool call parser 'xlam'.*hermes, llama3_json, mistral, pythonic, qwen3_coder",
    ):
        tool_parser("xlam")
