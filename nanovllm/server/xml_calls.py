"""The reading half of the qwen3_coder tool-call parser: calls written in XML, and their values typed.

Qwen3-Coder and Qwen3.5 write a call as

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

A value is raw text up to its `</parameter>` (one leading and one trailing newline are the layout, not the
value), so unlike the JSON formats the text alone does not say whether `3` is a number or a string: the
request's tool schema does (`typed_arguments`).

As with json_stream, the reader is written twice: `read_call` reads a finished text with regular
expressions, `CallReader` reads a growing one and keeps its place, and the tests check that both agree
however the text is cut. What they accept after a `<tool_call>` (whitespace is JSON's: space, tab, CR, LF):

    ws <function=NAME> (ws <parameter=NAME> VALUE </parameter>)* ws </function> ws (</tool_call> | the end)

NAME is one or more characters other than `<`, `>` and a newline; VALUE holds no `</parameter>`. The end
of the text stands for `</tool_call>` only in a finished text: generation may stop right after a call.
"""

from __future__ import annotations

import json
import math
import re
from enum import Enum
from typing import Any

from nanovllm.server.json_stream import Read, expect, skip_ws

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
_FUNCTION = "<function="
_FUNCTION_END = "</function>"
_PARAMETER = "<parameter="
_PARAMETER_END = "</parameter>"

_WS = r"[ \t\n\r]*"
_NAME = r"[^<>\n]+"
_VALUE = r"(?:(?!</parameter>).)*"
_PARAMETER_RE = re.compile(rf"<parameter=({_NAME})>({_VALUE})</parameter>", re.DOTALL)
_CALL_RE = re.compile(
    rf"{_WS}<function=({_NAME})>((?:{_WS}<parameter={_NAME}>{_VALUE}</parameter>)*){_WS}</function>{_WS}"
    rf"(?:</tool_call>|\Z)",
    re.DOTALL,
)
_NAME_STOP = re.compile(r"[<>\n]")

RawCall = tuple[str, dict[str, str], int]  # (function name, raw parameter values, index past the call)


def _value(text: str) -> str:
    """A parameter's text less the newline after its opening tag and the one before its closing tag."""
    text = text.removeprefix("\n")
    return text.removesuffix("\n")


def read_call(text: str, pos: int) -> RawCall | None:
    """The whole-text reader: the call at text[pos:] (just past its <tool_call>), or None."""
    match = _CALL_RE.match(text, pos)
    if match is None:
        return None
    params = {name: _value(value) for name, value in _PARAMETER_RE.findall(match.group(2))}
    return match.group(1), params, match.end()


class _Step(Enum):
    """What CallReader reads next."""

    FUNCTION = "function"  # whitespace, `<function=`
    NAME = "name"  # the function's name and `>`
    BODY = "body"  # whitespace, then `<parameter=` or `</function>`
    PARAMETER = "parameter"  # a parameter's name and `>`
    VALUE = "value"  # a value up to `</parameter>`
    CLOSE = "close"  # whitespace, `</tool_call>` (or the end of a final text)


