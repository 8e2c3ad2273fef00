"""A model's generated text -> OpenAI tool calls, for a finished output and for a stream.

The server picks a parser by name (`--tool-call-parser hermes`, as vLLM's) and makes one per generated
choice: `extract` reads a finished output, `feed`/`flush` read a stream and hold the state between its
pieces. Each parser is written twice on purpose: `extract` reads the whole text with the standard JSON
decoder, the stream reads it a piece at a time with json_stream's readers (qwen3_coder's XML: xml_calls.py,
regular expressions whole and a reader that keeps its place streamed; pythonic's lists of calls: Python's
own `ast`, whole, and held until the stream ends), and the tests check that every way
of cutting a text into pieces gives what `extract` gives. The stream sends content at once unless it may
be the start of a tool-call marker, and sends each call whole (name and full arguments) as soon as it is
complete; OpenAI clients join argument deltas, so one delta holding them all is valid.

One rule for a malformed call, the same whole and streamed: calls are read in order, and reading stops at the
first one that is not well formed (its JSON does not parse, it has no non-empty string "name", its arguments
are not an object, its XML is not the format's, or what follows it is not what the format expects). That call
and everything after it are dropped. If no call was read, the whole output is content, as if no parser ran.
vLLM's finished-output parsers make everything content when any call is malformed; we keep the calls before
it, so that a call can be sent the moment it closes and never has to be taken back (vLLM's own streaming
cannot take a sent call back either). So from the marker (for llama3_json, from the first `{`) until the first
call is decided, a stream holds everything back: it may yet turn out to be content. pythonic is the exception:
its output is calls only when all of it is a list of calls, as in vLLM (a Python list is read whole).
"""

from __future__ import annotations

import ast
import json
import math
import secrets
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from nanovllm.server import xml_calls
from nanovllm.server.json_stream import (
    ArrayStream,
    ObjectReader,
    Read,
    array_calls,
    decode_object,
    expect,
    find_marker,
    separated_calls,
    skip_ws,
)


@dataclass(frozen=True)
class ToolCall:
    """One function call, as OpenAI's `tool_calls[i].function` carries it (the server adds the id)."""

    name: str
    arguments: str  # the arguments object as JSON text: json.dumps(obj, ensure_ascii=False)


class ToolParser:
    """Turns one generated choice into content and tool calls. One instance per choice: it holds the
    streaming state."""

    name: ClassVar[str]
    # False where the marker may be a special token that the detokenizer would otherwise drop
    skip_special_tokens: ClassVar[bool] = True

    @staticmethod
    def call_id() -> str:
        """A new call's id, as the model's template expects to get it back (vLLM's random kind)."""
        return f"chatcmpl-tool-{uuid.uuid4().hex}"

    def __init__(self, tools: list[dict] | None = None) -> None:
        """tools: the request's, in OpenAI's shape; only a format whose values are untyped text reads them
        (qwen3_coder types its values from their schemas)."""
        self._text = ""  # everything fed so far
        self._pos = 0  # how far the stream has read: content before it was sent, calls before it emitted

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A finished output -> (content, calls). Content is None when empty. When the text holds no
        well-formed call, it is all content and calls is []."""
        raise NotImplementedError

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """Streaming: the next piece of generated text -> (content to send now, calls completed now)."""
        self._text += delta
        return self._advance(final=False)

    def flush(self) -> tuple[str, list[ToolCall]]:
        """The stream ended: whatever was held back."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, list[ToolCall]]:
        """Reads self._text on from self._pos as far as it can be decided (all of it when final)."""
        raise NotImplementedError


# ---- calls ---------------------------------------------------------------------------------------------

_ARGS_KEYS = ("arguments", "parameters")  # what the formats call a call's arguments


