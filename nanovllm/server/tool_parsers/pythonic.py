"""pythonic: the whole output is a Python list of calls, `[f(key=literal, ...), ...]`, read with `ast` and
never run."""

from __future__ import annotations

import ast
import json
import math
from typing import Any

from nanovllm.server.json_stream import skip_ws
from nanovllm.server.tool_parsers.base import CallDelta, Mode, ToolCall, ToolParser


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
        self._mode = Mode.START

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

    def _advance(self, final: bool) -> tuple[str, list[CallDelta]]:
        text = self._text
        if self._mode is Mode.START:
            pos = skip_ws(text, 0)
            if text.startswith(self._START, pos):
                pos = skip_ws(text, pos + len(self._START))
            elif not final and self._START.startswith(text[pos:]):
                return "", []  # only whitespace so far, or the tag is arriving
            if pos == len(text) and not final:
                return "", []
            self._mode = Mode.HOLD if text.startswith("[", pos) else Mode.PASS
        if self._mode is Mode.HOLD:
            if not final:
                return "", []
            content, calls = self.extract(text)
            self._pos, self._mode = len(text), Mode.DONE
            return content or "", [self._piece(call.name, call.arguments) for call in calls]
        if self._mode is Mode.PASS:  # (self._pos is 0 until now: nothing was sent)
            content, self._pos = text[self._pos :], len(text)
            return content, []
        return "", []  # DONE
