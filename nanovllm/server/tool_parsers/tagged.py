"""Calls each opened by a tag, after content: hermes (`<tool_call>` and a JSON object, read by json_call.py)
and qwen3_coder (`<tool_call>` and XML, read by xml_calls.py). `_TaggedCallsParser` reads the content and the
run of calls, whole and streamed; each format supplies only how one call after its tag is read."""

from __future__ import annotations

from typing import Any, ClassVar

from nanovllm.server import xml_calls
from nanovllm.server.json_stream import Read, expect, find_marker, skip_ws
from nanovllm.server.tool_parsers.base import CallDelta, Mode, ToolCall, ToolParser
from nanovllm.server.tool_parsers.json_call import CallReader, Piece, read_call

# ---- what the tagged formats share -------------------------------------------------------------------


class _TaggedCallsParser(ToolParser):
    """Content, then calls each opened by the start tag `_START`: content is the text before the first
    one; text between and after calls is dropped (as vLLM does). A subclass reads one call after its tag,
    whole (`_call_at`) and from a growing text (`_call_reader`: pieces of the call, then the index past
    it)."""

    _START: ClassVar[str]

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._mode = Mode.CONTENT
        self._region = -1  # where the first start tag is: content from there if no call is read
        self._reader: Any = None  # the call being read: `.read(text, final)` -> (Piece | None, end | Read)

    def _call_at(self, text: str, pos: int) -> tuple[ToolCall, int | None] | None:
        """The call just past a start tag at pos, read whole, and the index past it (None: it is the last
        call); None: no call."""
        raise NotImplementedError

    def _call_reader(self, pos: int) -> Any:
        """A reader of the call just past a start tag at pos, from a growing text: `.read(text, final)` ->
        (a piece of the call to send now or None, MORE, BAD (no call, or the last if a piece was sent) or
        the index past the call)."""
        raise NotImplementedError

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        first = text.find(self._START)
        calls: list[ToolCall] = []
        start = first
        while start >= 0 and (read := self._call_at(text, start + len(self._START))) is not None:
            calls.append(read[0])
            start = -1 if read[1] is None else text.find(self._START, read[1])
        if not calls:
            return text or None, []
        return text[:first] or None, calls

    def _advance(self, final: bool) -> tuple[str, list[CallDelta]]:
        text = self._text
        content: list[str] = []
        pieces: list[CallDelta] = []
        while True:
            if self._mode is Mode.CONTENT or self._mode is Mode.BETWEEN:
                stop, found = find_marker(text, self._pos, self._START, final)
                if self._mode is Mode.CONTENT:
                    content.append(text[self._pos : stop])
                self._pos = stop
                if not found:
                    break
                if self._mode is Mode.CONTENT:
                    self._region = stop
                self._reader = self._call_reader(stop + len(self._START))
                self._mode = Mode.CALL
            elif self._mode is Mode.CALL:
                piece, read = self._reader.read(text, final)
                if piece is not None:
                    pieces.append(self._piece(*piece))
                if read is Read.MORE:
                    break
                if read is Read.BAD:
                    if self._num_calls == 0:  # all held back since the first tag is content
                        self._mode, self._pos = Mode.PASS, self._region
                    else:
                        self._mode = Mode.DONE
                    continue
                self._pos = read
                self._mode = Mode.BETWEEN
            elif self._mode is Mode.PASS:
                content.append(text[self._pos :])
                self._pos = len(text)
                break
            else:  # DONE
                self._pos = len(text)
                break
        return "".join(content), pieces


# ---- hermes ------------------------------------------------------------------------------------------


class HermesToolParser(_TaggedCallsParser):
    """Qwen2.5, Qwen3 and Hermes models: content, then calls, each
    `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, its arguments streamed as they are
    generated (json_call.py). The last call may be left unclosed when generation stopped right after its
    JSON; a call followed by anything but `</tool_call>` is the last. A missing "arguments" is `{}` (the
    marker already says this is a call); "parameters" in its place makes it no call, as in vLLM's hermes
    parser, which does not read that key either."""

    name = "hermes"
    skip_special_tokens = False  # (Hermes 2 Pro and 3 make <tool_call> a special token; Qwen does not)
    _START = "<tool_call>"
    _END = "</tool_call>"
    _ARGS_KEYS = ("arguments",)

    def _call_at(self, text: str, pos: int) -> tuple[ToolCall, int | None] | None:
        read = read_call(text, pos, self._ARGS_KEYS, False)
        if read is None or read[1] is None:
            return read
        end = skip_ws(text, read[1])
        if text.startswith(self._END, end):
            return read[0], end + len(self._END)
        return read[0], (end if end == len(text) else None)

    def _call_reader(self, pos: int) -> _HermesCallReader:
        return _HermesCallReader(CallReader(pos, self._ARGS_KEYS, False), self._END)