def _to_call(obj: Any, args_keys: tuple[str, ...], args_required: bool) -> ToolCall | None:
    """A decoded call object -> ToolCall, or None when it is not one. The arguments come under one of
    args_keys; more than one of them is ambiguous, none is `{}` unless args_required. Arguments under the
    other format's key (hermes' `"parameters"`) make it no call: read as `{}` they would be lost without a
    word, and vLLM's parsers make such an output content too."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    keys = [key for key in _ARGS_KEYS if key in obj]
    if len(keys) > 1 or (not keys and args_required) or not set(keys) <= set(args_keys):
        return None
    arguments = obj[keys[0]] if keys else {}
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


class _Mode(Enum):
    """Where a stream is. Each parser uses some of these."""

    CONTENT = "content"  # before the first marker: content
    START = "start"  # llama3_json, pythonic: before the first non-space character
    HOLD = "hold"  # pythonic: the output starts as a list: held to the end, then read whole
    OBJECT = "object"  # llama3_json: inside a call's JSON object
    CALL = "call"  # hermes, qwen3_coder: reading a call after its <tool_call>
    BETWEEN = "between"  # hermes, qwen3_coder: after </tool_call>, dropping text up to the next <tool_call>
    SEPARATOR = "separator"  # llama3_json: after a call, waiting for `;`
    ARRAY = "array"  # mistral: reading the call array
    PASS = "pass"  # no call was read: the rest is content
    DONE = "done"  # calls were read and reading stopped: the rest is dropped


# ---- calls opened by a tag: hermes, qwen3_coder ---------------------------------------------------------


class _TaggedCallsParser(ToolParser):
    """Content, then calls each opened by the start tag `_START`: content is the text before the first
    one; text between and after calls is dropped (as vLLM does). A subclass reads one call after its tag,
    whole (`_call_at`) and from a growing text (`_call_reader`), each giving (the call, the index past it)."""

    _START: ClassVar[str]

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._mode = _Mode.CONTENT
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
            if self._mode is _Mode.CONTENT or self._mode is _Mode.BETWEEN:
                stop, found = find_marker(text, self._pos, self._START, final)
                if self._mode is _Mode.CONTENT:
                    content.append(text[self._pos : stop])
                self._pos = stop
                if not found:
                    break
                if self._mode is _Mode.CONTENT:
                    self._region = stop
                self._reader = self._call_reader(stop + len(self._START))
                self._mode = _Mode.CALL
            elif self._mode is _Mode.CALL:
                read = self._reader.read(text, final)
                if read is Read.MORE:
                    break
                if read is Read.BAD:
                    if self._num_calls == 0:  # all held back since the first tag is content
                        self._mode, self._pos = _Mode.PASS, self._region
                    else:
                        self._mode = _Mode.DONE
                    continue
                calls.append(read[0])
                self._num_calls += 1
                self._pos = read[1]
                self._mode = _Mode.BETWEEN
            elif self._mode is _Mode.PASS:
                content.append(text[self._pos :])
                self._pos = len(text)
                break
            else:  # DONE
                self._pos = len(text)
                break
        return "".join(content), calls


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
        return _to_call(obj, ("arguments",), False)

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


# ---- llama3_json --------------------------------------------------------------------------------------


class Llama3JsonToolParser(ToolParser):
    """Llama 3.1/3.2 JSON tool calling: the whole output is calls `{"name": "f", "parameters": {...}}`
    ("arguments" also read) separated by `;`, perhaps after `<|python_tag|>` (only seen when special
    tokens are kept). An output that does not start with `{` (after whitespace and the tag) is content,
    decided by its first non-space character (or, for a `<`, once it cannot be the tag). Without a marker
    a JSON answer could look like a call, so the arguments are required here, as vLLM requires them."""

    name = "llama3_json"
    _PYTHON_TAG = "<|python_tag|>"

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._mode = _Mode.START
        self._num_calls = 0
        self._reader = ObjectReader(0)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        pos = skip_ws(text, 0)
        if text.startswith(self._PYTHON_TAG, pos):
            pos += len(self._PYTHON_TAG)
        calls = separated_calls(text, pos, ";", lambda obj: _to_call(obj, _ARGS_KEYS, True))
        return (None, calls) if calls else (text or None, [])

    def _advance(self, final: bool) -> tuple[str, list[ToolCall]]:
        text = self._text
        calls: list[ToolCall] = []
        while True:
            if self._mode is _Mode.START:
                pos = skip_ws(text, 0)
                if text.startswith(self._PYTHON_TAG, pos):
                    pos = skip_ws(text, pos + len(self._PYTHON_TAG))
                elif not final and self._PYTHON_TAG.startswith(text[pos:]):
                    break  # only whitespace so far, or the tag is arriving
                if pos == len(text) and not final:
                    break
                if text.startswith("{", pos):
                    self._reader = ObjectReader(pos)
                    self._mode = _Mode.OBJECT
                else:
                    self._mode = _Mode.PASS
            elif self._mode is _Mode.OBJECT:
                read = self._reader.read(text, final)
                if read is Read.MORE:
                    break
                call = None if read is Read.BAD else _to_call(read[0], _ARGS_KEYS, True)
                if call is None:
                    self._mode = _Mode.PASS if self._num_calls == 0 else _Mode.DONE
                    continue
                calls.append(call)
                self._num_calls += 1
                self._pos = read[1]
                self._mode = _Mode.SEPARATOR
            elif self._mode is _Mode.SEPARATOR:
                self._pos = skip_ws(text, self._pos)
                if self._pos == len(text):
                    break
                if text[self._pos] == ";":
                    self._reader = ObjectReader(self._pos + 1)
                    self._mode = _Mode.OBJECT
                else:
                    self._mode = _Mode.DONE
            elif self._mode is _Mode.PASS:  # (self._pos is still 0: nothing was sent)
                content, self._pos = text[self._pos :], len(text)
                return content, calls
            else:  # DONE
                self._pos = len(text)
                break
        return "", calls


# ---- JSON arrays of calls: mistral and tool_choice "required" -----------------------------------------


class MistralToolParser(ToolParser):
    """Mistral v0.3-style: content, then `[TOOL_CALLS]` and a JSON array of
    `{"name": "f", "arguments": {...}}`. Content is the text before the marker; a missing "arguments" is
    `{}`. The marker is a special token, so the detokenizer must keep special tokens for this parser.
    When no call can be read, the content is the text without the marker (as in vLLM's, and as a user
    would have seen it had special tokens been skipped). Elements are read as they close, so an array cut
    short after complete elements still gives those calls (vLLM's finished-output parser gives none)."""

    name = "mistral"
    skip_special_tokens = False

    @staticmethod
    def call_id() -> str:
        """Mistral's templates refuse any id but 9 letters and digits when the call comes back."""
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))

    _MARKER = "[TOOL_CALLS]"

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._mode = _Mode.CONTENT
        self._region = -1  # where the marker is: content from there (less markers) if no call is read
        self._array = ArrayStream(0, self._call)

    @staticmethod
    def _call(obj: Any) -> ToolCall | None:
        return _to_call(obj, ("arguments",), False)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        marker = text.find(self._MARKER)
        calls = [] if marker < 0 else array_calls(text, marker + len(self._MARKER), self._call)
        if not calls:
            return text.replace(self._MARKER, "") or None, []
        return text[:marker] or None, calls

    def _advance(self, final: bool) -> tuple[str, list[ToolCall]]:
        text = self._text
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self._mode is _Mode.CONTENT or self._mode is _Mode.PASS:
                stop, found = find_marker(text, self._pos, self._MARKER, final)
                content.append(text[self._pos : stop])
                self._pos = stop
                if not found:
                    break
                if self._mode is _Mode.PASS:  # no call was read: content, less the markers
                    self._pos += len(self._MARKER)
                else:
                    self._region = stop
                    self._array = ArrayStream(stop + len(self._MARKER), self._call)
                    self._mode = _Mode.ARRAY
            elif self._mode is _Mode.ARRAY:
                calls += self._array.read(text, final)
                if not self._array.done:
                    break
                if self._array.num_calls == 0:
                    self._mode, self._pos = _Mode.PASS, self._region
                else:
                    self._mode = _Mode.DONE
            else:  # DONE
                self._pos = len(text)
                break
        return "".join(content), calls


