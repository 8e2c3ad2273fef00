"""Calls as bare JSON, with no tag around each: llama3_json (the whole output is `;`-separated call objects)
and mistral (content, then `[TOOL_CALLS]` and a JSON array of calls)."""

from __future__ import annotations

import secrets
import string

from nanovllm.server.json_stream import ArrayStream, Read, array_calls, find_marker, separated_calls, skip_ws
from nanovllm.server.tool_parsers.base import CallDelta, Mode, ToolCall, ToolParser
from nanovllm.server.tool_parsers.json_call import ARGS_KEYS, CallReader, read_call

# ---- llama3_json -------------------------------------------------------------------------------------


class Llama3JsonToolParser(ToolParser):
    """Llama 3.1/3.2 JSON tool calling: the whole output is calls `{"name": "f", "parameters": {...}}`
    ("arguments" also read) separated by `;`, perhaps after `<|python_tag|>` (only seen when special
    tokens are kept). An output that does not start with `{` (after whitespace and the tag) is content,
    decided by its first non-space character (or, for a `<`, once it cannot be the tag). Without a marker
    a JSON answer could look like a call, so the arguments are required here, as vLLM requires them. Each
    call's arguments stream as they are generated (json_call.py)."""

    name = "llama3_json"
    _PYTHON_TAG = "<|python_tag|>"

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._mode = Mode.START
        self._reader = CallReader(0, ARGS_KEYS, True)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        pos = skip_ws(text, 0)
        if text.startswith(self._PYTHON_TAG, pos):
            pos += len(self._PYTHON_TAG)
        calls = separated_calls(text, pos, ";", lambda text, pos: read_call(text, pos, ARGS_KEYS, True))
        return (None, calls) if calls else (text or None, [])

    def _advance(self, final: bool) -> tuple[str, list[CallDelta]]:
        text = self._text
        pieces: list[CallDelta] = []
        while True:
            if self._mode is Mode.START:
                pos = skip_ws(text, 0)
                if text.startswith(self._PYTHON_TAG, pos):
                    pos = skip_ws(text, pos + len(self._PYTHON_TAG))
                elif not final and self._PYTHON_TAG.startswith(text[pos:]):
                    break  # only whitespace so far, or the tag is arriving
                if pos == len(text) and not final:
                    break
                if text.startswith("{", pos):
                    self._reader = CallReader(pos, ARGS_KEYS, True)
                    self._mode = Mode.OBJECT
                else:
                    self._mode = Mode.PASS
            elif self._mode is Mode.OBJECT:
                piece, read = self._reader.read(text, final)
                if piece is not None:
                    pieces.append(self._piece(*piece))
                if read is Read.MORE:
                    break
                if read is Read.BAD:
                    self._mode = Mode.PASS if self._num_calls == 0 else Mode.DONE
                    continue
                self._pos = read
                self._mode = Mode.SEPARATOR
            elif self._mode is Mode.SEPARATOR:
                self._pos = skip_ws(text, self._pos)
                if self._pos == len(text):
                    break
                if text[self._pos] == ";":
                    self._reader = CallReader(self._pos + 1, ARGS_KEYS, True)
                    self._mode = Mode.OBJECT
                else:
                    self._mode = Mode.DONE
            elif self._mode is Mode.PASS:  # (self._pos is still 0: nothing was sent)
                content, self._pos = text[self._pos :], len(text)
                return content, pieces
            else:  # DONE
                self._pos = len(text)
                break
        return "", pieces


# ---- mistral -----------------------------------------------------------------------------------------


class MistralToolParser(ToolParser):
    """Mistral v0.3-style: content, then `[TOOL_CALLS]` and a JSON array of
    `{"name": "f", "arguments": {...}}`. Content is the text before the marker; a missing "arguments" is
    `{}`. The marker is a special token, so the detokenizer must keep special tokens for this parser.
    When no call can be read, the content is the text without the marker (as in vLLM's, and as a user
    would have seen it had special tokens been skipped). Elements are read as they close, so an array cut
    short after complete elements still gives those calls (vLLM's finished-output parser gives none). Each
    call's arguments stream as they are generated (json_call.py)."""

    name = "mistral"
    skip_special_tokens = False

    @staticmethod
    def call_id() -> str:
        """Mistral's templates refuse any id but 9 letters and digits when the call comes back."""
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))

    _MARKER = "[TOOL_CALLS]"

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._mode = Mode.CONTENT
        self._region = -1  # where the marker is: content from there (less markers) if no call is read
        self._array = ArrayStream(0, self._reader)

    _ARGS_KEYS = ("arguments",)

    def _reader(self, pos: int) -> CallReader:
        return CallReader(pos, self._ARGS_KEYS, False)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        marker = text.find(self._MARKER)
        read = lambda text, pos: read_call(text, pos, self._ARGS_KEYS, False)
        calls = [] if marker < 0 else array_calls(text, marker + len(self._MARKER), read)
        if not calls:
            return text.replace(self._MARKER, "") or None, []
        return text[:marker] or None, calls

    def _advance(self, final: bool) -> tuple[str, list[CallDelta]]:
        text = self._text
        content: list[str] = []
        pieces: list[CallDelta] = []
        while True:
            if self._mode is Mode.CONTENT or self._mode is Mode.PASS:
                stop, found = find_marker(text, self._pos, self._MARKER, final)
                content.append(text[self._pos : stop])
                self._pos = stop
                if not found:
                    break
                if self._mode is Mode.PASS:  # no call was read: content, less the markers
                    self._pos += len(self._MARKER)
                else:
                    self._region = stop
                    self._array = ArrayStream(stop + len(self._MARKER), self._reader)
                    self._mode = Mode.ARRAY
            elif self._mode is Mode.ARRAY:
                pieces += [self._piece(*piece) for piece in self._array.read(text, final)]
                if not self._array.done:
                    break
                if self._num_calls == 0:
                    self._mode, self._pos = Mode.PASS, self._region
                else:
                    self._mode = Mode.DONE
            else:  # DONE
                self._pos = len(text)
                break
        return "".join(content), pieces
