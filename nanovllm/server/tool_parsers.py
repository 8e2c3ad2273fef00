"""A model's generated text -> OpenAI tool calls, for a finished output and for a stream.

The server picks a parser by name (`--tool-call-parser hermes`, as vLLM's) and makes one per generated
choice: `extract` reads a finished output, `feed`/`flush` read a stream and hold the state between its
pieces. Each parser is written twice on purpose: `extract` reads the whole text with the standard JSON
decoder, the stream reads it a piece at a time with a bracket scanner, and the tests check that every way
of cutting a text into pieces gives what `extract` gives. The stream sends content at once unless it may
be the start of a tool-call marker, and sends each call whole (name and full arguments) as soon as it is
complete; OpenAI clients join argument deltas, so one delta holding them all is valid.

One rule for a malformed call, the same whole and streamed: calls are read in order, and reading stops at
the first one that is not well formed (its JSON does not parse, it has no non-empty string "name", its
arguments are not an object, or what follows it is not what the format expects). That call and
everything after it are dropped. If no call was read, the whole output is content, as if no parser ran.
vLLM's finished-output parsers make everything content when any call is malformed; we keep the calls
before it, so that a call can be sent the moment it closes and never has to be taken back (vLLM's own
streaming cannot take a sent call back either). So from the marker (for llama3_json, from the first
`{`) until the first call is decided, a stream holds everything back: it may yet turn out to be content.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar


@dataclass(frozen=True)
class ToolCall:
    """One function call, as OpenAI's `tool_calls[i].function` carries it (the server adds the id)."""

    name: str
    arguments: str  # the arguments object as JSON text: json.dumps(obj, ensure_ascii=False)


class ToolParser:
    """Turns one generated choice into content and tool calls. One instance per choice: it holds the
    streaming state."""

    name: ClassVar[str]
    # False where the marker is a special token that the detokenizer would otherwise drop
    skip_special_tokens: ClassVar[bool] = True

    def __init__(self) -> None:
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


# ---- reading JSON -------------------------------------------------------------------------------------

_JSON_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace (not str.isspace's, which has more)
_DECODER = json.JSONDecoder()
_OUTSIDE_STRING = re.compile(r'[{}\[\]"]')  # the characters that change a scanner's state
_INSIDE_STRING = re.compile(r'["\\]')


def _skip_ws(text: str, pos: int) -> int:
    return _JSON_WS.match(text, pos).end()


def _decode_object(text: str, pos: int) -> tuple[Any, int] | None:
    """The JSON object at text[pos:] after whitespace and the index past it, or None: extract's reader."""
    pos = _skip_ws(text, pos)
    if not text.startswith("{", pos):
        return None
    try:
        return _DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError):
        return None


class _BracketScanner:
    """How deep a JSON text's brackets are, read a piece at a time. Strings and their escapes are
    tracked, so a brace, a `]` or a `</tool_call>` inside a string does not count, and a backslash at
    the end of one piece escapes the first character of the next. It checks no other syntax: the value
    it delimits is parsed afterwards, and for valid JSON the place where the brackets balance is exactly
    where the value ends, so it agrees with the JSON decoder that `extract` uses."""

    __slots__ = ("depth", "in_string", "escaped")

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def scan(self, text: str, pos: int) -> int:
        """Reads text[pos:]: the index just past the bracket that closes the value, or -1 when the text
        runs out first (the next call goes on from len(text))."""
        while pos < len(text):
            if self.escaped:
                self.escaped = False
                pos += 1
                continue
            found = (_INSIDE_STRING if self.in_string else _OUTSIDE_STRING).search(text, pos)
            if found is None:
                return -1
            pos, char = found.end(), found.group()
            if char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = not self.in_string
            elif char in "{[":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth == 0:
                    return pos
        return -1


class _Read(Enum):
    MORE = "more"  # undecided: the text so far is a prefix of something valid
    BAD = "bad"  # not what the format expects, whatever comes next