class RequiredCallsParser(ToolParser):
    """tool_choice "required": the output was constrained to a JSON array of
    `{"name": "f", "parameters": {...}}`, so it is all calls and never content. Each element is sent as a
    call as soon as its closing brace arrives; a missing "parameters" is `{}`. An output that is not such
    an array to the end (cut by max_tokens, say) gives the complete calls before the first element that
    is not one, and none if it does not start with `[`. Not in TOOL_PARSERS: the server uses it for
    "required" whatever the model's parser."""

    name = "required"

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._array = ArrayStream(0, self._call)

    @staticmethod
    def _call(obj: Any) -> ToolCall | None:
        return _to_call(obj, ("parameters",), False)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return None, array_calls(text, 0, self._call)

    def _advance(self, final: bool) -> tuple[str, list[ToolCall]]:
        calls = self._array.read(self._text, final)
        self._pos = len(self._text)
        return "", calls


# ---- qwen3_coder --------------------------------------------------------------------------------------


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


# ---- pythonic -----------------------------------------------------------------------------------------


def _json_literal(value: Any) -> bool:
    """Whether a value that ast.literal_eval read has a JSON form: tuples, sets, bytes, complex numbers,
    infinities and keys that are not strings do not."""
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_json_literal(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _json_literal(item) for key, item in value.items())
    return False


