"""OpenAI tool calling on the chat endpoint (`tools`, `tool_choice`, `parallel_tool_calls`), as vLLM's server.

The tools always go to the chat template, which shows them to the model. What `tool_choice` then does:
  "none"      nothing more: the reply is text.
  named       {"type": "function", "function": {"name": N}}: the output is constrained (structured outputs)
              to N's `parameters` schema, and the whole output is N's arguments. finish_reason stays
              ("stop"), as OpenAI's and vLLM's.
  "required"  the output is constrained to a JSON array of {"name": ..., "parameters": ...}, one of the tools
              each, at least one (at most one without parallel_tool_calls); finish_reason "tool_calls".
  "auto"      (the default when tools are given) the model decides; a tool parser (tool_parsers/, chosen
              by `serve --enable-auto-tool-choice --tool-call-parser NAME`) finds the calls in its output;
              finish_reason "tool_calls" when it found any. Without the flags, "auto" is a 400, as vLLM's.
A reply with tool calls has `content` null unless the model wrote text before them (OpenAI's shape; vLLM
returns "" for named and required). `parallel_tool_calls: false` keeps the first call only.

Streamed, each call goes out as OpenAI's (and vLLM's) do: a first delta with its index, id, type and name,
then deltas whose `function.arguments` are pieces of the arguments' JSON text as they are generated; the
client joins them, and they join to the non-streamed reply's `arguments`. Named calls and the JSON formats
stream arguments so ("required", hermes, llama3_json, mistral: tool_parsers/json_call.py); qwen3_coder sends
them a parameter at a time, and pythonic each call's arguments whole once the call is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nanovllm.sampling_params import StructuredOutputsParams
from nanovllm.server.errors import RequestError
from nanovllm.server.tool_parsers import CallDelta, RequiredCallsParser, ToolCall, ToolParser

TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")
_CHOICES = ("none", "auto", "required")
_NO_PARAMETERS = {"type": "object", "properties": {}}  # a function without `parameters` takes no arguments
_DEFINITIONS = ("$defs", "definitions")
_TOOL_KEYS = {"type", "function"}  # where a schema keeps what its $refs point at


@dataclass(frozen=True)
class ToolRequest:
    """A chat request's tools and what it asks of them."""

    tools: list[dict]  # [{"type": "function", "function": {"name", "description", "parameters"}}]
    choice: str  # "none", "auto", "required", or "named"
    name: str | None = None  # the named function
    parallel: bool = True  # more than one call per reply

    @property
    def constrained(self) -> bool:
        return self.choice in ("named", "required")

    def constraint(self) -> StructuredOutputsParams | None:
        """The structured output that named and required choices generate under. Under "required" each
        tool's schema moves into the array's; its definitions (`$defs`, `definitions`) move to the root,
        where its `$ref`s point (RequestError when two tools define one name differently, as vLLM's)."""
        if self.choice == "named":
            return StructuredOutputsParams(json=self._parameters(self.name))
        if self.choice != "required":
            return None
        array: dict = {"type": "array", "minItems": 1}
        calls = []
        for name in self.names:
            parameters = dict(self._parameters(name))
            for key in _DEFINITIONS:
                for def_name, schema in parameters.pop(key, {}).items():
                    defined = array.setdefault(key, {})
                    if defined.setdefault(def_name, schema) != schema:
                        raise RequestError(f"two tools define {key}/{def_name} differently", "tools")
            properties = {"name": {"type": "string", "enum": [name]}, "parameters": parameters}
            calls.append({"properties": properties, "required": ["name", "parameters"]})
        array["items"] = {"type": "object", "anyOf": calls}
        if not self.parallel:
            array["maxItems"] = 1
        return StructuredOutputsParams(json=array)

    @property
    def names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.tools]

    def _parameters(self, name: str) -> dict:
        function = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return function.get("parameters") or _NO_PARAMETERS


