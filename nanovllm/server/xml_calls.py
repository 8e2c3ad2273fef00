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
request's tool schema does (`typed_value`).

As with json_stream, the reader is written twice: `read_call` reads a finished text with regular
expressions, `CallReader` reads a growing one and keeps its place, and the tests check that both agree
however the text is cut. What they accept after a `<tool_call>` (whitespace is JSON's: space, tab, CR, LF):

    ws <function=NAME> (ws <parameter=KEY> VALUE </parameter>)* ws </function> ws (</tool_call> | the end)

NAME and KEY are one or more characters other than `<`, `>` and a newline; VALUE holds no `</parameter>`.
The end of the text stands for `</tool_call>` only in a finished text: generation may stop right after a
call.

A call is decided at its `<function=NAME>`: from there on it can no longer turn out to be no call, so a
stream sends its name then, and each parameter once its `</parameter>` is read. Its arguments are its
complete parameters, in order, up to the first thing that is not the grammar's: a parameter cut short (by
max_tokens), a key given twice (its first value was sent already), text in the body, or what follows
`</function>` if it is not `</tool_call>`. A call broken so is kept with the parameters before the break, and
it is the last call read; one broken before its `<function=NAME>` is complete is no call.
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
_FUNCTION_RE = re.compile(rf"{_WS}<function=({_NAME})>")
_PARAMETER_RE = re.compile(rf"{_WS}<parameter=({_NAME})>({_VALUE})</parameter>", re.DOTALL)
_CLOSE_RE = re.compile(rf"{_WS}</function>{_WS}(?:</tool_call>|\Z)")
_NAME_STOP = re.compile(r"[<>\n]")

# (function name, raw parameter values in order, the index past the call or None: it is the last call)
RawCall = tuple[str, dict[str, str], int | None]


def _value(text: str) -> str:
    """A parameter's text less the newline after its opening tag and the one before its closing tag."""
    text = text.removeprefix("\n")
    return text.removesuffix("\n")


def read_call(text: str, pos: int) -> RawCall | None:
    """The whole-text reader: the call at text[pos:] (just past its <tool_call>), or None when there is
    none (it breaks before its `<function=NAME>` is complete)."""
    function = _FUNCTION_RE.match(text, pos)
    if function is None:
        return None
    params: dict[str, str] = {}
    pos = function.end()
    while (parameter := _PARAMETER_RE.match(text, pos)) is not None and parameter[1] not in params:
        params[parameter[1]] = _value(parameter[2])
        pos = parameter.end()
    close = _CLOSE_RE.match(text, pos)
    return function[1], params, (None if close is None else close.end())


class _Step(Enum):
    """What CallReader reads next."""

    FUNCTION = "function"  # whitespace, `<function=`
    NAME = "name"  # the function's name and `>`
    BODY = "body"  # whitespace, then `<parameter=` or `</function>`
    PARAMETER = "parameter"  # a parameter's key and `>`
    VALUE = "value"  # a value up to `</parameter>`
    CLOSE = "close"  # whitespace, `</tool_call>` (or the end of a final text)


class CallReader:
    """One call read out of a growing text from `pos` (just past its <tool_call>), as read_call reads it.
    Keeps its place between calls, so each character is scanned about once however the text arrives.
    What it has read stays readable between reads: `name` once the call is decided, `params` its complete
    parameters so far, `closed` once its `</function>` is read."""

    def __init__(self, pos: int) -> None:
        self.pos = pos
        self.step = _Step.FUNCTION
        self.start = pos  # where the name or the value being read starts
        self.name: str | None = None
        self.parameter = ""  # the parameter whose value is being read
        self.params: dict[str, str] = {}
        self.closed = False

    def read(self, text: str, final: bool) -> int | Read:
        """The index past the call, or MORE (the text so far may yet become more of it), or BAD (MORE
        becomes BAD when final): no call while `name` is None, else the call ends with `params` as they
        are and is the last."""
        while True:
            if self.step is _Step.FUNCTION or self.step is _Step.CLOSE:
                pos = self.pos = skip_ws(text, self.pos)
                if self.step is _Step.CLOSE and final and pos == len(text):
                    return pos
                literal = _FUNCTION if self.step is _Step.FUNCTION else CALL_END
                end = expect(text, pos, literal, final)
                if isinstance(end, Read) or self.step is _Step.CLOSE:
                    return end
                self.pos = self.start = end
                self.step = _Step.NAME
            elif self.step is _Step.NAME or self.step is _Step.PARAMETER:
                stop = _NAME_STOP.search(text, self.pos)
                if stop is None:
                    self.pos = len(text)
                    return Read.BAD if final else Read.MORE
                if stop.group() != ">" or stop.start() == self.start:
                    return Read.BAD
                name = text[self.start : stop.start()]
                if self.step is _Step.NAME:
                    self.name = name
                    self.step = _Step.BODY
                elif name in self.params:  # (a key given twice: the first was sent)
                    return Read.BAD
                else:
                    self.parameter = name
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
                    self.closed = True
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


def argument_member(key: str, text: str, properties: dict[str, dict] | None) -> str:
    """One parameter as a member of its call's arguments object, `"key": value`, its raw text typed from
    its schema (properties: its function's parameter schemas; None for a function not in the tools, whose
    values stay strings, as in vLLM). As json.dumps(ensure_ascii=False) writes a member, so a call's
    arguments, `{` + its members joined by `, ` + `}`, are json.dumps of the typed object, and a stream can
    send them a member at a time."""
    value = typed_value(text, (properties or {}).get(key))
    return f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}"
