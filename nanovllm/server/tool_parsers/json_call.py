"""One tool call written as a JSON object, `{"name": "f", "arguments": {...}}`, read whole (`read_call`) and
streamed (`CallReader`): what the JSON formats share (hermes, llama3_json, mistral, tool_choice "required").

A call's arguments are the text of its arguments object exactly as the model wrote it (checked to be a JSON
object, never re-serialized; a call without them has `{}`). That is what lets a stream send the arguments
as they are generated, and its pieces still join to exactly what the whole reply gives.

When a call is decided, so that a stream can send it and never take it back:
- At its head, `{"name": "f", "arguments": {` (any JSON whitespace between; the format's arguments key),
  the order the models write. Its name goes out, then its arguments as they arrive, up to the brace that
  closes them (json_stream.BracketScanner): nothing after that brace is arguments. The rest of the object
  (`}`, or more keys) is read after: if the whole object is not a well-formed call with that name and
  those arguments (they are not JSON, another "name" or arguments key follows...), or the text ends first
  (cut by max_tokens), the call stays as sent, its arguments as far as they were written, and it is the
  last call read.
- Otherwise (another key first, the arguments first, or none), at its closing brace, when the standard
  decoder reads the object as a call; it is sent whole then.
Until a call is decided, it may still turn out to be no call (content, or the end of the calls), so nothing
of it is sent.
"""

from __future__ import annotations

import json
import re
from typing import Any

from nanovllm.server.json_stream import BracketScanner, ObjectReader, Read, decode_object, skip_ws
from nanovllm.server.tool_parsers.base import ToolCall

ARGS_KEYS = ("arguments", "parameters")  # what the formats call a call's arguments

Piece = tuple[str | None, str]  # a piece of a streamed call: (its name, on its first only; arguments text)

_WS = r"[ \t\n\r]*"
_STRING = r'"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"'  # a JSON string, escapes and all
_KEY = "|".join(ARGS_KEYS)
_HEAD = re.compile(rf'\{{{_WS}"name"{_WS}:{_WS}({_STRING}){_WS},{_WS}"({_KEY})"{_WS}:{_WS}\{{')
_DECODER = json.JSONDecoder()


def _head(text: str, start: int, args_keys: tuple[str, ...]) -> tuple[str, int] | None:
    """(the name, where the arguments' `{` is) when the object at text[start] opens with a non-empty name
    and then the format's arguments key, else None."""
    head = _HEAD.match(text, start)
    if head is None or head[2] not in args_keys:
        return None
    name = json.loads(head[1])
    return (name, head.end() - 1) if name else None


def _object_call(
    text: str, start: int, obj: Any, args_keys: tuple[str, ...], args_required: bool
) -> ToolCall | None:
    """The object decoded from text[start:] -> a ToolCall with its arguments' own text, or None when it is
    not one. The arguments come under one of args_keys; more than one of them is ambiguous, none is `{}`
    unless args_required. Arguments under the other format's key (hermes' `"parameters"`) make it no call:
    read as `{}` they would be lost without a word, and vLLM's parsers make such an output content too."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    keys = [key for key in ARGS_KEYS if key in obj]
    if len(keys) > 1 or (not keys and args_required) or not set(keys) <= set(args_keys):
        return None
    if not keys:
        return ToolCall(name, "{}")
    if not isinstance(obj[keys[0]], dict):
        return None
    begin, end = _member_spans(text, start)[keys[0]]
    return ToolCall(name, text[begin:end])


def _member_spans(text: str, start: int) -> dict[str, tuple[int, int]]:
    """Where each member's value is in the well-formed object at text[start:] (a key given twice: its last
    value, the one the decoder keeps)."""
    spans = {}
    pos = skip_ws(text, start + 1)
    while text[pos] != "}":
        key, pos = _DECODER.raw_decode(text, pos)
        begin = skip_ws(text, skip_ws(text, pos) + 1)  # past the `:`
        end = _DECODER.raw_decode(text, begin)[1]
        spans[key] = (begin, end)
        pos = skip_ws(text, end)
        if text[pos] == ",":
            pos = skip_ws(text, pos + 1)
    return spans


def read_call(
    text: str, pos: int, args_keys: tuple[str, ...], args_required: bool
) -> tuple[ToolCall, int | None] | None:
    """The call object at text[pos:] (after whitespace), read whole: (the call, the index past its object,
    or None when it must be the last call: decided at its head, then broken or cut short), or None when it
    is no call."""
    start = skip_ws(text, pos)
    decoded = decode_object(text, start)
    whole = None if decoded is None else _object_call(text, start, decoded[0], args_keys, args_required)
    head = _head(text, start, args_keys)
    if head is None:
        return None if whole is None else (whole, decoded[1])
    name, args_start = head
    args_end = BracketScanner().scan(text, args_start)
    call = ToolCall(name, text[args_start : args_end if args_end >= 0 else len(text)])
    return call, (decoded[1] if whole == call else None)


class CallReader:
    """One call object read out of a growing text from pos, as read_call reads it whole. `read` gives (a
    piece to send now or None, MORE, BAD or the index past the call's well-formed object). BAD: no call when
    nothing was sent, else the call sent must be the last."""

    def __init__(self, pos: int, args_keys: tuple[str, ...], args_required: bool) -> None:
        self.object = ObjectReader(pos)  # the call's whole object
        self.args_keys, self.args_required = args_keys, args_required
        self.name: str | None = None  # once the head is read: the call's name (sent)
        self.args = BracketScanner()  # after the head: the arguments' brackets
        self.args_start = self.args_end = -1  # the arguments' text, once known
        self.scanned = self.sent = -1  # after the head: how far the arguments were scanned, and sent

    def read(self, text: str, final: bool) -> tuple[Piece | None, int | Read]:
        whole = self.object.read(text, final)
        first = self.name is None
        if first:
            head = None if self.object.start < 0 else _head(text, self.object.start, self.args_keys)
            if head is None:  # (not decided until the object closes)
                if not isinstance(whole, tuple):
                    return None, whole
                call = self._object_call(text, whole[0])
                return (None, Read.BAD) if call is None else ((call.name, call.arguments), whole[1])
            self.name, self.args_start = head
            self.scanned = self.sent = self.args_start
        if self.args_end < 0:
            self.args_end = self.args.scan(text, self.scanned)
            self.scanned = len(text)
        stop = self.args_end if self.args_end >= 0 else len(text)
        fragment, self.sent = text[self.sent : stop], stop
        piece = (self.name if first else None, fragment) if first or fragment else None
        if self.args_end < 0:  # (the object cannot have closed either)
            return piece, Read.BAD if final else Read.MORE
        if not isinstance(whole, tuple):
            return piece, whole
        sent = ToolCall(self.name, text[self.args_start : self.args_end])
        return piece, whole[1] if self._object_call(text, whole[0]) == sent else Read.BAD

    def _object_call(self, text: str, obj: Any) -> ToolCall | None:
        return _object_call(text, self.object.start, obj, self.args_keys, self.args_required)