def _python_call(node: ast.expr) -> ToolCall | None:
    """`name(key=literal, ...)` -> ToolCall, or None when it is not one: a dotted or computed name,
    positional or `**` arguments, a key given twice, or a value that is not a literal with a JSON form."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    arguments: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None or keyword.arg in arguments:
            return None
        try:
            value = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
        if not _json_literal(value):
            return None
        arguments[keyword.arg] = value
    return ToolCall(node.func.id, json.dumps(arguments, ensure_ascii=False))


class PythonicToolParser(ToolParser):
    """Llama 3.2, Llama 4 and other models that write calls as Python: the whole output is a list
    `[get_weather(city="Paris", days=3), get_time()]`, perhaps between `<|python_start|>` and
    `<|python_end|>` (Llama 4's special tokens, seen only when special tokens are kept; the list is read
    without them). Values are Python literals (strings, numbers, True/False/None, lists, dicts), read with
    `ast` and never run. As in vLLM, the output is calls only when all of it is such a list of calls:
    anything else (text, a list of something else, a positional argument, a value that is not a literal,
    a list cut short) makes it all content. So a stream that starts with `[` (after whitespace and the
    tag) holds everything until it ends; one that starts otherwise is content from its first character."""

    name = "pythonic"
    _START, _END = "<|python_start|>", "<|python_end|>"

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._mode = _Mode.START

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        pos = skip_ws(text, 0)  # (the stream's whitespace, so that both decide at the same character)
        if text.startswith(self._START, pos):
            pos = skip_ws(text, pos + len(self._START))
        calls: list[ToolCall] = []
        if text.startswith("[", pos):
            try:
                tree = ast.parse(text[pos:].rstrip().removesuffix(self._END), mode="eval").body
            except (SyntaxError, ValueError, MemoryError, RecursionError):
                tree = None
            if isinstance(tree, ast.List):
                calls = [call for node in tree.elts if (call := _python_call(node)) is not None]
                if len(calls) < len(tree.elts):
                    calls = []
        return (None, calls) if calls else (text or None, [])

    def _advance(self, final: bool) -> tuple[str, list[ToolCall]]:
        text = self._text
        if self._mode is _Mode.START:
            pos = skip_ws(text, 0)
            if text.startswith(self._START, pos):
                pos = skip_ws(text, pos + len(self._START))
            elif not final and self._START.startswith(text[pos:]):
                return "", []  # only whitespace so far, or the tag is arriving
            if pos == len(text) and not final:
                return "", []
            self._mode = _Mode.HOLD if text.startswith("[", pos) else _Mode.PASS
        if self._mode is _Mode.HOLD:
            if not final:
                return "", []
            content, calls = self.extract(text)
            self._pos, self._mode = len(text), _Mode.DONE
            return content or "", calls
        if self._mode is _Mode.PASS:  # (self._pos is 0 until now: nothing was sent)
            content, self._pos = text[self._pos :], len(text)
            return content, []
        return "", []  # DONE


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
