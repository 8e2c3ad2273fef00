"""A model's generated text -> OpenAI tool calls, for a finished output and for a stream.

The server picks a parser by name (`--tool-call-parser hermes`, as vLLM's) and makes one per generated
choice: `extract` reads a finished output, `feed`/`flush` read a stream and hold the state between its
pieces. Each parser is written twice on purpose: `extract` reads the whole text with the standard JSON
decoder, the stream reads it a piece at a time with json_stream's readers (qwen3_coder's XML: xml_calls.py,
regular expressions whole and a reader that keeps its place streamed; pythonic's lists of calls: Python's
own `ast`, whole, and held until the stream ends), and the tests check that every way of cutting a text into
pieces gives what `extract` gives. The stream sends content at once unless it may be the start of a
tool-call marker, and sends calls as `CallDelta`s: a call's first with its name, the next ones with more of
its arguments' JSON text. The JSON formats (hermes, llama3_json, mistral; "required") send the arguments as
they are generated, the text the model wrote (json_call.py); qwen3_coder, whose values are not JSON until
each is read and typed, sends a parameter at a time (`{`, each `"key": value` at its `</parameter>`, `}`:
exactly json.dumps of the typed arguments); pythonic sends each call in one piece once the list is read.

One rule for a malformed call, the same whole and streamed: calls are read in order, and reading stops at the
first one that is not well formed (its JSON does not parse, it has no non-empty string "name", its arguments
are not an object, its XML is not the format's, or what follows it is not what the format expects). A call is
decided (and a stream may send it) once it can no longer turn out to be no call: a JSON call at its head
`{"name": "f", "arguments": {`, else when its object closes; a qwen3_coder call at its `<function=f>` (broken
after it, it keeps its complete parameters: xml_calls.py); pythonic when the list is read. A call
that is malformed before that point is dropped with everything after it; one malformed after it (its JSON
broken or cut short after the head, or followed by something other than what the format expects) is kept, as
written, as the last call. If no call was read, the whole output is content, as if no parser ran. vLLM's
finished-output parsers make everything content when any call is malformed; we keep the calls before it (and
the one decided), so that what a stream sends never has to be taken back (vLLM's own streaming cannot take a
sent call back either). So from the marker (for llama3_json, from the first `{`) until the first call is
decided, a stream holds everything back: it may yet turn out to be content. pythonic is the exception: its
output is calls only when all of it is a list of calls, as in vLLM (a Python list is read whole).

The parser classes live in a module per format family: base.py (what they share), json_call.py (one JSON
call object, for the JSON formats), tagged.py (hermes, qwen3_coder), json_calls.py (llama3_json, mistral),
pythonic.py, required.py (tool_choice "required").
"""

from __future__ import annotations

from nanovllm.server.tool_parsers.base import CallDelta, ToolCall, ToolParser
from nanovllm.server.tool_parsers.json_calls import Llama3JsonToolParser, MistralToolParser
from nanovllm.server.tool_parsers.pythonic import PythonicToolParser
from nanovllm.server.tool_parsers.required import RequiredCallsParser
from nanovllm.server.tool_parsers.tagged import HermesToolParser, Qwen3CoderToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser
    for parser in (
        HermesToolParser,
        Llama3JsonToolParser,
        MistralToolParser,
        PythonicToolParser,
        Qwen3CoderToolParser,
    )
}


def tool_parser(name: str, tools: list[dict] | None = None) -> ToolParser:
    """A fresh parser (one per generated choice) by its --tool-call-parser name; tools: the request's."""
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; known parsers: {', '.join(TOOL_PARSERS)}")
    return TOOL_PARSERS[name](tools)


__all__ = [
    "TOOL_PARSERS",
    "CallDelta",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "MistralToolParser",
    "PythonicToolParser",
    "Qwen3CoderToolParser",
    "RequiredCallsParser",
    "ToolCall",
    "ToolParser",
    "tool_parser",
]
