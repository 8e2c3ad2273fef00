"""What every tool parser shares: `ToolCall` and `CallDelta`, the `ToolParser` interface (one instance per
generated choice: `extract` for a finished output, `feed`/`flush` for a stream) and the places a stream can be
in (`Mode`). The formats are the package's other modules; the rules they all follow are in its docstring
(__init__.py)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar


@dataclass(frozen=True)
class ToolCall:
    """One function call, as OpenAI's `tool_calls[i].function` carries it (the server adds the id)."""

    name: str
    # the arguments object as JSON text: the JSON formats' as the model wrote it (json_call.py), the others'
    # json.dumps(obj, ensure_ascii=False)
    arguments: str


@dataclass(frozen=True)
class CallDelta:
    """A piece of a streamed call. A call's pieces come in a row, the first with its name; their arguments
    join to its ToolCall.arguments."""

    index: int  # the call's place among the choice's calls: 0, 1, ...
    name: str | None  # on the call's first piece only
    arguments: str  # the next piece of the arguments' JSON text ("" when none is known yet)


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
        self._num_calls = 0  # calls begun in the stream so far

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A finished output -> (content, calls). Content is None when empty. When the text holds no
        well-formed call, it is all content and calls is []."""
        raise NotImplementedError

    def feed(self, delta: str) -> tuple[str, list[CallDelta]]:
        """Streaming: the next piece of generated text -> (content to send now, call pieces to send now)."""
        self._text += delta
        return self._advance(final=False)

    def flush(self) -> tuple[str, list[CallDelta]]:
        """The stream ended: whatever was held back."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, list[CallDelta]]:
        """Reads self._text on from self._pos as far as it can be decided (all of it when final)."""
        raise NotImplementedError

    def _piece(self, name: str | None, arguments: str) -> CallDelta:
        """The stream's next piece of a call: a new call when name is given, else more of the last one's
        arguments."""
        self._num_calls += name is not None
        return CallDelta(self._num_calls - 1, name, arguments)


class Mode(Enum):
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