def parse_tools(body: dict) -> ToolRequest | None:
    """The request's tool fields -> a ToolRequest (None: no tools, or "none"/"required" without them, as
    vLLM's). An explicit `tool_choice: null` is "none" (vLLM's); left out with tools, it is "auto".
    RequestError names the field at fault."""
    tools, choice = body.get("tools"), body.get("tool_choice", "auto")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise RequestError(f"parallel_tool_calls must be a boolean, got {parallel!r}", "parallel_tool_calls")
    if not tools:
        if tools is not None and not isinstance(tools, list):
            raise RequestError(f"tools must be a list of function tools, got {tools!r}", "tools")
        if choice not in (None, "none", "auto", "required") or choice == "auto" and "tool_choice" in body:
            raise RequestError(f"tool_choice={choice!r} needs tools", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise RequestError(f"tools must be a list of function tools, got {tools!r}", "tools")
    tools = [_check_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    names = [tool["function"]["name"] for tool in tools]
    if len(set(names)) < len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise RequestError(f"two tools are named {duplicate!r}", "tools")
    parallel = parallel is not False
    if choice is None or choice in _CHOICES:
        return ToolRequest(tools, choice or "none", parallel=parallel)
    name = _named_choice(choice)
    if name not in names:
        raise RequestError(f"tool_choice names {name!r}, which is not among the tools {names}", "tool_choice")
    return ToolRequest(tools, "named", name, parallel)


def _check_tool(tool: Any, where: str) -> dict:
    """OpenAI's function tool, with only the keys a chat template reads."""
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or set(tool) - _TOOL_KEYS:
        raise RequestError(f'{where} must be {{"type": "function", "function": {{...}}}}', "tools")
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise RequestError(f"{where}.function must be an object with a name", "tools")
    unknown = set(function) - {"name", "description", "parameters", "strict"}
    if unknown:
        raise RequestError(f"{where}.function has unsupported keys {sorted(unknown)}", "tools")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise RequestError(f"{where}.function.parameters must be a JSON schema object", "tools")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise RequestError(f"{where}.function.description must be a string", "tools")
    kept = {key: function.get(key) for key in ("name", "description", "parameters")}
    return {"type": "function", "function": {key: value for key, value in kept.items() if value is not None}}


def _named_choice(choice: Any) -> str:
    if isinstance(choice, dict) and choice.get("type", "function") == "function":
        function = choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"]
    raise RequestError(
        'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}},'
        f" got {choice!r}",
        "tool_choice",
    )


class ToolOutput:
    """One choice's output (tool_choice named, "required" or "auto") as OpenAI's message or chunk deltas:
    text, tool calls, or both. `parser`: a fresh one of the server's --tool-call-parser, for "auto";
    `call_id`: makes each call's id (ToolParser.call_id, or the server's parser's)."""

    def __init__(
        self, request: ToolRequest, parser: ToolParser | None, call_id: Callable[[], str] = ToolParser.call_id
    ):
        if request.choice == "auto" and parser is None:
            raise ValueError('tool_choice "auto" needs a tool parser')
        self.request = request
        self.parser = RequiredCallsParser() if request.choice == "required" else parser
        self.call_id = call_id
        self.num_calls_sent = 0  # streaming (a named call: 1 once its first delta, with the name, is out)

    def message(self, text: str | None, finish_reason: str | None) -> tuple[dict, str | None]:
        """A finished choice's text (None: none, e.g. a thinking model cut short) -> (the message's "content"
        and, when there are calls, "tool_calls"; finish_reason). Without calls the content is the text
        ("auto") or none ("required", whose JSON is no reply)."""
        if self.request.choice == "named":
            if not text:  # (no arguments were generated: there is no call to show)
                return {"content": None}, finish_reason
            call = self._call(ToolCall(self.request.name, text))
            return {"content": None, "tool_calls": [call]}, finish_reason
        content, calls = self.parser.extract(text or "")
        calls = calls if self.request.parallel else calls[:1]
        reason = self._finish_reason(finish_reason, bool(calls))
        if not calls:  # ("required" wrote JSON for calls, not a reply: no content, as its stream sends none)
            return {"content": None if self.request.choice == "required" else text}, reason
        return {"content": content, "tool_calls": [self._call(call) for call in calls]}, reason

    def delta(self, text: str, finished: bool) -> dict:
        """Streaming: the next piece of the choice's text (`finished`: the last) -> the chunk's delta."""
        if self.request.choice == "named":  # (the text is the call's arguments)
            name = None if self.num_calls_sent else self.request.name
            content, pieces = "", [CallDelta(0, name, text)] if text or self.num_calls_sent else []
        else:
            content, pieces = self.parser.feed(text)
            if finished:
                more_content, more_pieces = self.parser.flush()
                content, pieces = content + more_content, pieces + more_pieces
            if not self.request.parallel:
                pieces = [piece for piece in pieces if piece.index == 0]
        delta: dict = {}
        if content or not pieces:  # ("" while text is held back or has none yet, as a plain chunk)
            delta["content"] = content
        if pieces:
            delta["tool_calls"] = self._call_deltas(pieces)
        return delta

    def _call_deltas(self, pieces: list[CallDelta]) -> list[dict]:
        """Pieces of calls -> the chunk's `tool_calls`, one entry per call: a call's first carries its id,
        type and name."""
        deltas: list[dict] = []
        for piece in pieces:
            if deltas and deltas[-1]["index"] == piece.index:
                deltas[-1]["function"]["arguments"] += piece.arguments
            elif piece.name is not None:
                deltas.append({"index": piece.index, **self._call(ToolCall(piece.name, piece.arguments))})
                self.num_calls_sent += 1
            else:
                deltas.append({"index": piece.index, "function": {"arguments": piece.arguments}})
        return deltas

    def finish_reason(self, reason: str | None) -> str | None:
        """Streaming: the last chunk's finish_reason (after its delta: every call is sent)."""
        return self._finish_reason(reason, self.num_calls_sent > 0)

    def _finish_reason(self, reason: str | None, called: bool) -> str | None:
        """ "tool_calls" when the reply holds calls the model chose ("auto") or was made to make ("required",
        unless cut short); a named call keeps the engine's reason, as OpenAI's."""
        chosen = self.request.choice == "auto"
        made = self.request.choice == "required" and reason == "stop"
        return "tool_calls" if called and (chosen or made) else reason

    def _call(self, call: ToolCall) -> dict:
        function = {"name": call.name, "arguments": call.arguments}
        return {"id": self.call_id(), "type": "function", "function": function}