class _ObjectReader:
    """One JSON object read out of a growing text from `pos`: whitespace, `{`, up to its matching `}`.
    Keeps its place between calls, so each character is scanned once however the text arrives."""

    def __init__(self, pos: int) -> None:
        self.pos = pos
        self.start = -1  # where the `{` is, once seen
        self.scanner = _BracketScanner()

    def read(self, text: str, final: bool) -> tuple[Any, int] | _Read:
        """(the object, the index past it), or MORE, or BAD (MORE becomes BAD when the text is final)."""
        if self.start < 0:
            self.pos = _skip_ws(text, self.pos)
            if self.pos == len(text):
                return _Read.BAD if final else _Read.MORE
            if text[self.pos] != "{":
                return _Read.BAD
            self.start = self.pos
        end = self.scanner.scan(text, self.pos)
        if end < 0:
            self.pos = len(text)
            return _Read.BAD if final else _Read.MORE
        try:
            return json.loads(text[self.start : end]), end
        except (ValueError, RecursionError):
            return _Read.BAD


def _expect(text: str, pos: int, literal: str, final: bool) -> int | _Read:
    """The index past `literal` at text[pos:]; MORE while the text is still a proper prefix of it."""
    if text.startswith(literal, pos):
        return pos + len(literal)
    if not final and literal.startswith(text[pos:]):
        return _Read.MORE
    return _Read.BAD


def _find_marker(text: str, pos: int, marker: str, final: bool) -> tuple[int, bool]:
    """(where the text before `marker` ends, whether the marker is there). Without the marker, a tail of
    text[pos:] that is a proper prefix of it is held back (it may be arriving), unless the text is
    final: the stream holds back no more than that."""
    found = text.find(marker, pos)
    if found >= 0:
        return found, True
    if not final:
        for size in range(min(len(marker) - 1, len(text) - pos), 0, -1):
            if text.endswith(marker[:size]):
                return len(text) - size, False
    return len(text), False


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
    START = "start"  # llama3_json: before the first non-space character
    OBJECT = "object"  # inside a call's JSON object
    CLOSE = "close"  # hermes: after a call's object, waiting for </tool_call>
    BETWEEN = "between"  # hermes: after </tool_call>, dropping text up to the next <tool_call>
    SEPARATOR = "separator"  # llama3_json: after a call, waiting for `;`
    ARRAY = "array"  # mistral: reading the call array
    PASS = "pass"  # no call was read: the rest is content
    DONE = "done"  # calls were read and reading stopped: the rest is dropped


# ---- hermes -------------------------------------------------------------------------------------------


class HermesToolParser(ToolParser):
    """Qwen2.5, Qwen3 and Hermes models: content, then calls, each
    `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`. Content is the text before the first
    `<tool_call>`; text between and after calls is dropped (as vLLM does). The last call may be left
    unclosed when generation stopped right after its JSON. A missing "arguments" is `{}` (the marker
    already says this is a call); "parameters" in its place makes it no call, as in vLLM's hermes parser,
    which does not read that key either."""

    name = "hermes"
    _START = "<tool_call>"
    _END = "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._mode = _Mode.CONTENT
        self._region = -1  # where the first <tool_call> is: content from there if no call is read
        self._num_calls = 0
        self._reader = _ObjectReader(0)
        self._call: ToolCall | None = None  # the call whose </tool_call> the stream waits for

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        first = text.find(self._START)
        calls: list[ToolCall] = []
        start = first
        while start >= 0:
            read = self._call_at(text, start + len(self._START))
            if read is None:
                break
            calls.append(read[0])
            start = text.find(self._START, read[1])
        if not calls:
            return text or None, []
        return text[:first] or None, calls

    def _call_at(self, text: str, pos: int) -> tuple[ToolCall, int] | None:
        """The call after a <tool_call> at pos and the index past its </tool_call> (or the end)."""
        decoded = _decode_object(text, pos)
        call = None if decoded is None else _to_call(decoded[0], ("arguments",), False)
        if call is None:
            return None
        end = _skip_ws(text, decoded[1])
        if text.startswith(self._END, end):
            return call, end + len(self._END)
        return (call, end) if end == len(text) else None

    def _advance(self, final: bool) -> tuple[str, list[ToolCall]]:
        text = self._text
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self._mode is _Mode.CONTENT or self._mode is _Mode.BETWEEN:
                stop, found = _find_marker(text, self._pos, self._START, final)
                if self._mode is _Mode.CONTENT:
                    content.append(text[self._pos : stop])
                self._pos = stop
                if not found:
                    break
                if self._mode is _Mode.CONTENT:
                    self._region = stop
                self._reader = _ObjectReader(stop + len(self._START))
                self._mode = _Mode.OBJECT
            elif self._mode is _Mode.OBJECT:
                read = self._reader.read(text, final)
                if read is _Read.MORE:
                    break
                self._call = None if read is _Read.BAD else _to_call(read[0], ("arguments",), False)
                if self._call is None:
                    self._malformed()
                else:
                    self._pos = read[1]
                    self._mode = _Mode.CLOSE
            elif self._mode is _Mode.CLOSE:
                pos = self._pos = _skip_ws(text, self._pos)
                if final and pos == len(text):  # an unclosed last call: generation stopped after its JSON
                    calls.append(self._call)
                    self._mode = _Mode.DONE
                    continue
                end = _expect(text, pos, self._END, final)
                if end is _Read.MORE:
                    break
                if end is _Read.BAD:
                    self._malformed()
                    continue
                calls.append(self._call)
                self._num_calls += 1
                self._pos = end
                self._mode = _Mode.BETWEEN
            elif self._mode is _Mode.PASS:
                content.append(text[self._pos :])
                self._pos = len(text)
                break
            else:  # DONE
                self._pos = len(text)
                break
        return "".join(content), calls

    def _malformed(self) -> None:
        if self._num_calls == 0:
            self._mode, self._pos = _Mode.PASS, self._region  # all held back since <tool_call> is content
        else:
            self._mode = _Mode.DONE


