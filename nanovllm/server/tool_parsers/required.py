"""tool_choice "required": the reader of the JSON array of calls that the server's constraint generates,
whatever the model's own format."""

from __future__ import annotations

from nanovllm.server.json_stream import ArrayStream, array_calls
from nanovllm.server.tool_parsers.base import CallDelta, ToolCall, ToolParser
from nanovllm.server.tool_parsers.json_call import CallReader, read_call


class RequiredCallsParser(ToolParser):
    """tool_choice "required": the output was constrained to a JSON array of
    `{"name": "f", "parameters": {...}}`, so it is all calls and never content. Each element's arguments
    stream as they are generated (json_call.py); a missing "parameters" is `{}`. An output that is not such
    an array to the end (cut by max_tokens, say) gives the calls before the first element that is not one
    (and the one cut short, if its arguments had begun), and none if it does not start with `[`. Not in
    TOOL_PARSERS: the server uses it for "required" whatever the model's parser."""

    name = "required"

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._array = ArrayStream(0, lambda pos: CallReader(pos, self._ARGS_KEYS, False))

    _ARGS_KEYS = ("parameters",)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return None, array_calls(text, 0, lambda text, pos: read_call(text, pos, self._ARGS_KEYS, False))

    def _advance(self, final: bool) -> tuple[str, list[CallDelta]]:
        pieces = self._array.read(self._text, final)
        self._pos = len(self._text)
        return "", [self._piece(*piece) for piece in pieces]
