"""What every tool parser shares: `ToolCall`, the `ToolParser` interface (one instance per generated
choice: `extract` for a finished output, `feed`/`flush` for a stream), a decoded JSON object read as a call
(`object_to_call`, for the JSON formats) and the places a stream can be in (`Mode`). The formats are the
package's other modules; the rules they all follow are in its docstring (__init__.py)."""

from __future__ import annotations

import json
import uuid
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

ARGS_KEYS = ("arguments", "parameters")  # what the formats call a call's arguments


def object_to_call(obj: Any, args_keys: tuple[str, ...], args_required: bool) -> ToolCall | None:
    """A decoded call object -> ToolCall, or None when it is not one. The arguments come under one of
    args_keys; more than one of them is ambiguous, none is `{}` unless args_required. Arguments under the
    other format's key (hermes' `"parameters"`) make it no call: read as `{}` they would be lost without a
    word, and vLLM's parsers make such an output content too."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    keys = [key for key in ARGS_KEYS if key in obj]
    if len(keys) > 1 or (not keys and args_required) or not set(keys) <= set(args_keys):
        return None
    arguments = obj[keys[0]] if keys else {}
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


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