# ---- llama3_json --------------------------------------------------------------------------------------


class Llama3JsonToolParser(ToolParser):
    """Llama 3.1/3.2 JSON tool calling: the whole output is calls `{"name": "f", "parameters": {...}}`
    ("arguments" also read) separated by `;`, perhaps after `<|python_tag|>` (only seen when special
    tokens are kept). An output that does not start with `{` (after whitespace and the tag) is content,
    decided by its first non-space character (or, for a `<`, once it cannot be the tag). Without a marker
    a JSON answer could look like a call, so the arguments are required here, as vLLM requires them."""

    name = "llama3_json"
    _PYTHON_TAG = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self._mode = _Mode.START
        self._num_calls = 0
        self._reader = _ObjectReader(0)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        pos = _skip_ws(text, 0)
        if text.startswith(self._PYTHON_TAG, pos):
            pos += len(self._PYTHON_TAG)
        calls: list[ToolCall] = []
        while (decoded := _decode_object(text, pos)) is not None:
            call = _to_call(decoded[0], _ARGS_KEYS, True)
            if call is None:
                break
            calls.append(call)
            pos = _skip_ws(text, decoded[1])
            if not text.startswith(";", pos):
                break
            pos += 1
        return (None, calls) if calls else (text or None, [])

    def _advance(self, final: bool) -> tuple[str, list[ToolCall]]:
        text = self._text
        calls: list[ToolCall] = []
        while True:
            if self._mode is _Mode.START:
                pos = _skip_ws(text, 0)
                if text.startswith(self._PYTHON_TAG, pos):
                    pos = _skip_ws(text, pos + len(self._PYTHON_TAG))
                elif not final and self._PYTHON_TAG.startswith(text[pos:]):
                    break  # only whitespace so far, or the tag is arriving
                if pos == len(text) and not final:
                    break
                if text.startswith("{", pos):
                    self._reader = _ObjectReader(pos)
                    self._mode = _Mode.OBJECT
                else:
                    self._mode = _Mode.PASS
            elif self._mode is _Mode.OBJECT:
                read = self._reader.read(text, final)
                if read is _Read.MORE:
                    break
                call = None if read is _Read.BAD else _to_call(read[0], _ARGS_KEYS, True)
                if call is None:
                    self._mode = _Mode.PASS if self._num_calls == 0 else _Mode.DONE
                    continue
                calls.append(call)
                self._num_calls += 1
                self._pos = read[1]
                self._mode = _Mode.SEPARATOR
            elif self._mode is _Mode.SEPARATOR:
                self._pos = _skip_ws(text, self._pos)
                if self._pos == len(text):
                    break
                if text[self._pos] == ";":
                    self._reader = _ObjectReader(self._pos + 1)
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


def _array_calls(text: str, pos: int, to_call: Callable[[Any], ToolCall | None]) -> list[ToolCall]:
    """extract's reader of a call array `[{...}, ...]` at text[pos:] (after whitespace): the calls up to
    the first element that is not one, a `]`, or the end of the text."""
    pos = _skip_ws(text, pos)
    if not text.startswith("[", pos):
        return []
    calls: list[ToolCall] = []
    pos += 1
    while (decoded := _decode_object(text, pos)) is not None:
        call = to_call(decoded[0])
        if call is None:
            break
        calls.append(call)
        pos = _skip_ws(text, decoded[1])
        if not text.startswith(",", pos):
            break
        pos += 1
    return calls


