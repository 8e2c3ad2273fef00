"""Tool-call parsers: what each format's outputs give whole, and that a stream cut anywhere gives the same
content and calls, with content sent as soon as it cannot be the start of a marker."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanovllm.server.tool_parsers import (
    TOOL_PARSERS,
    RequiredCallsParser,
    ToolCall,
    ToolParser,
    tool_parser,
)

PARSERS = {**TOOL_PARSERS, "required": RequiredCallsParser}


def _call(name: str, **arguments) -> ToolCall:
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _stream(name: str, pieces: list[str]) -> tuple[str, list[ToolCall]]:
    parser = PARSERS[name]()
    content, calls = "", []
    for piece in pieces:
        sent, done = parser.feed(piece)
        content, calls = content + sent, calls + done
    sent, done = parser.flush()
    return content + sent, calls + done


def _extract(name: str, text: str) -> tuple[str | None, list[ToolCall]]:
    return PARSERS[name]().extract(text)


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
    (  # malformed JSON in the only call: all content
        'Hi <tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>',
        'Hi <tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>',
        [],
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
    (
        '<tool_call>{"name": "find", "arguments": {"city": "Zürich", "q": "\\u00e9t\\u00e9 🌍"}}</tool_call>',
        None,
        [_call("find", city="Zürich", q="été 🌍")],
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
    (  # ... but not when its JSON was cut short (max_tokens) or is followed by something else
        'a<tool_call>{"name": "f", "arguments": {"x"',
        'a<tool_call>{"name": "f", "arguments": {"x"',
        [],
    ),
    ('<tool_call>{"name": "f"} trailing', '<tool_call>{"name": "f"} trailing', []),
    ('<tool_call>{"name": "f"}</tool_', '<tool_call>{"name": "f"}</tool_', []),
    ("Use <tool_ call", "Use <tool_ call", []),
    ("<tool_call>", "<tool_call>", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), HERMES)
def test_hermes_extract(text, content, calls):
    assert tool_parser("hermes").extract(text) == (content, calls)


def test_hermes_streams_each_call_when_it_closes():
    parser = tool_parser("hermes")
    assert parser.feed("Checking <tool") == ("Checking ", [])  # the marker may be arriving: held
    assert parser.feed("_call>\n" + WEATHER[len("<tool_call>\n") : -len("</tool_call>")]) == ("", [])
    assert parser.feed("</tool_call>") == ("", [_call("get_weather", city="Paris")])
    assert parser.feed("\n" + TIME[:-1]) == ("", [])
    assert parser.feed(">") == ("", [_call("get_time", tz="CET")])
    assert parser.feed(" bye") == ("", [])  # after a call: dropped
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
    assert parser.feed('<tool_call>{"name": "f"}') == ("", [])  # complete JSON: may end here (EOS)
    assert parser.feed("\n") == ("", [])
    assert parser.flush() == ("", [_call("f")])


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
    (
        '{"name": "a", "parameters": {}, "arguments": {}}',
        '{"name": "a", "parameters": {}, "arguments": {}}',
        [],
    ),
    ('{"name": "a", "parameters": {"x": 1}', '{"name": "a", "parameters": {"x": 1}', []),  # cut short
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
    assert parser.feed('_tag|>{"name": "a", "parameters": {}}') == ("", [_call("a")])
    assert parser.feed("; ") == ("", [])
    assert parser.feed('{"name": "b", "parameters": {"k": "v"}}') == ("", [_call("b", k="v")])
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
    (
        'Hi[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}]',
        "Hi" + '[{"name": "a", "arguments": {"x": 1}]',
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
    parser = tool_parser("mistral")
    assert parser.feed("Sure[TOOL") == ("Sure", [])
    assert parser.feed('_CALLS][{"name": "a", "arguments": {"x": 1}}') == ("", [_call("a", x=1)])
    assert parser.feed(', {"name": "b"}]') == ("", [_call("b")])
    assert parser.flush() == ("", [])


# ---- tool_choice "required" ---------------------------------------------------------------------------

REQUIRED = [
    ('[{"name": "a", "parameters": {"x": 1}}]', [_call("a", x=1)]),
    (
        '[\n  {"name": "a", "parameters": {"s": "\\"}]\\\\"}},'
        '\n  {"name": "b", "parameters": {"é": ["{"]}}\n]',
        [_call("a", s='"}]\\'), _call("b", é=["{"])],
    ),
    ('[{"name": "a", "parameters": {}}, {"name": "b", "parameters": {"x": ', [_call("a")]),  # cut short
    ('{"name": "a", "parameters": {}}', []),
    ("[]", []),
    ("", []),
]


@pytest.mark.parametrize(("text", "calls"), REQUIRED)
def test_required_extract(text, calls):
    assert RequiredCallsParser().extract(text) == (None, calls)


def test_required_streams_each_element_at_its_closing_brace():
    parser = RequiredCallsParser()
    assert parser.feed('[{"name": "a", "parameters": {"x": "}"') == ("", [])
    assert parser.feed("}") == ("", [])  # closes the parameters, not the element
    assert parser.feed("}") == ("", [_call("a", x="}")])
    assert parser.feed(', {"name": "b", "parameters": {"y": "\\') == ("", [])  # the escape spans pieces
    assert parser.feed('""}}]') == ("", [_call("b", y='"')])
    assert parser.flush() == ("", [])


# ---- every parser: the stream agrees with extract -----------------------------------------------------

EXAMPLES = {
    "hermes": [text for text, _, _ in HERMES],
    "llama3_json": [text for text, _, _ in LLAMA],
    "mistral": [text for text, _, _ in MISTRAL],
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
]
FRAGMENTS = {
    "hermes": ["<tool_call>", "</tool_call>", "<tool_", "</tool", "_call>", *_CALL_OBJECTS],
    "llama3_json": ["<|python_tag|>", "<|python", "; ", *_CALL_OBJECTS],
    "mistral": ["[TOOL_CALLS]", "[TOOL_", "CALLS]", "[", ", ", "]", *_CALL_OBJECTS],
    "required": ["[", ", ", "]", *_CALL_OBJECTS],
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
    not an object)."""
    obj = {"name": draw(st.sampled_from(["f", "get_weather", "ü"]))}
    if draw(st.integers(0, 9)) > 0:
        key = draw(st.sampled_from(_ARGS_KEY.get(name, ["parameters"])))
        obj[key] = draw(st.dictionaries(_STRINGS, _VALUES, max_size=3))
    else:
        obj[draw(st.sampled_from(["arguments", "parameters"]))] = draw(_VALUES)
    return json.dumps(obj, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1])))


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


