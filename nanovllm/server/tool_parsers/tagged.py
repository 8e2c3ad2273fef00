"""Calls each opened by a tag, after content: hermes (`<tool_call>` and a JSON object) and qwen3_coder
(`<tool_call>` and XML, read by xml_calls.py). `_TaggedCallsParser` reads the content and the run of calls,
whole and streamed; each format supplies only how one call after its tag is read."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar

from nanovllm.server import xml_calls
from nanovllm.server.json_stream import ObjectReader, Read, decode_object, expect, find_marker, skip_ws
from nanovllm.server.tool_parsers.base import Mode, ToolCall, ToolParser, object_to_call

# ---- what the tagged formats share -------------------------------------------------------------------


class _TaggedCallsParser(ToolParser):
    """Content, then calls each opened by the start tag `_START`: content is the text before the first
    one; text between and after calls is dropped (as vLLM does). A subclass reads one call after its tag,
    whole (`_call_at`) and from a growing text (`_call_reader`), each giving (the call, the index past it)."""

    _START: ClassVar[str]

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._mode = Mode.CONTENT
        self._region = -1  # where the first start tag is: content from there if no call is read
        self._num_calls = 0
        self._reader: Any = None  # the call being read: `.read(text, final)` -> (call, end) | Read

    def _call_at(self, text: str, pos: int) -> tuple[ToolCall, int] | None:
        """The call just past a start tag at pos, read whole, and the index past it; None: no call."""
        raise NotImplementedError

    def _call_reader(self, pos: int) -> Any:
        """A reader of the call just past a start tag at pos, from a growing text."""
        raise NotImplementedError

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        first = text.find(self._START)
        calls: list[ToolCall] = []
        start = first
        while start >= 0 and (read := self._call_at(text, start + len(self._START))) is not None:
            calls.append(read[0])
            start = text.find(self._START, read[1])
        if not calls:
            return text or None, []
        return text[:first] or None, calls

    def _advance(self, final: bool) -> tuple[str, list[ToolCall]]:
        text = self._text
        content: list[str] = []
        calls: list[ToolCall] = []
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
                read = self._reader.read(text, final)
                if read is Read.MORE:
                    break
                if read is Read.BAD:
                    if self._num_calls == 0:  # all held back since the first tag is content
                        self._mode, self._pos = Mode.PASS, self._region
                    else:
                        self._mode = Mode.DONE
                    continue
                calls.append(read[0])
                self._num_calls += 1
                self._pos = read[1]
                self._mode = Mode.BETWEEN
            elif self._mode is Mode.PASS:
                content.append(text[self._pos :])
                self._pos = len(text)
                break
            else:  # DONE
                self._pos = len(text)
                break
        return "".join(content), calls


# ---- hermes ------------------------------------------------------------------------------------------


class HermesToolParser(_TaggedCallsParser):
    """Qwen2.5, Qwen3 and Hermes models: content, then calls, each
    `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`. The last call may be left unclosed
    when generation stopped right after its JSON. A missing "arguments" is `{}` (the marker already says
    this is a call); "parameters" in its place makes it no call, as in vLLM's hermes parser, which does not
    read that key either."""

    name = "hermes"
    skip_special_tokens = False  # (Hermes 2 Pro and 3 make <tool_call> a special token; Qwen does not)
    _START = "<tool_call>"
    _END = "</tool_call>"

    @staticmethod
    def _to_call(obj: Any) -> ToolCall | None:
        return object_to_call(obj, ("arguments",), False)

    def _call_at(self, text: str, pos: int) -> tuple[ToolCall, int] | None:
        decoded = decode_object(text, pos)
        call = None if decoded is None else self._to_call(decoded[0])
        if call is None:
            return None
        end = skip_ws(text, decoded[1])
        if text.startswith(self._END, end):
            return call, end + len(self._END)
        return (call, end) if end == len(text) else None

    def _call_reader(self, pos: int) -> _HermesCallReader:
        return _HermesCallReader(pos, self._to_call, self._END)


class _HermesCallReader:
    """One hermes call read out of a growing text: its JSON object, then `</tool_call>` (or, in a final
    text, its end: generation stopped right after the JSON)."""

    def __init__(self, pos: int, to_call: Callable[[Any], ToolCall | None], end_tag: str) -> None:
        self.object = ObjectReader(pos)
        self.to_call, self.end_tag = to_call, end_tag
        self.call: ToolCall | None = None  # once the object is read: the call whose end tag is awaited
        self.pos = pos

    def read(self, text: str, final: bool) -> tuple[ToolCall, int] | Read:
        if self.call is None:
            read = self.object.read(text, final)
            if read is Read.MORE:
                return read
            self.call = None if read is Read.BAD else self.to_call(read[0])
            if self.call is None:
                return Read.BAD
            self.pos = read[1]
        pos = self.pos = skip_ws(text, self.pos)
        if final and pos == len(text):
            return self.call, pos
        end = expect(text, pos, self.end_tag, final)
        return end if isinstance(end, Read) else (self.call, end)


# ---- qwen3_coder -------------------------------------------------------------------------------------


class Qwen3CoderToolParser(_TaggedCallsParser):
    """Qwen3-Coder and Qwen3.5: content, then calls in XML, each
    `<tool_call>\n<function=f>\n<parameter=k>\nvalue\n</parameter>\n</function>\n</tool_call>`
    (xml_calls.py reads them). As hermes: content is the text before the first `<tool_call>`, text between
    and after calls is dropped, and the last call may be left without its `</tool_call>` when generation
    stopped after its `</function>`. Values are typed from the request's tool schemas
    (xml_calls.typed_value); a function not in the tools is still a call, its values strings."""

    name = "qwen3_coder"  # (<tool_call> is not a special token in Qwen's tokenizers: the default detokenizer)

    _START = xml_calls.CALL_START

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._properties = xml_calls.tool_properties(tools)

    def _call(self, read: xml_calls.RawCall) -> tuple[ToolCall, int]:
        name, params, end = read
        arguments = xml_calls.typed_arguments(params, self._properties.get(name))
        return ToolCall(name, json.dumps(arguments, ensure_ascii=False)), end

    def _call_at(self, text: str, pos: int) -> tuple[ToolCall, int] | None:
        read = xml_calls.read_call(text, pos)
        return None if read is None else self._call(read)

    def _call_reader(self, pos: int) -> _XmlCallReader:
        return _XmlCallReader(xml_calls.CallReader(pos), self._call)


class _XmlCallReader:
    """xml_calls.CallReader with its raw call typed into a ToolCall."""

    def __init__(
        self, reader: xml_calls.CallReader, to_call: Callable[[xml_calls.RawCall], tuple[ToolCall, int]]
    ) -> None:
        self.reader, self.to_call = reader, to_call

    def read(self, text: str, final: bool) -> tuple[ToolCall, int] | Read:
        read = self.reader.read(text, final)
        return read if isinstance(read, Read) else self.to_call(read)