class _ArrayStream:
    """The stream's reader of a call array from `pos`: each element becomes a call as soon as its closing
    brace arrives. `done` once it stops (at `]`, at the first element that is not a call, or at the end of
    a final text), reading the same calls as _array_calls."""

    def __init__(self, pos: int, to_call: Callable[[Any], ToolCall | None]) -> None:
        self.pos = pos
        self.to_call = to_call
        self.reader: _ObjectReader | None = None  # reading an element; None before `[` and after elements
        self.opened = False
        self.done = False
        self.num_calls = 0

    def read(self, text: str, final: bool) -> list[ToolCall]:
        calls: list[ToolCall] = []
        while not self.done:
            if not self.opened:
                self.pos = _skip_ws(text, self.pos)
                opened = _expect(text, self.pos, "[", final)
                if opened is _Read.MORE:
                    break
                if opened is _Read.BAD:
                    self.done = True
                    break
                self.opened = True
                self.reader = _ObjectReader(opened)
            elif self.reader is not None:
                read = self.reader.read(text, final)
                if read is _Read.MORE:
                    break
                call = None if read is _Read.BAD else self.to_call(read[0])
                if call is None:
                    self.done = True
                    break
                calls.append(call)
                self.pos, self.reader = read[1], None
            else:  # after an element: `,` and the next one, or the end of the calls
                self.pos = _skip_ws(text, self.pos)
                if self.pos == len(text):
                    self.done = final
                    break
                if text[self.pos] == ",":
                    self.reader = _ObjectReader(self.pos + 1)
                else:
                    self.done = True
        self.num_calls += len(calls)
        return calls


class MistralToolParser(ToolParser):
    """Mistral v0.3-style: content, then `[TOOL_CALLS]` and a JSON array of
    `{"name": "f", "arguments": {...}}`. Content is the text before the marker; a missing "arguments" is
    `{}`. The marker is a special token, so the detokenizer must keep special tokens for this parser.
    When no call can be read, the content is the text without the marker (as in vLLM's, and as a user
    would have seen it had special tokens been skipped). Elements are read as they close, so an array cut
    short after complete elements still gives those calls (vLLM's finished-output parser gives none)."""

    name = "mistral"
    skip_special_tokens = False
    _MARKER = "[TOOL_CALLS]"

    def __init__(self) -> None:
        super().__init__()
        self._mode = _Mode.CONTENT
        self._region = -1  # where the marker is: content from there (less markers) if no call is read
        self._array = _ArrayStream(0, self._call)

    @staticmethod
    def _call(obj: Any) -> ToolCall | None:
        return _to_call(obj, ("arguments",), False)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        marker = text.find(self._MARKER)
        calls = [] if marker < 0 else _array_calls(text, marker + len(self._MARKER), self._call)
        if not calls:
            return text.replace(self._MARKER, "") or None, []
        return text[:marker] or None, calls

    def _advance(self, final: bool) -> tuple[str, list[ToolCall]]:
        text = self._text
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self._mode is _Mode.CONTENT or self._mode is _Mode.PASS:
                stop, found = _find_marker(text, self._pos, self._MARKER, final)
                content.append(text[self._pos : stop])
                self._pos = stop
                if not found:
                    break
                if self._mode is _Mode.PASS:  # no call was read: content, less the markers
                    self._pos += len(self._MARKER)
                else:
                    self._region = stop
                    self._array = _ArrayStream(stop + len(self._MARKER), self._call)
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

    def __init__(self) -> None:
        super().__init__()
        self._array = _ArrayStream(0, self._call)

    @staticmethod
    def _call(obj: Any) -> ToolCall | None:
        return _to_call(obj, ("parameters",), False)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return None, _array_calls(text, 0, self._call)

    def _advance(self, final: bool) -> tuple[str, list[ToolCall]]:
        calls = self._array.read(self._text, final)
        self._pos = len(self._text)
        return "", calls


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}


def tool_parser(name: str) -> ToolParser:
    """A fresh parser (one per generated choice) by its --tool-call-parser name."""
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; known parsers: {', '.join(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()
