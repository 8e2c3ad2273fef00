"""tool_choice "required": the reader of the JSON array of calls that the server's constraint generates,
whatever the model's own format."""

from __future__ import annotations

from typing import Any

from nanovllm.server.json_stream import ArrayStream, array_calls
from nanovllm.server.tool_parsers.base import ToolCall, ToolParser, object_to_call


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
        return object_to_call(obj, ("parameters",), False)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return None, array_calls(text, 0, self._call)

    def _advance(self, final: bool) -> tuple[str, list[ToolCall]]:
        calls = self._array.read(self._text, final)
        self._pos = len(self._text)
        return "", calls