class CallReader:
    """One call read out of a growing text from `pos` (just past its <tool_call>), as read_call reads it.
    Keeps its place between calls, so each character is scanned about once however the text arrives."""

    def __init__(self, pos: int) -> None:
        self.pos = pos
        self.step = _Step.FUNCTION
        self.start = pos  # where the name or the value being read starts
        self.name = ""
        self.parameter = ""  # the parameter whose value is being read
        self.params: dict[str, str] = {}

    def read(self, text: str, final: bool) -> RawCall | Read:
        """The call, or MORE (the text so far may yet become one), or BAD (MORE becomes BAD when final)."""
        while True:
            if self.step is _Step.FUNCTION or self.step is _Step.CLOSE:
                pos = self.pos = skip_ws(text, self.pos)
                if self.step is _Step.CLOSE and final and pos == len(text):
                    return self.name, self.params, pos
                literal = _FUNCTION if self.step is _Step.FUNCTION else CALL_END
                end = expect(text, pos, literal, final)
                if isinstance(end, Read):
                    return end
                if self.step is _Step.CLOSE:
                    return self.name, self.params, end
                self.pos = self.start = end
                self.step = _Step.NAME
            elif self.step is _Step.NAME or self.step is _Step.PARAMETER:
                stop = _NAME_STOP.search(text, self.pos)
                if stop is None:
                    self.pos = len(text)
                    return Read.BAD if final else Read.MORE
                if stop.group() != ">" or stop.start() == self.start:
                    return Read.BAD
                if self.step is _Step.NAME:
                    self.name = text[self.start : stop.start()]
                    self.step = _Step.BODY
                else:
                    self.parameter = text[self.start : stop.start()]
                    self.step = _Step.VALUE
                self.pos = self.start = stop.end()
            elif self.step is _Step.BODY:
                pos = self.pos = skip_ws(text, self.pos)
                parameter = expect(text, pos, _PARAMETER, final)
                function_end = expect(text, pos, _FUNCTION_END, final)
                if isinstance(parameter, int):
                    self.pos = self.start = parameter
                    self.step = _Step.PARAMETER
                elif isinstance(function_end, int):
                    self.pos = function_end
                    self.step = _Step.CLOSE
                else:
                    return Read.MORE if Read.MORE in (parameter, function_end) else Read.BAD
            else:  # VALUE
                end = text.find(_PARAMETER_END, self.pos)
                if end < 0:  # (a `</parameter>` may be arriving: look again from where it could start)
                    self.pos = max(self.start, len(text) - len(_PARAMETER_END) + 1)
                    return Read.BAD if final else Read.MORE
                self.params[self.parameter] = _value(text[self.start : end])
                self.pos = end + len(_PARAMETER_END)
                self.step = _Step.BODY


# ---- typing the values from the schema -----------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity, which the json module reads by default


def _json(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None


def _typed(text: str, type_name: str) -> tuple[bool, Any]:
    """(whether text reads as type_name, the value)."""
    word = text.strip().lower()
    if type_name == "null":
        return word == "null", None
    if type_name == "boolean":
        return word in ("true", "false"), word == "true"
    value = _json(text)
    if type_name == "integer":
        return isinstance(value, int) and not isinstance(value, bool), value
    if type_name == "number":
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return number, value
    if type_name == "object":
        return isinstance(value, dict), value
    return isinstance(value, list), value  # "array"


_TYPE_ORDER = ("null", "boolean", "integer", "number", "object", "array")  # then the text as a string


def typed_value(text: str, schema: Any) -> Any:
    """A parameter's raw text -> its JSON value, by its schema's "type" (a name or a list of names): the
    first of the types, in _TYPE_ORDER, that the text reads as; else the text itself. Without a "type"
    (or for "string", or a schema we do not read, such as anyOf) the value is the text."""
    types = schema.get("type") if isinstance(schema, dict) else None
    types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
    for type_name in _TYPE_ORDER:
        if type_name in types:
            ok, value = _typed(text, type_name)
            if ok:
                return value
    return text


def tool_properties(tools: list[dict] | None) -> dict[str, dict]:
    """The request's tools (OpenAI's shape) -> each function's parameter schemas by parameter name."""
    properties: dict[str, dict] = {}
    for tool in tools or []:
        function = tool.get("function") or {}
        parameters = function.get("parameters") or {}
        found = parameters.get("properties") if isinstance(parameters, dict) else None
        properties.setdefault(function.get("name"), found if isinstance(found, dict) else {})
    return properties


def typed_arguments(params: dict[str, str], properties: dict[str, dict] | None) -> dict[str, Any]:
    """A call's raw values typed from its function's parameter schemas (properties None: a function not
    in the tools, whose values stay strings, as in vLLM)."""
    properties = properties or {}
    return {name: typed_value(text, properties.get(name)) for name, text in params.items()}
