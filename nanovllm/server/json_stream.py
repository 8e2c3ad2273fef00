"""Reading JSON values out of a text that arrives a piece at a time.

A stream parser has to decide, after each piece, whether the JSON value it is reading is complete,
still arriving, or can never be valid, and it must agree exactly with the standard decoder on where a
value ends: the tool-call parsers read a finished output with `json`'s decoder and a stream with these
readers, and their tests check that both give the same calls however the text is cut. Each stream
reader keeps its place between pieces, so a new piece does not make it scan the old ones again.

- `decode_object`, `array_calls`: the whole-text readers, on the standard decoder (`skip_ws`: JSON's
  whitespace).
- `BracketScanner`, `ObjectReader`, `ArrayStream`: their piece-at-a-time counterparts, which answer a
  value, `Read.MORE` (undecided: the text so far is a prefix of something valid) or `Read.BAD`.
- `expect`, `find_marker`: a fixed literal, or a marker that may be arriving, in a growing text.

Nothing here knows a tool-call format: an array element is read by the caller's reader (`read_call`,
`new_reader`; a JSON call object's: tool_parsers/json_call.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")  # what array_calls reads each element as (a tool call)
P = TypeVar("P")  # what ArrayStream's element readers hand on (pieces of calls)
P_co = TypeVar("P_co", covariant=True)

_JSON_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace (not str.isspace's, which has more)
_DECODER = json.JSONDecoder()
_OUTSIDE_STRING = re.compile(r'[{}\[\]"]')  # the characters that change a scanner's state
_INSIDE_STRING = re.compile(r'["\\]')


def skip_ws(text: str, pos: int) -> int:
    return _JSON_WS.match(text, pos).end()


def decode_object(text: str, pos: int) -> tuple[Any, int] | None:
    """The JSON object at text[pos:] after whitespace and the index past it, or None: the whole-text
    reader, the standard decoder's answer that the stream readers agree with."""
    pos = skip_ws(text, pos)
    if not text.startswith("{", pos):
        return None
    try:
        return _DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError):
        return None


class BracketScanner:
    """How deep a JSON text's brackets are, read a piece at a time. Strings and their escapes are
    tracked, so a brace, a `]` or a `</tool_call>` inside a string does not count, and a backslash at
    the end of one piece escapes the first character of the next. It checks no other syntax: the value
    it delimits is parsed afterwards, and for valid JSON the place where the brackets balance is exactly
    where the value ends, so it agrees with the JSON decoder (decode_object)."""

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


class Read(Enum):
    MORE = "more"  # undecided: the text so far is a prefix of something valid
    BAD = "bad"  # not what the format expects, whatever comes next


class ObjectReader:
    """One JSON object read out of a growing text from `pos`: whitespace, `{`, up to its matching `}`.
    Keeps its place between calls, so each character is scanned once however the text arrives."""

    def __init__(self, pos: int) -> None:
        self.pos = pos
        self.start = -1  # where the `{` is, once seen
        self.scanner = BracketScanner()

    def read(self, text: str, final: bool) -> tuple[Any, int] | Read:
        """(the object, the index past it), or MORE, or BAD (MORE becomes BAD when the text is final)."""
        if self.start < 0:
            self.pos = skip_ws(text, self.pos)
            if self.pos == len(text):
                return Read.BAD if final else Read.MORE
            if text[self.pos] != "{":
                return Read.BAD
            self.start = self.pos
        end = self.scanner.scan(text, self.pos)
        if end < 0:
            self.pos = len(text)
            return Read.BAD if final else Read.MORE
        try:
            return json.loads(text[self.start : end]), end
        except (ValueError, RecursionError):
            return Read.BAD


def expect(text: str, pos: int, literal: str, final: bool) -> int | Read:
    """The index past `literal` at text[pos:]; MORE while the text is still a proper prefix of it."""
    if text.startswith(literal, pos):
        return pos + len(literal)
    if not final and literal.startswith(text[pos:]):
        return Read.MORE
    return Read.BAD


def find_marker(text: str, pos: int, marker: str, final: bool) -> tuple[int, bool]:
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


def array_calls(text: str, pos: int, read_call: Callable[[str, int], tuple[T, int | None] | None]) -> list[T]:
    """The whole-text reader of a call array `[{...}, ...]` at text[pos:] (after whitespace), each element
    read by read_call ((the call, the index past it, or None when it is the last), or None: no call): the
    calls up to the first element that is not one, a `]`, or the end of the text."""
    pos = skip_ws(text, pos)
    if not text.startswith("[", pos):
        return []
    return separated_calls(text, pos + 1, ",", read_call)


def separated_calls(
    text: str, pos: int, separator: str, read_call: Callable[[str, int], tuple[T, int | None] | None]
) -> list[T]:
    """The whole-text reader of objects `{...}` joined by `separator` from text[pos:], each read by read_call
    (as array_calls'): the calls up to the first object that is not one or is the last, anything but the
    separator after one, or the end of the text."""
    calls: list[T] = []
    while (read := read_call(text, pos)) is not None:
        calls.append(read[0])
        if read[1] is None:
            break
        pos = skip_ws(text, read[1])
        if not text.startswith(separator, pos):
            break
        pos += len(separator)
    return calls


class ElementReader(Protocol[P_co]):
    """A reader of one element of a growing text: (a piece to send now or None, MORE, BAD (the element ended
    the array) or the index past it)."""

    def read(self, text: str, final: bool) -> tuple[P_co | None, int | Read]: ...


class ArrayStream(Generic[P]):
    """The stream's reader of a call array from `pos`, each element read by a reader from new_reader(its
    position), whose pieces it hands on. `done` once it stops (at `]`, at an element that ends the array,
    or at the end of a final text), reading the same calls as array_calls."""

    def __init__(self, pos: int, new_reader: Callable[[int], ElementReader[P]]) -> None:
        self.pos = pos
        self.new_reader = new_reader
        self.reader: ElementReader[P] | None = None  # reading an element; None before `[` and after elements
        self.opened = False
        self.done = False

    def read(self, text: str, final: bool) -> list[P]:
        pieces: list[P] = []
        while not self.done:
            if not self.opened:
                self.pos = skip_ws(text, self.pos)
                opened = expect(text, self.pos, "[", final)
                if opened is Read.MORE:
                    break
                if opened is Read.BAD:
                    self.done = True
                    break
                self.opened = True
                self.reader = self.new_reader(opened)
            elif self.reader is not None:
                piece, read = self.reader.read(text, final)
                if piece is not None:
                    pieces.append(piece)
                if read is Read.MORE:
                    break
                if read is Read.BAD:
                    self.done = True
                    break
                self.pos, self.reader = read, None
            else:  # after an element: `,` and the next one, or the end of the calls
                self.pos = skip_ws(text, self.pos)
                if self.pos == len(text):
                    self.done = final
                    break
                if text[self.pos] == ",":
                    self.reader = self.new_reader(self.pos + 1)
                else:
                    self.done = True
        return pieces
