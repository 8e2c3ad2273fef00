"""OpenAI chat messages -> what chat templates expect, for both LLM.chat and the server's chat endpoint."""

from __future__ import annotations

import json
from typing import Any


class MessageError(ValueError):
    """A message (or a rendering option) that cannot be rendered; `param` is the offending part's path:
    `messages[1].content[0]`, `chat_template_kwargs`."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def text_messages(
    messages: Any, roles: tuple[str, ...] | None = None, fields: tuple[str, ...] | None = None
) -> list[dict]:
    """Each message as a dict with a role and its content as one string: OpenAI's lists of
    {"type": "text", "text": ...} parts are joined with newlines, as vLLM does. `roles` limits the roles
    (None: any string) and `fields` the keys a message may have (None: any, passed on to the template).
    Fields set to None are left out unchecked (a client's `message.model_dump()` of a reply carries
    `tool_calls: None`, `refusal: None`, ...). An assistant's `tool_calls` come out with their arguments
    as objects, which is what templates print (OpenAI sends them as JSON text), and its content may then be
    null; its thinking (`reasoning` or `reasoning_content`, as a --reasoning-parser server returns it) comes
    out as `reasoning_content`, which Qwen3's template reads. Raises MessageError naming the first bad
    part."""
    if not isinstance(messages, list) or not messages:
        raise MessageError("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise MessageError(f"{where} must be an object", where)
        for key, value in m.items():
            if fields is not None and key not in fields and value is not None:  # (only the server limits)
                raise MessageError(f"{where}.{key} is not supported by this server", f"{where}.{key}")
        role = m.get("role")
        if roles is not None and role not in roles:
            raise MessageError(f"{where}.role must be one of {list(roles)}, got {role!r}", f"{where}.role")
        if not isinstance(role, str):
            raise MessageError(f"{where}.role must be a string, got {role!r}", f"{where}.role")
        message = {key: value for key, value in m.items() if value is not None}
        if m.get("tool_calls") is not None:
            if role != "assistant":
                raise MessageError(f"{where}: only an assistant calls tools", f"{where}.tool_calls")
            message["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
        # a reply sent back as the server gave it: its thinking under the name templates read (Qwen3's)
        thinking = next((m[k] for k in ("reasoning_content", "reasoning") if m.get(k) is not None), None)
        if thinking is not None:
            if role != "assistant" or not isinstance(thinking, str):
                raise MessageError(f"{where}: only an assistant's reasoning is a text", f"{where}.reasoning")
            message["reasoning_content"] = thinking
            message.pop("reasoning", None)
        if m.get("tool_call_id") is not None and not isinstance(m["tool_call_id"], str):
            raise MessageError(f"{where}.tool_call_id must be a string", f"{where}.tool_call_id")
        if m.get("content") is None and "tool_calls" in message:
            message["content"] = ""  # (a reply that only called tools)
        else:
            message["content"] = _content_text(m.get("content"), f"{where}.content")
        out.append(message)
    return out


def _tool_calls(calls: Any, where: str) -> list[dict]:
    """OpenAI's [{"id", "type": "function", "function": {"name", "arguments": JSON text}}] with each call's
    arguments parsed (an object; empty: {}), as vLLM hands them to templates."""
    if not isinstance(calls, list):
        raise MessageError(f"{where} must be a list of tool calls", where)
    out = []
    for j, call in enumerate(calls):
        here = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise MessageError(f"{here} must be a function call with a name and arguments", here)
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
                json.dumps(arguments, ensure_ascii=False).encode()  # (an escaped half of a UTF-16 pair)
            except (ValueError, RecursionError) as e:  # (UnicodeEncodeError is a ValueError)
                raise MessageError(f"{here}.function.arguments is not valid JSON text: {e}", here) from None
        if not isinstance(arguments, dict):
            raise MessageError(f"{here}.function.arguments must be a JSON object, got {arguments!r}", here)
        parsed = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if call.get("id") is not None:
            parsed["id"] = call["id"]
        out.append(parsed)
    return out


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise MessageError(f"{where}[{j}]: only text parts are supported", f"{where}[{j}]")
            parts.append(part["text"])
        return "\n".join(parts)
    raise MessageError(f"{where} must be a string or a list of text parts, got {content!r}", where)


# apply_chat_template arguments that are ours to set, not template variables (a server's client may not
# swap the template itself)
_RESERVED_TEMPLATE_KWARGS = (
    "conversation",
    "chat_template",
    "tokenize",
    "return_dict",
    "return_tensors",
    "tools",  # (the request's own field)
)


def check_chat_options(
    add_generation_prompt: bool, continue_final_message: bool, chat_template_kwargs: dict | None
) -> dict:
    """The switches with the template variables over them (vLLM's order: the kwargs win), as
    apply_chat_template's keyword arguments. MessageError (a ValueError) if a kwarg is one of its own
    arguments, or if the result both adds a generation prompt and continues the final message."""
    options = dict(add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message)
    for key, value in (chat_template_kwargs or {}).items():
        if not isinstance(key, str) or key in _RESERVED_TEMPLATE_KWARGS:
            raise MessageError(f"chat_template_kwargs may not set {key!r}", "chat_template_kwargs")
        options[key] = value
    if options["add_generation_prompt"] and options["continue_final_message"]:
        raise MessageError(
            "add_generation_prompt and continue_final_message cannot both be true", "continue_final_message"
        )
    return options


def render_chat(
    tokenizer,
    messages: list[dict],
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict | None = None,
    tools: list[dict] | None = None,
) -> str:
    """The conversation (text_messages' output) as the prompt text the model expects: the tokenizer's chat
    template, or `chat_template`. `chat_template_kwargs` become template variables (Qwen3's
    {"enable_thinking": False}) and, as in vLLM, win over the two switches. `tools`: OpenAI's function tools,
    which the template shows the model. Raises ValueError when the options are contradictory or the
    template fails."""
    options = check_chat_options(add_generation_prompt, continue_final_message, chat_template_kwargs)
    options["chat_template"] = chat_template
    if tools:
        options["tools"] = tools
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except Exception as e:  # jinja and transformers raise many kinds for what a template rejects
        raise ValueError(f"the chat template failed: {e}") from None