class _HermesCallReader:
    """One hermes call read out of a growing text: its JSON object (json_call.CallReader), then
    `</tool_call>` (or, in a final text, its end: generation stopped right after the JSON)."""

    def __init__(self, call: CallReader, end_tag: str) -> None:
        self.call, self.end_tag = call, end_tag
        self.pos = -1  # once the object is read: the index past it

    def read(self, text: str, final: bool) -> tuple[Piece | None, int | Read]:
        piece = None
        if self.pos < 0:
            piece, read = self.call.read(text, final)
            if isinstance(read, Read):
                return piece, read
            self.pos = read
        pos = self.pos = skip_ws(text, self.pos)
        if final and pos == len(text):
            return piece, pos
        return piece, expect(text, pos, self.end_tag, final)


# ---- qwen3_coder -------------------------------------------------------------------------------------


class Qwen3CoderToolParser(_TaggedCallsParser):
    """Qwen3-Coder and Qwen3.5: content, then calls in XML, each
    `<tool_call>\n<function=f>\n<parameter=k>\nvalue\n</parameter>\n</function>\n</tool_call>`
    (xml_calls.py reads them). As hermes: content is the text before the first `<tool_call>`, text between
    and after calls is dropped, and the last call may be left without its `</tool_call>` when generation
    stopped after its `</function>`. Values are typed from the request's tool schemas
    (xml_calls.typed_value); a function not in the tools is still a call, its values strings.

    A call is decided at its `<function=f>` and streams a parameter at a time: its name and `{` then, each
    parameter's `"k": value` (after `, ` but for the first) at its `</parameter>`, and `}` at its
    `</function>`; a call broken after its `<function=f>` (cut short by max_tokens, a key given twice, text
    in its body, or anything but `</tool_call>` after it) is closed after its last complete parameter, the
    last call read, whole and streamed alike (xml_calls.py)."""

    name = "qwen3_coder"  # (<tool_call> is not a special token in Qwen's tokenizers: the default detokenizer)

    _START = xml_calls.CALL_START

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._properties = xml_calls.tool_properties(tools)

    def _call_at(self, text: str, pos: int) -> tuple[ToolCall, int | None] | None:
        read = xml_calls.read_call(text, pos)
        if read is None:
            return None
        name, params, end = read
        properties = self._properties.get(name)
        members = [xml_calls.argument_member(key, value, properties) for key, value in params.items()]
        return ToolCall(name, "{" + ", ".join(members) + "}"), end

    def _call_reader(self, pos: int) -> _XmlCallReader:
        return _XmlCallReader(xml_calls.CallReader(pos), self._properties)


class _XmlCallReader:
    """xml_calls.CallReader, its call sent as it is read: the name and `{` once decided, a member per
    parameter read, `}` once the call is closed or broken. Joined, the pieces are _call_at's arguments."""

    def __init__(self, reader: xml_calls.CallReader, properties: dict[str, dict]) -> None:
        self.reader, self.properties = reader, properties
        self.started = False  # whether the name and `{` were sent
        self.num_sent = 0  # how many parameters were sent
        self.closed = False  # whether the `}` was sent

    def read(self, text: str, final: bool) -> tuple[Piece | None, int | Read]:
        reader = self.reader
        read = reader.read(text, final)
        if reader.name is None or self.closed:
            return None, read
        first, self.started = not self.started, True
        parts = ["{"] if first else []
        properties = self.properties.get(reader.name)
        for key, value in list(reader.params.items())[self.num_sent :]:
            parts.append(", " * (self.num_sent > 0) + xml_calls.argument_member(key, value, properties))
            self.num_sent += 1
        if reader.closed or read is Read.BAD:  # (BAD: the call ends here, the last)
            parts.append("}")
            self.closed = True
        arguments = "".join(parts)
        return ((reader.name if first else None, arguments) if first or arguments else None), read