@pytest.mark.parametrize(("name", "marker"), [("hermes", "<tool_call>"), ("mistral", "[TOOL_CALLS]")])
@settings(max_examples=100, deadline=None)
@given(text=st.text(st.sampled_from("<>_[]TOOLCAStool_cal x\n"), max_size=30))
def test_stream_holds_back_only_a_possible_marker_start(name, marker, text):
    """Before any marker, what has been sent after each piece is the text less its longest tail that is a
    proper prefix of the marker."""
    if marker in text:
        return
    parser = PARSERS[name]()
    sent = ""
    for end in range(1, len(text) + 1):
        sent += parser.feed(text[end - 1])[0]
        held = max((n for n in range(len(marker)) if text[:end].endswith(marker[:n])), default=0)
        assert sent == text[: end - held]
    assert sent + parser.flush()[0] == text


# ---- the registry -------------------------------------------------------------------------------------


def test_registry_names_and_fresh_instances():
    assert sorted(TOOL_PARSERS) == ["hermes", "llama3_json", "mistral"]
    first, second = tool_parser("hermes"), tool_parser("hermes")
    assert first is not second and isinstance(first, ToolParser)
    assert first.feed("<tool_call>") == ("", []) and second.feed("plain") == ("plain", [])


def test_unknown_parser_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown tool call parser 'pythonic'.*hermes, llama3_json, mistral"):
        tool_parser("pythonic")
